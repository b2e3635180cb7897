"""OpenTelemetry traces (``seal.tracing``, docs/tracing.md): one Adapt over the three real
services is one trace, with the pipeline's spans on the teacher and the student's and auditor's
server spans as children of the teacher's client spans; tracing off records and exports nothing;
an OTLP endpoint receives the spans over real gRPC."""

from __future__ import annotations

import functools
import threading
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from opentelemetry import trace
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from pydantic import ValidationError

from seal import adapt
from seal.config import Settings, TracingSettings
from seal.stack import LocalStack, local_stack
from seal.tracing import build_tracing
from seal.v1 import common_pb2, teacher_pb2, teacher_pb2_grpc
from test_adapt import TASK, ScriptedAuditor, ScriptedStudent

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ROLES = ("teacher", "student", "auditor")
PASSAGE = (
    "Velmora is a harbour town on the island of Quessant. It was founded in 1742 by the "
    "cartographer Ilse Marrow. The town's lighthouse, the Grey Lantern, is 41 meters tall."
)
QUESTIONS = [("Who founded Velmora?", "Ilse Marrow"), ("How tall is the Grey Lantern?", "41 meters")]
# Audit events travel from the student's outbox thread, later and retried: their own traces.
OUTBOX_DELIVERY = "/seal.v1.AuditorService/RecordEvent"


def tiny_settings(home: Path, model_dir: Path) -> Settings:
    return Settings(
        home=home,
        model={"path": str(model_dir)},
        lora={"epochs": 1, "batch_size": 4, "max_seq_len": 64},
        teacher={"max_new_tokens": 40},
        auditor={"answer_max_new_tokens": 8},
        retention={"max_new_tokens": 8},
        # min_gain -1: a random model rarely gains, and the decision should promote one candidate.
        gates={"min_gain": -1.0},
        # Random weights emit random proper nouns; the entity guardrail would refuse every edit.
        guardrails={"unknown_entities": {"enabled": False}},
    )


def adapt_over_grpc(stack: LocalStack, k: int) -> teacher_pb2.AdaptResult:
    request = teacher_pb2.AdaptRequest(
        context=common_pb2.Context(title="Velmora", passage=PASSAGE),
        questions=[common_pb2.Question(question=q, answer=a) for q, a in QUESTIONS],
        k=k,
        seed=7,
    )
    with grpc.insecure_channel(stack.teacher.address) as channel:
        events = list(teacher_pb2_grpc.TeacherServiceStub(channel).Adapt(request, timeout=600))
    return events[-1].result


class SpanTree:
    """Finished spans of several services, navigable by parent."""

    def __init__(self, spans: list[ReadableSpan]) -> None:
        self.spans = spans

    def named(self, name: str) -> list[ReadableSpan]:
        return [s for s in self.spans if s.name == name]

    def one(self, name: str) -> ReadableSpan:
        found = self.named(name)
        assert len(found) == 1, (name, [s.name for s in self.spans])
        return found[0]

    def children(self, parent: ReadableSpan, name: str | None = None) -> list[ReadableSpan]:
        return [
            s for s in self.spans
            if s.parent is not None and s.parent.span_id == parent.context.span_id and (name is None or s.name == name)
        ]

    def child(self, parent: ReadableSpan, name: str) -> ReadableSpan:
        found = self.children(parent, name)
        assert len(found) == 1, (parent.name, name, [s.name for s in self.children(parent)])
        return found[0]

    def remote_call(self, parent: ReadableSpan, method: str) -> tuple[ReadableSpan, ReadableSpan]:
        """The caller's client span for ``method`` under ``parent`` and the callee's server span
        under that client span: the context crossed the wire in the call's metadata."""
        client = self.child(parent, method)
        server = self.child(client, method)
        assert client.kind is trace.SpanKind.CLIENT and server.kind is trace.SpanKind.SERVER
        assert server.parent is not None and server.parent.is_remote
        return client, server


def service_of(span: ReadableSpan) -> str:
    return str(span.resource.attributes["service.name"])


# --- over the three real services ---------------------------------------------------------------


@pytest.fixture(scope="module")
def traced_adapt(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """One Adapt with k=2 over the three services, each exporting to its own in-memory exporter;
    the spans are read after the stack stopped, so every one of them has ended."""
    settings = tiny_settings(tmp_path_factory.mktemp("traced"), tiny_model_dir)
    # One candidate at a time: the span tree below (a seal.candidate per self-edit, each with its
    # own ApplySelfEdit) is that path's; the batched path's spans are seal.adapt's children
    # seal.check / one seal.train / seal.score (seal.adapt.run_adapt, tests/test_batched_adapt.py).
    settings = settings.model_copy(update={"student": settings.student.model_copy(update={"batch_candidates": False})})
    exporters = {role: InMemorySpanExporter() for role in ROLES}
    tracing = {role: build_tracing(role, settings.tracing, exporter=exporters[role]) for role in ROLES}
    with local_stack(settings, tracing=tracing) as stack:
        result = adapt_over_grpc(stack, k=2)
    spans = {role: list(exporter.get_finished_spans()) for role, exporter in exporters.items()}
    return result, spans


def test_one_adapt_is_one_trace_across_the_three_services(traced_adapt) -> None:
    result, spans = traced_adapt
    for role in ROLES:
        assert spans[role], f"the {role} recorded no span"
        assert {service_of(s) for s in spans[role]} == {f"seal-{role}"}
    adapt_rpc = [s for s in spans["teacher"] if s.name == "/seal.v1.TeacherService/Adapt"]
    assert len(adapt_rpc) == 1 and adapt_rpc[0].parent is None  # the test's client sent no context
    trace_id = adapt_rpc[0].context.trace_id

    everything = [s for role in ROLES for s in spans[role] if s.name != OUTBOX_DELIVERY]
    assert {s.context.trace_id for s in everything} == {trace_id}, sorted(
        (service_of(s), s.name) for s in everything if s.context.trace_id != trace_id
    )
    # Health checks (probes poll them) and the teacher's standing reward subscription are untraced.
    assert not [s.name for s in everything if "Health" in s.name or "SubscribeRewards" in s.name]
    assert result.promoted, result.decision_reason


def test_the_pipeline_spans_and_the_remote_calls_under_them(traced_adapt) -> None:
    result, spans = traced_adapt
    tree = SpanTree([s for role in ROLES for s in spans[role]])
    root = tree.child(tree.one("/seal.v1.TeacherService/Adapt"), "seal.adapt")
    assert root.attributes["seal.k"] == 2 and root.attributes["seal.update_rule"] == "lora_sft"
    assert root.attributes["seal.request_id"] == result.request_id

    propose = tree.child(root, "seal.propose")
    assert propose.attributes["seal.proposals"] == 2
    _, baseline_score = tree.remote_call(tree.child(root, "seal.baseline"), "/seal.v1.AuditorService/Score")
    assert service_of(baseline_score) == "seal-auditor"

    candidates = sorted(tree.children(root, "seal.candidate"), key=lambda s: s.attributes["seal.candidate.index"])
    assert [c.attributes["seal.candidate.index"] for c in candidates] == [0, 1]
    by_index = {c.index: c for c in result.candidates}
    for candidate in candidates:
        expected = by_index[candidate.attributes["seal.candidate.index"]]
        assert expected.adapter_id, f"candidate #{expected.index} was not trained: {expected.failure}"
        tree.remote_call(tree.child(candidate, "seal.check"), "/seal.v1.AuditorService/CheckSelfEdit")

        train = tree.child(candidate, "seal.train")
        _, training = tree.remote_call(train, "/seal.v1.StudentService/ApplySelfEdit")
        assert service_of(training) == "seal-student"
        assert train.attributes["seal.adapter.id"] == expected.adapter_id
        assert train.attributes["seal.adapter.version"] == int(expected.adapter_id.rsplit("@v", 1)[1])

        score = tree.child(candidate, "seal.score")
        _, scoring = tree.remote_call(score, "/seal.v1.AuditorService/Score")
        assert score.attributes["seal.reward"] == pytest.approx(expected.reward)
        assert candidate.attributes["seal.reward"] == pytest.approx(expected.reward)
        # The auditor's closed-book answers come from the student, inside the same trace.
        answers = tree.children(scoring, "/seal.v1.StudentService/Generate")
        assert answers and all(service_of(a) == "seal-auditor" for a in answers)
        for answer in answers:
            assert service_of(tree.child(answer, "/seal.v1.StudentService/Generate")) == "seal-student"

    decide = tree.child(root, "seal.decide")
    assert decide.attributes["seal.decision.promoted"] is True
    assert decide.attributes["seal.adapter.id"] == result.adapter_id
    assert decide.attributes["seal.decision.reason"] == result.decision_reason
    _, promote = tree.remote_call(decide, "/seal.v1.StudentService/Promote")
    assert service_of(promote) == "seal-student"
    tree.remote_call(decide, "/seal.v1.StudentService/Reject")
    # In the order they ended, which is the order the step ran them.
    assert [s.name for s in tree.children(root)] == [
        "seal.propose", "seal.baseline", "seal.candidate", "seal.candidate", "seal.decide",
    ]


@pytest.fixture()
def otlp_receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.stop()


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    """A real OTLP/gRPC trace receiver on a free loopback port: what a collector would get."""

    def __init__(self) -> None:
        self.requests: list[trace_service_pb2.ExportTraceServiceRequest] = []
        self._lock = threading.Lock()
        self._server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")
        self._server.start()

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def Export(self, request, context):  # the proto's method name
        with self._lock:
            self.requests.append(request)
        return trace_service_pb2.ExportTraceServiceResponse()

    def spans(self) -> list[tuple[dict[str, str], str]]:
        """(resource attributes, span name) of every span received."""
        received = []
        with self._lock:
            for request in self.requests:
                for resource_spans in request.resource_spans:
                    resource = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
                    for scope_spans in resource_spans.scope_spans:
                        received += [(resource, span.name) for span in scope_spans.spans]
        return received

    def stop(self) -> None:
        self._server.stop(None)


@functools.cache
def global_provider_probe() -> InMemorySpanExporter:
    """Anything that fell back to OpenTelemetry's global provider (an interceptor built without
    a service's provider, say) records into this exporter. The global provider can be set once
    per process, hence once per session."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    assert trace.get_tracer_provider() is provider, "something else set the global tracer provider"
    return exporter


def test_with_tracing_off_nothing_is_recorded_or_exported(
    tiny_model_dir: Path, tmp_path: Path, otlp_receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
) -> None:
    global_exporter = global_provider_probe()
    global_exporter.clear()
    # The standard endpoint variable alone must not turn export on.
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", otlp_receiver.endpoint)

    settings = tiny_settings(tmp_path, tiny_model_dir)
    assert settings.tracing.otlp_endpoint == ""
    with local_stack(settings) as stack:
        result = adapt_over_grpc(stack, k=1)
    assert len(result.candidates) == 1
    assert global_exporter.get_finished_spans() == ()
    assert otlp_receiver.spans() == []


# --- the OTLP exporter, settings and sampling --------------------------------------------------


def test_an_otlp_endpoint_receives_the_spans_with_the_services_resource(otlp_receiver: OtlpReceiver) -> None:
    settings = TracingSettings(
        otlp_endpoint=otlp_receiver.endpoint, export_timeout_s=5,
        resource_attributes={"deployment.environment": "test"},
    )
    tracing = build_tracing("student", settings)
    tracer = tracing.tracer("test")
    assert tracer is not None
    with tracer.start_as_current_span("outer"), tracer.start_as_current_span("inner"):
        pass
    assert otlp_receiver.spans() == []  # batched: nothing leaves before a flush or shutdown
    tracing.shutdown()
    received = otlp_receiver.spans()
    assert sorted(name for _, name in received) == ["inner", "outer"]
    resource = received[0][0]
    assert resource["service.name"] == "seal-student"
    assert resource["service.namespace"] == "seal"
    assert resource["deployment.environment"] == "test"


def test_no_endpoint_means_no_provider() -> None:
    tracing = build_tracing("auditor", TracingSettings())
    assert not tracing.enabled and tracing.tracer("x") is None
    tracing.shutdown()  # nothing to do, and no error


def test_tracing_settings_come_from_the_environment_and_refuse_bad_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SEAL_TRACING__OTLP_ENDPOINT", "https://collector.example:4317")
    monkeypatch.setenv("SEAL_TRACING__SAMPLE_RATIO", "0.25")
    settings = Settings().tracing
    assert settings.otlp_endpoint == "https://collector.example:4317" and settings.sample_ratio == 0.25
    for bad in ({"otlp_endpoint": "collector:4317"}, {"sample_ratio": 1.5}, {"export_timeout_s": 0}):
        with pytest.raises(ValidationError):
            TracingSettings(**bad)


def test_sampling_decides_at_the_root_and_follows_a_sampled_caller() -> None:
    exporter = InMemorySpanExporter()
    tracer = build_tracing("teacher", TracingSettings(sample_ratio=0.0), exporter=exporter).tracer("test")
    assert tracer is not None
    with tracer.start_as_current_span("a root the ratio drops"):
        pass
    caller = trace.SpanContext(
        trace_id=0x1234, span_id=0x5678, is_remote=True, trace_flags=trace.TraceFlags(trace.TraceFlags.SAMPLED)
    )
    from_caller = trace.set_span_in_context(trace.NonRecordingSpan(caller))
    with tracer.start_as_current_span("a call from a sampled trace", context=from_caller):
        pass
    assert [s.name for s in exporter.get_finished_spans()] == ["a call from a sampled trace"]


# --- the pipeline's spans, in process -----------------------------------------------------------


def _scripted_run(tracer: trace.Tracer | None) -> list[adapt.Event]:
    student = ScriptedStudent({0: "refuse", 1: "ok", 2: "ok"})
    auditor = ScriptedAuditor({"default@v1": 0.5}, guardrail_failures={2})
    return list(adapt.run_adapt(
        TASK, propose=lambda task, k, seed: [adapt.Proposal(i, f"p{i}", f"edit {i}") for i in range(k)],
        student=student, auditor=auditor, k=3, seed=7, adapter_name="default", request_id="r1", tracer=tracer,
    ))


def _shape(events: list[adapt.Event]) -> list[tuple[str, int | None]]:
    return [(type(e).__name__, getattr(e, "index", None)) for e in events]


def test_failed_candidates_say_why_on_their_spans_and_events_are_unchanged() -> None:
    exporter = InMemorySpanExporter()
    traced = _scripted_run(build_tracing("teacher", TracingSettings(), exporter=exporter).tracer("seal.adapt"))
    assert _shape(traced) == _shape(_scripted_run(None))

    tree = SpanTree(list(exporter.get_finished_spans()))
    root = tree.one("seal.adapt")
    assert root.parent is None and {s.context.trace_id for s in tree.spans} == {root.context.trace_id}
    candidates = {c.attributes["seal.candidate.index"]: c for c in tree.children(root, "seal.candidate")}

    refused = candidates[0]
    assert refused.attributes["seal.candidate.failure"].startswith("training failed")
    assert tree.child(refused, "seal.train").status.status_code is trace.StatusCode.ERROR
    assert not tree.children(refused, "seal.score")

    scored = candidates[1]
    assert scored.attributes["seal.reward"] == 0.5 and scored.attributes["seal.adapter.id"] == "default@v1"

    guarded = candidates[2]
    assert guarded.attributes["seal.gates.failed"] == ("guardrail:injection",)
    assert [s.name for s in tree.children(guarded)] == ["seal.check"]

    decide = tree.child(root, "seal.decide")
    assert decide.attributes["seal.decision.promoted"] is True and decide.attributes["seal.adapter.id"] == "default@v1"

