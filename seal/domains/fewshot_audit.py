"""The few-shot domain's side of the auditor: the recipe gate before training, and scoring a
candidate on the task's test outputs (τ) after it. Transport-free; both auditors (in process,
``seal.local``, and the service) call these.

- ``check_recipe``: the self-edit must parse as a recipe (``seal.domains.fewshot.parse_self_edit``),
  so a malformed one fails as a guardrail and is never trained.
- ``score_task``: the base model and the candidate each answer every test input (views voted,
  pass@2, ``seal.domains.fewshot.predict``); accuracy = test inputs solved / test inputs, the
  reward is binary (solved or not), and the one promotion gate, ``solved``, passes only when the
  candidate solves the task.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from seal.auditor import QuestionOutcome, ScoreReport
from seal.domains.fewshot import (
    ArcTask,
    FewShotSettings,
    InvalidSelfEdit,
    Prediction,
    TaskGrade,
    grade,
    grid_to_text,
    parse_self_edit,
    predict,
)
from seal.gates import CandidateScores, Decision, GateResult
from seal.guardrails import GuardrailResult

RECIPE_RULE = "recipe"
SOLVED_GATE = "solved"

# (prompts, max_new_tokens, adapter_id) → answers; adapter_id "" = the base model.
AnswerFn = Callable[[Sequence[str], int, str], Sequence[str]]


def check_recipe(self_edit: str, settings: FewShotSettings) -> GuardrailResult:
    """The ``recipe`` guardrail: passes when the self-edit is a well-formed recipe."""
    try:
        recipe = parse_self_edit(self_edit, settings)
    except InvalidSelfEdit as exc:
        return GuardrailResult(RECIPE_RULE, False, str(exc))
    return GuardrailResult(RECIPE_RULE, True, recipe.to_json())


def outcomes_of(task: ArcTask, predictions: Sequence[Prediction]) -> list[QuestionOutcome]:
    """One outcome per test input, in the shape τ's questions travel in: the gold grid as the
    answer, the first attempt as the prediction, correct when the gold grid is among the attempts."""
    outcomes = []
    for number, (gold, prediction) in enumerate(zip(task.test_outputs, predictions, strict=True), start=1):
        correct = gold in prediction.attempts
        first = grid_to_text(prediction.attempts[0]) if prediction.attempts else ""
        outcomes.append(QuestionOutcome(
            question=f"{task.task_id} test input {number}", gold_answer=grid_to_text(gold), prediction=first,
            correct=correct, exact_match=correct, f1=1.0 if correct else 0.0, contains_answer=correct,
        ))
    return outcomes


@dataclass(frozen=True)
class Graded:
    grade: TaskGrade
    outcomes: tuple[QuestionOutcome, ...]

    @property
    def accuracy(self) -> float:
        return self.grade.tests_solved / self.grade.tests


def grade_with(task: ArcTask, answer: AnswerFn, adapter_id: str, settings: FewShotSettings) -> Graded:
    """``task`` answered by ``adapter_id`` ("" = base model) and graded (pass@2 per test input)."""
    predictions = predict(task, lambda prompts, max_new_tokens: answer(prompts, max_new_tokens, adapter_id), settings)
    return Graded(grade(task, predictions), tuple(outcomes_of(task, predictions)))


def solved_gate(adapted: TaskGrade, baseline: TaskGrade) -> GateResult:
    """The few-shot promotion gate: the candidate must solve the task (pass@2 on every test input)."""
    value = adapted.tests_solved / adapted.tests
    base = "the base model solves it too" if baseline.solved else "the base model does not"
    if adapted.solved:
        return GateResult(SOLVED_GATE, True, value, 1.0, f"the candidate solves the task ({base})")
    return GateResult(
        SOLVED_GATE, False, value, 1.0,
        f"the candidate solves {adapted.tests_solved} of {adapted.tests} test input(s); promotion needs all ({base})",
    )


def guardrail_gates(guardrails: Sequence[GuardrailResult]) -> list[GateResult]:
    """The checks made before training, as gates (a missing recipe check fails: never checked ≠ clean)."""
    if not guardrails:
        return [GateResult("guardrails", False, None, None, "no guardrail results: the recipe was never checked")]
    return [
        GateResult(f"guardrail:{g.rule}", g.passed, None, None, f"guardrail {g.rule} {'passed' if g.passed else 'failed'}"
                   + ("" if g.passed else f": {g.detail}"))
        for g in guardrails
    ]


@dataclass(frozen=True)
class FewShotScore:
    baseline: Graded
    adapted: Graded
    gates: tuple[GateResult, ...]

    @property
    def reward(self) -> float:
        """SEAL's binary reward: 1 when the candidate solves the task."""
        return self.adapted.grade.reward

    @property
    def passed_gates(self) -> bool:
        return all(g.passed for g in self.gates)

    def report(self, guardrails: Sequence[GuardrailResult]) -> ScoreReport:
        """The verdict as the auditor's :class:`seal.auditor.ScoreReport` (what its reward and
        audit records are written from)."""
        scores = CandidateScores(
            tau_accuracy=self.adapted.accuracy, baseline_tau_accuracy=self.baseline.accuracy, guardrails=guardrails
        )
        return ScoreReport(
            self.baseline.accuracy, self.adapted.accuracy, self.reward, list(self.baseline.outcomes),
            list(self.adapted.outcomes), Decision(self.passed_gates, self.gates), scores=scores,
        )


def score_task(
    task: ArcTask, baseline: Graded, adapted: Graded, guardrails: Sequence[GuardrailResult]
) -> FewShotScore:
    """A candidate's verdict from its graded answers and the base model's."""
    gates = (*guardrail_gates(guardrails), solved_gate(adapted.grade, baseline.grade))
    return FewShotScore(baseline, adapted, gates)
