"""The SEAL step, once: propose → check → train → score → decide (SEAL §3, Algorithm 1 inner loop).

Every caller runs a candidate through :func:`score_candidate`: ``Adapt`` (``run_adapt``, over gRPC
in ``teacher_svc``), ReST^EM's E-step (``seal.rl.restem`` through ``teacher_svc.restem.pipeline_scorer``) and policy
evaluation (``seal.evaluation``). They differ only in the ports they are given and in what they
do with the outcome — Adapt promotes the best candidate that passes every gate, ReST^EM keeps the
reward and discards the adapter, evaluation keeps the accuracies. With ``batch_candidates`` (the
``student.batch_candidates`` setting) Adapt runs the same three steps over all k at once instead:
every check, one :meth:`StudentPort.train_many` for the candidates that passed, one
:meth:`AuditorPort.score_many` for the candidates trained.

The pipeline depends on two abstractions, never on a transport (vLLM's ``EngineClient`` is the
model): :class:`StudentPort` trains and changes an adapter's status, :class:`AuditorPort` checks
guardrails and scores. ``seal.transport.ports`` implements them over gRPC for the services;
``seal.local`` implements them over the in-process engines for tests, benches and evaluation.

Failures have one classification. A port raises :class:`CandidateRefused` when the *self-edit*
is at fault (no usable line, training diverged with its directives): that candidate fails and
the others carry on. Anything else (a service down, a deadline, a protocol violation) propagates
and ends the step, because every other candidate would fail alike.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import Any, Protocol

from opentelemetry import trace
from opentelemetry.util.types import AttributeValue

from seal.auditor import QuestionOutcome
from seal.domains.fewshot import ArcTask, FewShotSettings, build_self_edit_prompt
from seal.domains.knowledge import Question, context_digest
from seal.domains.self_qa import NotEnoughQuestions, WrittenQuestions
from seal.gates import GateResult, choose_best
from seal.guardrails import GuardrailResult
from seal.registry import parse_adapter_id

# --- what flows through the step --------------------------------------------------------------


KNOWLEDGE = "knowledge"
FEWSHOT = "fewshot"
DOMAINS = (KNOWLEDGE, FEWSHOT)


@dataclass(frozen=True)
class Task:
    """The step's unit of work, in one of two domains:

    - knowledge incorporation: new context C (``title``, ``passage``) with its held-out
      questions τ (``questions``);
    - few-shot ARC (``fewshot`` set): the task's demonstrations are C, its test outputs are τ.

    The pipeline reads only :attr:`domain`, :attr:`context_id` and :attr:`has_tau`; what a
    domain's task holds is read by the ports (training, scoring) and the proposer."""

    title: str
    passage: str
    questions: tuple[Question, ...]
    fewshot: ArcTask | None = None

    @classmethod
    def from_arc(cls, arc: ArcTask) -> Task:
        return cls(title=arc.task_id, passage="", questions=(), fewshot=arc)

    @property
    def domain(self) -> str:
        return FEWSHOT if self.fewshot is not None else KNOWLEDGE

    @property
    def context_id(self) -> str:
        if self.fewshot is not None:
            return self.fewshot.context_id
        return context_digest(self.title, self.passage)

    @property
    def has_tau(self) -> bool:
        """Whether the task carries what it is scored on (τ: questions, or the test outputs)."""
        if self.fewshot is not None:
            return self.fewshot.has_solutions
        return bool(self.questions)


@dataclass(frozen=True)
class Proposal:
    """One self-edit the teacher wrote, with the prompt that produced it."""

    index: int
    prompt: str
    text: str
    completion_tokens: int = 0


GUARDRAIL_PREFIX = "guardrail:"


def guardrail_to_gate(result: GuardrailResult) -> GateResult:
    """A guardrail rule's result as the gate it travels as (``guardrail:<rule>``)."""
    return GateResult(f"{GUARDRAIL_PREFIX}{result.rule}", result.passed, None, None, result.detail)


def guardrail_from_gate(gate: GateResult) -> GuardrailResult:
    return GuardrailResult(rule=gate.gate.removeprefix(GUARDRAIL_PREFIX), passed=gate.passed, detail=gate.reason)


@dataclass(frozen=True)
class GuardrailCheck:
    passed: bool
    gates: tuple[GateResult, ...]

    @property
    def failed_rules(self) -> list[str]:
        return [gate.gate for gate in self.gates if not gate.passed]


# Guardrails whose reason is the caller's to read in a failure: a recipe's parse errors say how to
# fix the self-edit. Other rules' reasons may quote what they caught (a secret), so only their
# names are given; the audit record keeps the rest.
_REASON_SHOWN = (f"{GUARDRAIL_PREFIX}recipe",)


def guardrail_failure(check: GuardrailCheck) -> str:
    """Why a self-edit was stopped before training, for the caller: the failed rules, with the
    parse error of a few-shot recipe that did not parse (what the caller needs to act on it)."""
    failed = []
    for gate in check.gates:
        if gate.passed:
            continue
        failed.append(f"{gate.gate} ({gate.reason})" if gate.gate in _REASON_SHOWN and gate.reason else gate.gate)
    return f"guardrails failed before training: {', '.join(failed)}"


@dataclass(frozen=True)
class TrainedAdapter:
    adapter_id: str
    training_sequences: int
    seconds: float
    # The adapter's manifest as the student returned it (core ``Manifest`` in process, the proto
    # message over gRPC): carried to the caller's events untouched, never interpreted here.
    manifest: Any = None


@dataclass(frozen=True)
class Baseline:
    accuracy: float
    outcomes: tuple[QuestionOutcome, ...]


@dataclass(frozen=True)
class Score:
    """The auditor's verdict on one candidate: SEAL's reward and every promotion gate."""

    accuracy: float
    baseline_accuracy: float
    reward: float
    passed_gates: bool
    gates: tuple[GateResult, ...]
    outcomes: tuple[QuestionOutcome, ...]
    retention_accuracy: float | None = None
    baseline_retention_accuracy: float | None = None


class CandidateRefused(ValueError):
    """The self-edit, not the system, is at fault: this candidate fails, the step goes on."""


# The core's error codes (``code`` attribute, mapped to gRPC statuses by ``seal.rpc``) that blame
# the request rather than the system.
REFUSAL_CODES = ("invalid_argument", "failed_precondition")
# What blames one candidate when several are scored together (AuditorPort.score_many): its request,
# its weights (failed_precondition: they differ from the record) or its version (gone).
SCORING_REFUSAL_CODES = (*REFUSAL_CODES, "not_found")


def is_refusal(exc: BaseException) -> bool:
    """Whether a training error blames the self-edit (the same rule ``seal.rpc`` maps to
    INVALID_ARGUMENT / FAILED_PRECONDITION, so in-process and gRPC callers classify alike)."""
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        return code in REFUSAL_CODES
    return isinstance(exc, ValueError)


def is_scoring_refusal(exc: BaseException) -> bool:
    """Whether a scoring error blames the one candidate it was raised for (its version unknown,
    its weights unusable), by the same code names as :func:`is_refusal`."""
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        return code in SCORING_REFUSAL_CODES
    return isinstance(exc, ValueError)


@dataclass(frozen=True)
class TrainingStep:
    """One optimizer step of a candidate's update, as the student reports it."""

    step: int
    total_steps: int
    loss: float


class StudentPort(Protocol):
    """Trains candidates and changes an adapter's status."""

    def train(
        self,
        task: Task,
        proposal: Proposal,
        *,
        adapter_name: str,
        seed: int,
        overrides: Mapping[str, Any],
        training_prompts: Sequence[str] = (),
    ) -> Iterator[TrainingStep | TrainedAdapter]:
        """The update's steps as they happen, then exactly one :class:`TrainedAdapter`.
        ``training_prompts``: questions about C an on-policy rule (SDFT) distils on; never τ."""
        ...

    def train_many(
        self,
        task: Task,
        proposals: Sequence[Proposal],
        *,
        adapter_name: str,
        seeds: Sequence[int],
        overrides: Mapping[str, Any],
        training_prompts: Sequence[str] = (),
    ) -> Iterator[tuple[int, TrainingStep | TrainedAdapter | CandidateRefused]]:
        """The candidates of several self-edits of one task trained in one call (the student may
        train them together): ``(position in proposals, event)`` as they happen, where each
        position ends with exactly one :class:`TrainedAdapter` or :class:`CandidateRefused` (that
        candidate alone is refused). ``seeds[i]`` is ``proposals[i]``'s seed. Anything that is not
        the self-edit's fault raises and ends the step, as :meth:`train` does."""
        ...

    def answer_with_base(self, prompts: Sequence[str], *, max_new_tokens: int) -> list[str]:
        """Greedy answers of the base model (no adapter): the open-book check of written questions."""
        ...

    def promote(self, adapter_id: str, reason: str) -> None: ...

    def reject(self, adapter_id: str, reason: str, *, discard_weights: bool = False) -> None: ...


@dataclass(frozen=True)
class ScoreJob:
    """One trained candidate as :meth:`AuditorPort.score_many` takes it: what :meth:`AuditorPort.score`
    is given for it."""

    proposal: Proposal
    adapter: TrainedAdapter
    seed: int
    guardrails: GuardrailCheck


class AuditorPort(Protocol):
    """Checks self-edits before training and scores candidates after it."""

    def check(self, task: Task, proposal: Proposal, *, seed: int, request_id: str) -> GuardrailCheck: ...

    def baseline(self, task: Task) -> Baseline: ...

    def score(
        self,
        task: Task,
        proposal: Proposal,
        adapter: TrainedAdapter,
        *,
        seed: int,
        guardrails: GuardrailCheck,
        request_id: str,
        measure_retention: bool,
    ) -> Score: ...

    def score_many(
        self, task: Task, jobs: Sequence[ScoreJob], *, request_id: str, measure_retention: bool
    ) -> list[Score | CandidateRefused]:
        """The trained candidates of one task scored in one call (the auditor asks their answers
        together): one result per job, in order, each the :class:`Score` that :meth:`score` would
        give, or :class:`CandidateRefused` when that candidate alone cannot be scored (its version
        or weights are unusable). Anything that is not one candidate's fault raises."""
        ...


def score_each(
    auditor: AuditorPort, task: Task, jobs: Sequence[ScoreJob], *, request_id: str, measure_retention: bool
) -> list[Score | CandidateRefused]:
    """:meth:`AuditorPort.score_many` as one :meth:`AuditorPort.score` per candidate: what a port
    falls back to when its auditor cannot score several at once."""
    results: list[Score | CandidateRefused] = []
    for job in jobs:
        try:
            results.append(auditor.score(
                task, job.proposal, job.adapter, seed=job.seed, guardrails=job.guardrails, request_id=request_id,
                measure_retention=measure_retention,
            ))
        except CandidateRefused as refused:
            results.append(refused)
    return results


# --- events (what a caller streams) ---------------------------------------------------------


@dataclass(frozen=True)
class SelfEditsProposed:
    proposals: tuple[Proposal, ...]
    seconds: float


@dataclass(frozen=True)
class QuestionsWritten:
    """The request had no τ (or the update rule needs training prompts): the teacher wrote them."""

    questions: WrittenQuestions
    seconds: float


@dataclass(frozen=True)
class BaselineScored:
    baseline: Baseline


@dataclass(frozen=True)
class CandidateProgress:
    index: int
    step: int
    total_steps: int
    loss: float


@dataclass(frozen=True)
class CandidateTrained:
    index: int
    adapter: TrainedAdapter


@dataclass(frozen=True)
class CandidateFailed:
    index: int
    reason: str
    gates: tuple[GateResult, ...] = ()
    # Where it failed: "guardrails" (refused before training), "training" or "scoring".
    stage: str = "training"


@dataclass(frozen=True)
class CandidateScored:
    index: int
    adapter_id: str
    score: Score
    seconds: float


@dataclass
class CandidateOutcome:
    """Everything the step learned about one self-edit; ``failure`` set means never scored."""

    proposal: Proposal
    seed: int
    adapter: TrainedAdapter | None = None
    score: Score | None = None
    failure: str = ""
    gates: tuple[GateResult, ...] = ()
    train_seconds: float = 0.0
    score_seconds: float = 0.0

    @property
    def scored(self) -> bool:
        return self.score is not None


@dataclass(frozen=True)
class PromotionDecided:
    promoted: bool
    adapter_id: str
    reason: str


@dataclass(frozen=True)
class AdaptFinished:
    request_id: str
    task: Task
    baseline: Baseline
    candidates: tuple[CandidateOutcome, ...]
    promoted: CandidateOutcome | None
    # The promoted candidate, else the best scored one (what a caller shows), else None.
    shown: CandidateOutcome | None
    reason: str
    phase_seconds: dict[str, float]
    # Set when τ was written by the teacher rather than sent by the caller.
    written: WrittenQuestions | None = None


Event = (
    SelfEditsProposed | QuestionsWritten | BaselineScored | CandidateProgress | CandidateTrained | CandidateFailed
    | CandidateScored | PromotionDecided | AdaptFinished
)


# --- the step --------------------------------------------------------------------------------


@dataclass
class PhaseClock:
    """Wall seconds per phase of a step (generation, training, scoring), summed over candidates."""

    seconds: dict[str, float] = field(default_factory=lambda: {"generation": 0.0, "training": 0.0, "scoring": 0.0})

    def add(self, phase: str, started: float) -> float:
        elapsed = time.perf_counter() - started
        self.seconds[phase] = self.seconds.get(phase, 0.0) + elapsed
        return elapsed


# --- tracing (docs/tracing.md) ---------------------------------------------------------------
# Spans through the OpenTelemetry API only; the caller hands in its service's tracer. None means
# tracing is off: then no span is made and the context is not touched, so the step costs the same
# as before tracing existed.

Attributes = dict[str, AttributeValue]


def _span(
    tracer: trace.Tracer | None, name: str, attributes: Attributes | None = None
) -> AbstractContextManager[trace.Span]:
    """``name`` as the current span for the block (gRPC calls made inside it become its children).

    Held across the step's ``yield``s: the whole Adapt runs as nested generators driven by one
    gRPC thread, so context is entered and left in order, as the gRPC instrumentation's own
    stream spans are."""
    if tracer is None:
        return nullcontext(trace.INVALID_SPAN)
    return tracer.start_as_current_span(name, attributes=attributes)


def _adapter_attributes(adapter: TrainedAdapter) -> Attributes:
    attributes: Attributes = {"seal.adapter.id": adapter.adapter_id}
    try:
        attributes["seal.adapter.version"] = parse_adapter_id(adapter.adapter_id)[1]
    except ValueError:  # an id this registry did not mint (a test double's): the id says enough
        pass
    return attributes


def _score_attributes(score: Score) -> Attributes:
    attributes: Attributes = {
        "seal.reward": score.reward,
        "seal.accuracy": score.accuracy,
        "seal.baseline_accuracy": score.baseline_accuracy,
        "seal.gates.passed": score.passed_gates,
        "seal.gates.failed": [gate.gate for gate in score.gates if not gate.passed],
    }
    if score.retention_accuracy is not None:
        attributes["seal.retention_accuracy"] = score.retention_accuracy
    return attributes


def _outcome_attributes(outcome: CandidateOutcome) -> Attributes:
    attributes: Attributes = {"seal.candidate.scored": outcome.scored}
    if outcome.failure:
        attributes["seal.candidate.failure"] = outcome.failure
        attributes["seal.gates.failed"] = [gate.gate for gate in outcome.gates if not gate.passed]
    if outcome.adapter is not None:
        attributes.update(_adapter_attributes(outcome.adapter))
    if outcome.score is not None:
        attributes.update(_score_attributes(outcome.score))
    return attributes


def score_candidate(
    task: Task,
    proposal: Proposal,
    *,
    student: StudentPort,
    auditor: AuditorPort,
    adapter_name: str,
    seed: int,
    request_id: str,
    overrides: Mapping[str, Any] | None = None,
    training_prompts: Sequence[str] = (),
    measure_retention: bool = True,
    clock: PhaseClock | None = None,
    tracer: trace.Tracer | None = None,
) -> Iterator[Event]:
    """One candidate: guardrails → train → score. Yields its events; returns its outcome
    (``outcome = yield from score_candidate(...)``). The adapter is left as a candidate: what
    happens to it next is the caller's decision.

    With a ``tracer``, the candidate is a ``seal.candidate`` span with ``seal.check``,
    ``seal.train`` and ``seal.score`` children (each the parent of the gRPC call it makes)."""
    clock = clock or PhaseClock()
    outcome = CandidateOutcome(proposal, seed)
    with _span(tracer, "seal.candidate", {"seal.candidate.index": proposal.index, "seal.seed": seed}) as span:
        yield from _candidate_steps(
            outcome, task, student=student, auditor=auditor, adapter_name=adapter_name, request_id=request_id,
            overrides=overrides or {}, training_prompts=training_prompts, measure_retention=measure_retention,
            clock=clock, tracer=tracer,
        )
        span.set_attributes(_outcome_attributes(outcome))
    return outcome


def _candidate_steps(
    outcome: CandidateOutcome,
    task: Task,
    *,
    student: StudentPort,
    auditor: AuditorPort,
    adapter_name: str,
    request_id: str,
    overrides: Mapping[str, Any],
    training_prompts: Sequence[str],
    measure_retention: bool,
    clock: PhaseClock,
    tracer: trace.Tracer | None,
) -> Iterator[Event]:
    """:func:`score_candidate`'s steps, filling in ``outcome`` as they go."""
    proposal, seed = outcome.proposal, outcome.seed
    index = {"seal.candidate.index": proposal.index}
    started = time.perf_counter()
    with _span(tracer, "seal.check", index) as span:
        check = auditor.check(task, proposal, seed=seed, request_id=request_id)
        span.set_attributes({"seal.gates.passed": check.passed, "seal.gates.failed": check.failed_rules})
    clock.add("scoring", started)
    outcome.gates = check.gates
    if not check.passed:
        outcome.failure = guardrail_failure(check)
        yield CandidateFailed(proposal.index, outcome.failure, check.gates, stage="guardrails")
        return

    started = time.perf_counter()
    adapter: TrainedAdapter | None = None
    with _span(tracer, "seal.train", index) as span:
        try:
            updates = student.train(
                task, proposal, adapter_name=adapter_name, seed=seed, overrides=overrides,
                training_prompts=training_prompts,
            )
            for update in updates:
                if isinstance(update, TrainingStep):
                    yield CandidateProgress(proposal.index, update.step, update.total_steps, update.loss)
                else:
                    adapter = update
        except CandidateRefused as exc:
            outcome.train_seconds = clock.add("training", started)
            outcome.failure = f"training failed: {exc}"
            span.set_status(trace.StatusCode.ERROR, outcome.failure)
            yield CandidateFailed(proposal.index, outcome.failure)
            return
        if adapter is None:
            # Never score anything in its place (an earlier candidate's adapter least of all).
            raise RuntimeError(
                f"the student's training stream for self-edit #{proposal.index} ended without an adapter"
            )
        span.set_attributes(_adapter_attributes(adapter))
    outcome.train_seconds = clock.add("training", started)
    outcome.adapter = adapter
    yield CandidateTrained(proposal.index, adapter)

    started = time.perf_counter()
    with _span(tracer, "seal.score", {**index, **_adapter_attributes(adapter)}) as span:
        score = auditor.score(
            task, proposal, adapter, seed=seed, guardrails=check, request_id=request_id,
            measure_retention=measure_retention,
        )
        span.set_attributes(_score_attributes(score))
    outcome.score_seconds = clock.add("scoring", started)
    outcome.score = score
    outcome.gates = score.gates
    yield CandidateScored(proposal.index, adapter.adapter_id, score, outcome.score_seconds)


def _batched_candidates(
    task: Task,
    proposals: Sequence[Proposal],
    *,
    student: StudentPort,
    auditor: AuditorPort,
    adapter_name: str,
    seed: int,
    request_id: str,
    overrides: Mapping[str, Any],
    training_prompts: Sequence[str],
    clock: PhaseClock,
    tracer: trace.Tracer | None,
) -> Iterator[Event]:
    """Every self-edit checked, every one that passed trained in one ``train_many`` call, then
    every one trained scored in one ``score_many`` call: the same events and outcomes as
    :func:`score_candidate` per self-edit (a candidate the auditor refuses to score fails alone).
    Returns the outcomes in the proposals' order."""
    outcomes = [CandidateOutcome(proposal, seed + proposal.index) for proposal in proposals]
    checks: dict[int, GuardrailCheck] = {}
    for position, outcome in enumerate(outcomes):
        index = outcome.proposal.index
        started = time.perf_counter()
        with _span(tracer, "seal.check", {"seal.candidate.index": index}) as span:
            check = auditor.check(task, outcome.proposal, seed=outcome.seed, request_id=request_id)
            span.set_attributes({"seal.gates.passed": check.passed, "seal.gates.failed": check.failed_rules})
        clock.add("scoring", started)
        outcome.gates = check.gates
        if not check.passed:
            outcome.failure = guardrail_failure(check)
            yield CandidateFailed(index, outcome.failure, check.gates, stage="guardrails")
            continue
        checks[position] = check

    training = [outcomes[position] for position in checks]
    if training:
        started = time.perf_counter()
        with _span(tracer, "seal.train", {"seal.candidates": len(training)}) as span:
            updates = student.train_many(
                task, [o.proposal for o in training], adapter_name=adapter_name, seeds=[o.seed for o in training],
                overrides=overrides, training_prompts=training_prompts,
            )
            for position, update in updates:
                if not 0 <= position < len(training) or training[position].adapter or training[position].failure:
                    raise RuntimeError(f"the student's batch training stream sent an event for candidate {position} "
                                       "that has none to come")
                outcome = training[position]
                index = outcome.proposal.index
                if isinstance(update, TrainingStep):
                    yield CandidateProgress(index, update.step, update.total_steps, update.loss)
                elif isinstance(update, TrainedAdapter):
                    outcome.train_seconds = time.perf_counter() - started
                    outcome.adapter = update
                    yield CandidateTrained(index, update)
                else:
                    outcome.train_seconds = time.perf_counter() - started
                    outcome.failure = f"training failed: {update}"
                    yield CandidateFailed(index, outcome.failure)
            unfinished = [o.proposal.index for o in training if o.adapter is None and not o.failure]
            if unfinished:
                # Never score anything in their place.
                raise RuntimeError(
                    f"the student's training stream for self-edit {', '.join(f'#{i}' for i in unfinished)} "
                    "ended without an adapter"
                )
            span.set_attribute("seal.candidates.trained", sum(o.adapter is not None for o in training))
        clock.add("training", started)

    jobs = []
    for position, check in checks.items():
        outcome = outcomes[position]
        if outcome.adapter is not None:
            jobs.append(ScoreJob(outcome.proposal, outcome.adapter, outcome.seed, check))
    if not jobs:
        return outcomes
    started = time.perf_counter()
    with _span(tracer, "seal.score", {"seal.candidates": len(jobs)}) as span:
        results = auditor.score_many(task, jobs, request_id=request_id, measure_retention=True)
        if len(results) != len(jobs):
            raise RuntimeError(f"the auditor scored {len(jobs)} candidates with {len(results)} results")
        span.set_attribute("seal.candidates.scored", sum(isinstance(r, Score) for r in results))
    # One call for all of them: each candidate is given an equal share of its time.
    seconds = clock.add("scoring", started) / len(jobs)
    by_index = {outcome.proposal.index: outcome for outcome in outcomes}
    for job, result in zip(jobs, results, strict=True):
        outcome = by_index[job.proposal.index]
        outcome.score_seconds = seconds
        if isinstance(result, CandidateRefused):
            outcome.failure = f"scoring failed: {result}"
            yield CandidateFailed(job.proposal.index, outcome.failure, stage="scoring")
            continue
        outcome.score = result
        outcome.gates = result.gates
        yield CandidateScored(job.proposal.index, job.adapter.adapter_id, result, seconds)
    return outcomes


def drain(events: Iterator[Event]) -> Any:
    """Run a step to its end without a listener and return its result (a generator's return value)."""
    while True:
        try:
            next(events)
        except StopIteration as stop:
            return stop.value


def choose_promotion(candidates: Sequence[CandidateOutcome]) -> CandidateOutcome | None:
    """The best candidate by reward among those that passed every gate (``seal.gates.choose_best``)."""
    scored = [c for c in candidates if c.score is not None]
    best_index = choose_best([(c.proposal.index, c.score.reward, c.score.passed_gates) for c in scored])  # type: ignore[union-attr]
    return next((c for c in scored if c.proposal.index == best_index), None)


def no_promotion_reason(candidates: Sequence[CandidateOutcome]) -> str:
    """Why nothing was promoted, candidate by candidate, in words an operator can act on."""
    if not candidates:
        return "no candidate self-edits"
    reasons = []
    for candidate in candidates:
        if candidate.failure:
            reasons.append(f"#{candidate.proposal.index}: {candidate.failure}")
        else:
            failed = "; ".join(g.reason for g in candidate.gates if not g.passed) or "no gate failed"
            reasons.append(f"#{candidate.proposal.index}: {failed}")
    return "nothing promoted — " + " | ".join(reasons)


ProposeFn = Callable[[Task, int, int], Sequence[Proposal]]  # (task, k, seed) → k proposals
WriteQuestionsFn = Callable[[Task, int], WrittenQuestions]  # (task without τ, seed) → written questions


def proposer_fn(proposer: Any, style: str, fewshot: FewShotSettings | None = None) -> ProposeFn:
    """A :class:`seal.teacher.SelfEditProposer` (or anything with its ``propose`` and
    ``propose_from_prompt``) as a ProposeFn: knowledge tasks get the ``style`` prompt, few-shot
    tasks the recipe prompt (``seal.domains.fewshot.build_self_edit_prompt`` with ``fewshot``)."""

    def propose(task: Task, k: int, seed: int) -> list[Proposal]:
        if task.fewshot is not None:
            edits = proposer.propose_from_prompt(build_self_edit_prompt(task.fewshot, fewshot), k, seed)
        else:
            edits = proposer.propose(task.title, task.passage, k, style, seed)
        return [Proposal(e.index, e.prompt, e.text, e.completion_tokens) for e in edits]

    return propose


def question_writer(
    proposer: Any, student: StudentPort, grader: Any, settings: Any, *, answer_max_new_tokens: int = 32
) -> WriteQuestionsFn:
    """Self-QA for a task without τ: the teacher (``proposer.complete``) writes pairs, the base
    model answers them open book through the student, ``grader`` keeps the ones it gets right
    (``settings``: the teacher settings' question-writing fields)."""
    from seal.domains.knowledge import extract_answer
    from seal.domains.self_qa import write_questions

    def grade(questions: list[Question], answers: list[str]) -> list[bool]:
        predictions = [extract_answer(a) for a in answers]
        grades = grader.grade_batch([q.question for q in questions], [q.answer for q in questions], predictions)
        return [g.correct for g in grades]

    def write(task: Task, seed: int) -> WrittenQuestions:
        return write_questions(
            task.title,
            task.passage,
            generate=lambda prompt: proposer.complete(prompt, seed=seed, max_new_tokens=settings.question_max_new_tokens),
            answer_open_book=lambda prompts: student.answer_with_base(prompts, max_new_tokens=answer_max_new_tokens),
            grade=grade,
            n=settings.questions_to_write,
            held_out_fraction=settings.held_out_fraction,
            min_held_out=settings.min_written_questions,
            seed=seed,
        )

    return write


ON_POLICY_RULES = ("sdft",)  # rules that distil on prompts about C, so need training prompts


def update_rule(overrides: Mapping[str, Any], default: str) -> str:
    """The update rule a request asks for (``overrides.update_rule``), else the configured one."""
    return str(overrides.get("update_rule") or default)


def check_fewshot_task(task: Task, *, needs_training_prompts: bool) -> None:
    """What a few-shot task must hold before anything is sampled: τ is its test outputs (no
    question writing), and the update is the recipe's LoRA SFT (no on-policy rule)."""
    assert task.fewshot is not None
    if not task.fewshot.has_solutions:
        raise ValueError(
            f"few-shot task {task.fewshot.task_id} has {len(task.fewshot.test_outputs)} test output(s) for "
            f"{len(task.fewshot.test_inputs)} test input(s): Adapt scores on the test outputs, send one per input"
        )
    if needs_training_prompts:
        raise ValueError("few-shot tasks train by their recipe (LoRA SFT); an on-policy update rule does not apply")


def _decide(
    candidates: Sequence[CandidateOutcome], student: StudentPort, *, k: int, request_id: str
) -> tuple[CandidateOutcome | None, str]:
    """Promote the best candidate that passed every gate, reject every other trained one; returns
    the promoted candidate (None if none) and the reason, in words."""
    best = choose_promotion(candidates)
    if best is not None:
        assert best.score is not None and best.adapter is not None
        student.promote(
            best.adapter.adapter_id,
            f"Adapt {request_id}: best of {k}, reward {best.score.reward:+.3f}, all gates passed",
        )
        reason = f"promoted {best.adapter.adapter_id}: reward {best.score.reward:+.3f}, every gate passed"
    else:
        reason = no_promotion_reason(candidates)
    for candidate in candidates:
        if candidate.adapter is not None and candidate is not best:
            student.reject(candidate.adapter.adapter_id, f"Adapt {request_id}: {reason}")
    return best, reason


def run_adapt(
    task: Task,
    *,
    propose: ProposeFn,
    student: StudentPort,
    auditor: AuditorPort,
    k: int,
    seed: int,
    adapter_name: str,
    overrides: Mapping[str, Any] | None = None,
    request_id: str | None = None,
    write_questions: WriteQuestionsFn | None = None,
    needs_training_prompts: bool = False,
    tracer: trace.Tracer | None = None,
    trace_attributes: Attributes | None = None,
    batch_candidates: bool = False,
) -> Iterator[Event]:
    """One Adapt call: k self-edits, a candidate per edit, the best passing candidate promoted,
    every other scored candidate rejected. Yields events as they happen; the last is
    :class:`AdaptFinished`.

    A task without τ gets questions written by ``write_questions`` (held out for τ, the rest
    training prompts); so does an update rule that distils on prompts
    (``needs_training_prompts``), whose prompts then exclude the caller's τ.

    With a ``tracer`` the call is one ``seal.adapt`` span (with ``trace_attributes``, the
    caller's facts such as the update rule) whose children are ``seal.write_questions`` (when τ
    is written), ``seal.propose``, ``seal.baseline``, a ``seal.candidate`` per self-edit (see
    :func:`score_candidate`) and ``seal.decide``.

    ``batch_candidates`` (the ``student.batch_candidates`` setting) with k > 1: every self-edit is
    checked first, then every one that passed is trained in one :meth:`StudentPort.train_many`
    call, then every one trained is scored in one :meth:`AuditorPort.score_many` call; the events
    and the result are those of the one-at-a-time path (progress of several candidates may
    interleave), except that a candidate the auditor cannot score fails alone ("scoring failed")
    where one at a time it would end the step. The spans are then a ``seal.check`` per candidate,
    one ``seal.train`` and one ``seal.score`` for the batch, children of ``seal.adapt``."""
    request_id = request_id or uuid.uuid4().hex[:12]
    attributes: Attributes = {
        "seal.request_id": request_id, "seal.k": k, "seal.adapter.name": adapter_name, "seal.seed": seed,
        **(trace_attributes or {}),
    }
    with _span(tracer, "seal.adapt", attributes):
        yield from _adapt_steps(
            task, propose=propose, student=student, auditor=auditor, k=k, seed=seed, adapter_name=adapter_name,
            overrides=overrides, request_id=request_id, write_questions=write_questions,
            needs_training_prompts=needs_training_prompts, tracer=tracer, batch_candidates=batch_candidates,
        )


def _adapt_steps(
    task: Task,
    *,
    propose: ProposeFn,
    student: StudentPort,
    auditor: AuditorPort,
    k: int,
    seed: int,
    adapter_name: str,
    overrides: Mapping[str, Any] | None,
    request_id: str,
    write_questions: WriteQuestionsFn | None,
    needs_training_prompts: bool,
    tracer: trace.Tracer | None,
    batch_candidates: bool = False,
) -> Iterator[Event]:
    """:func:`run_adapt`'s steps, inside its span."""
    clock, started_total = PhaseClock(), time.perf_counter()

    written: WrittenQuestions | None = None
    training_prompts: tuple[str, ...] = ()
    if task.domain == FEWSHOT:
        check_fewshot_task(task, needs_training_prompts=needs_training_prompts)
    elif not task.questions or needs_training_prompts:
        if write_questions is None:
            raise ValueError("no questions: τ needs at least one held-out question with its gold answer")
        started = time.perf_counter()
        with _span(tracer, "seal.write_questions") as span:
            written = write_questions(task, seed)
            span.set_attributes({
                "seal.questions.written": written.written,
                "seal.questions.kept": len(written.training) + len(written.held_out),
            })
        yield QuestionsWritten(written, clock.add("generation", started))
        if task.questions:
            asked = {q.question.casefold() for q in task.questions}
            pool = [*written.training, *written.held_out]
            training_prompts = tuple(q.question for q in pool if q.question.casefold() not in asked)
        else:
            task = Task(task.title, task.passage, written.require_held_out())
            training_prompts = tuple(q.question for q in written.training)
        if needs_training_prompts and not training_prompts:
            # Every candidate would be refused alike by the student: say why once, up front.
            raise NotEnoughQuestions(
                f"the update rule distils on questions about the passage, and of the {written.written} the "
                "teacher wrote none besides τ survived open-book verification; use update_rule lora_sft, "
                "or raise teacher.questions_to_write"
            )

    started = time.perf_counter()
    with _span(tracer, "seal.propose", {"seal.k": k}) as span:
        proposals = tuple(propose(task, k, seed))
        span.set_attributes({
            "seal.proposals": len(proposals),
            "seal.completion_tokens": sum(p.completion_tokens for p in proposals),
        })
    yield SelfEditsProposed(proposals, clock.add("generation", started))

    started = time.perf_counter()
    with _span(tracer, "seal.baseline") as span:
        baseline = auditor.baseline(task)
        span.set_attribute("seal.baseline_accuracy", baseline.accuracy)
    clock.add("scoring", started)
    yield BaselineScored(baseline)

    candidates: list[CandidateOutcome] = []
    if batch_candidates and len(proposals) > 1:
        candidates = yield from _batched_candidates(
            task, proposals, student=student, auditor=auditor, adapter_name=adapter_name, seed=seed,
            request_id=request_id, overrides=overrides or {}, training_prompts=training_prompts, clock=clock,
            tracer=tracer,
        )
    else:
        for proposal in proposals:
            outcome = yield from score_candidate(
                task, proposal, student=student, auditor=auditor, adapter_name=adapter_name,
                seed=seed + proposal.index, request_id=request_id, overrides=overrides,
                training_prompts=training_prompts, clock=clock, tracer=tracer,
            )
            candidates.append(outcome)

    with _span(tracer, "seal.decide") as span:
        best, reason = _decide(candidates, student, k=k, request_id=request_id)
        span.set_attributes({"seal.decision.promoted": best is not None, "seal.decision.reason": reason})
        if best is not None and best.adapter is not None:
            span.set_attributes(_adapter_attributes(best.adapter))
    yield PromotionDecided(best is not None, best.adapter.adapter_id if best and best.adapter else "", reason)

    scored = [c for c in candidates if c.score is not None]
    shown = best or max(scored, key=lambda c: c.score.reward, default=None)  # type: ignore[union-attr]
    yield AdaptFinished(
        request_id=request_id,
        task=task,
        baseline=baseline,
        candidates=tuple(candidates),
        promoted=best,
        shown=shown,
        reason=reason,
        phase_seconds=dict(clock.seconds, total=time.perf_counter() - started_total),
        written=written if written is not None and task.questions == written.held_out else None,
    )
