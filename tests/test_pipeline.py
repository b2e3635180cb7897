"""The whole SEAL loop over real gRPC on loopback, with a tiny random model built in-process."""

from __future__ import annotations

import hashlib
import json
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from seal.config import Settings
from seal.stack import LocalStack, local_stack
from seal.v1 import common_pb2, student_pb2, student_pb2_grpc, teacher_pb2, teacher_pb2_grpc

PASSAGE = (
    "Velmora is a harbour town on the island of Quessant. It was founded in 1742 by the "
    "cartographer Ilse Marrow. The town's lighthouse, the Grey Lantern, is 41 meters tall."
)
QUESTIONS = [("Who founded Velmora?", "Ilse Marrow"), ("How tall is the Grey Lantern?", "41 meters")]


def tiny_settings(home: Path, model_dir: Path, **gates: float) -> Settings:
    return Settings(
        home=home,
        model={"path": str(model_dir)},
        lora={"epochs": 2, "batch_size": 4, "max_seq_len": 64},
        teacher={"max_new_tokens": 40, "default_k": 2},
        auditor={"answer_max_new_tokens": 8},
        gates=gates,
        # Random weights emit random proper nouns; the entity guardrail would refuse every edit.
        guardrails={"unknown_entities": {"enabled": False}},
    )


def adapt_request(k: int = 2, **overrides: object) -> teacher_pb2.AdaptRequest:
    request = teacher_pb2.AdaptRequest(
        context=common_pb2.Context(title="Velmora", passage=PASSAGE),
        questions=[common_pb2.Question(question=q, answer=a) for q, a in QUESTIONS],
        k=k,
        seed=7,
    )
    for key, value in overrides.items():
        setattr(request.overrides, key, value)
    return request


def run_adapt(stack: LocalStack, request: teacher_pb2.AdaptRequest) -> list[teacher_pb2.AdaptResponse]:
    with grpc.insecure_channel(stack.teacher.address) as channel:
        return list(teacher_pb2_grpc.TeacherServiceStub(channel).Adapt(request, timeout=600))


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    # min_gain -1: a random model rarely gains, and this fixture exercises the promotion path.
    settings = tiny_settings(tmp_path_factory.mktemp("seal-home"), tiny_model_dir, min_gain=-1.0)
    with local_stack(settings) as running:
        yield running


def test_adapt_end_to_end_produces_scored_versioned_adapters(stack: LocalStack) -> None:
    events = run_adapt(stack, adapt_request(k=2))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "self_edits_proposed" and kinds[-1] == "result"
    assert "baseline_scored" in kinds and "candidate_progress" in kinds and "promotion_decided" in kinds
    assert len({e.request_id for e in events}) == 1

    result = events[-1].result
    assert len(result.candidates) == 2
    trained = [c for c in result.candidates if c.adapter_id]
    assert trained, [c.failure for c in result.candidates]

    # Accuracies are what the per-question outcomes say.
    baseline = sum(o.correct for o in result.baseline_outcomes) / len(QUESTIONS)
    assert result.baseline_accuracy == pytest.approx(baseline)
    for candidate in trained:
        assert candidate.accuracy == pytest.approx(sum(o.correct for o in candidate.outcomes) / len(QUESTIONS))
        assert candidate.reward == pytest.approx(candidate.accuracy - result.baseline_accuracy)
    assert result.adapted_accuracy == pytest.approx(sum(o.correct for o in result.adapted_outcomes) / len(QUESTIONS))
    assert set(result.phase_seconds) >= {"generation", "training", "scoring", "total"}

    # With min_gain −1 every scored candidate passes τ; the best by reward is promoted.
    assert result.promoted
    best = max(trained, key=lambda c: (c.reward, -c.index))
    assert result.adapter_id == best.adapter_id

    with grpc.insecure_channel(stack.student.address) as channel:
        student = student_pb2_grpc.StudentServiceStub(channel)
        adapters = {m.adapter_id: m for m in student.ListAdapters(student_pb2.ListAdaptersRequest(), timeout=30).adapters}
        promoted = adapters[result.adapter_id]
        assert promoted.status == common_pb2.ADAPTER_STATUS_PROMOTED
        for candidate in trained:
            if candidate.adapter_id != result.adapter_id:
                assert adapters[candidate.adapter_id].status == common_pb2.ADAPTER_STATUS_REJECTED

        # The adapter on disk: a plain PEFT directory whose bytes match the manifest.
        directory = Path(promoted.path)
        assert (directory / "adapter_config.json").is_file()
        assert (directory / "adapter_model.safetensors").is_file()
        manifest = json.loads((directory / "manifest.json").read_text())
        assert manifest["adapter_id"] == promoted.adapter_id and manifest["seed"] == promoted.seed
        for name, digest in promoted.files.items():
            assert hashlib.sha256((directory / name).read_bytes()).hexdigest() == digest
        assert promoted.self_edit_sha256 == hashlib.sha256(best.self_edit.encode()).hexdigest()
        assert promoted.hyperparameters["learning_rate"] > 0

        # Unspecified adapter → the promoted version answers.
        reply = student.Generate(student_pb2.GenerateRequest(prompts=["Who founded Velmora?"], max_new_tokens=4), timeout=60)
        assert reply.served_adapter_id == result.adapter_id
        base = student.Generate(
            student_pb2.GenerateRequest(prompts=["Who founded Velmora?"], max_new_tokens=4,
                                        adapter=student_pb2.AdapterSelector(base_model=empty_pb2.Empty())),
            timeout=60,
        )
        assert base.served_adapter_id == ""


def test_rewards_stream_into_the_teachers_buffer(stack: LocalStack) -> None:
    import time

    buffer_path = stack.settings.home / "teacher" / "restem_buffer.jsonl"
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        lines = buffer_path.read_text().splitlines() if buffer_path.exists() else []
        if len(lines) >= 2:
            break
        time.sleep(0.2)
    events = [json.loads(line) for line in lines]
    assert len(events) >= 2
    assert len({e["event_id"] for e in events}) == len(events)
    assert [e["sequence"] for e in events] == sorted(e["sequence"] for e in events)
    assert all(e["adapter_id"] and "reward" in e for e in events)


@pytest.mark.parametrize(
    ("mutate", "code", "fragment"),
    [
        (lambda r: setattr(r.context, "passage", ""), grpc.StatusCode.INVALID_ARGUMENT, "passage is empty"),
        (lambda r: setattr(r.context, "passage", "x" * 20_001), grpc.StatusCode.INVALID_ARGUMENT, "above the limit"),
        # Without τ the teacher writes questions about C; the random tiny teacher writes none
        # that verify open-book, so the call is refused with what to do about it.
        (lambda r: r.ClearField("questions"), grpc.StatusCode.FAILED_PRECONDITION, "min_written_questions"),
        (lambda r: setattr(r, "k", 99), grpc.StatusCode.INVALID_ARGUMENT, "between 1 and"),
        (lambda r: setattr(r, "prompt_style", "poem"), grpc.StatusCode.INVALID_ARGUMENT, "prompt_style"),
        (lambda r: setattr(r, "adapter_name", "Bad Name!"), grpc.StatusCode.INVALID_ARGUMENT, "adapter_name"),
        # Overrides keep lora.*'s bounds at the teacher too: rank 0 used to reach the student, where
        # every one of the k candidates failed alike after sampling.
        (lambda r: setattr(r.overrides, "lora_rank", 0), grpc.StatusCode.INVALID_ARGUMENT, "overrides.lora_rank"),
        (lambda r: setattr(r.overrides, "epochs", 1000), grpc.StatusCode.INVALID_ARGUMENT, "overrides.epochs"),
    ],
)
def test_bad_adapt_input_gets_a_clear_status(stack: LocalStack, mutate, code, fragment) -> None:
    request = adapt_request()
    mutate(request)
    with pytest.raises(grpc.RpcError) as error:
        run_adapt(stack, request)
    assert error.value.code() == code
    assert fragment in error.value.details()


def test_student_errors_are_actionable_and_leave_nothing_behind(stack: LocalStack) -> None:
    registry_dir = stack.settings.registry_dir
    before = sorted(p.name for p in registry_dir.rglob("*"))
    with grpc.insecure_channel(stack.student.address) as channel:
        student = student_pb2_grpc.StudentServiceStub(channel)
        with pytest.raises(grpc.RpcError) as error:
            student.Promote(student_pb2.PromoteRequest(adapter_id="default@v999"), timeout=30)
        assert error.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.RpcError) as error:
            student.Promote(student_pb2.PromoteRequest(adapter_id="not an id"), timeout=30)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT

        def apply(self_edit: str, **overrides: object) -> None:
            request = student_pb2.ApplySelfEditRequest(
                context=common_pb2.Context(title="Velmora", passage=PASSAGE), self_edit=self_edit
            )
            for key, value in overrides.items():
                setattr(request.overrides, key, value)
            list(student.ApplySelfEdit(request, timeout=120))

        with pytest.raises(grpc.RpcError) as error:
            apply("\n - \n 1.\nok\n")
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "no usable lines" in error.value.details()

        with pytest.raises(grpc.RpcError) as error:
            apply("Velmora was founded in 1742 by Ilse Marrow.", learning_rate=1e30, epochs=3)
        # lr 1e30 is outside lora.learning_rate's bounds: refused before any training thread, lock or
        # staging folder (a divergence inside the bounds is tests/test_lora_sft.py's to check).
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert "learning_rate" in error.value.details()
    after = sorted(p.name for p in registry_dir.rglob("*"))
    assert after == before
    assert not list(registry_dir.rglob(".staging-*"))
    # ...and the service keeps serving.
    with grpc.insecure_channel(stack.student.address) as channel:
        health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
        assert health.status == health_pb2.HealthCheckResponse.SERVING


def test_a_rejected_candidate_whose_weights_are_discarded_never_answers_again(stack: LocalStack) -> None:
    with grpc.insecure_channel(stack.student.address) as channel:
        student = student_pb2_grpc.StudentServiceStub(channel)
        request = student_pb2.ApplySelfEditRequest(
            adapter_name="scratch", context=common_pb2.Context(title="Velmora", passage=PASSAGE),
            self_edit="Velmora was founded in 1742 by Ilse Marrow.",
        )
        candidate = [u.candidate for u in student.ApplySelfEdit(request, timeout=120) if u.HasField("candidate")][0]
        generate = student_pb2.GenerateRequest(
            prompts=["Who founded Velmora?"], max_new_tokens=4,
            adapter=student_pb2.AdapterSelector(adapter_id=candidate.adapter_id),
        )
        assert student.Generate(generate, timeout=60).served_adapter_id == candidate.adapter_id  # now cached in memory

        reply = student.Reject(student_pb2.RejectRequest(adapter_id=candidate.adapter_id, reason="scored only",
                                                         discard_weights=True), timeout=30)
        assert reply.adapter.status == common_pb2.ADAPTER_STATUS_REJECTED
        assert [p.name for p in Path(candidate.path).iterdir()] == ["manifest.json"]
        with pytest.raises(grpc.RpcError) as error:
            student.Generate(generate, timeout=60)
        assert error.value.code() == grpc.StatusCode.FAILED_PRECONDITION
        assert "weights were discarded" in error.value.details()

    # The audit trail records that this version can no longer be re-examined.
    from seal.audit import AuditLog

    deadline = time.monotonic() + 30
    while True:
        with AuditLog(stack.settings.audit_log_path) as log:
            rejects = log.records(kind="reject", adapter_id=candidate.adapter_id)
        if rejects or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [r.payload["cause"] for r in rejects] == ["scored only; weights discarded"]


def test_every_service_has_health_reflection_and_metrics(stack: LocalStack) -> None:
    for name, service in (("student", stack.student), ("auditor", stack.auditor), ("teacher", stack.teacher)):
        full_name = f"seal.v1.{name.capitalize()}Service"
        with grpc.insecure_channel(service.address) as channel:
            health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=full_name), timeout=5)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            reflection = reflection_pb2_grpc.ServerReflectionStub(channel)
            replies = reflection.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5)
            names = {s.name for reply in replies for s in reply.list_services_response.service}
            assert full_name in names
        body = urllib.request.urlopen(f"http://127.0.0.1:{service.metrics_port}/metrics", timeout=5).read().decode()
        assert f"seal_{name}_rpc_requests_total" in body and f"seal_{name}_rpc_duration_seconds_bucket" in body
    student_metrics = urllib.request.urlopen(f"http://127.0.0.1:{stack.student.metrics_port}/metrics", timeout=5).read().decode()
    assert "seal_student_candidates_trained_total" in student_metrics
    teacher_metrics = urllib.request.urlopen(f"http://127.0.0.1:{stack.teacher.metrics_port}/metrics", timeout=5).read().decode()
    assert 'seal_teacher_self_edits_proposed_total{style="implications"}' in teacher_metrics


def test_default_gates_promote_nothing_without_gain(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = tiny_settings(tmp_path, tiny_model_dir)
    with local_stack(settings) as running:
        result = run_adapt(running, adapt_request(k=1))[-1].result
    candidate = result.candidates[0]
    assert candidate.adapter_id and candidate.reward <= 0  # seeded: a random model gains nothing here
    assert not result.promoted
    assert "nothing promoted" in result.decision_reason
    assert any(not g.passed and g.gate == "tau_gain" for g in candidate.gates)
