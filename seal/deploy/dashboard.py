"""seal's Grafana dashboard, built from code (never edited in a UI).

``python -m seal.deploy`` writes the JSON model the chart ships as a ConfigMap for
Grafana's dashboard sidecar (``helm/seal/files/grafana/seal-dashboard.json``, read by
``helm/seal/templates/dashboard.yaml``). ``tests/test_observability.py`` checks the file for
drift, parses every panel's PromQL and checks each metric it names exists in the services'
registries, and runs every query against a real Prometheus scraping the running services and
Triton after an Adapt.

Every query uses seal's own metric names (``seal_<service>_<thing>_<unit>``, see the servicers)
and Triton's ``nv_inference_*``. The Prometheus data source is the ``${datasource}`` variable, so
the dashboard works with whichever Prometheus the Grafana instance has.

A counter with labels has no series until its first event, and Prometheus' rate() cannot see
the event that creates it. The services therefore create at 0 the series whose label values are
known up front (promotions and rollbacks of the configured adapter, the gates, the Adapt phases,
each RPC method's OK count, …). Rare events whose label values are not known up front (guardrail
refusals by rule, training failures by exception, re-check outcomes, RPC errors by code) use
:func:`or_zero_while_up`, so that "none yet" shows as 0 rather than as "No data", which would
read as "not scraped"; the zero shows only while the service that would count the event reports.

>>> dashboard = build_dashboard()
>>> dashboard["templating"]["list"][0]["name"], dashboard["uid"]
('datasource', 'seal-overview')
>>> all(target["expr"] for panel in panels_of(dashboard) for target in panel["targets"])
True
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

SERVICES = ("teacher", "student", "auditor")
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# Grafana's own rate window: at least four scrape intervals, so rate() always has two samples.
RATE = "$__rate_interval"
GRID_WIDTH = 24  # Grafana's grid is 24 columns wide
PANEL_HEIGHT = 8
# Triton's model name in seal's model repository (seal.serving.triton.model_repository).
TRITON_MODEL = "seal_student"


# --- PromQL helpers ------------------------------------------------------------------------------


def zero_while_up(service: str) -> str:
    """A single 0 while ``service`` reports (its build_info series exists), nothing otherwise."""
    return f"(0 * group(seal_{service}_build_info))"


def or_zero_while_up(expr: str, service: str) -> str:
    """``expr``, or a 0 while ``service`` reports and ``expr`` has no series (no event yet)."""
    return f"({expr}) or on () {zero_while_up(service)}"


def without_zero_fallback(expr: str) -> str:
    """The query of :func:`or_zero_while_up` without its fallback (tests check it has data of its
    own); other queries unchanged."""
    for service in SERVICES:
        suffix = f" or on () {zero_while_up(service)}"
        if expr.endswith(suffix):
            return expr[: -len(suffix)].removeprefix("(").removesuffix(")")
    return expr


def per_minute(expr: str) -> str:
    return f"60 * {expr}"


def quantile(q: float, bucket_metric: str, by: str = "", selector: str = "") -> str:
    grouping = ", ".join(filter(None, [by, "le"]))
    matchers = f"{{{selector}}}" if selector else ""
    return f"histogram_quantile({q}, sum by ({grouping}) (rate({bucket_metric}{matchers}[{RATE}])))"


def mean_of(histogram: str, by: str = "") -> str:
    """Mean observation over the rate window: rate of the sum over rate of the count (0/0 = no
    observation = NaN, drawn as a gap)."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} (rate({histogram}_sum[{RATE}])) / sum{grouping} (rate({histogram}_count[{RATE}]))"


# --- panel helpers -------------------------------------------------------------------------------


def target(expr: str, legend: str = "", *, instant: bool = False, table: bool = False, heatmap: bool = False) -> dict[str, Any]:
    result: dict[str, Any] = {"datasource": DATASOURCE, "expr": expr, "legendFormat": legend or "__auto"}
    if instant:
        result["instant"], result["range"] = True, False
    if table:
        result["format"] = "table"
    if heatmap:
        result["format"] = "heatmap"
    return result


def panel(
    kind: str, title: str, description: str, targets: list[dict[str, Any]], *, unit: str = "short", width: int = 8,
    options: dict[str, Any] | None = None, custom: dict[str, Any] | None = None, decimals: int | None = None,
) -> dict[str, Any]:
    """One panel; ids, refIds and positions are filled in by :func:`layout`."""
    defaults: dict[str, Any] = {"unit": unit}
    if custom:
        defaults["custom"] = custom
    if decimals is not None:
        defaults["decimals"] = decimals
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DATASOURCE,
        "targets": targets,
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "options": options or {},
        "gridPos": {"w": width, "h": PANEL_HEIGHT},
    }


def timeseries(title: str, description: str, targets: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    return panel("timeseries", title, description, targets, **kwargs)


def quarter_width(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """A row of four panels side by side."""
    for item in panels:
        if item["type"] != "row":
            item["gridPos"]["w"] = GRID_WIDTH // 4
    return panels


def bars(title: str, description: str, targets: list[dict[str, Any]], **kwargs: Any) -> dict[str, Any]:
    """A time series drawn as bars: counts of events per rate window."""
    return panel("timeseries", title, description, targets, custom={"drawStyle": "bars", "fillOpacity": 80}, **kwargs)


def row(title: str) -> dict[str, Any]:
    return {"type": "row", "title": title, "collapsed": False, "panels": [], "gridPos": {"w": GRID_WIDTH, "h": 1}}


# --- the rows ------------------------------------------------------------------------------------


def overview_row() -> list[dict[str, Any]]:
    return [
        row("Overview"),
        panel(
            "stat", "Services reporting",
            "Instances of each service whose /metrics Prometheus scrapes (seal_<service>_build_info is always 1).",
            [target(f"sum(seal_{s}_build_info)", s, instant=True) for s in SERVICES],
        ),
        panel(
            "table", "Served adapter per role",
            "The version the student serves to requests naming none: 'promoted', and 'canary' while a candidate "
            "is under evaluation on Triton ('base' = the base model).",
            [target("max by (role, adapter) (seal_student_served_adapter_info)", instant=True, table=True)],
        ),
        panel(
            "table", "Serving backend",
            "How the student answers Generate (triton or in_process) and where Triton's own metrics are.",
            [target("max by (backend, triton_metrics_url) (seal_student_serving_backend_info)", instant=True, table=True)],
        ),
    ]


def adapt_row() -> list[dict[str, Any]]:
    adapt = 'method="Adapt"'
    return [
        row("Adapt"),
        timeseries(
            "Adapt calls by status", "Adapt RPCs finished per minute, by gRPC status code.",
            [target(per_minute(f"sum by (code) (rate(seal_teacher_rpc_requests_total{{{adapt}}}[{RATE}]))"), "{{code}}")],
        ),
        timeseries(
            "Adapt latency", "Wall time of an Adapt call, the whole stream, refused calls included (histogram quantiles).",
            [target(quantile(q, "seal_teacher_rpc_duration_seconds_bucket", selector=adapt), f"p{int(q * 100)}")
             for q in (0.5, 0.95)],
            unit="s",
        ),
        timeseries(
            "Adapt time by phase",
            "Mean seconds per Adapt call in each phase (generation: writing self-edits and questions; training: all "
            "candidates; scoring: guardrails, baseline and every candidate's evaluation; total: the call).",
            [target(mean_of("seal_teacher_adapt_phase_seconds", "phase"), "{{phase}}")],
            unit="s",
        ),
        timeseries(
            "Self-edits proposed", "Self-edits sampled by the teacher per minute, by prompt style.",
            [target(per_minute(f"sum by (style) (rate(seal_teacher_self_edits_proposed_total[{RATE}]))"), "{{style}}")],
        ),
    ]


def candidates_row() -> list[dict[str, Any]]:
    no_gain = 'le="0.001"'  # the reward bucket holding "no gain" (reward ≤ 0.001)
    return [
        row("Candidates and rewards"),
        timeseries(
            "Candidates trained and scored",
            "Per minute: candidate adapters the student trained, training runs that failed (by exception), and "
            "candidates the auditor scored (pass = every gate passed).",
            [
                target(per_minute(f"sum(rate(seal_student_candidates_trained_total[{RATE}]))"), "trained"),
                target(or_zero_while_up(
                    per_minute(f"sum by (reason) (rate(seal_student_training_failures_total[{RATE}]))"), "student"),
                    "training failed {{reason}}"),
                target(per_minute(f"sum by (decision) (rate(seal_auditor_candidates_scored_total[{RATE}]))"),
                       "scored: {{decision}}"),
            ],
        ),
        timeseries(
            "Candidate training time", "Wall time of one candidate's LoRA training (histogram quantiles).",
            [target(quantile(q, "seal_student_training_seconds_bucket"), f"p{int(q * 100)}") for q in (0.5, 0.95)],
            unit="s",
        ),
        panel(
            "heatmap", "Reward distribution",
            "SEAL reward (adapted − baseline accuracy on τ) of scored candidates, by histogram bucket.",
            [target(f"sum by (le) (increase(seal_auditor_reward_bucket[{RATE}]))", "{{le}}", heatmap=True)],
            options={"calculate": False, "yAxis": {"unit": "short"}, "cellGap": 1},
        ),
        timeseries(
            "Reward quantiles and share rewarded",
            "Median and 90th percentile reward, and the share of scored candidates that gained anything (reward "
            "above 0.001). No mean: the histogram's _sum goes down with negative rewards, which rate() would "
            "take for a counter reset.",
            [
                target(quantile(0.5, "seal_auditor_reward_bucket"), "p50 reward"),
                target(quantile(0.9, "seal_auditor_reward_bucket"), "p90 reward"),
                target(f"1 - sum(rate(seal_auditor_reward_bucket{{{no_gain}}}[{RATE}])) "
                       f"/ sum(rate(seal_auditor_reward_count[{RATE}]))", "share rewarded"),
            ],
            decimals=2,
        ),
    ]


def decisions_row() -> list[dict[str, Any]]:
    return [
        row("Promotions and gates"),
        bars(
            "Promotions vs no promotion, by reason",
            "Adapt calls that promoted a candidate, and those that did not by why: the first failed gate of the "
            "best-rewarded candidate, or why none was scored (guardrails, training_failed, scoring_failed, no_candidates).",
            [
                target(f"sum(increase(seal_teacher_promotions_total[{RATE}]))", "promoted"),
                target(f"sum by (reason) (increase(seal_teacher_no_promotion_total[{RATE}]))", "not promoted: {{reason}}"),
            ],
        ),
        bars(
            "Gate failures by gate",
            "Failed gates at every decision point: guardrail:<rule> before training, tau_gain, retention, "
            "retention_kl and guardrails after scoring.",
            [target(f"sum by (gate) (increase(seal_auditor_gate_failures_total[{RATE}]))", "{{gate}}")],
        ),
        bars(
            "Guardrail failures by rule", "Self-edits refused by each guardrail rule.",
            [target(or_zero_while_up(f"sum by (rule) (increase(seal_auditor_guardrail_failures_total[{RATE}]))",
                                     "auditor"), "{{rule}}")],
        ),
        timeseries(
            "Retention accuracy of the promoted adapter",
            "Retention-probe accuracy of each adapter's promoted version at its last re-check (the floor is "
            "retention.recheck_floor).",
            [target("max by (adapter) (seal_auditor_promoted_retention_accuracy)", "{{adapter}}")],
            unit="percentunit",
        ),
        bars(
            "Retention re-checks by outcome", "Re-checks of promoted versions: ok, rolled_back, not_measured, …",
            [target(or_zero_while_up(f"sum by (outcome) (increase(seal_auditor_rechecks_total[{RATE}]))", "auditor"),
                    "{{outcome}}")],
        ),
        bars(
            "Rollbacks: all vs automatic",
            "Every rollback the student carried out, and those the auditor's re-check triggered; the difference "
            "is operators' rollbacks (seal adapters rollback).",
            [
                target(f"sum(increase(seal_student_rollbacks_total[{RATE}]))", "all (student)"),
                target(f"sum(increase(seal_auditor_auto_rollbacks_total[{RATE}]))", "automatic (auditor re-check)"),
            ],
        ),
    ]


def restem_row() -> list[dict[str, Any]]:
    return [
        row("ReST^EM"),
        bars(
            "ReST^EM rounds and kept self-edits",
            "Teacher-policy training rounds finished, and the self-edits each kept for its SFT, by keep rule.",
            [
                target(f"sum by (keep_rule) (increase(seal_teacher_restem_rounds_total[{RATE}]))", "rounds {{keep_rule}}"),
                target(f"sum by (keep_rule) (increase(seal_teacher_restem_kept_self_edits_total[{RATE}]))",
                       "kept {{keep_rule}}"),
            ],
            width=12,
        ),
        timeseries(
            "Self-edit generation time", "Wall time to sample an Adapt's k self-edits (histogram quantiles).",
            [target(quantile(q, "seal_teacher_generation_seconds_bucket"), f"p{int(q * 100)}") for q in (0.5, 0.95)],
            unit="s", width=12,
        ),
    ]


def generate_row() -> list[dict[str, Any]]:
    return [
        row("Generate (student)"),
        timeseries(
            "Generate calls per adapter", "Generate calls per second, by the version that served them ('base' = none).",
            [target(f"sum by (adapter) (rate(seal_student_generate_requests_total[{RATE}]))", "{{adapter}}")],
            unit="reqps",
        ),
        timeseries(
            "Generate latency per adapter", "95th percentile wall time of a Generate call, by serving version.",
            [target(quantile(0.95, "seal_student_generate_seconds_bucket", by="adapter"), "{{adapter}}")],
            unit="s",
        ),
        timeseries(
            "Generated tokens per adapter", "Completion tokens per second, by serving version.",
            [target(f"sum by (adapter) (rate(seal_student_generated_tokens_total[{RATE}]))", "{{adapter}}")],
        ),
        timeseries(
            "Adapter swap time", "95th percentile time to change the served version (registry and server), by operation.",
            [target(quantile(0.95, "seal_student_adapter_swap_seconds_bucket", by="operation"), "{{operation}}")],
            unit="s",
        ),
    ]


def triton_row() -> list[dict[str, Any]]:
    model = f'model="{TRITON_MODEL}"'

    def per_request(counter: str) -> str:
        # Triton's *_duration_us are cumulative microseconds; per successful request, in seconds.
        return (f"sum(rate({counter}{{{model}}}[{RATE}])) / sum(rate(nv_inference_request_success{{{model}}}[{RATE}])) "
                "/ 1e6")

    return [
        row("Triton"),
        timeseries(
            "Triton inference requests", "Triton's own count of inference requests per second, successes and failures by reason.",
            [
                target(f"sum by (model) (rate(nv_inference_request_success[{RATE}]))", "success {{model}}"),
                target(f"sum by (model, reason) (rate(nv_inference_request_failure[{RATE}]))", "failure {{reason}}"),
            ],
            unit="reqps",
        ),
        timeseries(
            "Triton time per request", "Mean seconds per request Triton spent queued and in each compute stage.",
            [
                target(per_request("nv_inference_queue_duration_us"), "queue"),
                target(per_request("nv_inference_compute_input_duration_us"), "compute input"),
                target(per_request("nv_inference_compute_infer_duration_us"), "compute infer"),
                target(per_request("nv_inference_compute_output_duration_us"), "compute output"),
                target(per_request("nv_inference_request_duration_us"), "request (end to end)"),
            ],
            unit="s",
        ),
        timeseries(
            "Triton queue and batching",
            "Requests waiting in Triton, and inferences per model execution (above 1 = requests batched together).",
            [
                target("sum by (model) (nv_inference_pending_request_count)", "pending {{model}}"),
                target(f"sum by (model) (rate(nv_inference_count[{RATE}])) / sum by (model) (rate(nv_inference_exec_count[{RATE}]))",
                       "inferences per execution {{model}}"),
            ],
        ),
    ]


def rpc_row() -> list[dict[str, Any]]:
    def error_ratio(service: str) -> str:
        requests = f"seal_{service}_rpc_requests_total"
        ratio = (f'sum by (method, code) (rate({requests}{{code!="OK"}}[{RATE}])) '
                 f"/ on (method) group_left sum by (method) (rate({requests}[{RATE}]))")
        return or_zero_while_up(ratio, service)

    return [
        row("RPCs"),
        timeseries(
            "RPC error ratio by method and code",
            "Share of each method's calls that ended with each non-OK status, per service. Client errors "
            "(INVALID_ARGUMENT, NOT_FOUND, …) show here; the alert counts only server errors.",
            [target(error_ratio(s), f"{s} {{{{method}}}} {{{{code}}}}") for s in SERVICES],
            unit="percentunit",
        ),
        timeseries(
            "RPC rate by method", "Calls per second per method, per service.",
            [target(f"sum by (method) (rate(seal_{s}_rpc_requests_total[{RATE}]))", f"{s} {{{{method}}}}") for s in SERVICES],
            unit="reqps",
        ),
        timeseries(
            "RPC latency by method", "95th percentile wall time per method (streams until their last message), per service.",
            [target(quantile(0.95, f"seal_{s}_rpc_duration_seconds_bucket", by="method"), f"{s} {{{{method}}}}")
             for s in SERVICES],
            unit="s",
        ),
    ]


# --- the dashboard -------------------------------------------------------------------------------


def layout(panels: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Number panels and their queries and place them left to right, wrapping at the grid's width;
    a row starts a new line."""
    x = y = line_height = 0
    for panel_id, item in enumerate(panels, start=1):
        item["id"] = panel_id
        width, height = item["gridPos"]["w"], item["gridPos"]["h"]
        if item["type"] == "row" or x + width > GRID_WIDTH:
            x, y = 0, y + line_height
            line_height = 0
        item["gridPos"] = {"h": height, "w": width, "x": x, "y": y}
        x, line_height = x + width, max(line_height, height)
        if item["type"] == "row":
            x, y, line_height = 0, y + height, 0
        for index, query in enumerate(item.get("targets", [])):
            query["refId"] = chr(ord("A") + index)
    return panels


def datasource_variable() -> dict[str, Any]:
    return {
        "name": "datasource",
        "label": "Prometheus",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
        "hide": 0,
        "refresh": 1,
        "options": [],
    }


def build_dashboard() -> dict[str, Any]:
    """The Grafana dashboard JSON model."""
    panels = [
        *overview_row(), *quarter_width(adapt_row()), *quarter_width(candidates_row()), *decisions_row(),
        *restem_row(), *quarter_width(generate_row()), *triton_row(), *rpc_row(),
    ]
    return {
        "uid": "seal-overview",
        "title": "seal",
        "description": "seal's teacher, student and auditor: adaptation, governance, serving and RPCs.",
        "tags": ["seal"],
        "editable": False,
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "refresh": "30s",
        "timezone": "browser",
        "graphTooltip": 1,  # a shared crosshair: one moment across every panel
        "templating": {"list": [datasource_variable()]},
        "annotations": {"list": []},
        "links": [],
        "panels": layout(panels),
    }


def panels_of(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel with queries (not the rows)."""
    return (item for item in dashboard["panels"] if item["type"] != "row")


def render_dashboard_json() -> str:
    return json.dumps(build_dashboard(), indent=2, ensure_ascii=False) + "\n"

