"""Floods (issue 12, part 4): bounded queues that refuse with a retry hint, training that never
starves generation, deadlines that stop abandoned work, and a memory budget for requests.
Real servers on loopback (port 0), the tiny random model; the admission queue is also checked on
its own (seal.rpc.WorkQueue is plain Python)."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from seal.config import Settings
from seal.rpc import CallerGone, Overloaded, WorkQueue, retry_after_estimate
from seal.stack import local_stack
from seal.v1 import (
    auditor_pb2,
    auditor_pb2_grpc,
    common_pb2,
    student_pb2,
    student_pb2_grpc,
    teacher_pb2,
    teacher_pb2_grpc,
)

PASSAGE = (
    "Velmora is a harbour town on the island of Quessant. It was founded in 1742 by the "
    "cartographer Ilse Marrow. The town's lighthouse, the Grey Lantern, is 41 meters tall."
)
# Forty distinct training lines: with batch_size 1 and 100 epochs a candidate takes thousands of
# optimizer steps, long enough to still be training when the test is done with it.
SLOW_SELF_EDIT = "\n".join(f"- Fact number {i}: the harbour of Velmora has {i} moorings in row {i}." for i in range(40))


def base_settings(home: Path, model_dir: Path, **sections: dict) -> Settings:
    settings = {
        "home": home,
        "model": {"path": str(model_dir), "torch_threads": 1},
        "lora": {"epochs": 100, "batch_size": 1, "max_seq_len": 64, "rehearsal_ratio": 0.0, "kl_beta": 0.0},
        "teacher": {"max_new_tokens": 24, "default_k": 1},
        "auditor": {"answer_max_new_tokens": 8},
        "guardrails": {"unknown_entities": {"enabled": False}},
        "retention": {"measure_kl": False},
    }
    for name, values in sections.items():
        settings[name] = {**settings.get(name, {}), **values}
    return Settings(**settings)


def trailing(error: grpc.RpcError) -> dict[str, str]:
    return dict(error.trailing_metadata() or ())


def serving(address: str) -> bool:
    with grpc.insecure_channel(address) as channel:
        reply = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=10)
    return reply.status == health_pb2.HealthCheckResponse.SERVING


# --- the admission queue alone -------------------------------------------------------------------


def test_retry_estimate_counts_the_rounds_ahead_and_stays_clamped() -> None:
    assert retry_after_estimate(10.0, ahead=1, slots=1) == 10.0
    assert retry_after_estimate(10.0, ahead=3, slots=1) == 30.0
    assert retry_after_estimate(10.0, ahead=3, slots=2) == 20.0  # two rounds of two
    assert retry_after_estimate(0.01, ahead=1, slots=1) == 1.0  # floor: "soon", never "now"
    assert retry_after_estimate(1e6, ahead=5, slots=1) == 3600.0


def test_work_queue_refuses_beyond_its_depth_at_once_and_serves_waiters_in_order() -> None:
    queue = WorkQueue("q", slots=1, depth=2, wait_s=30.0, setting="x.q")
    assert queue.acquire(1.0)
    order: list[int] = []

    def wait_then_record(n: int) -> None:
        with queue.admitted(30.0):
            order.append(n)

    waiters = []
    for n in (1, 2):
        waiters.append(threading.Thread(target=wait_then_record, args=(n,)))
        waiters[-1].start()
        while queue.waiting < n:  # in this order, so that first come is first served
            time.sleep(0.01)
    with pytest.raises(Overloaded) as refused:
        queue.acquire(30.0)  # full: refused without waiting the 30 s
    assert "x.q_depth=2" in str(refused.value) and refused.value.retry_after_s >= 1.0
    queue.release()
    for waiter in waiters:
        waiter.join(10)
    assert order == [1, 2] and queue.running == 0 and queue.waiting == 0


def test_work_queue_wait_runs_out_and_a_departed_caller_leaves_the_line() -> None:
    queue = WorkQueue("q", slots=1, depth=4, wait_s=0.3, setting="x.q")
    queue.acquire()
    with pytest.raises(Overloaded, match="no free slot within 0.3 s"):
        queue.acquire(10.0)  # capped by wait_s
    with pytest.raises(CallerGone):
        queue.acquire(10.0, should_stop=lambda: True)
    assert queue.waiting == 0
    queue.release()
    with queue.admitted(0.0):  # free again: no wait needed
        assert queue.running == 1


# --- over the wire -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    settings = base_settings(
        tmp_path_factory.mktemp("seal-home"), tiny_model_dir,
        # A small server: 8 RPCs at once. Before training had its own queue, 8 ApplySelfEdit took
        # every slot and a Generate was refused (or, with fewer threads, waited past its deadline).
        services={"max_concurrent_rpcs": 8, "max_workers": 8, "inflight_request_bytes": 48 * 1024},
        student={"training_slots": 1, "training_queue_depth": 1},
        teacher={"adapt_queue_depth": 0},
        # Long closed-book answers: a Score of 64 questions is then about half a minute of generation.
        auditor={"answer_max_new_tokens": 512},
    )
    with local_stack(settings) as running:
        yield running


def slow_training(student: student_pb2_grpc.StudentServiceStub, passage: str = PASSAGE):
    return student.ApplySelfEdit(
        student_pb2.ApplySelfEditRequest(
            context=common_pb2.Context(title="Velmora", passage=passage), self_edit=SLOW_SELF_EDIT, seed=1,
        ),
        timeout=600,
    )


def test_a_flood_of_training_never_starves_generate(stack) -> None:
    with grpc.insecure_channel(stack.student.address) as channel:
        student = student_pb2_grpc.StudentServiceStub(channel)
        calls = [slow_training(student) for _ in range(8)]
        try:
            outcomes: dict[int, str] = {}

            def first_event(index: int) -> None:
                try:
                    next(calls[index])
                    outcomes[index] = "streaming"
                except grpc.RpcError as exc:
                    outcomes[index] = exc.code().name
                    if exc.code() is grpc.StatusCode.RESOURCE_EXHAUSTED:
                        metadata = trailing(exc)
                        assert int(metadata["retry-after-ms"]) >= 1000, metadata
                        assert metadata["grpc-retry-pushback-ms"] == metadata["retry-after-ms"]
                        assert "student.training_queue_depth" in exc.details(), exc.details()

            readers = [threading.Thread(target=first_event, args=(i,)) for i in range(8)]
            for reader in readers:
                reader.start()
            # The one admitted training streams progress; the one queued waits; the rest are refused.
            deadline = time.monotonic() + 120
            while "streaming" not in outcomes.values() and time.monotonic() < deadline:
                time.sleep(0.1)
            assert "streaming" in outcomes.values(), outcomes

            reply = student.Generate(
                student_pb2.GenerateRequest(prompts=["The lighthouse is"], max_new_tokens=4), timeout=5
            )
            assert len(reply.completions) == 1
            assert serving(stack.student.address)
            refused = [code for code in outcomes.values() if code == "RESOURCE_EXHAUSTED"]
            assert len(refused) == 6, outcomes  # 8 − one training − one queued
        finally:
            for call in calls:
                call.cancel()
            for reader in readers:
                reader.join(30)
        # Cancelled training stops at its next step: the queue drains and a new call is admitted
        # (refused with the queue full until then; without deadlines in the loop, never).
        quick = student_pb2.ApplySelfEditRequest(
            context=common_pb2.Context(title="Velmora", passage=PASSAGE),
            self_edit="The Grey Lantern of Velmora is 41 meters tall.", seed=2,
            overrides=common_pb2.UpdateOverrides(epochs=1),
        )
        give_up = time.monotonic() + 90
        while True:
            try:
                done = list(student.ApplySelfEdit(quick, timeout=120))
                break
            except grpc.RpcError as exc:
                if exc.code() is not grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > give_up:
                    raise
                time.sleep(0.5)
        assert done[-1].WhichOneof("event") == "candidate"


def test_an_abandoned_generation_stops_and_the_next_generate_is_served(stack) -> None:
    with grpc.insecure_channel(stack.student.address) as channel:
        student = student_pb2_grpc.StudentServiceStub(channel)
        # Far more work than the deadline allows (about a minute on this model); before deadlines
        # reached the generation loop, it ran to the end holding the model and the next call waited.
        prompts = [f"Tell me everything about harbour {i}" for i in range(64)]
        with pytest.raises(grpc.RpcError) as expired:
            student.Generate(student_pb2.GenerateRequest(prompts=prompts, max_new_tokens=900), timeout=1.5)
        assert expired.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        reply = student.Generate(
            student_pb2.GenerateRequest(prompts=["The lighthouse is"], max_new_tokens=4), timeout=20
        )
        assert len(reply.completions) == 1


def test_a_score_past_its_deadline_stops_the_student_generating(stack) -> None:
    questions = [common_pb2.Question(question=f"What is moored at berth {i} of Velmora?", answer=f"ship {i}")
                 for i in range(64)]
    with grpc.insecure_channel(stack.auditor.address) as auditor_channel, \
            grpc.insecure_channel(stack.student.address) as student_channel:
        auditor = auditor_pb2_grpc.AuditorServiceStub(auditor_channel)
        with pytest.raises(grpc.RpcError) as expired:
            # The auditor asks the student for 64 answers of up to 512 tokens: ~30 s of work.
            auditor.Score(
                auditor_pb2.ScoreRequest(
                    questions=questions, context=common_pb2.Context(title="Velmora", passage=PASSAGE),
                    skip_retention=True,
                ),
                timeout=1.5,
            )
        assert expired.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED
        reply = student_pb2_grpc.StudentServiceStub(student_channel).Generate(
            student_pb2.GenerateRequest(prompts=["The lighthouse is"], max_new_tokens=4), timeout=15
        )
        assert len(reply.completions) == 1
    assert serving(stack.auditor.address) and serving(stack.student.address)


def test_a_full_adapt_queue_answers_resource_exhausted_with_a_retry_hint(stack) -> None:
    request = teacher_pb2.AdaptRequest(
        context=common_pb2.Context(title="Velmora", passage=PASSAGE),
        questions=[common_pb2.Question(question="Who founded Velmora?", answer="Ilse Marrow")],
        k=1, seed=3,
    )
    with grpc.insecure_channel(stack.teacher.address) as channel:
        teacher = teacher_pb2_grpc.TeacherServiceStub(channel)
        running = teacher.Adapt(request, timeout=600)
        try:
            next(running)  # the first event: this Adapt holds the teacher's one slot
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as refused:
                list(teacher.Adapt(request, timeout=600))
            waited = time.monotonic() - started
        finally:
            running.cancel()
    assert refused.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "teacher.adapt_queue_depth=0" in refused.value.details(), refused.value.details()
    metadata = trailing(refused.value)
    assert int(metadata["retry-after-ms"]) >= 1000 and metadata["grpc-retry-pushback-ms"] == metadata["retry-after-ms"]
    # Refused on arrival, not after a wait (the old single slot waited 5 s before refusing);
    # generous, since it only has to tell "at once" from "after a wait".
    assert waited < 4.0, waited
    assert serving(stack.teacher.address)


def test_requests_over_their_method_cap_or_the_in_flight_budget_are_refused(stack) -> None:
    with grpc.insecure_channel(stack.student.address) as channel:
        student = student_pb2_grpc.StudentServiceStub(channel)
        # An id-only method has a small cap: refused before it is parsed, whatever it says.
        with pytest.raises(grpc.RpcError) as too_big:
            student.Promote(student_pb2.PromoteRequest(adapter_id="x" * 100_000), timeout=30)
        assert too_big.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "services.method_max_request_bytes" in too_big.value.details()
        assert "retry-after-ms" not in trailing(too_big.value)  # retrying the same bytes cannot help
        # Above the server-wide cap grpc refuses the message before reading it.
        with pytest.raises(grpc.RpcError) as huge:
            student.Generate(student_pb2.GenerateRequest(prompts=["x" * (5 * 1024 * 1024)]), timeout=30)
        assert huge.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED

        # A 30 KB training request in flight, then a 30 KB Generate: together past the 48 KB budget.
        passage = (PASSAGE + " ") * 150
        training = slow_training(student, passage=passage[:19_000])
        generate = student_pb2.GenerateRequest(prompts=["y" * 30_000], max_new_tokens=1)
        try:
            next(training)
            with pytest.raises(grpc.RpcError) as over_budget:
                student.Generate(generate, timeout=30)
            assert over_budget.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
            assert "services.inflight_request_bytes" in over_budget.value.details()
            assert int(trailing(over_budget.value)["retry-after-ms"]) >= 1
        finally:
            training.cancel()
        # The budget comes back when the call ends: the same request now passes the budget (and
        # is then judged on its content: the model's context is far shorter than 30,000 characters).
        deadline = time.monotonic() + 60
        while True:
            try:
                student.Generate(generate, timeout=30)
                code = grpc.StatusCode.OK
            except grpc.RpcError as exc:
                code = exc.code()
            if code is not grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert code in (grpc.StatusCode.OK, grpc.StatusCode.INVALID_ARGUMENT), code
