"""The one SEAL step (``seal.adapt``): in process against scripted ports, and over real gRPC
through the teacher's Adapt against student and auditor services that misbehave on purpose."""

from __future__ import annotations

from collections.abc import Iterator
from concurrent import futures
from dataclasses import dataclass, field

import grpc
import pytest

from seal import adapt
from seal.auditor import QuestionOutcome
from seal.config import Settings
from seal.domains.knowledge import Question
from seal.gates import GateResult
from seal.rpc import RpcMetrics
from seal.v1 import (
    auditor_pb2,
    auditor_pb2_grpc,
    common_pb2,
    student_pb2,
    student_pb2_grpc,
    teacher_pb2,
    teacher_pb2_grpc,
)

TASK = adapt.Task("Velmora", "Velmora is a harbour town whose mayor is Ana Dirk.", (Question("Who is the mayor?", "Ana Dirk"),))


def _proposals(k: int) -> list[adapt.Proposal]:
    return [adapt.Proposal(i, f"prompt {i}", f"self-edit number {i} about Velmora's mayor") for i in range(k)]


@dataclass
class ScriptedStudent:
    """Per self-edit index: 'ok', 'refuse' (the self-edit is unusable) or 'empty' (the stream
    ends without an adapter, as a broken student would)."""

    script: dict[int, str]
    promoted: list[str] = field(default_factory=list)
    rejected: list[str] = field(default_factory=list)
    trained: int = 0

    def train(self, task, proposal, *, adapter_name, seed, overrides, training_prompts=()) -> Iterator:
        behaviour = self.script[proposal.index]
        yield adapt.TrainingStep(1, 2, 0.5)
        if behaviour == "refuse":
            raise adapt.CandidateRefused("the self-edit has no usable lines")
        if behaviour == "empty":
            return
        self.trained += 1
        yield adapt.TrainingStep(2, 2, 0.25)
        yield adapt.TrainedAdapter(f"{adapter_name}@v{self.trained}", 3, 0.1)

    def promote(self, adapter_id, reason) -> None:
        self.promoted.append(adapter_id)

    def reject(self, adapter_id, reason, *, discard_weights=False) -> None:
        self.rejected.append(adapter_id)


@dataclass
class ScriptedAuditor:
    """Reward per adapter id; a candidate passes its gates when its reward is positive."""

    rewards: dict[str, float]
    guardrail_failures: set[int] = field(default_factory=set)
    scored: list[str] = field(default_factory=list)

    def check(self, task, proposal, *, seed, request_id) -> adapt.GuardrailCheck:
        passed = proposal.index not in self.guardrail_failures
        return adapt.GuardrailCheck(passed, (GateResult("guardrail:injection", passed, None, None, "checked"),))

    def baseline(self, task) -> adapt.Baseline:
        return adapt.Baseline(0.0, (QuestionOutcome("q", "a", "", False, False, 0.0, False),))

    def score(self, task, proposal, adapter, *, seed, guardrails, request_id, measure_retention) -> adapt.Score:
        self.scored.append(adapter.adapter_id)
        reward = self.rewards[adapter.adapter_id]
        gate = GateResult("tau_gain", reward > 0, reward, 0.0, f"gain {reward:+.2f}")
        return adapt.Score(reward, 0.0, reward, reward > 0, (gate,), ())


def _run(student, auditor, k: int) -> list[adapt.Event]:
    return list(adapt.run_adapt(
        TASK, propose=lambda task, k, seed: _proposals(k), student=student, auditor=auditor,
        k=k, seed=7, adapter_name="default", request_id="r1",
    ))


def test_best_passing_candidate_is_promoted_and_every_other_scored_one_rejected() -> None:
    student = ScriptedStudent({0: "ok", 1: "ok", 2: "ok"})
    auditor = ScriptedAuditor({"default@v1": 0.2, "default@v2": 0.6, "default@v3": -0.2})
    events = _run(student, auditor, 3)
    assert student.promoted == ["default@v2"]
    assert sorted(student.rejected) == ["default@v1", "default@v3"]
    finished = events[-1]
    assert isinstance(finished, adapt.AdaptFinished)
    assert finished.promoted is not None and finished.promoted.proposal.index == 1
    progress = [e for e in events if isinstance(e, adapt.CandidateProgress)]
    assert [(e.index, e.step) for e in progress] == [(0, 1), (0, 2), (1, 1), (1, 2), (2, 1), (2, 2)]
    assert set(finished.phase_seconds) == {"generation", "training", "scoring", "total"}


def test_a_refused_or_guarded_self_edit_fails_alone() -> None:
    student = ScriptedStudent({0: "refuse", 1: "ok", 2: "ok"})
    auditor = ScriptedAuditor({"default@v1": 0.5, "default@v2": 0.1}, guardrail_failures={2})
    events = _run(student, auditor, 3)
    failed = {e.index: e.reason for e in events if isinstance(e, adapt.CandidateFailed)}
    assert failed[0].startswith("training failed: the self-edit has no usable lines")
    assert failed[2] == "guardrails failed before training: guardrail:injection"
    assert student.trained == 1  # the guarded edit never reached the student
    assert student.promoted == ["default@v1"]


@pytest.mark.parametrize("batch", [False, True])
def test_a_recipe_that_did_not_parse_says_why_in_its_failure(batch: bool) -> None:
    """The caller gets the recipe's parse error to act on; other rules' reasons (which may quote a
    secret) stay in the audit record."""
    from seal.domains.fewshot import FewShotSettings
    from seal.domains.fewshot_audit import check_recipe

    recipe = check_recipe("not a recipe at all", FewShotSettings())
    assert not recipe.passed and recipe.detail

    @dataclass
    class RecipeAuditor(ScriptedAuditor):
        def check(self, task, proposal, *, seed, request_id) -> adapt.GuardrailCheck:
            if proposal.index == 0:
                gates = (adapt.guardrail_to_gate(recipe),)
            else:
                gates = (GateResult("guardrail:secrets", False, None, None, "found the key sk-1234"),)
            return adapt.GuardrailCheck(False, gates)

    events = list(adapt.run_adapt(
        TASK, propose=lambda task, k, seed: _proposals(k), student=ScriptedStudent({0: "ok", 1: "ok"}),
        auditor=RecipeAuditor({}), k=2, seed=7, adapter_name="default", request_id="r1", batch_candidates=batch,
    ))
    failed = {e.index: e.reason for e in events if isinstance(e, adapt.CandidateFailed)}
    assert failed[0] == f"guardrails failed before training: guardrail:recipe ({recipe.detail})"
    assert failed[1] == "guardrails failed before training: guardrail:secrets"


def test_nothing_passing_promotes_nothing_and_says_why_per_candidate() -> None:
    student = ScriptedStudent({0: "ok", 1: "refuse"})
    auditor = ScriptedAuditor({"default@v1": -0.1})
    finished = _run(student, auditor, 2)[-1]
    assert finished.promoted is None and student.promoted == []
    assert student.rejected == ["default@v1"]
    assert "#0: gain -0.10" in finished.reason and "#1: training failed" in finished.reason


@pytest.mark.parametrize("empty_index", [0, 1])
def test_a_training_stream_without_adapter_never_scores_another_candidates_adapter(empty_index: int) -> None:
    script = {0: "ok", 1: "ok"}
    script[empty_index] = "empty"
    student = ScriptedStudent(script)
    auditor = ScriptedAuditor({"default@v1": 0.5})
    with pytest.raises(RuntimeError, match=f"self-edit #{empty_index} ended without an adapter"):
        _run(student, auditor, 2)
    assert student.promoted == []
    assert auditor.scored == (["default@v1"] if empty_index == 1 else [])


def test_score_candidate_returns_its_outcome_to_a_caller_that_ignores_events() -> None:
    student = ScriptedStudent({4: "ok"})
    auditor = ScriptedAuditor({"lineage@v1": 0.25})
    outcome = adapt.drain(adapt.score_candidate(
        TASK, adapt.Proposal(4, "p", "a usable self-edit line"), student=student, auditor=auditor,
        adapter_name="lineage", seed=3, request_id="round-1",
    ))
    assert outcome.adapter.adapter_id == "lineage@v1" and outcome.score.reward == 0.25
    assert student.promoted == [] and student.rejected == []  # the caller decides, not the step


def test_refusal_classification_matches_the_grpc_mapping() -> None:
    from seal.rpc import status_code_for
    from seal.update.lora_sft import TrainingCancelled, TrainingDiverged

    for exc in (ValueError("bad"), TrainingDiverged("nan"), TrainingCancelled("late"), RuntimeError("down")):
        refused = status_code_for(exc) in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
        assert adapt.is_refusal(exc) is refused, exc


# --- over gRPC: the teacher's Adapt against a student whose stream ends without a candidate ----


class _EmptyStreamStudent(student_pb2_grpc.StudentServiceServicer):
    """Trains self-edit 0 properly; the stream for any later one ends without a candidate."""

    def __init__(self) -> None:
        self.calls = 0
        self.promoted: list[str] = []

    def ApplySelfEdit(self, request, context):
        self.calls += 1
        yield student_pb2.ApplySelfEditResponse(progress=common_pb2.TrainingProgress(step=1, total_steps=1, loss=0.1))
        if self.calls == 1:
            manifest = common_pb2.AdapterManifest(adapter_id="default@v1", adapter_name="default", version=1)
            manifest.hyperparameters.update({"training_sequences": 2})
            yield student_pb2.ApplySelfEditResponse(candidate=manifest)

    def Promote(self, request, context):
        self.promoted.append(request.adapter_id)
        return student_pb2.PromoteResponse()

    def Reject(self, request, context):
        return student_pb2.RejectResponse()


class _PassingAuditor(auditor_pb2_grpc.AuditorServiceServicer):
    def CheckSelfEdit(self, request, context):
        return auditor_pb2.CheckSelfEditResponse(passed=True)

    def Score(self, request, context):
        adapted = 1.0 if request.adapter_id else 0.0
        return auditor_pb2.ScoreResponse(baseline_accuracy=0.0, adapted_accuracy=adapted, reward=adapted, passed_gates=True)


class _FixedProposer:
    def propose(self, title, passage, k, style, seed):
        from seal.teacher import ProposedSelfEdit

        return [ProposedSelfEdit(i, f"prompt {i}", f"Velmora fact number {i}.", 5) for i in range(k)]


@pytest.fixture()
def grpc_stack(tmp_path):
    from teacher_svc.servicer import TeacherServicer

    servers, channels = [], []

    def serve(add, servicer) -> str:
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=4))
        add(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        server.start()
        servers.append(server)
        return f"127.0.0.1:{port}"

    student = _EmptyStreamStudent()
    student_address = serve(student_pb2_grpc.add_StudentServiceServicer_to_server, student)
    auditor_address = serve(auditor_pb2_grpc.add_AuditorServiceServicer_to_server, _PassingAuditor())
    channels += [grpc.insecure_channel(student_address), grpc.insecure_channel(auditor_address)]
    teacher = TeacherServicer(Settings(home=tmp_path), _FixedProposer(), channels[0], channels[1], RpcMetrics("teacher"))
    teacher_address = serve(teacher_pb2_grpc.add_TeacherServiceServicer_to_server, teacher)
    channel = grpc.insecure_channel(teacher_address)
    channels.append(channel)
    yield teacher_pb2_grpc.TeacherServiceStub(channel), student
    for c in channels:
        c.close()
    for s in servers:
        s.stop(None)


def test_adapt_fails_loudly_instead_of_reusing_the_previous_edits_adapter(grpc_stack) -> None:
    teacher, student = grpc_stack
    request = teacher_pb2.AdaptRequest(
        context=common_pb2.Context(title=TASK.title, passage=TASK.passage),
        questions=[common_pb2.Question(question="Who is the mayor?", answer="Ana Dirk")],
        k=2,
    )
    with pytest.raises(grpc.RpcError) as raised:
        list(teacher.Adapt(request, timeout=30))
    assert raised.value.code() == grpc.StatusCode.INTERNAL
    assert "self-edit #1 ended without an adapter" in raised.value.details()
    assert student.promoted == []  # before the fix, edit #1 reused default@v1 and it was promoted


# --- Adapt from a document alone ---------------------------------------------------------------

from hypothesis import given  # noqa: E402
from hypothesis import settings as hsettings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from seal.domains import self_qa  # noqa: E402

WRITTEN = (
    "Here are some questions.\n"
    "Q: Who is the mayor of Velmora?\nA: Ana Dirk\n"
    "Q1: What does Velmora export?\nA1: salt.\n"
    "Question: When was the harbour built?\nAnswer: 1802\n"
    "Q: What colour is the lighthouse?\n"  # no answer: dropped
    "Q: Who is the mayor of Velmora?\nA: Ana Dirk\n"  # duplicate: dropped
    "Q: Which river feeds the bay?\nA: the Orla\n"
)


def test_written_pairs_are_parsed_verified_open_book_and_split() -> None:
    asked: list[str] = []

    def answer_open_book(prompts: list[str]) -> list[str]:
        asked.extend(prompts)
        # The base model gets every pair right except the harbour's date.
        return ["Ana Dirk", "salt", "1790", "the Orla"]

    def grade(questions, answers):
        return [q.answer.casefold() in a.casefold() for q, a in zip(questions, answers)]

    written = self_qa.write_questions(
        "Velmora", TASK.passage, generate=lambda prompt: WRITTEN, answer_open_book=answer_open_book, grade=grade,
        n=6, held_out_fraction=0.5, min_held_out=1, seed=3,
    )
    assert all("Passage: " + TASK.passage in p for p in asked)  # verified with the passage in context
    kept = {q.question for q in (*written.training, *written.held_out)}
    assert kept == {"Who is the mayor of Velmora?", "What does Velmora export?", "Which river feeds the bay?"}
    assert written.written == 6 and written.dropped == 3
    assert set(written.training).isdisjoint(written.held_out) and len(written.held_out) == 2


@hsettings(max_examples=50, deadline=None)
@given(st.lists(st.text(alphabet="abcdefgh ", min_size=1, max_size=12), unique=True, max_size=30),
       st.floats(min_value=0.05, max_value=1.0), st.integers(0, 1000))
def test_split_is_a_seeded_partition(questions: list[str], fraction: float, seed: int) -> None:
    pool = [Question(q, "a") for q in questions]
    training, held_out = self_qa.split_questions(pool, held_out_fraction=fraction, seed=seed)
    assert sorted(map(str, training + held_out)) == sorted(map(str, pool))
    assert not set(training) & set(held_out)
    assert (training, held_out) == self_qa.split_questions(pool, held_out_fraction=fraction, seed=seed)
    assert bool(held_out) == bool(pool)


@dataclass
class PromptRecordingStudent(ScriptedStudent):
    prompts_seen: list[tuple[str, ...]] = field(default_factory=list)

    def train(self, task, proposal, *, adapter_name, seed, overrides, training_prompts=()):
        self.prompts_seen.append(tuple(training_prompts))
        yield from super().train(task, proposal, adapter_name=adapter_name, seed=seed, overrides=overrides)


def _written(held_out: int, training: int = 2) -> self_qa.WrittenQuestions:
    return self_qa.WrittenQuestions(
        tuple(Question(f"train {i}?", "x") for i in range(training)),
        tuple(Question(f"held {i}?", "y") for i in range(held_out)),
        written=held_out + training + 1, dropped=1, min_held_out=2,
    )


def test_a_task_without_questions_is_scored_on_written_held_out_questions() -> None:
    student = PromptRecordingStudent({0: "ok"})
    auditor = ScriptedAuditor({"default@v1": 0.5})
    events = list(adapt.run_adapt(
        adapt.Task(TASK.title, TASK.passage, ()), propose=lambda task, k, seed: _proposals(k), student=student,
        auditor=auditor, k=1, seed=0, adapter_name="default", write_questions=lambda task, seed: _written(3),
    ))
    written = next(e for e in events if isinstance(e, adapt.QuestionsWritten))
    finished = events[-1]
    assert [q.question for q in finished.task.questions] == ["held 0?", "held 1?", "held 2?"]
    assert finished.written is written.questions
    assert student.prompts_seen == [("train 0?", "train 1?")]


def test_too_few_surviving_questions_fail_the_call_as_a_precondition() -> None:
    from seal.rpc import status_code_for

    student = PromptRecordingStudent({0: "ok"})
    with pytest.raises(self_qa.NotEnoughQuestions, match="leaving 1 for τ") as raised:
        list(adapt.run_adapt(
            adapt.Task(TASK.title, TASK.passage, ()), propose=lambda task, k, seed: _proposals(k), student=student,
            auditor=ScriptedAuditor({}), k=1, seed=0, adapter_name="default",
            write_questions=lambda task, seed: _written(1),
        ))
    assert status_code_for(raised.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert student.trained == 0


def test_an_on_policy_rule_gets_written_prompts_but_keeps_the_callers_tau() -> None:
    student = PromptRecordingStudent({0: "ok"})
    written = self_qa.WrittenQuestions(
        (Question("Who is the mayor?", "Ana Dirk"), Question("train 1?", "x")), (Question("held 0?", "y"),), 4, 1,
    )
    events = list(adapt.run_adapt(
        TASK, propose=lambda task, k, seed: _proposals(k), student=student, auditor=ScriptedAuditor({"default@v1": 0.5}),
        k=1, seed=0, adapter_name="default", write_questions=lambda task, seed: written, needs_training_prompts=True,
    ))
    assert events[-1].task == TASK and events[-1].written is None
    # τ's own question never becomes a training prompt.
    assert student.prompts_seen == [("train 1?", "held 0?")]


def test_an_on_policy_rule_with_no_prompts_left_fails_before_any_training() -> None:
    from seal.rpc import status_code_for

    student = PromptRecordingStudent({0: "ok"})
    asked_only = self_qa.WrittenQuestions((), tuple(Question(q.question, q.answer) for q in TASK.questions), 3, 2)
    with pytest.raises(self_qa.NotEnoughQuestions, match="none besides τ") as raised:
        list(adapt.run_adapt(
            TASK, propose=lambda task, k, seed: _proposals(k), student=student, auditor=ScriptedAuditor({}),
            k=1, seed=0, adapter_name="default", write_questions=lambda task, seed: asked_only,
            needs_training_prompts=True,
        ))
    assert status_code_for(raised.value) == grpc.StatusCode.FAILED_PRECONDITION
    assert student.trained == 0
