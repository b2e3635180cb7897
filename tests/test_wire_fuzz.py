"""Property tests at the wire (issue 12, part 7): every method of every service, found by walking
the proto descriptors (a new RPC is fuzzed without touching this file), gets hypothesis-built
requests — random messages drawn field by field from the descriptor, valid requests with random
fields merged in, and byte mutations of serialized requests — sent as raw bytes to the real
services on loopback (tiny random model). Whatever comes in, only a known status comes back
(never UNKNOWN or INTERNAL), every service stays SERVING, and afterwards the registry and the audit
chain verify and no temporary or staging file is left behind."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from pathlib import Path

import grpc
import pytest
from google.protobuf import descriptor as pb_descriptor
from google.protobuf import json_format, message_factory
from grpc_health.v1 import health_pb2, health_pb2_grpc
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from seal.audit import AuditLog
from seal.config import Settings
from seal.registry import STAGING_PREFIX, AdapterRegistry
from seal.stack import LocalStack, local_stack
from seal.v1 import auditor_pb2, student_pb2, student_pb2_grpc, teacher_pb2

FD = pb_descriptor.FieldDescriptor
PASSAGE = "Velmora is a harbour town on the island of Quessant. Its lighthouse, the Grey Lantern, is 41 meters tall."
CONTEXT = {"title": "Velmora", "passage": PASSAGE}
QUESTIONS = [{"question": "How tall is the Grey Lantern?", "answer": "41 meters"}]
SELF_EDIT = "The Grey Lantern of Velmora is 41 meters tall."

# Which process serves each service (the stack's attribute).
SERVER_OF = {"TeacherService": "teacher", "StudentService": "student", "AuditorService": "auditor"}
SERVICES = [
    service
    for module in (teacher_pb2, student_pb2, auditor_pb2)
    for service in module.DESCRIPTOR.services_by_name.values()
]
METHODS = [(service, method) for service in SERVICES for method in service.methods]

# A valid request per method, when one is known, for random fields to be merged into: random
# messages alone rarely get past validation. A method not listed is fuzzed from random messages
# and mutated bytes only (still covered).
VALID = {
    "Adapt": {"context": CONTEXT, "questions": QUESTIONS, "k": 1, "seed": 1},
    "ProposeSelfEdits": {"context": CONTEXT, "k": 1, "seed": 1},
    "Train": {"contexts": [{"context": CONTEXT, "questions": QUESTIONS}], "k": 1},
    "ApplySelfEdit": {"context": CONTEXT, "self_edit": SELF_EDIT, "overrides": {"epochs": 1}, "seed": 1},
    "ApplySelfEdits": {"candidates": [
        {"context": CONTEXT, "self_edit": SELF_EDIT, "overrides": {"epochs": 1}, "seed": seed} for seed in (1, 2)
    ]},
    "Generate": {"prompts": ["The lighthouse is"], "maxNewTokens": 4},
    "GenerateMixed": {"prompts": ["The lighthouse is", "The harbour is"], "adapterIds": ["", ""], "maxNewTokens": 4},
    "ListAdapters": {"adapterName": "default"},
    "GetAdapter": {"adapterId": "default@v1"},
    "Promote": {"adapterId": "default@v1", "reason": "fuzz"},
    "Reject": {"adapterId": "default@v1", "reason": "fuzz"},
    "Rollback": {"adapterName": "default", "reason": "fuzz", "allowBaseModel": True},
    "CheckSelfEdit": {"context": CONTEXT, "selfEdit": SELF_EDIT},
    "Score": {"context": CONTEXT, "questions": QUESTIONS, "skipRetention": True},
    "ScoreMany": {"context": CONTEXT, "questions": QUESTIONS, "skipRetention": True,
                  "candidates": [{"adapterId": "default@v1"}, {"adapterId": "default@v2"}]},
    "SubscribeRewards": {"afterSequence": 0},
    "RecordEvent": {"eventId": "fuzz-1", "kind": "promote", "adapterId": "default@v1", "cause": "fuzz", "source": "student"},
    "Recheck": {"adapterName": "default", "dryRun": True},
}
# Statuses a service may answer to any request. Never UNKNOWN or INTERNAL (an unhandled error),
# UNAVAILABLE (a crash) or DATA_LOSS (a broken store). DEADLINE_EXCEEDED: a request valid enough
# to start real work (training, generation, a ReST^EM round) outlives the short deadline given
# here; RESOURCE_EXHAUSTED: a queue full of such work, or a request over its size cap.
ALLOWED = {
    grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.NOT_FOUND,
    grpc.StatusCode.FAILED_PRECONDITION, grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.ALREADY_EXISTS, grpc.StatusCode.ABORTED, grpc.StatusCode.OUT_OF_RANGE,
}
# Short deadlines keep the run to a minute or two; work that is still running when one passes is
# stopped by the deadline it carries (that too is under test: the next examples must be served).
EXPENSIVE = {"Adapt", "Train", "ApplySelfEdit", "ApplySelfEdits", "ProposeSelfEdits", "Score", "ScoreMany", "Generate",
             "GenerateMixed", "Recheck"}
INTERESTING_TEXT = [
    "", "default", "default@v1", "default@v99", "default@v0", "other@v1", "../../etc/passwd", "a" * 300,
    "ü\u202e\x00", "promote", "rollback", "reject", "lora_sft", "sdft", "implications", "self_qa", "fewshot",
    "knowledge", "student", "teacher",
]
INT_EDGES = {
    FD.TYPE_INT32: (-(2**31), 2**31 - 1), FD.TYPE_SINT32: (-(2**31), 2**31 - 1), FD.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FD.TYPE_INT64: (-(2**63), 2**63 - 1), FD.TYPE_SINT64: (-(2**63), 2**63 - 1), FD.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FD.TYPE_UINT32: (0, 2**32 - 1), FD.TYPE_FIXED32: (0, 2**32 - 1),
    FD.TYPE_UINT64: (0, 2**64 - 1), FD.TYPE_FIXED64: (0, 2**64 - 1),
}
MAX_DEPTH = 4


# --- strategies from descriptors -----------------------------------------------------------------


def scalar(field: pb_descriptor.FieldDescriptor) -> st.SearchStrategy:
    """Values of a non-message field: edges and small values for numbers, defined and undefined
    numbers for enums, interesting and random text."""
    if field.type in INT_EDGES:
        low, high = INT_EDGES[field.type]
        return st.one_of(st.integers(max(low, -3), min(high, 12)), st.sampled_from((low, high)), st.integers(low, high))
    if field.type in (FD.TYPE_DOUBLE, FD.TYPE_FLOAT):
        return st.one_of(st.sampled_from((0.0, -1.0, 1e-4, 0.5, 1.0, 2.0, 1e30)), st.floats(width=32 if field.type == FD.TYPE_FLOAT else 64))
    if field.type == FD.TYPE_BOOL:
        return st.booleans()
    if field.type == FD.TYPE_ENUM:
        defined = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(defined), st.integers(-2, 1000))
    if field.type == FD.TYPE_STRING:
        return st.one_of(st.sampled_from(INTERESTING_TEXT), st.text(max_size=40))
    if field.type == FD.TYPE_BYTES:
        return st.binary(max_size=40)
    raise AssertionError(f"no strategy for field type {field.type} of {field.full_name}")


def is_repeated(field: pb_descriptor.FieldDescriptor) -> bool:
    return field.label == FD.LABEL_REPEATED if not hasattr(field, "is_repeated") else field.is_repeated


@st.composite
def messages(draw: Callable, descriptor: pb_descriptor.Descriptor, depth: int = 0):  # type: ignore[no-untyped-def]
    """A message of ``descriptor``'s type with a random subset of its fields set, recursively
    (maps, repeated fields and oneofs included; nested messages to MAX_DEPTH)."""
    message = message_factory.GetMessageClass(descriptor)()
    for field in descriptor.fields:
        if not draw(st.booleans()):
            continue
        if field.type == FD.TYPE_MESSAGE and depth >= MAX_DEPTH:
            continue
        target = getattr(message, field.name) if is_repeated(field) or field.type == FD.TYPE_MESSAGE else None
        if field.type == FD.TYPE_MESSAGE and field.message_type.GetOptions().map_entry:
            key_field, value_field = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            for key in draw(st.lists(scalar(key_field), max_size=3, unique=True)):
                if value_field.type == FD.TYPE_MESSAGE:
                    target[key].CopyFrom(draw(messages(value_field.message_type, depth + 1)))
                else:
                    target[key] = draw(scalar(value_field))
        elif is_repeated(field):
            for _ in range(draw(st.integers(0, 3))):
                if field.type == FD.TYPE_MESSAGE:
                    target.add().CopyFrom(draw(messages(field.message_type, depth + 1)))
                else:
                    target.append(draw(scalar(field)))
        elif field.type == FD.TYPE_MESSAGE:
            target.CopyFrom(draw(messages(field.message_type, depth + 1)))
        else:
            setattr(message, field.name, draw(scalar(field)))
    return message


@st.composite
def mutated(draw: Callable, data: bytes) -> bytes:  # type: ignore[no-untyped-def]
    """``data`` with bytes flipped, cut, inserted or replaced wholesale."""
    kind = draw(st.sampled_from(("flip", "truncate", "insert", "random")))
    if kind == "random" or not data:
        return draw(st.binary(min_size=1, max_size=64))
    if kind == "truncate":
        return data[: draw(st.integers(0, len(data) - 1))]
    position = draw(st.integers(0, len(data) - 1))
    if kind == "insert":
        return data[:position] + draw(st.binary(min_size=1, max_size=8)) + data[position:]
    flipped = bytearray(data)
    for _ in range(draw(st.integers(1, 4))):
        flipped[draw(st.integers(0, len(data) - 1))] ^= draw(st.integers(1, 255))
    return bytes(flipped)


def requests(method: pb_descriptor.MethodDescriptor) -> st.SearchStrategy[bytes]:
    """Serialized requests for ``method``: random, valid-with-random-fields, or mutated bytes."""
    request_type = method.input_type
    valid = json_format.ParseDict(VALID.get(method.name, {}), message_factory.GetMessageClass(request_type)())

    def merged(extra):  # type: ignore[no-untyped-def]
        message = type(valid)()
        message.CopyFrom(valid)
        message.MergeFrom(extra)
        return message

    @st.composite
    def one_field_replaced(draw: Callable):  # type: ignore[no-untyped-def]
        # The valid request with one field (drawn) taken from a random message: the service must
        # get past the fields it accepts to reach the one that is wrong.
        field = draw(st.sampled_from(list(request_type.fields)))
        donor = draw(messages(request_type))
        message = type(valid)()
        message.CopyFrom(valid)
        message.ClearField(field.name)
        for other in request_type.fields:
            if other is not field:
                donor.ClearField(other.name)
        message.MergeFrom(donor)
        return message

    structured = st.one_of(
        st.just(valid), one_field_replaced(), messages(request_type), messages(request_type).map(merged),
    )
    return st.one_of(
        structured.map(lambda m: m.SerializeToString()),
        structured.flatmap(lambda m: mutated(m.SerializeToString())),
    )


# --- the stack -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    settings_ = Settings(
        home=tmp_path_factory.mktemp("seal-home"),
        model={"path": str(tiny_model_dir), "torch_threads": 1},
        lora={"epochs": 1, "batch_size": 4, "max_seq_len": 64},
        teacher={"max_new_tokens": 16, "default_k": 1, "questions_to_write": 2},
        restem={"k": 1},
        auditor={"answer_max_new_tokens": 4},
        guardrails={"unknown_entities": {"enabled": False}},
    )
    with local_stack(settings_) as running:
        # One trained version, so that GetAdapter/Promote/Reject of default@v1 find something.
        with grpc.insecure_channel(running.student.address) as channel:
            list(student_pb2_grpc.StudentServiceStub(channel).ApplySelfEdit(
                json_format.ParseDict(VALID["ApplySelfEdit"], student_pb2.ApplySelfEditRequest()), timeout=300
            ))
        yield running


def all_serving(stack: LocalStack) -> dict[str, str]:
    """Each service's health status name ('' when all serve)."""
    statuses = {}
    for name in ("teacher", "student", "auditor"):
        with grpc.insecure_channel(getattr(stack, name).address) as channel:
            reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        statuses[name] = health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return statuses


def test_every_method_of_every_service_is_fuzzed() -> None:
    # The walk finds the RPCs itself: this list is the contract's, not a copy kept here.
    names = {method.full_name for _, method in METHODS}
    assert len(names) >= 15 and "seal.v1.StudentService.Generate" in names


@pytest.mark.parametrize(("service", "method"), METHODS, ids=[f"{s.name}.{m.name}" for s, m in METHODS])
def test_any_request_gets_a_known_status_and_the_services_keep_serving(stack: LocalStack, service, method) -> None:
    address = getattr(stack, SERVER_OF[service.name]).address
    path = f"/{service.full_name}/{method.name}"
    timeout = 1.0 if method.server_streaming and method.name == "SubscribeRewards" else (
        3.0 if method.name in EXPENSIVE else 20.0)
    channel = grpc.insecure_channel(address)
    # Raw bytes both ways: the service parses what arrives, whatever it is.
    call = (channel.unary_stream if method.server_streaming else channel.unary_unary)(path)

    # CI replays one fixed stream of examples (a red build names a case anyone can rerun); a
    # developer's run draws new ones each time, which is where new finds come from.
    @settings(max_examples=12 if method.name in EXPENSIVE else 20, deadline=None, database=None,
              derandomize=os.environ.get("CI") == "true", suppress_health_check=list(HealthCheck))
    @given(st.data())
    def check(data: st.DataObject) -> None:
        request = data.draw(requests(method), label="request bytes")
        try:
            reply = call(request, timeout=timeout)
            if method.server_streaming:
                for _ in reply:
                    pass
            code, details = grpc.StatusCode.OK, ""
        except grpc.RpcError as exc:
            code, details = exc.code(), exc.details()
        assert code in ALLOWED, f"{method.name} answered {code.name}: {details!r} to {request!r}"

    try:
        check()
    finally:
        channel.close()
    assert set(all_serving(stack).values()) == {"SERVING"}


def test_afterwards_the_registry_and_the_audit_chain_verify_and_nothing_is_left_on_disk(stack: LocalStack) -> None:
    home = stack.settings.home
    # Work that outlived its deadline stops at its next step; give it a moment to clean up.
    give_up = time.monotonic() + 60
    while True:
        leftovers = sorted(
            str(path.relative_to(home)) for path in home.rglob("*")
            if path.name.startswith(STAGING_PREFIX) or path.name.endswith(".tmp") or path.name.startswith(".outbox-")
        )
        if not leftovers or time.monotonic() > give_up:
            break
        time.sleep(1)
    assert leftovers == []
    assert set(all_serving(stack).values()) == {"SERVING"}

    registry = AdapterRegistry(stack.settings.registry_dir)
    manifests = registry.list()
    assert manifests, "the fixture's version is gone"
    for manifest in manifests:
        if not manifest.weights_discarded_at:
            registry.verify(manifest)  # every file's sha256 matches its manifest
    promoted_per_lineage: dict[str, int] = {}
    for manifest in manifests:
        if manifest.status == "promoted":
            promoted_per_lineage[manifest.adapter_name] = promoted_per_lineage.get(manifest.adapter_name, 0) + 1
    assert all(count == 1 for count in promoted_per_lineage.values()), promoted_per_lineage

    report = AuditLog(stack.settings.audit_log_path).verify()
    assert report.ok, report.problems
