"""The auditor engine: closed-book scoring on τ, SEAL's reward, the promotion decision, and the
ordered reward log that the teacher's ReST^EM buffer subscribes to (transport-free)."""

from __future__ import annotations

import json
import logging
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from seal.domains.knowledge import (
    Grade,
    Grader,
    Question,
    build_question_prompt,
    extract_answer,
)
from seal.durable import JsonLinesLog
from seal.gates import CandidateScores, Decision, GateSettings, decide, reward
from seal.guardrails import GuardrailResult
from seal.retention import RetentionProbe, build_probe

# prompts, adapter_id ("" = base model) → completions
AnswerFunction = Callable[[list[str], str], list[str]]


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
        self._gate_settings = gate_settings
        # Baselines depend only on the base model and τ, so each is computed once.
        self._baselines: dict[tuple[str, ...], list[QuestionOutcome]] = {}
        self._baseline_lock = threading.Lock()
        # Same for the base model on a retention probe, keyed by the probe's content digest.
        self._retention_baselines: dict[str, list[QuestionOutcome]] = {}

    def closed_book(
        self, answer: AnswerFunction, questions: Sequence[Question], adapter_id: str
    ) -> list[QuestionOutcome]:
        if not questions:
            raise ValueError("τ is empty: send at least one question with its gold answer")
        prompts = [build_question_prompt(q.question) for q in questions]
        predictions = [extract_answer(text) for text in answer(prompts, adapter_id)]
        grades = self._grader.grade_batch(
            [q.question for q in questions], [q.answer for q in questions], predictions
        )
        return outcomes_from(questions, predictions, grades)

    def baseline(self, answer: AnswerFunction, questions: Sequence[Question]) -> list[QuestionOutcome]:
        key = tuple(f"{q.question}\x1f{q.answer}" for q in questions)
        with self._baseline_lock:
            cached = self._baselines.get(key)
        if cached is None:
            cached = self.closed_book(answer, questions, "")
            with self._baseline_lock:
                self._baselines[key] = cached
        return cached

    # --- retention ---------------------------------------------------------------------------

    def build_probe(
        self, answer: AnswerFunction, fingerprint: str, candidates: Sequence[Question], *, size: int, notes: str = ""
    ) -> RetentionProbe:
        """Screen candidates closed-book with the base model; keep the ones it gets right."""

        def grade(batch: Sequence[Question]) -> list[bool]:
            return [outcome.correct for outcome in self.closed_book(answer, batch, "")]

        return build_probe(fingerprint, candidates, grade, size=size, notes=notes)

    def baseline_retention(self, answer: AnswerFunction, probe: RetentionProbe) -> list[QuestionOutcome]:
        # Re-measured rather than assumed to be 1.0: batching and padding can flip a greedy
        # answer or two, and the gate must compare the candidate with the base model as served.
        with self._baseline_lock:
            cached = self._retention_baselines.get(probe.probe_id)
        if cached is None:
            cached = self.closed_book(answer, probe.questions, "")
            with self._baseline_lock:
                self._retention_baselines[probe.probe_id] = cached
        return cached

    def retention(
        self, answer: AnswerFunction, probe: RetentionProbe, adapter_id: str
    ) -> tuple[float | None, float | None, list[QuestionOutcome]]:
        """(candidate accuracy, base accuracy, candidate outcomes) on the probe; (None, None, [])
        for an empty probe, which measures nothing."""
        if not probe.questions:
            return None, None, []
        baseline = accuracy_of(self.baseline_retention(answer, probe))
        if not adapter_id:
            return baseline, baseline, list(self.baseline_retention(answer, probe))
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
    ) -> ScoreReport:
        """``probe`` (with ``probe_answer``, e.g. shorter answers) adds the retention measurement
        to a candidate's scores; the base model alone is never asked it."""
        baseline_outcomes = self.baseline(answer, questions)
        baseline_accuracy = accuracy_of(baseline_outcomes)
        if adapter_id:
            adapted_outcomes = self.closed_book(answer, questions, adapter_id)
        else:
            adapted_outcomes = baseline_outcomes
        adapted_accuracy = accuracy_of(adapted_outcomes)
        retention_accuracy = baseline_retention_accuracy = None
        retention_outcomes: list[QuestionOutcome] = []
        if probe is not None and adapter_id:
            retention_accuracy, baseline_retention_accuracy, retention_outcomes = self.retention(
                probe_answer or answer, probe, adapter_id
            )
        scores = CandidateScores(
            tau_accuracy=adapted_accuracy,
            baseline_tau_accuracy=baseline_accuracy,
            retention_accuracy=retention_accuracy,
            baseline_retention_accuracy=baseline_retention_accuracy,
            guardrails=tuple(guardrails),
        )
        decision = decide(scores, self._gate_settings)
        return ScoreReport(
            baseline_accuracy,
            adapted_accuracy,
            reward(adapted_accuracy, baseline_accuracy),
            baseline_outcomes,
            adapted_outcomes,
            decision,
            scores=scores,
            retention_accuracy=retention_accuracy,
            baseline_retention_accuracy=baseline_retention_accuracy,
            retention_outcomes=retention_outcomes,
            probe_id=probe.probe_id if probe is not None and probe.questions else "",
        )


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
