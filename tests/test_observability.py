"""The Grafana dashboard and the Prometheus alerts (seal/deploy/dashboard.py, seal/deploy/alerts.py)
checked with the real tools: the committed files match their generators; every panel query is
valid PromQL naming metrics the services really export; ``promtool check rules`` and
``promtool test rules`` pass, and the tests' floors are what keeps the silent cases silent; and
(slow) a real Prometheus on loopback scraping the three running services and Triton answers every
query of every panel with data after an Adapt."""

from __future__ import annotations

import json
import math
import re
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import grpc
import promql_parser
import pytest
import yaml
from google.protobuf import empty_pb2

from seal.deploy import alerts, dashboard
from seal.v1 import (
    auditor_pb2,
    auditor_pb2_grpc,
    common_pb2,
    student_pb2,
    student_pb2_grpc,
    teacher_pb2,
    teacher_pb2_grpc,
)
from tools import ROOT, tool

DASHBOARD_FILE = ROOT / "helm/seal/files/grafana/seal-dashboard.json"
ALERTS_FILE = ROOT / "helm/seal/files/prometheus/seal-alerts.yaml"
ALERTS_TEST_FILE = ROOT / "tests/prometheus/seal-alerts.test.yaml"
ALERTS_DOC = ROOT / "helm/seal/ALERTS.md"
# Grafana fills these in; any valid duration will do for parsing.
GRAFANA_VARIABLES = ("$__rate_interval", "$__interval", "$__range")


def with_window(expr: str, window: str) -> str:
    for variable in GRAFANA_VARIABLES:
        expr = expr.replace(variable, window)
    return expr


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, query) of every target of every panel of the committed dashboard."""
    model = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    return [(panel["title"], target["expr"]) for panel in dashboard.panels_of(model) for target in panel["targets"]]


def alert_rules() -> list[dict[str, Any]]:
    return [rule for group in yaml.safe_load(ALERTS_FILE.read_text(encoding="utf-8"))["groups"] for rule in group["rules"]]


def metric_names(expr: str) -> set[str]:
    """Every metric a PromQL expression selects, from its syntax tree."""
    names: set[str] = set()

    def visit(node: Any) -> None:
        if isinstance(node, promql_parser.VectorSelector):
            if node.name:
                names.add(node.name)
            names.update(m.value for m in node.matchers.matchers if m.name == "__name__")

    promql_parser.walk(promql_parser.parse(expr), visit)
    return names


def exposed_names(registry: Any) -> set[str]:
    """The series names a prometheus_client registry exposes, even for metrics with no sample yet
    (a labelled counter before its first event)."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",), "info": ("_info",)}
    return {f"{family.name}{suffix}" for family in registry.collect() for suffix in suffixes[family.type]}


# --- generated files ----------------------------------------------------------------------------


def test_the_committed_dashboard_and_alerts_match_their_generators() -> None:
    assert DASHBOARD_FILE.read_text(encoding="utf-8") == dashboard.render_dashboard_json(), (
        "stale: run `.venv/bin/python -m seal.deploy`")
    assert ALERTS_FILE.read_text(encoding="utf-8") == alerts.render_rules_yaml(), (
        "stale: run `.venv/bin/python -m seal.deploy`")


def test_seal_deploy_writes_the_dashboard_and_alerts_into_a_chart_directory(tmp_path: Path) -> None:
    from seal.deploy.__main__ import main

    assert main(["--chart-dir", str(tmp_path)]) == 0
    assert json.loads((tmp_path / "files/grafana/seal-dashboard.json").read_text())["uid"] == "seal-overview"
    assert yaml.safe_load((tmp_path / "files/prometheus/seal-alerts.yaml").read_text()) == alerts.build_rules()
    assert main(["--chart-dir", str(tmp_path), "--check"]) == 0
    (tmp_path / "values.yaml").write_text("edited by hand\n")
    assert main(["--chart-dir", str(tmp_path), "--check"]) == 1


# --- the dashboard ------------------------------------------------------------------------------


def test_the_dashboard_uses_the_datasource_variable_rows_and_unique_ids() -> None:
    model = json.loads(DASHBOARD_FILE.read_text(encoding="utf-8"))
    [variable] = model["templating"]["list"]
    assert (variable["name"], variable["type"], variable["query"]) == ("datasource", "datasource", "prometheus")
    assert model["panels"][0]["type"] == "row"
    assert len([p for p in model["panels"] if p["type"] == "row"]) >= 6
    ids = [p["id"] for p in model["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard.panels_of(model):
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, panel["title"]
        assert panel["targets"] and panel["description"], panel["title"]
        assert all(t["datasource"]["uid"] == "${datasource}" for t in panel["targets"]), panel["title"]
        assert len({t["refId"] for t in panel["targets"]}) == len(panel["targets"]), panel["title"]
        assert 0 <= panel["gridPos"]["x"] and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24, panel["title"]


def test_the_dashboard_covers_what_operators_asked_for() -> None:
    """Each thing the dashboard must show, by the metric that shows it."""
    used = set().union(*(metric_names(with_window(q, "5m")) for _, q in dashboard_queries()))
    required = {
        "seal_teacher_rpc_requests_total", "seal_teacher_rpc_duration_seconds_bucket",  # Adapt rate, latency
        "seal_teacher_adapt_phase_seconds_sum",  # Adapt latency by phase
        "seal_student_candidates_trained_total", "seal_auditor_candidates_scored_total",
        "seal_auditor_reward_bucket",  # reward distribution
        "seal_teacher_promotions_total", "seal_teacher_no_promotion_total",  # promotions vs no promotion by reason
        "seal_auditor_gate_failures_total", "seal_auditor_guardrail_failures_total",
        "seal_auditor_promoted_retention_accuracy",
        "seal_student_rollbacks_total", "seal_auditor_auto_rollbacks_total",  # operator vs automatic
        "seal_teacher_restem_rounds_total", "seal_teacher_restem_kept_self_edits_total",
        "seal_student_generate_seconds_bucket", "seal_student_generated_tokens_total",
        "seal_student_served_adapter_info",
        "nv_inference_request_success", "nv_inference_queue_duration_us",
        "seal_student_rpc_requests_total", "seal_auditor_rpc_requests_total",  # RPC error ratio
    }
    assert required <= used, required - used


def test_every_panel_query_parses() -> None:
    failures = []
    for title, query in dashboard_queries():
        for variant in {query, dashboard.without_zero_fallback(query)}:
            try:
                promql_parser.parse(with_window(variant, "5m"))
            except ValueError as exc:
                failures.append(f"{title}: {variant}: {exc}")
    assert not failures, "\n".join(failures)


def test_the_parser_refuses_broken_promql() -> None:
    """The check above can fail: a typo the dashboard could contain is refused."""
    with pytest.raises(ValueError):
        promql_parser.parse('sum by (code) (rate(seal_teacher_rpc_requests_total{method="Adapt"}[5m])')
    assert metric_names('a_total / on () group_left sum(b_bucket{le="1"}) or {__name__="c"}') == {"a_total", "b_bucket", "c"}


@pytest.fixture(scope="module")
def service_metric_names(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, one_torch_thread) -> set[str]:
    """The names the three services' registries expose, from the servicers themselves."""
    from auditor_svc.servicer import AuditorServicer
    from seal.config import Settings
    from seal.rpc import RpcMetrics
    from seal.serving import resolve_backend
    from seal.student import Student
    from student_svc.servicer import StudentServicer
    from teacher_svc.servicer import TeacherServicer

    settings = Settings(home=tmp_path_factory.mktemp("registries"), model={"path": str(tiny_model_dir), "torch_threads": 1},
                        student_serving={"backend": "in_process"})
    names: set[str] = set()
    nowhere = grpc.insecure_channel("127.0.0.1:9")  # never called: only the metrics are wanted
    try:
        metrics = RpcMetrics("teacher")
        TeacherServicer(settings, None, nowhere, nowhere, metrics)  # type: ignore[arg-type]
        names |= exposed_names(metrics.registry)
        metrics = RpcMetrics("auditor")
        auditor = AuditorServicer(settings, nowhere, metrics)
        auditor.core.close()
        names |= exposed_names(metrics.registry)
        metrics = RpcMetrics("student")
        student = Student(settings, serving=resolve_backend(settings))
        try:
            StudentServicer(student, settings, metrics)
        finally:
            student.close()
        names |= exposed_names(metrics.registry)
    finally:
        nowhere.close()
    return names


def test_every_seal_metric_a_panel_or_alert_names_is_exported_by_a_service(service_metric_names: set[str]) -> None:
    """Triton's nv_inference_* names are checked against a real Triton in the slow test."""
    queries = [q for _, q in dashboard_queries()] + [rule["expr"] for rule in alert_rules()]
    named = set().union(*(metric_names(with_window(q, "5m")) for q in queries))
    assert {n for n in named if not n.startswith("seal_")} <= {n for n in named if n.startswith("nv_inference_")}
    missing = {n for n in named if n.startswith("seal_")} - service_metric_names
    assert not missing, f"queries name metrics no service exports: {sorted(missing)}"
    assert "seal_teacher_adapt_phase_seconds_bucket" in service_metric_names  # the check sees real names


def test_the_no_promotion_reason_is_a_bounded_label_naming_the_blocking_gate() -> None:
    from seal.adapt import CandidateFailed, CandidateScored, Score
    from seal.gates import GateResult
    from teacher_svc.servicer import NO_PROMOTION_REASONS, no_promotion_reason_label

    def scored(index: int, reward: float, *failed_gates: str) -> CandidateScored:
        gates = tuple(GateResult(g, False, None, None, f"{g} failed") for g in failed_gates)
        gates += (GateResult("tau_gain", True, reward, 0.0, "ok"),) if "tau_gain" not in failed_gates else ()
        return CandidateScored(index, f"a@v{index}", Score(0.5, 0.5, reward, False, gates, ()), 1.0)

    refused = CandidateFailed(0, "guardrails failed before training: guardrail:secrets",
                              (GateResult("guardrail:secrets", False, None, None, "a key"),))
    untrained = CandidateFailed(1, "training failed: too long")
    unscored = CandidateFailed(2, "scoring failed: unknown version", stage="scoring")
    cases = [
        # The best-rewarded candidate's first failed gate, whatever the others failed.
        ("retention", (), (scored(0, -0.5, "tau_gain"), scored(1, 0.2, "retention", "retention_kl"))),
        ("guardrails", (refused,), (scored(1, 0.0, "guardrail:prompt_injection"),)),
        ("other", (), (scored(0, 0.0, "canary:agreement"),)),
        # Nothing scored: why the first candidate never was.
        ("guardrails", (untrained, refused), ()),
        ("training_failed", (untrained,), ()),
        ("scoring_failed", (unscored,), ()),
        ("no_candidates", (), ()),
    ]
    for expected, failed, scored_ones in cases:
        label = no_promotion_reason_label(list(failed), list(scored_ones))
        assert label == expected and label in NO_PROMOTION_REASONS, (expected, label)


# --- the alerts ---------------------------------------------------------------------------------


def test_every_alert_has_a_severity_summary_description_and_a_runbook_section() -> None:
    doc = ALERTS_DOC.read_text(encoding="utf-8")
    assert "## Alerts" in doc
    sections = {line.removeprefix("### ").strip().lower() for line in doc.splitlines() if line.startswith("### ")}
    for rule in alert_rules():
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description", "runbook"}, rule["alert"]
        path, _, anchor = rule["annotations"]["runbook"].partition("#")
        assert (ROOT / path) == ALERTS_DOC and anchor in sections, rule["annotations"]["runbook"]
    assert {r["labels"]["severity"] for r in alert_rules()} == {"warning", "critical"}


def test_promtool_check_rules_accepts_the_alerts() -> None:
    result = subprocess.run([tool("promtool"), "check", "rules", str(ALERTS_FILE)], check=False, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(alert_rules())} rules found" in result.stdout


def test_promtool_check_rules_refuses_a_broken_rule(tmp_path: Path) -> None:
    broken = alerts.build_rules()
    broken["groups"][0]["rules"][0]["expr"] = "absent(seal_teacher_build_info"
    path = tmp_path / "broken.yaml"
    path.write_text(yaml.safe_dump(broken))
    assert subprocess.run([tool("promtool"), "check", "rules", str(path)], check=False, capture_output=True).returncode != 0


def _promtool_test(test_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([tool("promtool"), "test", "rules", str(test_file)], check=False, capture_output=True, text=True,
                          cwd=test_file.parent)


def test_promtool_unit_tests_pass() -> None:
    result = _promtool_test(ALERTS_TEST_FILE)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_every_alert_is_tested_firing_and_silent() -> None:
    tests = yaml.safe_load(ALERTS_TEST_FILE.read_text(encoding="utf-8"))["tests"]
    checks = [check for case in tests for check in case["alert_rule_test"]]
    fired = {c["alertname"] for c in checks if c["exp_alerts"]}
    silent = {c["alertname"] for c in checks if not c["exp_alerts"]}
    every = {rule["alert"] for rule in alert_rules()}
    assert fired == every and silent == every, (every - fired, every - silent)
    # Both severities of the error ratio are seen firing.
    severities = {a["exp_labels"]["severity"] for c in checks if c["alertname"] == "SealRpcErrorRatio" for a in c["exp_alerts"]}
    assert severities == {"warning", "critical"}


# The floor each minimum-traffic constant is, and the promtool cases it alone keeps silent: with
# the floor at 0 those cases must fail, which proves they test the floor and not something else.
FLOORS = {
    "RPC_MIN_CALLS": {"no traffic (0/0), traffic under the floor and client errors raise nothing"},
    "NO_PROMOTION_MIN_ADAPTS": {"no Adapt traffic (0/0) or too few decided calls raise nothing"},
    "RETENTION_MIN_SCORED": {"four candidates an hour, all failing retention, are under the floor of five"},
    "REWARD_MIN_SCORED": {"nine scored self-edits in two hours are under the floor of ten"},
}


@pytest.mark.parametrize("floor", sorted(FLOORS))
def test_without_its_floor_an_alert_fires_on_too_little_traffic(floor: str, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(alerts, floor, 0)
    rules = tmp_path / "rules.yaml"
    rules.write_text(alerts.render_rules_yaml())
    suite = yaml.safe_load(ALERTS_TEST_FILE.read_text(encoding="utf-8"))
    suite["rule_files"] = [str(rules)]
    test_file = tmp_path / "seal-alerts.test.yaml"
    test_file.write_text(yaml.safe_dump(suite, sort_keys=False))
    result = _promtool_test(test_file)
    assert result.returncode != 0
    output = result.stdout + result.stderr  # promtool reports failures on stderr
    failed = set(re.findall(r"^\s+name: (.+),$", output, re.MULTILINE))
    # Firing cases fail too (their descriptions quote the floor); the silent ones are the point.
    silent = {case["name"] for case in suite["tests"] if not any(c["exp_alerts"] for c in case["alert_rule_test"])}
    assert failed & silent == FLOORS[floor], output[-3000:]


# --- a real Prometheus over the running stack -----------------------------------------------------

PASSAGE = (
    "Velmora is a harbour town on the island of Quessant. It was founded in 1742 by the "
    "cartographer Ilse Marrow. The town's lighthouse, the Grey Lantern, is 41 meters tall."
)
QUESTIONS = [("Who founded Velmora?", "Ilse Marrow"), ("How tall is the Grey Lantern?", "41 meters")]
# Panels on rare events that may honestly show only their zero fallback after this test's traffic:
# nothing in it makes a training run fail, and whether the random model's self-edits trip a
# guardrail is up to the model. Every other query must have data of its own.
ZERO_FALLBACK_ALLOWED = {"Candidates trained and scored", "Guardrail failures by rule"}


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _get(url: str, timeout: float = 10) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as reply:
        return json.loads(reply.read())


class Prometheus:
    """A real prometheus on 127.0.0.1 scraping ``targets`` (job → host:port) every second, with
    seal's alerts loaded."""

    def __init__(self, directory: Path, targets: dict[str, str]) -> None:
        config = {
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS_FILE)],
            "scrape_configs": [{"job_name": job, "static_configs": [{"targets": [address]}]}
                               for job, address in targets.items()],
        }
        self.config = directory / "prometheus.yml"
        self.config.write_text(yaml.safe_dump(config))
        self.directory = directory
        self.jobs = set(targets)
        self.process: subprocess.Popen[bytes] | None = None
        self.url = ""

    def start(self, timeout: float = 60) -> None:
        for _attempt in range(3):  # another process may take the free port first
            port = _free_port()
            self.url = f"http://127.0.0.1:{port}"
            log = (self.directory / "prometheus.log").open("wb")
            self.process = subprocess.Popen(
                [tool("prometheus"), f"--config.file={self.config}", f"--storage.tsdb.path={self.directory / 'data'}",
                 f"--web.listen-address=127.0.0.1:{port}", "--log.level=warn"],
                stdout=log, stderr=subprocess.STDOUT,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.process.poll() is None:
                try:
                    urllib.request.urlopen(f"{self.url}/-/ready", timeout=2)
                    return
                except OSError:
                    time.sleep(0.3)
            self.stop()
        raise RuntimeError(f"prometheus did not start: {(self.directory / 'prometheus.log').read_text()[-2000:]}")

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def query(self, expr: str) -> list[dict[str, Any]]:
        reply = _get(f"{self.url}/api/v1/query?" + urllib.parse.urlencode({"query": expr}))
        assert reply["status"] == "success", reply
        return reply["data"]["result"]

    def wait_until_scraped(self, timeout: float = 60) -> None:
        """Every target up, and one more scrape after that."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            targets = _get(f"{self.url}/api/v1/targets")["data"]["activeTargets"]
            if {t["labels"]["job"] for t in targets if t["health"] == "up"} == self.jobs:
                time.sleep(2.5)
                return
            time.sleep(0.5)
        raise AssertionError(f"targets not all up: {[(t['labels']['job'], t['health'], t['lastError']) for t in targets]}")


def _settings(home: Path, model_dir: Path):
    from seal.config import Settings

    return Settings(
        home=home,
        model={"path": str(model_dir), "torch_threads": 1},
        lora={"epochs": 2, "batch_size": 4, "max_seq_len": 64},
        teacher={"max_new_tokens": 40, "default_k": 2},
        auditor={"answer_max_new_tokens": 8},
        # Every scored candidate passes (a random model gains nothing), so the Adapt promotes and
        # the re-check has a promoted version to measure; recheck_floor 0 keeps it in place.
        gates={"min_gain": -1.0, "max_retention_drop": 1.0},
        retention={"max_new_tokens": 8, "recheck_floor": 0.0, "measure_kl": False},
        # Random weights emit random proper nouns; the entity guardrail would refuse every edit.
        guardrails={"unknown_entities": {"enabled": False}},
        student_serving={"backend": "triton", "startup_timeout_s": 240},
    )


def _plant_retention_probe(settings, model_dir: Path, student: student_pb2_grpc.StudentServiceStub) -> None:
    """The random model knows nothing, so its probe is its own greedy answers (as the governance
    tests do); building one by screening 160 questions would take minutes."""
    from seal.domains.knowledge import build_question_prompt, extract_answer
    from seal.models import model_fingerprint
    from seal.retention import BUILTIN_QUESTIONS, ProbeStore, self_consistency_probe

    questions = BUILTIN_QUESTIONS[:8]
    reply = student.Generate(student_pb2.GenerateRequest(
        prompts=[build_question_prompt(q.question) for q in questions],
        adapter=student_pb2.AdapterSelector(base_model=empty_pb2.Empty()),
        max_new_tokens=settings.retention.max_new_tokens), timeout=120)
    probe = self_consistency_probe(model_fingerprint(model_dir), questions,
                                   [extract_answer(c.text) for c in reply.completions])
    ProbeStore(settings.home / "auditor" / "retention").save(probe)


def _refused(call) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        call()
    return refused.value.code()


def _drive_traffic(stack, settings, model_dir: Path) -> None:
    """What an operator's day holds, in small: a retention probe, bad requests to each service,
    an Adapt that promotes, Generate on the promoted version, and a retention re-check."""
    with grpc.insecure_channel(stack.teacher.address) as t, grpc.insecure_channel(stack.student.address) as s, \
            grpc.insecure_channel(stack.auditor.address) as a:
        teacher = teacher_pb2_grpc.TeacherServiceStub(t)
        student = student_pb2_grpc.StudentServiceStub(s)
        auditor = auditor_pb2_grpc.AuditorServiceStub(a)
        _plant_retention_probe(settings, model_dir, student)

        context = common_pb2.Context(title="Velmora", passage=PASSAGE)
        # Twice, a scrape apart: an error series appears at 1 on its first scrape, and only the
        # second error is an increase rate() can see (as in production).
        for _ in range(2):
            assert _refused(lambda: list(teacher.Adapt(teacher_pb2.AdaptRequest(), timeout=30))) == (
                grpc.StatusCode.INVALID_ARGUMENT)
            assert _refused(lambda: student.Generate(student_pb2.GenerateRequest(prompts=["x"], max_new_tokens=5000),
                                                     timeout=30)) == grpc.StatusCode.INVALID_ARGUMENT
            assert _refused(lambda: auditor.Score(auditor_pb2.ScoreRequest(context=context), timeout=30)) == (
                grpc.StatusCode.INVALID_ARGUMENT)
            time.sleep(1.5)

        request = teacher_pb2.AdaptRequest(
            context=context, questions=[common_pb2.Question(question=q, answer=a) for q, a in QUESTIONS], k=2, seed=7)
        result = list(teacher.Adapt(request, timeout=600))[-1].result
        assert result.promoted, result.decision_reason

        for _ in range(3):  # spread over scrapes, so that rates see them
            reply = student.Generate(student_pb2.GenerateRequest(prompts=["Who founded Velmora?"], max_new_tokens=4),
                                     timeout=60)
            assert reply.served_adapter_id == result.adapter_id
            time.sleep(1.2)
        check = auditor.Recheck(auditor_pb2.RecheckRequest(adapter_name=settings.adapter_name), timeout=300)
        assert check.adapter_id == result.adapter_id and check.HasField("retention_accuracy"), check


def _finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


@pytest.mark.slow
def test_a_real_prometheus_answers_every_panel_query_after_an_adapt(
    tiny_model_dir: Path, tmp_path: Path, one_torch_thread
) -> None:
    from seal.serving.triton.server import TritonInstall, TritonNotInstalled
    from seal.stack import local_stack

    try:
        TritonInstall.discover()
    except TritonNotInstalled as exc:
        pytest.skip(f"tritonserver binary not installed: {exc}")
    tool("prometheus")  # skipped (failed in CI) here, before the stack starts, when it is missing
    settings = _settings(tmp_path / "home", tiny_model_dir)
    started = time.monotonic()
    with local_stack(settings, student_backend="triton") as stack:
        body = urllib.request.urlopen(f"http://127.0.0.1:{stack.student.metrics_port}/metrics", timeout=10).read().decode()
        triton_url = re.search(r'seal_student_serving_backend_info\{backend="triton",triton_metrics_url="([^"]+)"', body)
        assert triton_url, "the student does not say where Triton's metrics are"
        triton = urllib.parse.urlsplit(triton_url.group(1))
        prometheus = Prometheus(tmp_path, {
            "seal-teacher": f"127.0.0.1:{stack.teacher.metrics_port}",
            "seal-student": f"127.0.0.1:{stack.student.metrics_port}",
            "seal-auditor": f"127.0.0.1:{stack.auditor.metrics_port}",
            "triton": triton.netloc,
        })
        prometheus.start()
        try:
            prometheus.wait_until_scraped()
            _drive_traffic(stack, settings, tiny_model_dir)
            time.sleep(3)  # three more scrapes: the last calls are in Prometheus

            # A window reaching back past the first scrape: every rate sees the whole test.
            window = f"{int(time.monotonic() - started) + 60}s"
            empty, no_number, fallback_only, not_yet_counted = [], [], set(), set()
            for title, query in dashboard_queries():
                result = prometheus.query(with_window(query, window))
                if not result:
                    empty.append(f"{title}: {query}")
                elif not _finite(result):
                    no_number.append(f"{title}: {query} → {result}")
                own = dashboard.without_zero_fallback(query)
                if own != query and not prometheus.query(with_window(own, window)):
                    fallback_only.add(title)
                    not_yet_counted |= metric_names(with_window(own, "5m"))
            assert not empty, "queries without data:\n" + "\n".join(empty)
            assert not no_number, "queries with only NaN:\n" + "\n".join(no_number)
            assert fallback_only <= ZERO_FALLBACK_ALLOWED, fallback_only - ZERO_FALLBACK_ALLOWED

            # Triton's metric names (and seal's) are real: Prometheus has scraped each one, but for
            # the labelled counters of events that did not happen (no series before the first).
            scraped = set(_get(f"{prometheus.url}/api/v1/label/__name__/values")["data"])
            named = set().union(*(metric_names(with_window(q, "5m")) for _, q in dashboard_queries()))
            named |= set().union(*(metric_names(rule["expr"]) for rule in alert_rules()))
            assert {n for n in named if n.startswith("nv_inference_")}, "no Triton metric on the dashboard"
            assert named - scraped <= not_yet_counted, sorted(named - scraped - not_yet_counted)

            # The alerts evaluate without error over real series, and a healthy stack raises no
            # critical one, not even pending.
            groups = _get(f"{prometheus.url}/api/v1/rules")["data"]["groups"]
            rules = [rule for group in groups for rule in group["rules"]]
            assert len(rules) == len(alert_rules())
            assert all(rule["health"] == "ok" for rule in rules), [(r["name"], r.get("lastError")) for r in rules]
            assert prometheus.query('ALERTS{severity="critical"}') == []
        finally:
            prometheus.stop()
