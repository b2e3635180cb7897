"""seal's Prometheus alerts, as a rule file (``{"groups": [...]}``) built from code.

The chart ships them as a PrometheusRule (``helm/seal/templates/prometheusrule.yaml`` reads
``helm/seal/files/prometheus/seal-alerts.yaml``, which ``python -m seal.deploy``
writes); ``tests/test_observability.py`` checks the file for drift, runs ``promtool check rules``
and ``promtool test rules`` (``tests/prometheus/seal-alerts.test.yaml``) on it, and loads it into a
real Prometheus scraping the running services.

Written the way llm-d recommends for serving alerts:

* ratios are silent at 0/0: a ratio of two empty or zero increases is empty or NaN, and NaN
  compares false, so an idle service never alerts;
* every ratio has a minimum-traffic floor (``and on () … >= floor``): one failure in two calls
  is 50 % and means nothing;
* a vanished target is caught by ``absent()`` on a series that always exists
  (``seal_<service>_build_info``), not by a ratio that merely goes quiet;
* ``severity`` is ``warning`` (look during working hours) or ``critical`` (users are affected
  now); every alert carries ``summary``, ``description`` and a ``runbook`` link to its section of
  ``helm/seal/ALERTS.md``.

>>> rules = build_rules()
>>> sorted(group["name"] for group in rules["groups"])
['seal.adaptation', 'seal.availability', 'seal.rpc']
>>> {rule["labels"]["severity"] for group in rules["groups"] for rule in group["rules"]}
{'critical', 'warning'}
"""

from __future__ import annotations

from typing import Any

import yaml

SERVICES = ("teacher", "student", "auditor")

# Where each alert's runbook lives: its own section (``### <AlertName>``, GitHub's anchor is the
# lower-cased name) of the chart's alerts document, which the README links.
RUNBOOK = "helm/seal/ALERTS.md"

# --- RPC errors ----------------------------------------------------------------------------------

# Status codes that blame the service, not the caller. INVALID_ARGUMENT, NOT_FOUND,
# FAILED_PRECONDITION, PERMISSION_DENIED, RESOURCE_EXHAUSTED (the teacher is busy with another
# Adapt) and CANCELLED (the client left) are answers a correct service gives to a bad or
# impatient request; alerting on them would page for other people's bugs.
SERVER_ERROR_CODES = ("UNKNOWN", "INTERNAL", "UNAVAILABLE", "DATA_LOSS", "DEADLINE_EXCEEDED", "UNIMPLEMENTED")
# Long enough to hold a few Adapt calls (minutes each), short enough to page within the hour.
RPC_ERROR_WINDOW = "15m"
# Calls of one method in the window below which its error ratio is not judged (~1.3 calls a
# minute): a handful of calls makes any single failure look like an outage.
RPC_MIN_CALLS = 20
# A few failures in a hundred: something is wrong but most requests succeed.
RPC_ERROR_RATIO_WARNING = 0.05
# One call in four failing: users are affected now.
RPC_ERROR_RATIO_CRITICAL = 0.25

# --- adaptation ----------------------------------------------------------------------------------

# Adapt calls normally promote now and then; hours of decided calls without one mean the gates
# refuse everything (a τ set the model cannot learn, a retention probe that no longer fits, a
# guardrail misfiring) and the model is no longer adapting at all.
NO_PROMOTION_WINDOW = "6h"
# Decided Adapt calls (promoted nothing) in the window before "no promotion" means something: a
# few refusals in a row are the gates doing their job.
NO_PROMOTION_MIN_ADAPTS = 5

# Scored candidates in the window, and the share of them failing one retention gate, above which
# forgetting is systemic (a learning rate or update rule that overwrites old knowledge) rather
# than one bad self-edit.
RETENTION_WINDOW = "1h"
RETENTION_MIN_SCORED = 5
RETENTION_FAILURE_RATIO = 0.5
RETENTION_GATES = ("retention", "retention_kl")

# A promoted version was rolled back by the auditor's re-check: firing for this long after it.
AUTO_ROLLBACK_WINDOW = "30m"

# Reward collapse across a ReST^EM round: the share of scored self-edits with a positive reward in
# the window after a round, against the window before it. Rewards are compared through the
# histogram's buckets because its _sum goes down with negative rewards, which rate() and
# increase() would read as counter resets.
REWARD_WINDOW = "2h"
# The reward histogram's bucket boundary between "no gain" (reward ≤ 0.001, the τ accuracy did
# not move) and a gain; must be one of the auditor's reward buckets.
NO_GAIN_BUCKET = "0.001"
# Scored candidates needed in each window before their shares are compared.
REWARD_MIN_SCORED = 10
# The positive share falling below this fraction of what it was: the new policy writes
# self-edits that teach half as often as the one it replaced.
REWARD_COLLAPSE_FACTOR = 0.5

# --- availability --------------------------------------------------------------------------------

# Triton's model name in seal's model repository (seal.serving.triton.model_repository).
TRITON_MODEL = "seal_student"
# Longer than a model reload after a restart, shorter than anyone would wait for Generate.
TRITON_NOT_READY_FOR = "5m"
# Prometheus marks a vanished target's series stale after one missed scrape and absent() turns
# true; five minutes lets a rolling restart (new pod scraped, old one gone) pass quietly.
METRICS_ABSENT_FOR = "5m"


# --- helpers -------------------------------------------------------------------------------------


def alert(
    name: str, expr: str, *, severity: str, summary: str, description: str, for_: str = "0m",
    labels: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One alerting rule in Prometheus' rule-file format."""
    if severity not in ("warning", "critical"):
        raise ValueError(f"severity {severity!r}: use warning or critical")
    return {
        "alert": name,
        "expr": expr,
        "for": for_,
        "labels": {"severity": severity, **(labels or {})},
        "annotations": {
            "summary": summary,
            "description": description,
            "runbook": f"{RUNBOOK}#{name.lower()}",
        },
    }


def codes_regex(codes: tuple[str, ...]) -> str:
    return "|".join(codes)


def increase_by(metric: str, window: str, by: str = "", selector: str = "", offset: str = "") -> str:
    """``sum by (by) (increase(metric{selector}[window] offset …))``; ``by=""`` sums everything."""
    grouping = f" by ({by})" if by else ""
    matchers = f"{{{selector}}}" if selector else ""
    shifted = f" offset {offset}" if offset else ""
    return f"sum{grouping} (increase({metric}{matchers}[{window}]{shifted}))"


# --- the alerts ----------------------------------------------------------------------------------


def rpc_error_ratio_alerts(service: str) -> list[dict[str, Any]]:
    """Warning and critical on the share of a method's calls failing with a server error."""
    requests = f"seal_{service}_rpc_requests_total"
    failed = increase_by(requests, RPC_ERROR_WINDOW, "method", f'code=~"{codes_regex(SERVER_ERROR_CODES)}"')
    every = increase_by(requests, RPC_ERROR_WINDOW, "method")
    rules = []
    for severity, ratio, for_ in (
        ("warning", RPC_ERROR_RATIO_WARNING, "15m"),
        ("critical", RPC_ERROR_RATIO_CRITICAL, "5m"),
    ):
        rules.append(alert(
            "SealRpcErrorRatio",
            f"(\n  {failed}\n  /\n  {every}\n) > {ratio}\nand on (method)\n{every} >= {RPC_MIN_CALLS}",
            severity=severity,
            for_=for_,
            labels={"service": service},
            summary=f"seal {service}: {{{{ $labels.method }}}} fails with server errors",
            description=(
                f"{{{{ $value | humanizePercentage }}}} of {service} {{{{ $labels.method }}}} calls in the last "
                f"{RPC_ERROR_WINDOW} ended with {', '.join(SERVER_ERROR_CODES)} (threshold {ratio:.0%}; judged "
                f"only from {RPC_MIN_CALLS} calls on)."
            ),
        ))
    return rules


def no_promotion_alert() -> dict[str, Any]:
    decided_without = increase_by("seal_teacher_no_promotion_total", NO_PROMOTION_WINDOW, "adapter")
    promoted = increase_by("seal_teacher_promotions_total", NO_PROMOTION_WINDOW, "adapter")
    return alert(
        "SealNoPromotion",
        f"{decided_without} >= {NO_PROMOTION_MIN_ADAPTS}\nunless on (adapter)\n{promoted} > 0",
        severity="warning",
        for_="15m",
        summary="seal: adapter {{ $labels.adapter }} has promoted nothing for " + NO_PROMOTION_WINDOW,
        description=(
            "{{ $value | humanize }} Adapt calls for {{ $labels.adapter }} promoted nothing in the last "
            f"{NO_PROMOTION_WINDOW}, and none promoted anything. The dashboard's no-promotion reasons say "
            "which gate refuses."
        ),
    )


def retention_failures_alert() -> dict[str, Any]:
    failures = increase_by(
        "seal_auditor_gate_failures_total", RETENTION_WINDOW, "gate", f'gate=~"{codes_regex(RETENTION_GATES)}"'
    )
    scored = increase_by("seal_auditor_candidates_scored_total", RETENTION_WINDOW)
    return alert(
        "SealRetentionGateFailures",
        f"(\n  {failures}\n  / on () group_left\n  {scored}\n) > {RETENTION_FAILURE_RATIO}\n"
        f"and on ()\n{scored} >= {RETENTION_MIN_SCORED}",
        severity="warning",
        for_="15m",
        summary="seal: most candidates fail the {{ $labels.gate }} gate",
        description=(
            "{{ $value | humanizePercentage }} of the candidates scored in the last " + RETENTION_WINDOW
            + " failed the {{ $labels.gate }} gate (threshold " + f"{RETENTION_FAILURE_RATIO:.0%}"
            + "): adapters forget what the base model knew."
        ),
    )


def auto_rollback_alert() -> dict[str, Any]:
    return alert(
        "SealAutomaticRollback",
        f"{increase_by('seal_auditor_auto_rollbacks_total', AUTO_ROLLBACK_WINDOW, 'adapter')} > 0",
        # The auditor already acted (the previous version serves again): nobody needs waking,
        # but a promoted version forgot what the gates said it kept, and someone must find out why.
        severity="warning",
        summary="seal: the auditor rolled back adapter {{ $labels.adapter }}",
        description=(
            "A retention re-check found the promoted version of {{ $labels.adapter }} below the floor in the last "
            f"{AUTO_ROLLBACK_WINDOW} and rolled it back; the audit trail has the rollback record and its cause."
        ),
    )


def positive_reward_share(offset: str = "") -> str:
    no_gain = increase_by("seal_auditor_reward_bucket", REWARD_WINDOW, selector=f'le="{NO_GAIN_BUCKET}"', offset=offset)
    scored = increase_by("seal_auditor_reward_count", REWARD_WINDOW, offset=offset)
    return f"(1 - {no_gain} / {scored})"


def reward_collapse_alert() -> dict[str, Any]:
    scored_now = increase_by("seal_auditor_reward_count", REWARD_WINDOW)
    scored_before = increase_by("seal_auditor_reward_count", REWARD_WINDOW, offset=REWARD_WINDOW)
    rounds = increase_by("seal_teacher_restem_rounds_total", REWARD_WINDOW)
    return alert(
        "SealRewardCollapse",
        f"{positive_reward_share()}\n< {REWARD_COLLAPSE_FACTOR} * {positive_reward_share(REWARD_WINDOW)}\n"
        f"and on () {rounds} > 0\n"
        f"and on () {scored_now} >= {REWARD_MIN_SCORED}\n"
        f"and on () {scored_before} >= {REWARD_MIN_SCORED}",
        severity="warning",
        summary="seal: self-edits stopped teaching after a ReST^EM round",
        description=(
            "Only {{ $value | humanizePercentage }} of the self-edits scored in the last " + REWARD_WINDOW
            + " gained reward, under " + f"{REWARD_COLLAPSE_FACTOR:.0%}" + " of the share in the "
            + REWARD_WINDOW + " before, and a ReST^EM round finished in between: the new teacher policy is worse."
        ),
    )


def triton_not_ready_alert() -> dict[str, Any]:
    # Per pod where the labels exist (a ServiceMonitor scrapes the student's two ports from the
    # same pod); one global comparison on a Prometheus without them.
    serving = 'count by (namespace, pod) (seal_student_serving_backend_info{backend="triton"})'
    loaded = f'count by (namespace, pod) (nv_inference_request_success{{model="{TRITON_MODEL}"}})'
    return alert(
        "SealTritonNotReady",
        f"{serving}\nunless on (namespace, pod)\n{loaded}",
        severity="critical",
        for_=TRITON_NOT_READY_FOR,
        summary="seal: the student serves through Triton but Triton reports no loaded model",
        description=(
            f"A student configured with backend=triton is up, but no Triton metrics for model {TRITON_MODEL} "
            f"have been scraped for {TRITON_NOT_READY_FOR}: tritonserver is down, its model failed to load, or "
            "its metrics port is not scraped. Generate and candidate scoring fail meanwhile."
        ),
    )


def metrics_absent_alert(service: str) -> dict[str, Any]:
    return alert(
        "SealMetricsAbsent",
        f"absent(seal_{service}_build_info)",
        severity="critical",
        for_=METRICS_ABSENT_FOR,
        labels={"service": service},
        summary=f"seal {service}: no metrics",
        description=(
            f"Prometheus has scraped no seal_{service}_build_info for {METRICS_ABSENT_FOR}: the {service} is down, "
            "crash-looping, or no longer scraped (ServiceMonitor, NetworkPolicy). Every other seal alert about it is "
            "blind meanwhile."
        ),
    )


def build_rules() -> dict[str, Any]:
    """The rule file: availability, RPC errors and adaptation health."""
    return {
        "groups": [
            {
                "name": "seal.availability",
                "rules": [*(metrics_absent_alert(s) for s in SERVICES), triton_not_ready_alert()],
            },
            {
                "name": "seal.rpc",
                "rules": [rule for service in SERVICES for rule in rpc_error_ratio_alerts(service)],
            },
            {
                "name": "seal.adaptation",
                "rules": [
                    no_promotion_alert(),
                    retention_failures_alert(),
                    auto_rollback_alert(),
                    reward_collapse_alert(),
                ],
            },
        ]
    }


class _BlockDumper(yaml.SafeDumper):
    """Multi-line strings (the expressions) as literal blocks, as people write rule files."""


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_BlockDumper.add_representer(str, _represent_str)


def render_rules_yaml() -> str:
    header = "# Generated by seal/deploy/alerts.py (python -m seal.deploy); do not edit.\n"
    return header + yaml.dump(build_rules(), Dumper=_BlockDumper, sort_keys=False, width=1000, allow_unicode=True)

