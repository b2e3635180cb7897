"""The auditor engine: closed-book scoring on τ, SEAL's reward, the promotion decision, and the
ordered reward log that the teacher's ReST^EM buffer subscribes to (transport-free)."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from seal.audit import (
    KIND_CANDIDATE,
    KIND_REJECT,
    PAYLOAD_VERSION,
    AuditLog,
    candidate_payload,
    cause_payload,
    stored_self_edit,
)
from seal.domains.fewshot import ArcTask, FewShotSettings
from seal.domains.knowledge import (
    QUESTION_REPHRASINGS,
    Grade,
    Grader,
    Question,
    build_question_prompt,
    context_digest,
    extract_answer,
)
from seal.durable import JsonLinesLog
from seal.gates import CandidateScores, Decision, GateSettings, decide, refused_before_retention, reward
from seal.guardrails import GuardrailResult, GuardrailSettings, check_self_edit
from seal.retention import (
    CanarySignal,
    ProbeStore,
    RetentionProbe,
    RetentionSettings,
    build_probe,
    candidate_questions,
    check_fingerprint,
    load_explicit_probe,
    recheck_verdict,
)

if TYPE_CHECKING:
    from seal.config import Settings

log = logging.getLogger(__name__)

# prompts, adapter_id ("" = base model) → completions
AnswerFunction = Callable[[list[str], str], list[str]]
# prompts, one adapter_id per prompt ("" = base model) → completions: several versions in one call
MixedAnswerFunction = Callable[[list[str], list[str]], list[str]]

# The base model's graded answers kept in memory (one per question, base model and generation
# settings): a few hundred bytes each, so the bound is about a few tens of MB at most.
MAX_CACHED_BASE_OUTCOMES = 100_000


def base_key(fingerprint: str, max_new_tokens: int, *, first_sentence: bool = False) -> str:
    """Names the base model's closed-book answers in the auditor's cache: the base model (its
    fingerprint, "" when not known) and the settings they were asked with (greedy, the chat
    template, ``max_new_tokens``, stopped after the first sentence or not). Answers under
    different keys are never taken for each other."""
    return f"{fingerprint or 'unknown'}:greedy:chat:{max_new_tokens}" + (":first-sentence" if first_sentence else "")


@dataclass(frozen=True)
class AdapterToScore:
    """One candidate of :meth:`Auditor.score_many`: what :meth:`Auditor.score` takes per adapter."""

    adapter_id: str
    guardrails: Sequence[GuardrailResult] = ()
    retention_kl: float | None = None


@dataclass(frozen=True)
class _TauPart:
    """A candidate scored on τ, before the retention probe is (or is not) asked."""

    adapter: AdapterToScore
    baseline_outcomes: list[QuestionOutcome]
    adapted_outcomes: list[QuestionOutcome]

    def scores(self, **retention: Any) -> CandidateScores:
        return CandidateScores(
            tau_accuracy=accuracy_of(self.adapted_outcomes),
            baseline_tau_accuracy=accuracy_of(self.baseline_outcomes),
            guardrails=tuple(self.adapter.guardrails),
            retention_kl=self.adapter.retention_kl if self.adapter.adapter_id else None,
            **retention,
        )


def prefetched(answer: AnswerFunction, answers: Mapping[tuple[str, str], str]) -> AnswerFunction:
    """``answer`` with ``answers`` ((adapter_id, prompt) → completion, already generated) served
    first: scoring code written for one adapter at a time reads what one mixed generate asked for
    all of them, and asks ``answer`` only for what is missing (nothing, unless that generate failed)."""

    def ask(prompts: list[str], adapter_id: str) -> list[str]:
        missing = list(dict.fromkeys(p for p in prompts if (adapter_id, p) not in answers))
        fresh = dict(zip(missing, answer(missing, adapter_id), strict=True)) if missing else {}
        return [answers[(adapter_id, p)] if (adapter_id, p) in answers else fresh[p] for p in prompts]

    return ask


@dataclass(frozen=True)
class QuestionOutcome:
    question: str
    gold_answer: str
    prediction: str
    correct: bool
    exact_match: bool
    f1: float
    contains_answer: bool


@dataclass(frozen=True)
class ScoreReport:
    baseline_accuracy: float
    adapted_accuracy: float
    reward: float
    baseline_outcomes: list[QuestionOutcome]
    adapted_outcomes: list[QuestionOutcome]
    decision: Decision
    scores: CandidateScores | None = None
    retention_accuracy: float | None = None
    baseline_retention_accuracy: float | None = None
    retention_outcomes: list[QuestionOutcome] = field(default_factory=list)
    probe_id: str = ""


def outcomes_from(questions: Sequence[Question], predictions: Sequence[str], grades: Sequence[Grade]) -> list[QuestionOutcome]:
    return [
        QuestionOutcome(q.question, q.answer, p, g.correct, g.exact_match, g.f1, g.contains)
        for q, p, g in zip(questions, predictions, grades, strict=True)
    ]


def accuracy_of(outcomes: Sequence[QuestionOutcome]) -> float:
    return sum(outcome.correct for outcome in outcomes) / len(outcomes)


class Auditor:
    def __init__(self, grader: Grader, gate_settings: GateSettings) -> None:
        self._grader = grader
        # A grader that reads only an answer's first sentence lets the student stop generating
        # there (SamplingParams.stop_after_first_sentence); one that reads more must get it all.
        self.stops_after_first_sentence = bool(getattr(grader, "reads_first_sentence_only", False))
        self._gate_settings = gate_settings
        # The base model's graded answer to a question depends only on the base model and the
        # generation settings (``base``, see base_key), the question as asked (its prompt) and the
        # gold answer: cached under all four, so τ's baseline and the retention probe's are asked
        # once, whichever candidates and calls need them (least recently used dropped first).
        self._base_outcomes: OrderedDict[tuple[str, str, str], QuestionOutcome] = OrderedDict()
        self._baseline_lock = threading.Lock()

    def closed_book(
        self,
        answer: AnswerFunction,
        questions: Sequence[Question],
        adapter_id: str,
        *,
        prompt: Callable[[str], str] = build_question_prompt,
    ) -> list[QuestionOutcome]:
        if not questions:
            raise ValueError("τ is empty: send at least one question with its gold answer")
        prompts = [prompt(q.question) for q in questions]
        predictions = [extract_answer(text) for text in answer(prompts, adapter_id)]
        grades = self._grader.grade_batch(
            [q.question for q in questions], [q.answer for q in questions], predictions
        )
        return outcomes_from(questions, predictions, grades)

    def baseline(self, answer: AnswerFunction, questions: Sequence[Question], *, base: str = "") -> list[QuestionOutcome]:
        """The base model's outcomes on ``questions``; ``base`` names the base model and the
        settings ``answer`` generates with (:func:`base_key`), under which they are cached."""
        if not questions:
            raise ValueError("τ is empty: send at least one question with its gold answer")
        return self._cached_base_outcomes(answer, questions, base)

    def _base_key(self, base: str, question: Question) -> tuple[str, str, str]:
        return (base, build_question_prompt(question.question), question.answer)

    def _cached_base_outcomes(self, answer: AnswerFunction, questions: Sequence[Question], base: str) -> list[QuestionOutcome]:
        """Cached outcomes, and the base model asked (one call) only for the questions not cached."""
        keys = [self._base_key(base, q) for q in questions]
        with self._baseline_lock:
            found = {key: self._base_outcomes[key] for key in keys if key in self._base_outcomes}
            for key in found:
                self._base_outcomes.move_to_end(key)
        missing = [q for q, key in zip(questions, keys, strict=True) if key not in found]
        if missing:
            fresh = self.closed_book(answer, missing, "")
            with self._baseline_lock:
                for question, outcome in zip(missing, fresh, strict=True):
                    key = self._base_key(base, question)
                    found[key] = self._base_outcomes[key] = outcome
                while len(self._base_outcomes) > MAX_CACHED_BASE_OUTCOMES:
                    self._base_outcomes.popitem(last=False)
        return [found[key] for key in keys]

    def base_prompts_missing(self, questions: Sequence[Question], base: str) -> list[str]:
        """The prompts of ``questions`` whose base outcome under ``base`` is not cached."""
        with self._baseline_lock:
            return list(dict.fromkeys(
                key[1] for key in (self._base_key(base, q) for q in questions) if key not in self._base_outcomes
            ))

    # --- retention ---------------------------------------------------------------------------

    def build_probe(
        self,
        answer: AnswerFunction,
        fingerprint: str,
        candidates: Sequence[Question],
        *,
        size: int,
        notes: str = "",
        rephrasings: Sequence[Callable[[str], str]] = QUESTION_REPHRASINGS,
    ) -> RetentionProbe:
        """Screen candidates closed-book with the base model; keep the ones it gets right, in the
        usual wording and in every one of ``rephrasings`` (asked only of the questions still kept)."""

        def grade(batch: Sequence[Question]) -> list[bool]:
            flags = [outcome.correct for outcome in self.closed_book(answer, batch, "")]
            for rephrase in rephrasings:
                still = [i for i, ok in enumerate(flags) if ok]
                if not still:
                    break
                again = self.closed_book(answer, [batch[i] for i in still], "", prompt=rephrase)
                for i, outcome in zip(still, again, strict=True):
                    flags[i] = outcome.correct
            return flags

        return build_probe(fingerprint, candidates, grade, size=size, notes=notes)

    def baseline_retention(self, answer: AnswerFunction, probe: RetentionProbe, *, base: str = "") -> list[QuestionOutcome]:
        """The base model's outcomes on the probe, cached as τ's are (``base``: see :meth:`baseline`)."""
        # Re-measured rather than assumed to be 1.0: batching and padding can flip a greedy
        # answer or two, and the gate must compare the candidate with the base model as served.
        if not probe.questions:
            return []
        return self._cached_base_outcomes(answer, probe.questions, base)

    def retention(
        self, answer: AnswerFunction, probe: RetentionProbe, adapter_id: str, *, base: str = ""
    ) -> tuple[float | None, float | None, list[QuestionOutcome]]:
        """(candidate accuracy, base accuracy, candidate outcomes) on the probe; (None, None, [])
        for an empty probe, which measures nothing."""
        if not probe.questions:
            return None, None, []
        base_outcomes = self.baseline_retention(answer, probe, base=base)
        baseline = accuracy_of(base_outcomes)
        if not adapter_id:
            return baseline, baseline, list(base_outcomes)
        outcomes = self.closed_book(answer, probe.questions, adapter_id)
        return accuracy_of(outcomes), baseline, outcomes

    def score(
        self,
        answer: AnswerFunction,
        adapter_id: str,
        questions: Sequence[Question],
        guardrails: Sequence[GuardrailResult] = (),
        *,
        probe: RetentionProbe | None = None,
        probe_answer: AnswerFunction | None = None,
        retention_kl: float | None = None,
        base: str = "",
        probe_base: str = "",
        skip_refused: bool = False,
    ) -> ScoreReport:
        """``probe`` (with ``probe_answer``, e.g. shorter answers) adds the retention measurement
        to a candidate's scores; the base model alone is never asked it. ``retention_kl`` is the
        candidate's KL drift from the base, measured by the student when it trained it. ``base``
        and ``probe_base`` name the base model and the settings of ``answer`` and ``probe_answer``
        (:func:`base_key`): the base model's answers are cached under them. ``skip_refused``: the
        probe is not asked of a candidate another gate already refuses (:func:`refused_before_retention`)."""
        tau = self._score_tau(answer, AdapterToScore(adapter_id, guardrails, retention_kl), questions, base)
        probed = probe if self._needs_probe(tau, probe, skip_refused) else None
        return self._finish(tau, probed, probe_answer or answer, probe_base, skipped=probed is None and probe is not None)

    def score_many(
        self,
        answer: AnswerFunction,
        answer_mixed: MixedAnswerFunction,
        adapters: Sequence[AdapterToScore],
        questions: Sequence[Question],
        *,
        probe: RetentionProbe | None = None,
        probe_answer: AnswerFunction | None = None,
        probe_answer_mixed: MixedAnswerFunction | None = None,
        base: str = "",
        probe_base: str = "",
        skip_refused: bool = False,
    ) -> list[ScoreReport | Exception]:
        """:meth:`score` for each of ``adapters`` (the same reports), with every candidate's
        answers asked up front in one ``answer_mixed`` call for τ and one for the probe (only the
        candidates that still need it, with ``skip_refused``), the base model's rows that are not
        cached yet among them. One report per adapter, in order; a candidate whose scoring raised
        has its exception in its place, and the others are scored. Should a mixed call fail, each
        candidate is asked alone (so a bad one fails alone)."""
        if not questions:
            raise ValueError("τ is empty: send at least one question with its gold answer")
        ids = [a.adapter_id for a in adapters if a.adapter_id]
        tau_answers = prefetched(answer, self._prefetch(answer_mixed, ids, questions, base))
        parts: list[_TauPart | Exception] = []
        for adapter in adapters:
            try:
                parts.append(self._score_tau(tau_answers, adapter, questions, base))
            except Exception as exc:  # noqa: BLE001 - this candidate fails alone; the caller classifies
                parts.append(exc)
        probed = [
            isinstance(part, _TauPart) and self._needs_probe(part, probe, skip_refused) for part in parts
        ]
        probe_answers: Mapping[tuple[str, str], str] = {}
        if probe is not None and probe.questions:
            asked = [
                part.adapter.adapter_id for part, ask in zip(parts, probed, strict=True) if ask and isinstance(part, _TauPart)
            ]
            if asked:
                probe_answers = self._prefetch(probe_answer_mixed or answer_mixed, asked, probe.questions, probe_base)
        reports: list[ScoreReport | Exception] = []
        for part, ask in zip(parts, probed, strict=True):
            if isinstance(part, Exception):
                reports.append(part)
                continue
            try:
                reports.append(self._finish(
                    part, probe if ask else None, prefetched(probe_answer or answer, probe_answers), probe_base,
                    skipped=not ask and probe is not None,
                ))
            except Exception as exc:  # noqa: BLE001 - this candidate fails alone; the caller classifies
                reports.append(exc)
        return reports

    def _score_tau(
        self, answer: AnswerFunction, adapter: AdapterToScore, questions: Sequence[Question], base: str
    ) -> _TauPart:
        """τ before and after (the base model's answers from the cache where it has them)."""
        baseline_outcomes = self.baseline(answer, questions, base=base)
        if adapter.adapter_id:
            adapted_outcomes = self.closed_book(answer, questions, adapter.adapter_id)
        else:
            adapted_outcomes = baseline_outcomes
        return _TauPart(adapter, baseline_outcomes, adapted_outcomes)

    def _needs_probe(self, tau: _TauPart, probe: RetentionProbe | None, skip_refused: bool) -> bool:
        if probe is None or not tau.adapter.adapter_id:
            return False
        return not (skip_refused and refused_before_retention(tau.scores(), self._gate_settings))

    def _finish(
        self, tau: _TauPart, probe: RetentionProbe | None, probe_answer: AnswerFunction, probe_base: str, *, skipped: bool
    ) -> ScoreReport:
        """The report: τ, the probe when given (and measurable), the decision on all of them."""
        adapter_id = tau.adapter.adapter_id
        retention_accuracy = baseline_retention_accuracy = None
        retention_outcomes: list[QuestionOutcome] = []
        if probe is not None and adapter_id:
            retention_accuracy, baseline_retention_accuracy, retention_outcomes = self.retention(
                probe_answer, probe, adapter_id, base=probe_base
            )
        scores = tau.scores(
            retention_accuracy=retention_accuracy,
            baseline_retention_accuracy=baseline_retention_accuracy,
            retention_skipped=skipped and bool(adapter_id),
        )
        decision = decide(scores, self._gate_settings)
        baseline_accuracy, adapted_accuracy = scores.baseline_tau_accuracy, scores.tau_accuracy
        return ScoreReport(
            baseline_accuracy,
            adapted_accuracy,
            reward(adapted_accuracy, baseline_accuracy),
            tau.baseline_outcomes,
            tau.adapted_outcomes,
            decision,
            scores=scores,
            retention_accuracy=retention_accuracy,
            baseline_retention_accuracy=baseline_retention_accuracy,
            retention_outcomes=retention_outcomes,
            probe_id=probe.probe_id if probe is not None and probe.questions else "",
        )

    def _prefetch(
        self, answer_mixed: MixedAnswerFunction, adapter_ids: Sequence[str], questions: Sequence[Question], base: str
    ) -> dict[tuple[str, str], str]:
        """Every adapter's answers to ``questions`` and the base model's not yet cached, in one
        call: (adapter_id, prompt) → completion. Empty when that call fails (logged)."""
        prompts = list(dict.fromkeys(build_question_prompt(q.question) for q in questions))
        rows = [("", p) for p in self.base_prompts_missing(questions, base)]
        rows += [(adapter_id, p) for adapter_id in adapter_ids for p in prompts]
        if not rows:
            return {}
        try:
            texts = answer_mixed([p for _, p in rows], [a for a, _ in rows])
        except Exception:  # noqa: BLE001 - an optimisation failed: each candidate is asked alone
            log.warning("asking %d candidates in one mixed generate failed; asking each alone", len(adapter_ids),
                        exc_info=True)
            return {}
        if len(texts) != len(rows):
            log.warning("a mixed generate answered %d of %d prompts; asking each candidate alone", len(texts), len(rows))
            return {}
        return dict(zip(rows, texts, strict=True))


# --- the auditing service's work, transport-free -------------------------------------------------

KIND_RECHECK = "recheck"
KIND_PROBE = "retention_probe"


@dataclass(frozen=True)
class AdapterFacts:
    """What the auditor needs to know of an adapter version (a projection of its manifest)."""

    adapter_id: str
    base_model_fingerprint: str
    self_edit_sha256: str = ""
    hyperparameters: Mapping[str, Any] = field(default_factory=dict)
    # The KL drift from the base the student measured after training (manifest metric
    # ``retention_kl``); None when it was not measured.
    retention_kl: float | None = None


class AuditedStudent(Protocol):
    """The student as the auditor uses it: asked closed book, looked up, and rolled back.

    The auditor service implements it over the student's gRPC stub, ``seal.local`` over an
    in-process :class:`seal.student.Student`; tests may pass a small fake."""

    def answer(
        self, prompts: list[str], adapter_id: str, *, max_new_tokens: int, stop_after_first_sentence: bool = False
    ) -> list[str]:
        """Greedy completions with adapter ``adapter_id`` ("" = the base model), in prompt order;
        ``stop_after_first_sentence``: each may end once its first sentence is complete."""
        ...

    def answer_mixed(
        self, prompts: list[str], adapter_ids: list[str], *, max_new_tokens: int, stop_after_first_sentence: bool = False
    ) -> list[str]:
        """Greedy completions, ``prompts[i]`` with adapter ``adapter_ids[i]`` ("" = the base
        model), in one call where the student can (the same answers as :meth:`answer` per adapter)."""
        ...

    def adapter(self, adapter_id: str) -> AdapterFacts: ...

    def promoted(self, adapter_name: str) -> AdapterFacts | None:
        """The promoted version of the lineage, None when nothing is promoted."""
        ...

    def rollback(self, adapter_name: str, reason: str) -> str:
        """Roll the lineage's promoted version back (to the base model if nothing earlier is
        left); returns the adapter id served now ("" = the base model)."""
        ...


@dataclass(frozen=True)
class GuardrailVerdict:
    results: list[GuardrailResult]
    audit_sequence: int = 0  # the reject record of a refused self-edit; 0 when it passed

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)

    @property
    def failed_rules(self) -> list[str]:
        return [r.rule for r in self.results if not r.passed]


@dataclass(frozen=True)
class CandidateToScore:
    """One candidate of :meth:`Auditing.score_many`, with what a Score request carries about it."""

    adapter_id: str
    guardrails: Sequence[GuardrailResult] = ()
    prompt: str = ""
    self_edit: str = ""
    seed: int = 0


@dataclass(frozen=True)
class ScoredCandidate:
    report: ScoreReport
    probe_size: int = 0
    # Set only when an adapter was scored (a baseline-only request records nothing).
    reward_sequence: int = 0
    audit_sequence: int = 0


@dataclass(frozen=True)
class RecheckResult:
    """One retention re-check. ``outcome`` names what happened, for metrics and logs:
    nothing_promoted, ok, not_measured, rollback_needed_dry_run, superseded or rolled_back."""

    adapter_name: str
    floor: float
    reason: str
    outcome: str
    adapter_id: str = ""
    retention_accuracy: float | None = None
    baseline_retention_accuracy: float | None = None
    probe_size: int = 0
    rollback_needed: bool = False
    rolled_back: bool = False
    now_serving_adapter_id: str = ""
    signals: tuple[CanarySignal, ...] = ()
    audit_sequence: int = 0


class Auditing:
    """Everything the auditor service does, minus gRPC: guardrails with their refusal record,
    scoring with its reward and audit records, the retention probe of each base model (built
    once, then reused), idempotent recording of reported events, and the re-check that rolls a
    promoted version back when it has forgotten too much.

    Each call takes the :class:`AuditedStudent` to ask, because its deadline is the caller's
    (a gRPC request's remaining time, or the scheduled re-check's own timeout)."""

    def __init__(
        self,
        auditor: Auditor,
        *,
        reward_log: RewardLog,
        audit: AuditLog,
        probe_store: ProbeStore,
        retention: RetentionSettings,
        guardrails: GuardrailSettings,
        answer_max_new_tokens: int,
        on_append: Callable[[str], None] = lambda kind: None,
        probe_base_dir: Path | None = None,
        fewshot: FewShotSettings | None = None,
        max_prompts: int = 256,
    ) -> None:
        self.auditor = auditor
        # The student refuses a Generate with more prompts (limits.max_prompts): larger batches,
        # such as a retention probe of up to 1024 questions, are asked in parts of this size.
        self._max_prompts = max_prompts
        # The few-shot domain's recipe limits and answer voting (``seal.domains.fewshot_audit``).
        self._fewshot = fewshot or FewShotSettings()
        self._fewshot_baselines: dict[str, Any] = {}  # context_id → the base model's graded answers
        self.reward_log = reward_log
        self.audit = audit
        self._probe_store = probe_store
        self._retention = retention
        self._guardrails = guardrails
        self._answer_tokens = answer_max_new_tokens
        # Called with the kind of every audit record appended (the service counts them).
        self._on_append = on_append
        # Where a relative retention.squad_file is looked up; None: the working directory at
        # the time the probe is built, as an operator starting the service would expect.
        self._probe_base_dir = probe_base_dir
        self._probes: dict[str, RetentionProbe] = {}
        self._probe_lock = threading.Lock()
        # The student's base model as last seen in a manifest: what the base model's cached
        # answers are looked up under when a request names no adapter (a baseline). A student
        # restarted on another model shows a new fingerprint in the next candidate's manifest, and
        # candidates are always scored under their own manifest's, never another model's answers.
        self._fingerprint = ""
        # Hook for live serving signals (the Triton canary): adapter_id → signals with minimums.
        # They join the retention probe in every re-check's rollback verdict.
        self.canary_signals: Callable[[str], Sequence[CanarySignal]] = lambda adapter_id: ()

    @classmethod
    def from_settings(
        cls, settings: Settings, auditor: Auditor, *, on_append: Callable[[str], None] = lambda kind: None
    ) -> Auditing:
        """The files the settings name under ``home``: rewards, the audit log, the probe store."""
        return cls(
            auditor,
            reward_log=RewardLog(settings.home / "auditor" / "rewards.jsonl"),
            audit=AuditLog(settings.audit_log_path),
            probe_store=ProbeStore(settings.home / "auditor" / "retention"),
            retention=settings.retention,
            guardrails=settings.guardrails,
            answer_max_new_tokens=settings.auditor.answer_max_new_tokens,
            on_append=on_append,
            fewshot=settings.fewshot,
            max_prompts=settings.limits.max_prompts,
        )

    def close(self) -> None:
        self.reward_log.close()
        self.audit.close()

    def _append(self, kind: str, adapter_id: str | None, payload: dict[str, Any]) -> int:
        record = self.audit.append(kind, adapter_id, payload)
        self._on_append(kind)
        return record.seq

    # --- guardrails before training ----------------------------------------------------------

    def check_self_edit(
        self, title: str, passage: str, self_edit: str, *, prompt: str = "", seed: int = 0, request_id: str = ""
    ) -> GuardrailVerdict:
        context = f"{title}\n{passage}"
        results = check_self_edit(self_edit, context, self._guardrails)
        return self._refusal_recorded(
            GuardrailVerdict(results), context_digest(title, passage), self_edit,
            prompt=prompt, seed=seed, request_id=request_id, context=context,
        )

    def check_recipe(
        self, task: ArcTask, self_edit: str, *, prompt: str = "", seed: int = 0, request_id: str = ""
    ) -> GuardrailVerdict:
        """The few-shot domain's check before training: the self-edit must be a well-formed recipe."""
        from seal.domains import fewshot_audit

        verdict = GuardrailVerdict([fewshot_audit.check_recipe(self_edit, self._fewshot)])
        return self._refusal_recorded(
            verdict, task.context_id, self_edit, prompt=prompt, seed=seed, request_id=request_id, context=""
        )

    def _stored(self, self_edit: str, prompt: str, context: str) -> dict[str, Any]:
        """The self-edit and its prompt as records keep them: secrets and personal data masked."""
        return stored_self_edit(self_edit, prompt, context=context, guardrails=self._guardrails)

    def _refusal_recorded(
        self, verdict: GuardrailVerdict, digest: str, self_edit: str, *, prompt: str, seed: int, request_id: str,
        context: str,
    ) -> GuardrailVerdict:
        """A refused self-edit never becomes an adapter, so its reject record is its only trace:
        with a secret or personal data masked, and the original's sha256."""
        if verdict.passed:
            return verdict
        results = verdict.results
        failed = verdict.failed_rules
        sequence = self._append(
            KIND_REJECT,
            None,
            cause_payload(
                f"guardrails failed before training: {', '.join(failed)}",
                stage="guardrails",
                failed_rules=failed,
                context_digest=digest,
                **self._stored(self_edit, prompt, context),
                seed=seed,
                request_id=request_id,
                gates=[r.to_dict() for r in results],
            ),
        )
        return replace(verdict, audit_sequence=sequence)

    # --- retention probe -----------------------------------------------------------------------

    def _answers(self, student: AuditedStudent, max_new_tokens: int) -> AnswerFunction:
        def answer(prompts: list[str], adapter_id: str) -> list[str]:
            answers: list[str] = []
            for start in range(0, len(prompts), self._max_prompts):
                part = prompts[start : start + self._max_prompts]
                answers.extend(student.answer(
                    part, adapter_id, max_new_tokens=max_new_tokens,
                    stop_after_first_sentence=self.auditor.stops_after_first_sentence,
                ))
            return answers

        return answer

    def _mixed_answers(self, student: AuditedStudent, max_new_tokens: int) -> MixedAnswerFunction:
        def answer(prompts: list[str], adapter_ids: list[str]) -> list[str]:
            answers: list[str] = []
            for start in range(0, len(prompts), self._max_prompts):
                end = start + self._max_prompts
                answers.extend(student.answer_mixed(
                    prompts[start:end], adapter_ids[start:end], max_new_tokens=max_new_tokens,
                    stop_after_first_sentence=self.auditor.stops_after_first_sentence,
                ))
            return answers

        return answer

    def _answers_key(self, fingerprint: str, max_new_tokens: int) -> str:
        """The cache key of the base model's answers asked by :meth:`_answers` (:func:`base_key`)."""
        return base_key(fingerprint, max_new_tokens, first_sentence=self.auditor.stops_after_first_sentence)

    def _manifest(self, student: AuditedStudent, adapter_id: str) -> AdapterFacts:
        manifest = student.adapter(adapter_id)
        if manifest.base_model_fingerprint:
            self._fingerprint = manifest.base_model_fingerprint
        return manifest

    def probe_for(self, fingerprint: str, student: AuditedStudent) -> RetentionProbe | None:
        """The retention probe of this base model: cached, else loaded from disk, else built now
        (once per fingerprint; the build asks the base model up to max_candidates questions)."""
        settings = self._retention
        if not settings.enabled:
            return None
        try:
            check_fingerprint(fingerprint)
        except ValueError:
            log.warning("no retention probe: the adapter's base model fingerprint %r is unusable", fingerprint)
            return None
        # Held through the build, so concurrent first requests build one probe, not several.
        with self._probe_lock:
            probe = self._probes.get(fingerprint)
            if probe is not None:
                return probe
            if settings.probe_file:
                probe = load_explicit_probe(settings.probe_file, fingerprint)
            else:
                probe = self._probe_store.load(fingerprint)
            if probe is None:
                candidates, notes = candidate_questions(settings, base_dir=self._probe_base_dir or Path.cwd())
                answer = self._answers(student, settings.max_new_tokens)
                probe = self.auditor.build_probe(
                    answer, fingerprint, candidates, size=settings.probe_size, notes=notes,
                    rephrasings=QUESTION_REPHRASINGS if settings.screen_rephrasings else (),
                )
                path = self._probe_store.save(probe)
                log.info("retention probe for %s: %d of %d screened questions kept (%s) → %s",
                         fingerprint[:12], len(probe), probe.screened, notes, path)
                self._append(KIND_PROBE, None, {
                    "payload_version": PAYLOAD_VERSION, "fingerprint": fingerprint, "probe_id": probe.probe_id,
                    "size": len(probe), "screened": probe.screened, "notes": notes, "path": str(path),
                })
            if not probe.questions:
                log.warning("the retention probe of %s is empty: retention will be reported as not measured", fingerprint[:12])
            self._probes[fingerprint] = probe
            return probe

    # --- scoring -------------------------------------------------------------------------------

    def score(
        self,
        student: AuditedStudent,
        *,
        adapter_id: str,
        questions: Sequence[Question],
        title: str,
        passage: str,
        guardrails: Sequence[GuardrailResult] = (),
        prompt: str = "",
        self_edit: str = "",
        seed: int = 0,
        request_id: str = "",
        measure_retention: bool = True,
    ) -> ScoredCandidate:
        """Score ``adapter_id`` on τ (and the retention probe); without an adapter, the base
        model's baseline only. A scored adapter gets a reward record (what ReST^EM subscribes
        to) and a candidate audit record with everything needed to explain and re-run it."""
        if not questions:
            raise ValueError("no questions: scoring needs τ, at least one question with its gold answer")
        answer = self._answers(student, self._answer_tokens)
        probe_answer = self._answers(student, self._retention.max_new_tokens)
        manifest: AdapterFacts | None = None
        probe: RetentionProbe | None = None
        if adapter_id:
            manifest = self._manifest(student, adapter_id)
            if measure_retention:
                probe = self.probe_for(manifest.base_model_fingerprint, student)
        fingerprint = manifest.base_model_fingerprint if manifest is not None else self._fingerprint
        report = self.auditor.score(
            answer, adapter_id, questions, guardrails, probe=probe, probe_answer=probe_answer,
            retention_kl=manifest.retention_kl if manifest is not None and measure_retention else None,
            base=self._answers_key(fingerprint, self._answer_tokens),
            probe_base=self._answers_key(fingerprint, self._retention.max_new_tokens),
            skip_refused=self._retention.skip_refused,
        )
        probe_size = len(probe) if probe is not None else 0
        if manifest is None:
            return ScoredCandidate(report, probe_size)
        return self._record_scored(
            report, manifest, adapter_id=adapter_id, digest=context_digest(title, passage), prompt=prompt,
            self_edit=self_edit, seed=seed, request_id=request_id, probe_size=probe_size,
            context=f"{title}\n{passage}",
        )

    def score_many(
        self,
        student: AuditedStudent,
        *,
        candidates: Sequence[CandidateToScore],
        questions: Sequence[Question],
        title: str,
        passage: str,
        request_id: str = "",
        measure_retention: bool = True,
    ) -> list[ScoredCandidate | Exception]:
        """:meth:`score` for each trained candidate of one task (the same reports, reward and
        audit records), with all their answers asked of the student together: one mixed-adapter
        generate for τ and one for the retention probe (per ``limits.max_prompts`` prompts), the
        base model's answers from the cache or among those rows. One result per candidate, in
        order; a candidate whose manifest or answers cannot be had gets its exception instead, and
        the others are scored. Recording (reward log, audit log) failing raises, as in score."""
        if not questions:
            raise ValueError("no questions: scoring needs τ, at least one question with its gold answer")
        results: list[ScoredCandidate | Exception | None] = [None] * len(candidates)
        manifests: dict[int, AdapterFacts] = {}
        for position, candidate in enumerate(candidates):
            if not candidate.adapter_id:
                results[position] = ValueError(f"candidates[{position}] names no adapter: Score scores the base model")
                continue
            try:
                manifests[position] = self._manifest(student, candidate.adapter_id)
            except Exception as exc:  # noqa: BLE001 - e.g. an unknown version: this candidate fails alone
                results[position] = exc
        # The candidates of one step share their base model; should the student have been
        # restarted on another between trainings, each base model's are scored apart.
        by_base: dict[str, list[int]] = {}
        for position, manifest in manifests.items():
            by_base.setdefault(manifest.base_model_fingerprint, []).append(position)
        for fingerprint, positions in by_base.items():
            probe = self.probe_for(fingerprint, student) if measure_retention else None
            reports = self.auditor.score_many(
                self._answers(student, self._answer_tokens),
                self._mixed_answers(student, self._answer_tokens),
                [
                    AdapterToScore(
                        candidates[i].adapter_id, candidates[i].guardrails,
                        manifests[i].retention_kl if measure_retention else None,
                    )
                    for i in positions
                ],
                questions,
                probe=probe,
                probe_answer=self._answers(student, self._retention.max_new_tokens),
                probe_answer_mixed=self._mixed_answers(student, self._retention.max_new_tokens),
                base=self._answers_key(fingerprint, self._answer_tokens),
                probe_base=self._answers_key(fingerprint, self._retention.max_new_tokens),
                skip_refused=self._retention.skip_refused,
            )
            probe_size = len(probe) if probe is not None else 0
            for position, report in zip(positions, reports, strict=True):
                if isinstance(report, Exception):
                    results[position] = report
                    continue
                candidate = candidates[position]
                results[position] = self._record_scored(
                    report, manifests[position], adapter_id=candidate.adapter_id,
                    digest=context_digest(title, passage), prompt=candidate.prompt, self_edit=candidate.self_edit,
                    seed=candidate.seed, request_id=request_id, probe_size=probe_size, context=f"{title}\n{passage}",
                )
        scored = [result for result in results if result is not None]
        assert len(scored) == len(candidates), "every candidate has a result"
        return scored

    def score_many_fewshot(
        self, student: AuditedStudent, *, candidates: Sequence[CandidateToScore], task: ArcTask, request_id: str = ""
    ) -> list[ScoredCandidate | Exception]:
        """:meth:`score_fewshot` for each candidate (the same reports and records), with every
        candidate's answers to the task's voting prompts asked in one mixed-adapter generate, the
        base model's among them until its baseline is cached. A candidate whose scoring raises gets
        its exception in its place; should the mixed call fail, each candidate is asked alone."""
        from seal.domains.fewshot import answer_budget, solve_prompts

        manifests: dict[str, AdapterFacts] = {}
        for adapter_id in dict.fromkeys(c.adapter_id for c in candidates if c.adapter_id):
            try:
                manifests[adapter_id] = self._manifest(student, adapter_id)
            except Exception:  # noqa: BLE001 - e.g. an unknown version: it fails alone below, not the batch
                continue
        ids = list(manifests)
        owners = ([] if task.context_id in self._fewshot_baselines else [""]) + ids
        prompts = list(dict.fromkeys(solve_prompts(task, self._fewshot))) if task.has_solutions else []
        budget = answer_budget(task, self._fewshot.answer_max_new_tokens)
        asked: dict[tuple[str, str], str] = {}
        rows = [(owner, prompt) for owner in owners for prompt in prompts]
        if rows and ids:
            try:
                texts = student.answer_mixed([p for _, p in rows], [o for o, _ in rows], max_new_tokens=budget)
            except Exception:  # noqa: BLE001 - an optimisation failed: each candidate is asked alone
                log.warning("asking %d few-shot candidates in one mixed generate failed; asking each alone", len(ids),
                            exc_info=True)
                texts = []
            if len(texts) == len(rows):
                asked = dict(zip(rows, texts, strict=True))
        results: list[ScoredCandidate | Exception] = []
        for position, candidate in enumerate(candidates):
            if not candidate.adapter_id:
                results.append(ValueError(f"candidates[{position}] names no adapter: Score scores the base model"))
                continue
            try:
                results.append(self.score_fewshot(
                    student, adapter_id=candidate.adapter_id, task=task, guardrails=candidate.guardrails,
                    prompt=candidate.prompt, self_edit=candidate.self_edit, seed=candidate.seed, request_id=request_id,
                    answered=asked, manifest=manifests.get(candidate.adapter_id),
                ))
            except Exception as exc:  # noqa: BLE001 - this candidate fails alone; the caller classifies
                results.append(exc)
        return results

    def score_fewshot(
        self,
        student: AuditedStudent,
        *,
        adapter_id: str,
        task: ArcTask,
        guardrails: Sequence[GuardrailResult] = (),
        prompt: str = "",
        self_edit: str = "",
        seed: int = 0,
        request_id: str = "",
        answered: Mapping[tuple[str, str], str] | None = None,
        manifest: AdapterFacts | None = None,
    ) -> ScoredCandidate:
        """Score ``adapter_id`` on a few-shot task's test outputs (pass@2, binary reward, the
        ``solved`` gate); without an adapter, the base model alone. Recorded like :meth:`score`.
        :meth:`score_many_fewshot` passes what it already has: ``answered``, (adapter_id, prompt)
        → answer asked with the task's answer budget (the rest are asked of ``student``), and the
        adapter's ``manifest``."""
        from seal.domains import fewshot_audit

        if not task.has_solutions:
            raise ValueError(f"few-shot task {task.task_id} needs a test output per test input to be scored")

        def answer(prompts: Sequence[str], max_new_tokens: int, adapter: str) -> list[str]:
            # predict() asks every prompt with the same budget (answer_budget), the one of ``answered``.
            ask = prefetched(lambda missing, a: student.answer(missing, a, max_new_tokens=max_new_tokens), answered or {})
            return ask(list(prompts), adapter)

        baseline = self._fewshot_baselines.get(task.context_id)
        if baseline is None:
            baseline = self._fewshot_baselines[task.context_id] = fewshot_audit.grade_with(
                task, answer, "", self._fewshot
            )
        if not adapter_id:
            verdict = fewshot_audit.score_task(task, baseline, baseline, guardrails)
            return ScoredCandidate(verdict.report(guardrails))
        manifest = manifest or self._manifest(student, adapter_id)
        adapted = fewshot_audit.grade_with(task, answer, adapter_id, self._fewshot)
        report = fewshot_audit.score_task(task, baseline, adapted, guardrails).report(guardrails)
        return self._record_scored(
            report, manifest, adapter_id=adapter_id, digest=task.context_id, prompt=prompt, self_edit=self_edit,
            seed=seed, request_id=request_id, probe_size=0, context="",
        )

    def _record_scored(
        self, report: ScoreReport, manifest: AdapterFacts, *, adapter_id: str, digest: str, prompt: str,
        self_edit: str, seed: int, request_id: str, probe_size: int, context: str,
    ) -> ScoredCandidate:
        """A scored adapter's reward record (what ReST^EM subscribes to) and its candidate audit
        record, with everything needed to explain and re-run it. Both keep the self-edit as
        records may (secrets and personal data masked): a caller of Score is not bound to have
        asked CheckSelfEdit first."""
        assert report.scores is not None
        stored = self._stored(self_edit, prompt, context)
        record = self.reward_log.append(
            context_id=digest,
            adapter_id=adapter_id,
            prompt=stored["prompt"],
            self_edit=stored["self_edit"],
            reward=report.reward,
            baseline_accuracy=report.baseline_accuracy,
            adapted_accuracy=report.adapted_accuracy,
            outcomes=report.adapted_outcomes,
            seed=seed,
        )
        from seal.student import (
            self_edit_digest,  # here: seal.student loads the model stack
        )

        edit_sha256 = self_edit_digest(self_edit)
        payload = candidate_payload(
            context_digest=digest,
            prompt=stored["prompt"],
            self_edit=stored["self_edit"],
            hyperparameters=manifest.hyperparameters,
            seed=seed,
            scores=report.scores,
            decision=report.decision,
        )
        payload.update(
            request_id=request_id,
            reward=report.reward,
            reward_sequence=record.sequence,
            base_model_fingerprint=manifest.base_model_fingerprint,
            retention_probe_id=report.probe_id,
            retention_probe_size=probe_size,
            self_edit_sha256=edit_sha256,
            **({"redacted_rules": stored["redacted_rules"]} if "redacted_rules" in stored else {}),
            # The adapter must have been trained on the text being scored; a mismatch is
            # kept on record rather than refused, since scoring itself is still valid.
            self_edit_matches_manifest=manifest.self_edit_sha256 == edit_sha256,
        )
        sequence = self._append(KIND_CANDIDATE, adapter_id, payload)
        return ScoredCandidate(report, probe_size, record.sequence, sequence)

    # --- reported status changes ---------------------------------------------------------------

    def record_event(
        self,
        *,
        event_id: str,
        kind: str,
        adapter_id: str,
        cause: str,
        details: Mapping[str, Any] | None = None,
        source: str = "",
        reported_at: str = "",
    ) -> tuple[int, bool]:
        """A promote/reject/rollback another service reports: (its sequence, duplicate). A
        redelivered ``event_id`` returns the first delivery's sequence and writes nothing."""
        payload = cause_payload(
            cause,
            event_id=event_id,
            source=source or "unknown",
            reported_at=reported_at,
            **{k: v for k, v in (details or {}).items() if k not in ("cause", "payload_version", "event_id", "source", "reported_at")},
        )
        record, duplicate = self.audit.append_once(event_id, kind, adapter_id, payload)
        if not duplicate:
            self._on_append(kind)
        return record.seq, duplicate

    # --- re-check ------------------------------------------------------------------------------

    def recheck(self, student: AuditedStudent, adapter_name: str, *, dry_run: bool) -> RecheckResult:
        """Measure the promoted version on the retention probe and roll it back on a failed verdict."""
        floor = self._retention.recheck_floor
        manifest = student.promoted(adapter_name)
        if manifest is None:
            return RecheckResult(adapter_name, floor, f"nothing is promoted in lineage {adapter_name!r}", "nothing_promoted")
        probe = self.probe_for(manifest.base_model_fingerprint, student)
        accuracy = baseline = None
        if probe is not None:
            answer = self._answers(student, self._retention.max_new_tokens)
            accuracy, baseline, _ = self.auditor.retention(
                answer, probe, manifest.adapter_id,
                base=self._answers_key(manifest.base_model_fingerprint, self._retention.max_new_tokens),
            )
        signals = tuple(self.canary_signals(manifest.adapter_id))
        verdict = recheck_verdict(accuracy, baseline, floor, signals)
        probe_size = len(probe) if probe is not None else 0
        # Recorded before acting, so the rollback record that follows can point at it.
        sequence = self._append(KIND_RECHECK, manifest.adapter_id, {
            "payload_version": PAYLOAD_VERSION,
            "retention_accuracy": accuracy,
            "baseline_retention_accuracy": baseline,
            "floor": floor,
            "retention_probe_id": probe.probe_id if probe is not None else "",
            "retention_probe_size": probe_size,
            "signals": [{"name": s.name, "value": s.value, "minimum": s.minimum} for s in signals],
            "rollback_needed": verdict.rollback,
            "dry_run": dry_run,
            "reason": verdict.reason,
        })
        result = RecheckResult(
            adapter_name,
            floor,
            verdict.reason,
            outcome="ok" if accuracy is not None else "not_measured",
            adapter_id=manifest.adapter_id,
            retention_accuracy=accuracy,
            baseline_retention_accuracy=baseline,
            probe_size=probe_size,
            rollback_needed=verdict.rollback,
            now_serving_adapter_id=manifest.adapter_id,
            signals=signals,
            audit_sequence=sequence,
        )
        if not verdict.rollback:
            return result
        if dry_run:
            return replace(result, outcome="rollback_needed_dry_run")
        # Narrows (does not close) the window in which a newer promotion could be rolled back
        # instead of the version just measured; the student's rollback takes no expected version.
        current = student.promoted(adapter_name)
        if current is None or current.adapter_id != manifest.adapter_id:
            return replace(
                result, outcome="superseded",
                reason=result.reason + "; not rolled back: the promoted version changed during the check",
            )
        now_serving = student.rollback(
            adapter_name,
            f"automatic rollback by the auditor's retention re-check (audit #{sequence}): {verdict.reason}",
        )
        log.warning("rolled back %s: %s", manifest.adapter_id, verdict.reason)
        return replace(result, outcome="rolled_back", rolled_back=True, now_serving_adapter_id=now_serving)


@dataclass(frozen=True)
class RewardRecord:
    sequence: int
    event_id: str
    context_id: str
    adapter_id: str
    prompt: str
    self_edit: str
    reward: float
    baseline_accuracy: float
    adapted_accuracy: float
    outcomes: list[QuestionOutcome]
    seed: int
    at: str = field(default_factory=lambda: datetime.now(UTC).isoformat())

    @classmethod
    def from_json(cls, line: str) -> RewardRecord:
        return cls.from_dict(json.loads(line))

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> RewardRecord:
        outcomes = [QuestionOutcome(**outcome) for outcome in data["outcomes"]]  # type: ignore[attr-defined]
        return cls(**{**data, "outcomes": outcomes})  # type: ignore[arg-type]


class RewardLog:
    """Append-only, sequence-numbered rewards on disk (a :class:`~seal.durable.JsonLinesLog`).

    Subscribers resume with the last sequence they saw, so a reconnecting teacher gets every
    event exactly once in order. That only holds if an acknowledged reward survives a crash and
    its number is never handed out again: each append is fsynced before it returns, and a torn
    last line is cut off on open, so the next reward does not land glued to it (unreadable)."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._log = JsonLinesLog(path, sequence_key="sequence", sort_keys=False)
        self._records: list[RewardRecord] = []
        for data in self._log.read():
            try:
                self._records.append(RewardRecord.from_dict(data))
            except (KeyError, TypeError, ValueError) as exc:
                # Its sequence number still counts (the log keeps the high-water mark), so a
                # subscriber never sees one number for two different rewards.
                logging.getLogger(__name__).warning("%s: a reward that does not decode is skipped: %s", path, exc)
        self._condition = threading.Condition()
        self._closed = False

    @property
    def last_sequence(self) -> int:
        return self._log.last_sequence

    def append(self, **fields: object) -> RewardRecord:
        with self._condition:
            # Built first so that a wrong field fails before anything is written or numbered.
            draft = RewardRecord(sequence=0, event_id=uuid.uuid4().hex, **fields)  # type: ignore[arg-type]
            data = asdict(draft)
            del data["sequence"]
            record = RewardRecord.from_dict(self._log.append(data))
            self._records.append(record)
            self._condition.notify_all()
            return record

    def follow(self, after_sequence: int, is_active: Callable[[], bool], poll_s: float = 1.0) -> Iterator[RewardRecord]:
        """Every record after ``after_sequence``, then new ones as they arrive, until inactive."""
        next_index = 0
        while is_active():
            with self._condition:
                pending = [r for r in self._records[next_index:] if r.sequence > after_sequence]
                next_index = len(self._records)
                if not pending:
                    if self._closed:
                        return
                    self._condition.wait(poll_s)
                    continue
            yield from pending

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()
