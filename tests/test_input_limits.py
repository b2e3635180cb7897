"""Input limits, enforced by the service that does the work (issue 12, part 5).

The student and the auditor check every request they are sent — not only what comes through the
teacher's Adapt — against ``limits.*`` (seal/limits.py) and the bounds ``LoraSettings`` declares,
and the wire itself refuses undecodable bytes and unknown enum numbers. Every refusal is
INVALID_ARGUMENT with a short message naming the field, and changes nothing: the files under the
service home, the registry and the audit chain are the same afterwards.

Real services over loopback (tiny random model, port 0); the limits are set small here so the
requests that cross them stay small."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seal.audit import AuditLog
from seal.config import LoraSettings, Settings
from seal.limits import ECHO_CHARS, MAX_GUARDRAIL_RESULTS, check_update_overrides, echo
from seal.v1 import auditor_pb2, common_pb2, student_pb2
from student_and_auditor import student_and_auditor

PASSAGE = (
    "Velmora is a harbour town on the island of Quessant. It was founded in 1742 by the "
    "cartographer Ilse Marrow. The town's lighthouse, the Grey Lantern, is 41 meters tall."
)
LIMITS = {
    "max_passage_chars": 400,
    "max_questions": 3,
    "max_question_chars": 80,
    "max_answer_chars": 40,
    "max_self_edit_chars": 300,
    "max_prompts": 4,
    "max_prompt_chars": 600,
    "max_new_tokens": 32,
    "max_reason_chars": 100,
    "max_event_details_bytes": 512,
    "max_fewshot_pairs": 2,
}
# Far above every limit, far below the per-method request-size caps (services.method_max_request_bytes):
# a value the servicer must refuse without echoing it back.
HUGE = "x" * 50_000


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    settings = Settings(
        home=tmp_path_factory.mktemp("limits"),
        model={"path": str(tiny_model_dir)},
        lora={"epochs": 1, "batch_size": 4, "max_seq_len": 64},
        auditor={"answer_max_new_tokens": 4},
        retention={"enabled": False},
        limits=LIMITS,
    )
    with student_and_auditor(settings) as stack:
        yield stack


# --- what "changes nothing" means ---------------------------------------------------------------


def _disk(home: Path) -> dict[str, tuple[int, int]]:
    """Every file under the service home with its size and modification time. SQLite's
    shared-memory index changes on reads; the audit log itself is compared by its head."""
    return {
        str(path.relative_to(home)): (path.stat().st_size, path.stat().st_mtime_ns)
        for path in sorted(home.rglob("*"))
        if path.is_file() and not path.name.endswith(("-shm", "-wal"))
    }


def _state(stack: dict[str, Any]) -> tuple[Any, ...]:
    settings = stack["settings"]
    with AuditLog(settings.audit_log_path) as log:
        head, verified = log.head(), log.verify().ok
    adapters = stack["student"].ListAdapters(student_pb2.ListAdaptersRequest(), timeout=30).adapters
    return _disk(settings.home), head, verified, [(a.adapter_id, a.status) for a in adapters]


def _serving(channel: grpc.Channel) -> bool:
    reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


def _refused(call: Callable[[], Any]) -> str:
    """The details of the INVALID_ARGUMENT ``call`` must end with (a stream is read to its end)."""
    with pytest.raises(grpc.RpcError) as error:
        reply = call()
        if isinstance(reply, Iterator):
            list(reply)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, (error.value.code(), error.value.details())
    details = error.value.details()
    # Short enough to read, whatever the request held: nothing is echoed at length.
    assert len(details) < 1_000, details[:300]
    return details


def _apply(**fields: Any) -> student_pb2.ApplySelfEditRequest:
    overrides = fields.pop("overrides", {})
    fields.setdefault("context", common_pb2.Context(title="Velmora", passage=PASSAGE))
    fields.setdefault("self_edit", "Velmora was founded in 1742 by Ilse Marrow.")
    request = student_pb2.ApplySelfEditRequest(**fields)
    for key, value in overrides.items():
        setattr(request.overrides, key, value)
    return request


# --- the wire -------------------------------------------------------------------------------------


def _methods() -> list[tuple[str, str, bool]]:
    from seal.v1 import auditor_pb2 as auditor_module
    from seal.v1 import student_pb2 as student_module

    methods = []
    for module, service in ((student_module, "StudentService"), (auditor_module, "AuditorService")):
        for method in module.DESCRIPTOR.services_by_name[service].methods:
            methods.append((service, method.name, method.server_streaming))
    return methods


@pytest.mark.parametrize("garbage", [b"\xff\xff\xff\xff", b"\x0a\x05ab", b"\x12\x80"], ids=["tag", "short", "varint"])
def test_undecodable_bytes_are_invalid_argument_on_every_method(stack, garbage: bytes) -> None:
    """Walked from the descriptors, so a new method is covered: grpc itself answers INTERNAL
    ("Exception deserializing request!"), which says the service is broken."""
    before = _state(stack)
    for service, method, streaming in _methods():
        channel = stack["channels"][service]
        path = f"/seal.v1.{service}/{method}"
        if streaming:
            call = channel.unary_stream(path, request_serializer=None, response_deserializer=None)
        else:
            call = channel.unary_unary(path, request_serializer=None, response_deserializer=None)
        details = _refused(lambda: call(garbage, timeout=30))
        assert "do not decode" in details and f"seal.v1.{method}Request" in details, (method, details)
    assert _state(stack) == before
    assert all(_serving(channel) for channel in stack["channels"].values())


def test_an_unknown_enum_number_is_refused_naming_the_field(stack) -> None:
    """proto3 enums are open: status 99 parses as a plain int and used to list everything."""
    details = _refused(lambda: stack["student"].ListAdapters(student_pb2.ListAdaptersRequest(status=99), timeout=30))
    assert "status=99" in details and "AdapterStatus" in details and "ADAPTER_STATUS_PROMOTED" in details
    # A known value is still a filter.
    stack["student"].ListAdapters(
        student_pb2.ListAdaptersRequest(status=common_pb2.ADAPTER_STATUS_PROMOTED), timeout=30
    )


def test_unknown_enum_numbers_are_found_in_nested_and_repeated_fields() -> None:
    from seal.rpc import unknown_enum_values

    manifest = common_pb2.AdapterManifest(history=[common_pb2.StatusChange(status=common_pb2.ADAPTER_STATUS_PROMOTED)])
    manifest.history.add().status = 77
    manifest.hyperparameters.update({"rank": 8, "nested": {"list": [1, None, "x"]}})  # Struct: NullValue is an enum
    assert [m.split(" is ")[0] for m in unknown_enum_values(manifest)] == ["history[1].status=77"]
    manifest.history[1].status = common_pb2.ADAPTER_STATUS_ROLLED_BACK
    assert unknown_enum_values(manifest) == []


# --- update overrides: LoraSettings' own bounds --------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"lora_rank": 4294967295}, "overrides.lora_rank"),  # was INTERNAL: an allocator error
        ({"lora_rank": 0}, "overrides.lora_rank"),
        ({"lora_alpha": 0}, "overrides.lora_alpha"),
        ({"batch_size": 0}, "overrides.batch_size"),
        ({"batch_size": 100_000}, "overrides.batch_size"),
        ({"epochs": 1000}, "overrides.epochs"),  # was accepted: days of training
        ({"epochs": 0}, "overrides.epochs"),
        ({"learning_rate": math.nan}, "overrides.learning_rate"),
        ({"learning_rate": math.inf}, "overrides.learning_rate"),
        ({"learning_rate": -1e-3}, "overrides.learning_rate"),
        ({"update_rule": "gradient_ascent"}, "overrides.update_rule"),
    ],
)
def test_apply_self_edit_keeps_the_lora_bounds(stack, overrides: dict[str, Any], named: str) -> None:
    before = _state(stack)
    details = _refused(lambda: stack["student"].ApplySelfEdit(_apply(overrides=overrides), timeout=60))
    assert named in details, details
    assert _state(stack) == before


def test_override_bounds_are_the_ones_lora_settings_declares() -> None:
    """One table: a bound is read from LoraSettings, so both sides of each edge follow it."""
    for key, field in (("rank", "rank"), ("epochs", "epochs"), ("batch_size", "batch_size")):
        top = next(m.le for m in LoraSettings.model_fields[field].metadata if hasattr(m, "le"))
        check_update_overrides({key: top})
        with pytest.raises(ValueError, match=f"lora.{field}"):
            check_update_overrides({key: top + 1})
    with pytest.raises(ValueError, match="overrides.lora_rank"):
        check_update_overrides({"rank": 0}, field_names={"rank": "lora_rank"})


# --- sizes and counts on the student ---------------------------------------------------------------


def _generate(**fields: Any) -> student_pb2.GenerateRequest:
    fields.setdefault("prompts", ["Who founded Velmora?"])
    fields.setdefault("max_new_tokens", 2)
    return student_pb2.GenerateRequest(**fields)


@pytest.mark.parametrize(
    ("request_fields", "named"),
    [
        ({"prompts": ["q?"] * (LIMITS["max_prompts"] + 1)}, "limits.max_prompts"),
        ({"prompts": ["q?", "y" * (LIMITS["max_prompt_chars"] + 1)]}, "prompts[1]"),
        ({"max_new_tokens": LIMITS["max_new_tokens"] + 1}, "limits.max_new_tokens"),
        ({"temperature": math.nan}, "temperature"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 1.5}, "top_p"),
        ({"adapter": student_pb2.AdapterSelector(promoted_of="No Such/Lineage")}, "adapter.promoted_of"),
        ({"adapter": student_pb2.AdapterSelector(promoted_of=HUGE)}, "adapter.promoted_of"),
        ({"adapter": student_pb2.AdapterSelector(adapter_id="default@v01")}, "adapter.adapter_id"),
    ],
)
def test_generate_limits(stack, request_fields: dict[str, Any], named: str) -> None:
    before = _state(stack)
    details = _refused(lambda: stack["student"].Generate(_generate(**request_fields), timeout=60))
    assert named in details, details
    assert _state(stack) == before


def test_generate_at_the_limits_still_answers(stack) -> None:
    reply = stack["student"].Generate(
        _generate(prompts=["q?"] * LIMITS["max_prompts"], max_new_tokens=LIMITS["max_new_tokens"]), timeout=120
    )
    assert len(reply.completions) == LIMITS["max_prompts"]


def _grid(side: int) -> common_pb2.Grid:
    return common_pb2.Grid(rows=[common_pb2.GridRow(cells=[1] * side) for _ in range(side)])


def _fewshot(pairs: int = 1, side: int = 2, task_id: str = "t1") -> common_pb2.FewShotTask:
    return common_pb2.FewShotTask(
        task_id=task_id,
        train=[common_pb2.GridPair(input=_grid(side), output=_grid(side)) for _ in range(pairs)],
        test_inputs=[_grid(2)],
        test_outputs=[_grid(2)],
    )


@pytest.mark.parametrize(
    ("request_fields", "named"),
    [
        ({"self_edit": "s" * (LIMITS["max_self_edit_chars"] + 1)}, "limits.max_self_edit_chars"),
        ({"context": common_pb2.Context(title="V", passage="p" * (LIMITS["max_passage_chars"] + 1))},
         "limits.max_passage_chars"),
        ({"context": common_pb2.Context(title="t" * 501, passage=PASSAGE)}, "context.title"),
        ({"training_prompts": ["Who?"] * (LIMITS["max_questions"] + 1)}, "limits.max_questions"),
        ({"training_prompts": ["W" * (LIMITS["max_question_chars"] + 1)]}, "training_prompts[0]"),
        ({"adapter_name": "../escape"}, "adapter_name"),
        ({"adapter_name": HUGE}, "adapter_name"),
        ({"fewshot": _fewshot(pairs=LIMITS["max_fewshot_pairs"] + 1), "context": None}, "limits.max_fewshot_pairs"),
        ({"fewshot": _fewshot(side=31), "context": None}, "30 × 30"),
        ({"fewshot": _fewshot(task_id=HUGE), "context": None}, "fewshot.task_id"),
    ],
)
def test_apply_self_edit_sizes_and_names_refused_before_anything_is_created(
    stack, request_fields: dict[str, Any], named: str
) -> None:
    before = _state(stack)
    request = _apply(**{k: v for k, v in request_fields.items() if v is not None})
    if request_fields.get("context", "") is None:
        request.ClearField("context")
    details = _refused(lambda: stack["student"].ApplySelfEdit(request, timeout=60))
    assert named in details, details
    assert _state(stack) == before


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.GetAdapter(student_pb2.GetAdapterRequest(adapter_id=HUGE), timeout=30),
        lambda s: s.GetAdapter(student_pb2.GetAdapterRequest(adapter_id="default@v0"), timeout=30),
        lambda s: s.ListAdapters(student_pb2.ListAdaptersRequest(adapter_name=HUGE), timeout=30),
        lambda s: s.Promote(student_pb2.PromoteRequest(adapter_id=HUGE), timeout=30),
        lambda s: s.Promote(student_pb2.PromoteRequest(adapter_id="default@v1", reason="r" * 101), timeout=30),
        lambda s: s.Reject(student_pb2.RejectRequest(adapter_id="default@v1", reason="r" * 101), timeout=30),
        lambda s: s.Reject(student_pb2.RejectRequest(adapter_id="Default@v1"), timeout=30),
        lambda s: s.Rollback(student_pb2.RollbackRequest(adapter_name="default", reason="r" * 101), timeout=30),
        lambda s: s.Rollback(student_pb2.RollbackRequest(adapter_name=HUGE), timeout=30),
    ],
    ids=["get-huge", "get-v0", "list-huge", "promote-huge", "promote-reason", "reject-reason", "reject-name",
         "rollback-reason", "rollback-huge"],
)
def test_governance_rpcs_validate_names_and_reasons_first(stack, call: Callable[[Any], Any]) -> None:
    """Reasons are kept in manifests and the audit log for good; names are checked before any
    lock or file exists. A 50 kB id is refused in a message a person can read."""
    before = _state(stack)
    details = _refused(lambda: call(stack["student"]))
    assert HUGE[:ECHO_CHARS + 1] not in details
    assert _state(stack) == before


# --- the auditor ------------------------------------------------------------------------------------


def _score(**fields: Any) -> auditor_pb2.ScoreRequest:
    fields.setdefault("context", common_pb2.Context(title="Velmora", passage=PASSAGE))
    fields.setdefault("questions", [common_pb2.Question(question="Who founded Velmora?", answer="Ilse Marrow")])
    return auditor_pb2.ScoreRequest(**fields)


def _gate(reason: str = "ok") -> common_pb2.GateResult:
    return common_pb2.GateResult(gate="guardrail:length", passed=True, reason=reason)


@pytest.mark.parametrize(
    ("call", "named"),
    [
        (lambda a: a.CheckSelfEdit(auditor_pb2.CheckSelfEditRequest(
            context=common_pb2.Context(passage=PASSAGE), self_edit="s" * (LIMITS["max_self_edit_chars"] + 1)),
            timeout=30), "limits.max_self_edit_chars"),
        (lambda a: a.CheckSelfEdit(auditor_pb2.CheckSelfEditRequest(
            context=common_pb2.Context(passage=PASSAGE), self_edit="ok", prompt="p" * (LIMITS["max_prompt_chars"] + 1)),
            timeout=30), "limits.max_prompt_chars"),
        (lambda a: a.CheckSelfEdit(auditor_pb2.CheckSelfEditRequest(
            context=common_pb2.Context(passage="p" * (LIMITS["max_passage_chars"] + 1)), self_edit="ok"),
            timeout=30), "limits.max_passage_chars"),
        (lambda a: a.CheckSelfEdit(auditor_pb2.CheckSelfEditRequest(
            context=common_pb2.Context(passage=PASSAGE), self_edit="ok", request_id=HUGE), timeout=30), "request_id"),
        (lambda a: a.CheckSelfEdit(auditor_pb2.CheckSelfEditRequest(
            self_edit="{}", fewshot=_fewshot(pairs=LIMITS["max_fewshot_pairs"] + 1)), timeout=30),
         "limits.max_fewshot_pairs"),
        (lambda a: a.Score(_score(questions=[common_pb2.Question(question="Q?", answer="A")] * (LIMITS["max_questions"] + 1)),
                           timeout=30), "limits.max_questions"),
        (lambda a: a.Score(_score(questions=[common_pb2.Question(question="Q?", answer="A" * (LIMITS["max_answer_chars"] + 1))]),
                           timeout=30), "limits.max_answer_chars"),
        (lambda a: a.Score(_score(questions=[common_pb2.Question(question="Q" * (LIMITS["max_question_chars"] + 1), answer="A")]),
                           timeout=30), "limits.max_question_chars"),
        (lambda a: a.Score(_score(self_edit="s" * (LIMITS["max_self_edit_chars"] + 1)), timeout=30),
         "limits.max_self_edit_chars"),
        (lambda a: a.Score(_score(guardrails=[_gate()] * (MAX_GUARDRAIL_RESULTS + 1)), timeout=30), "guardrails"),
        (lambda a: a.Score(_score(guardrails=[_gate("r" * (LIMITS["max_reason_chars"] + 1))]), timeout=30),
         "guardrails[0].reason"),
        (lambda a: a.Score(_score(adapter_id=HUGE), timeout=30), "adapter_id"),
        (lambda a: a.Recheck(auditor_pb2.RecheckRequest(adapter_name="Not A Name"), timeout=30), "adapter_name"),
    ],
    ids=["check-self-edit", "check-prompt", "check-passage", "check-request-id", "check-fewshot", "score-count",
         "score-answer", "score-question", "score-self-edit", "score-guardrails", "score-guardrail-reason",
         "score-adapter-id", "recheck-name"],
)
def test_auditor_limits(stack, call: Callable[[Any], Any], named: str) -> None:
    before = _state(stack)
    details = _refused(lambda: call(stack["auditor"]))
    assert named in details, details
    assert _state(stack) == before


def _event(**fields: Any) -> auditor_pb2.RecordEventRequest:
    request = auditor_pb2.RecordEventRequest(
        event_id="limits-1", kind="promote", adapter_id="default@v1", cause="operator", source="student"
    )
    for key, value in fields.items():
        if key == "details":
            request.details.update(value)
        else:
            setattr(request, key, value)
    return request


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"cause": "c" * (LIMITS["max_reason_chars"] + 1)}, "limits.max_reason_chars"),
        ({"details": {"blob": "d" * LIMITS["max_event_details_bytes"]}}, "limits.max_event_details_bytes"),
        ({"adapter_id": "default@v99; DROP"}, "adapter_id"),
        ({"adapter_id": HUGE}, "adapter_id"),
        ({"kind": HUGE}, "cannot be reported"),
        ({"source": HUGE}, "source"),
        ({"event_id": HUGE}, "event_id"),
    ],
)
def test_record_event_fields_are_bounded_before_the_audit_log(stack, fields: dict[str, Any], named: str) -> None:
    """RecordEvent writes to the append-only log: a 1 MB field there would be there for good."""
    before = _state(stack)
    details = _refused(lambda: stack["auditor"].RecordEvent(_event(**fields), timeout=30))
    assert named in details, details
    assert _state(stack) == before


def test_echo_cuts_long_values_and_says_how_long() -> None:
    assert echo("default") == "'default'"
    shown = echo(HUGE)
    assert len(shown) < ECHO_CHARS + 40 and "50000 characters" in shown


def test_the_auditor_asks_the_student_in_parts_it_accepts(tmp_path: Path) -> None:
    """The student refuses more than limits.max_prompts prompts per Generate, so the auditor
    splits a long batch (a τ or a retention probe larger than that) into parts, in order."""
    from seal.auditor import Auditing, Auditor
    from seal.domains.knowledge import Question
    from seal.grading import build_grader

    settings = Settings(home=tmp_path, limits={"max_prompts": 4}, retention={"enabled": False})
    asked: list[list[str]] = []

    class RecordingStudent:  # the student's side of the port; the auditing core is real
        def answer(self, prompts: list[str], adapter_id: str, *, max_new_tokens: int, **_: object) -> list[str]:
            asked.append(prompts)
            return [f"answer {len(asked)}.{i}" for i in range(len(prompts))]

    core = Auditing.from_settings(settings, Auditor(build_grader(settings.auditor), settings.gates))
    try:
        questions = [Question(f"Question {i}?", f"answer {i}") for i in range(10)]
        scored = core.score(RecordingStudent(), adapter_id="", questions=questions, title="T", passage=PASSAGE)
    finally:
        core.close()
    assert [len(part) for part in asked] == [4, 4, 2]
    assert [o.question for o in scored.report.baseline_outcomes] == [q.question for q in questions]
