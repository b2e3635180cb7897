"""The few-shot ARC domain through the one candidate pipeline (seal.adapt.run_adapt): recipes
proposed from the recipe prompt, checked as a guardrail, refused over budget, trained by the
student's LoRA SFT, scored pass@2 with a binary reward, decided like any other candidate."""

from __future__ import annotations

from pathlib import Path

import pytest

from seal import adapt
from seal.auditor import Auditor
from seal.config import Settings
from seal.domains import fewshot_audit
from seal.domains.fewshot import (
    ArcPair,
    ArcTask,
    FewShotSelfEdit,
    FewShotSettings,
    build_self_edit_prompt,
)
from seal.executors import CandidateJob
from seal.gates import GateSettings
from seal.grading import build_grader
from seal.guardrails import GuardrailSettings
from seal.local import LocalAuditorPort, LocalStudentPort
from seal.student import Student
from seal.teacher import ProposedSelfEdit


def flip(grid: tuple[tuple[int, ...], ...]) -> tuple[tuple[int, ...], ...]:
    return tuple(tuple(reversed(row)) for row in grid)


def flip_task() -> ArcTask:
    """Mirror each row: three demonstrations, one test input with its gold output."""
    inputs = [((1, 0), (2, 0)), ((0, 3), (0, 4)), ((5, 6), (0, 0))]
    test = ((7, 0), (0, 8))
    return ArcTask("flip", tuple(ArcPair(g, flip(g)) for g in inputs), (test,), (flip(test),))


VALID = FewShotSelfEdit(True, False, False, False, "output_tokens", 1e-3, 1).to_json()
MALFORMED = '{"basic": "yes", "epochs": 1}'
OVER_BUDGET = FewShotSelfEdit(True, False, False, False, "all_tokens", 1e-3, 10).to_json()


def fewshot_settings(home: Path, model_dir: Path) -> Settings:
    return Settings(
        home=home,
        model={"path": str(model_dir)},
        # Small on purpose: two examples, one vote view, short answers; 10 epochs × 2 examples = 20
        # steps is over the 8-step budget, one epoch is under it.
        fewshot={"max_examples": 2, "leave_two_out": False, "max_steps": 8, "vote_views": ["identity"],
                 "answer_max_new_tokens": 16, "max_seq_len": 512},
    )


@pytest.fixture(scope="module")
def ports(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, one_torch_thread):
    settings = fewshot_settings(tmp_path_factory.mktemp("fewshot-home"), tiny_model_dir)
    student = Student(settings)
    auditor = Auditor(build_grader(settings.auditor), GateSettings())
    yield (
        LocalStudentPort(student),
        LocalAuditorPort(student, auditor, guardrails=GuardrailSettings(), fewshot=settings.fewshot),
        student,
    )
    student.close()


def fixed(texts: list[str]) -> adapt.ProposeFn:
    def propose(task: adapt.Task, k: int, seed: int) -> list[adapt.Proposal]:
        prompt = build_self_edit_prompt(task.fewshot)  # type: ignore[arg-type]
        return [adapt.Proposal(i, prompt, text) for i, text in enumerate(texts[:k])]

    return propose


def test_a_fewshot_task_runs_the_adapt_step_end_to_end(ports) -> None:
    student_port, auditor_port, student = ports
    task = adapt.Task.from_arc(flip_task())
    events = list(adapt.run_adapt(
        task, propose=fixed([VALID, MALFORMED, OVER_BUDGET]), student=student_port, auditor=auditor_port,
        k=3, seed=5, adapter_name="arc",
    ))
    kinds = [type(e).__name__ for e in events]
    assert kinds[0] == "SelfEditsProposed" and kinds[1] == "BaselineScored"
    assert "QuestionsWritten" not in kinds  # τ is the test outputs, nothing is written
    assert kinds[-2:] == ["PromotionDecided", "AdaptFinished"]

    finished = events[-1]
    assert isinstance(finished, adapt.AdaptFinished)
    valid, malformed, over = finished.candidates
    # The valid recipe trained (progress streamed) and was scored with a binary reward.
    assert any(isinstance(e, adapt.CandidateProgress) and e.index == 0 for e in events)
    assert valid.adapter is not None and valid.score is not None
    assert valid.score.reward in (0.0, 1.0)
    assert valid.score.accuracy in (0.0, 1.0)
    assert [o.gold_answer for o in valid.score.outcomes] == ["07\n80"]  # the gold grid's text, one per test input
    manifest = student.registry.get(valid.adapter.adapter_id)
    assert manifest.hyperparameters["domain"] == "fewshot"
    assert manifest.hyperparameters["recipe"] == VALID
    assert manifest.hyperparameters["epochs"] == 1 and manifest.context_id == task.context_id
    # A malformed recipe fails as a guardrail, before training; an over-budget one is refused by
    # the student's cost guard, nothing trained.
    assert malformed.adapter is None and "guardrail:recipe" in malformed.failure
    assert over.adapter is None and "refused before training" in over.failure and "max_steps=8" in over.failure
    # The decision follows the solved gate: promoted exactly when the candidate solves the task.
    decided = events[-2]
    assert isinstance(decided, adapt.PromotionDecided)
    solved = valid.score.reward == 1.0
    assert decided.promoted == solved
    if not solved:
        assert "solves 0 of 1 test input(s)" in decided.reason
        assert student.registry.get(valid.adapter.adapter_id).status == "rejected"


def test_a_fewshot_task_without_test_outputs_is_refused_before_sampling(ports) -> None:
    student_port, auditor_port, _ = ports
    arc = flip_task()
    unsolved = ArcTask(arc.task_id, arc.demonstrations, arc.test_inputs)

    def never(task, k, seed):  # pragma: no cover - must not be reached
        raise AssertionError("proposed for a task that cannot be scored")

    with pytest.raises(ValueError, match="test output"):
        list(adapt.run_adapt(adapt.Task.from_arc(unsolved), propose=never, student=student_port,
                             auditor=auditor_port, k=1, seed=0, adapter_name="arc"))
    with pytest.raises(ValueError, match="on-policy"):
        list(adapt.run_adapt(adapt.Task.from_arc(arc), propose=never, student=student_port, auditor=auditor_port,
                             k=1, seed=0, adapter_name="arc", needs_training_prompts=True))


# --- pure pieces -----------------------------------------------------------------------------------


class RecordingProposer:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def propose(self, title, passage, k, style, seed):
        self.calls.append(("knowledge", title, k, seed))
        return [ProposedSelfEdit(i, "knowledge prompt", "a line of notes", 1) for i in range(k)]

    def propose_from_prompt(self, prompt, k, seed):
        self.calls.append(("prompt", prompt, k, seed))
        return [ProposedSelfEdit(i, prompt, VALID, 1) for i in range(k)]


def test_the_proposer_gets_the_recipe_prompt_for_fewshot_and_the_style_prompt_for_knowledge() -> None:
    proposer, settings = RecordingProposer(), FewShotSettings(max_epochs=4)
    propose = adapt.proposer_fn(proposer, "implications", settings)
    arc = flip_task()
    proposals = propose(adapt.Task.from_arc(arc), 2, 9)
    assert proposer.calls == [("prompt", build_self_edit_prompt(arc, settings), 2, 9)]
    assert "between 1 and 4" in proposals[0].prompt and proposals[1].text == VALID
    propose(adapt.Task("T", "P.", ()), 1, 3)
    assert proposer.calls[-1] == ("knowledge", "T", 1, 3)


def test_task_domain_and_context_id() -> None:
    arc = flip_task()
    assert adapt.Task.from_arc(arc).domain == "fewshot"
    assert adapt.Task.from_arc(arc).context_id == arc.context_id
    assert adapt.Task.from_arc(arc).has_tau
    assert adapt.Task("T", "P.", ()).domain == "knowledge" and not adapt.Task("T", "P.", ()).has_tau


def test_scoring_is_pass_at_2_with_a_binary_reward_and_a_solved_gate() -> None:
    arc = flip_task()
    gold = "07\n80"
    settings = FewShotSettings(vote_views=("identity",))

    def answer(prompts, max_new_tokens, adapter_id):
        return [gold if adapter_id else "12\n34" for _ in prompts]

    baseline = fewshot_audit.grade_with(arc, answer, "", settings)
    adapted = fewshot_audit.grade_with(arc, answer, "arc@v1", settings)
    assert (baseline.accuracy, adapted.accuracy) == (0.0, 1.0)
    verdict = fewshot_audit.score_task(arc, baseline, adapted, [fewshot_audit.check_recipe(VALID, settings)])
    assert verdict.reward == 1.0 and verdict.passed_gates
    assert [g.gate for g in verdict.gates] == ["guardrail:recipe", "solved"]
    # The base model's verdict on itself: not solved, reward 0, the solved gate fails.
    unsolved = fewshot_audit.score_task(arc, baseline, baseline, [fewshot_audit.check_recipe(VALID, settings)])
    assert unsolved.reward == 0.0 and not unsolved.passed_gates
    assert "solves 0 of 1" in unsolved.gates[-1].reason
    # No recipe check recorded is a failed gate, never a pass.
    assert not fewshot_audit.score_task(arc, baseline, adapted, []).passed_gates
    bad = fewshot_audit.check_recipe(MALFORMED, settings)
    assert not bad.passed and "basic must be true or false" in bad.detail


def test_a_fewshot_job_round_trips_through_its_spec_and_a_knowledge_job_spec_is_unchanged() -> None:
    from seal.domains.fewshot import task_to_dict

    job = CandidateJob("arc", "flip", "", VALID, "cid", fewshot_task=task_to_dict(flip_task()))
    assert CandidateJob.from_json(job.to_json()) == job
    assert "fewshot_task" not in CandidateJob("a", "T", "P", "e", "c").to_json()


# --- over gRPC: the three services on loopback ports ------------------------------------------------


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory, one_torch_thread):
    from seal.stack import local_stack

    settings = fewshot_settings(tmp_path_factory.mktemp("fewshot-stack"), tiny_model_dir)
    settings = settings.model_copy(update={"teacher": settings.teacher.model_copy(update={"max_new_tokens": 24})})
    with local_stack(settings) as running:
        yield running


def adapt_over_grpc(stack, request):
    import grpc

    from seal.v1 import teacher_pb2_grpc

    with grpc.insecure_channel(stack.teacher.address) as channel:
        return list(teacher_pb2_grpc.TeacherServiceStub(channel).Adapt(request, timeout=600))


def test_adapt_over_grpc_takes_a_fewshot_task_and_streams_the_same_events(stack) -> None:
    from seal.transport import convert
    from seal.v1 import teacher_pb2

    arc = flip_task()
    events = adapt_over_grpc(stack, teacher_pb2.AdaptRequest(fewshot=convert.fewshot_to_proto(arc), k=2, seed=4))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "self_edits_proposed" and kinds[1] == "baseline_scored"
    assert kinds[-2:] == ["promotion_decided", "result"]
    assert "questions_written" not in kinds
    proposed = events[0].self_edits_proposed.self_edits
    assert len(proposed) == 2 and all("Puzzle:" in e.prompt and '"epochs"' in e.prompt for e in proposed)
    result = events[-1].result
    assert result.context_id == arc.context_id
    assert [o.gold_answer for o in result.baseline_outcomes] == ["07\n80"]
    for candidate in result.candidates:
        # The random teacher writes no recipe a parser accepts (then the recipe gate fails it
        # before training); if it ever did, the candidate is scored with a binary reward.
        if candidate.adapter_id:
            assert candidate.reward in (0.0, 1.0)
        else:
            assert "guardrail:recipe" in candidate.failure or "refused before training" in candidate.failure
    assert result.promoted == any(c.reward == 1.0 for c in result.candidates if c.adapter_id)


def test_the_pipeline_over_the_grpc_ports_trains_and_scores_a_recipe(stack) -> None:
    import grpc

    from seal.transport.ports import GrpcAuditorPort, GrpcStudentPort
    from seal.v1 import auditor_pb2_grpc, student_pb2_grpc

    task = adapt.Task.from_arc(flip_task())
    with grpc.insecure_channel(stack.student.address) as s, grpc.insecure_channel(stack.auditor.address) as a:
        student = GrpcStudentPort(student_pb2_grpc.StudentServiceStub(s), lambda: 300.0)
        auditor = GrpcAuditorPort(auditor_pb2_grpc.AuditorServiceStub(a), lambda: 300.0)
        events = list(adapt.run_adapt(
            task, propose=fixed([VALID, MALFORMED, OVER_BUDGET]), student=student, auditor=auditor,
            k=3, seed=5, adapter_name="arc",
        ))
    finished = events[-1]
    assert isinstance(finished, adapt.AdaptFinished)
    valid, malformed, over = finished.candidates
    assert any(isinstance(e, adapt.CandidateProgress) for e in events)
    assert valid.adapter is not None and valid.score is not None and valid.score.reward in (0.0, 1.0)
    assert valid.adapter.manifest.hyperparameters["domain"] == "fewshot"
    assert [g.gate for g in valid.score.gates] == ["guardrail:recipe", "solved"]
    assert valid.score.passed_gates == (valid.score.reward == 1.0)
    assert "guardrail:recipe" in malformed.failure
    # The cost guard's refusal crosses the wire as FAILED_PRECONDITION: that candidate alone fails.
    assert "FAILED_PRECONDITION" in over.failure and "max_steps=8" in over.failure
    # The auditor recorded the reward, keyed by the task's content digest.
    rewards = (stack.settings.home / "auditor" / "rewards.jsonl").read_text()
    assert task.context_id in rewards and valid.adapter.adapter_id in rewards


@pytest.mark.parametrize(
    ("change", "fragment"),
    [
        ("no_outputs", "test output"),
        ("with_context", "leave context and questions empty"),
        ("ragged", "a grid is rectangular"),
        ("overrides", "chooses its own training recipe: send no overrides (epochs set)"),
        ("sdft", "update_rule 'sdft' does not apply"),
    ],
)
def test_bad_fewshot_adapt_requests_are_refused_with_a_clear_status(stack, change, fragment) -> None:
    import grpc

    from seal.transport import convert
    from seal.v1 import common_pb2, teacher_pb2

    message = convert.fewshot_to_proto(flip_task())
    request = teacher_pb2.AdaptRequest(fewshot=message, k=1)
    if change == "no_outputs":
        del request.fewshot.test_outputs[:]
    elif change == "overrides":
        request.overrides.epochs = 3
    elif change == "sdft":
        request.overrides.update_rule = "sdft"
    elif change == "with_context":
        request.context.CopyFrom(common_pb2.Context(title="T", passage="P."))
    else:
        request.fewshot.test_inputs[0].rows[0].cells.append(3)
    with pytest.raises(grpc.RpcError) as caught:
        adapt_over_grpc(stack, request)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in caught.value.details()


def test_find_arc_task_reads_a_task_with_its_solutions_and_names_what_is_there(tmp_path: Path) -> None:
    import json

    from seal.domains.fewshot import find_arc_task, task_to_dict

    data = task_to_dict(flip_task())
    (tmp_path / "x_challenges.json").write_text(json.dumps({"flip": {"train": data["train"], "test": data["test"]}}))
    (tmp_path / "x_solutions.json").write_text(json.dumps({"flip": data["solutions"]}))
    assert find_arc_task(tmp_path / "x_challenges.json", "flip") == flip_task()
    with pytest.raises(ValueError, match=r"no task 'nope' \(1 tasks: flip\)"):
        find_arc_task(tmp_path / "x_challenges.json", "nope")


def test_the_cli_builds_an_adapt_request_from_an_arc_file_with_its_gold_outputs() -> None:
    import argparse
    from pathlib import Path

    from seal.cli import build_parser
    from seal.cli.adapt import fewshot_adapt_request

    challenges = Path(__file__).resolve().parents[2] / "shared/data/arc/arc-agi_evaluation_challenges_filtered_1B_eval_set.json"
    if not challenges.is_file():
        pytest.skip(f"{challenges} not present (../shared/data)")
    args = build_parser().parse_args(["adapt", "--arc-task", str(challenges), "--task-id", "66e6c45b", "--k", "2", "--seed", "3"])
    request = fewshot_adapt_request(args)
    assert (request.k, request.seed) == (2, 3)
    assert request.fewshot.task_id == "66e6c45b" and request.fewshot.train
    assert len(request.fewshot.test_outputs) == len(request.fewshot.test_inputs) >= 1  # τ: the gold outputs
    with pytest.raises(SystemExit, match="--task-id"):
        fewshot_adapt_request(argparse.Namespace(arc_task=str(challenges), task_id=None, k=None, seed=None))
