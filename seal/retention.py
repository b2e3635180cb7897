"""Retention: does an adapted model still know what its base model knew?

A *probe* is a set of closed-book questions that the base model answers correctly. It is built
once per base model (identified by its content fingerprint), stored next to that fingerprint,
and then asked of every candidate: the fraction it still gets right, against the base model's,
is what the promotion gate's retention check compares (``seal.gates``). A scheduled re-check
asks the *promoted* version again and rolls it back when it falls below a floor.

Why closed-book questions the base model already answers: retention must measure knowledge the
model had *before* the edit, without help. Questions it got wrong to begin with cannot be
forgotten, and an open-book probe would measure reading, not memory.

Candidates come from a built-in list of general-knowledge questions and, when the file exists,
from a SQuAD-format file. The built-in list goes first: a 135M model answers few SQuAD
questions without their passage, so SQuAD alone would yield a probe of a handful of questions.

Everything here except ``ProbeStore`` (atomic JSON files) is pure: model calls come in as
functions, so the rules can be tested without a model.
"""

from __future__ import annotations

import hashlib
import json
import logging
import random
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from seal.domains.knowledge import Question, load_squad, normalize_answer
from seal.durable import atomic_write_json

log = logging.getLogger(__name__)

# 2: questions are also screened in other wordings (retention.screen_rephrasings); a stored
# probe of format 1 is rebuilt rather than used.
PROBE_FORMAT = 2
_FINGERPRINT = re.compile(r"[0-9a-f]{16,128}")


class RetentionSettings(BaseModel):
    model_config = ConfigDict(extra="forbid")

    enabled: bool = Field(True, description="measure retention in Score (off: the gate reports 'not measured')")
    # The probe is the costliest measurement of a candidate (one generation per question, 60 by
    # default, against 4-5 for τ): asking it of a candidate whose τ gain, guardrails or KL drift
    # already refuse it changes no decision. bench/adapt_wall.py measures what it saves.
    skip_refused: bool = Field(
        True,
        description="do not ask the probe of a candidate another gate (τ gain, guardrails, KL drift) already "
        "refuses; its retention is reported as not measured, with that reason (off: every candidate is probed)",
    )
    # Measured by the student right after training, where the trained adapter and its base are
    # both in memory (about a second on CPU for SmolLM2); the auditor reads it from the manifest.
    measure_kl: bool = Field(
        True,
        description="record each candidate's KL drift from the base (mean token KL on never-trained texts, "
        "seal.anchors.kl_drift) in its manifest metrics as retention_kl; gates.max_retention_kl gates on it",
    )
    # Relative paths are resolved against the working directory of the auditor process.
    squad_file: str = Field(
        "../shared/data/squad/squad_val_passages.json",
        description="SQuAD-format file whose questions are screened closed-book; missing = built-in list only",
    )
    include_builtin: bool = Field(True, description="screen the built-in general-knowledge questions first")
    probe_file: str = Field(
        "", description="an explicit probe (JSON list of {question, answer}) used instead of building one"
    )
    # 60, so that the gate's default 0.05 allows three lost questions, not one: with 24, a single
    # flipped greedy answer (0.042) sat at the threshold and two failed any candidate. Each probe
    # question costs one generation per candidate (60 x 24 tokens is ~3x scoring a τ of 4-5
    # questions with SmolLM2 on 2 CPU cores); the screen keeps the first 60 the base model gets right.
    probe_size: int = Field(60, ge=1, le=1024, description="questions kept in a built probe")
    max_candidates: int = Field(
        160, ge=1, description="questions screened at most while building (built-in list first, then SQuAD)"
    )
    screen_rephrasings: bool = Field(
        True,
        description="keep a screened question only if the base model also answers it right in two other "
        "wordings (seal.domains.knowledge.QUESTION_REPHRASINGS): what it knows only by a hair would count "
        "as forgotten after any update",
    )
    max_new_tokens: int = Field(24, ge=1, le=512, description="answer length for probe questions")
    seed: int = Field(0, ge=0, description="which SQuAD questions are screened")
    recheck_floor: float = Field(
        0.85, ge=0.0, le=1.0, description="a promoted version whose probe accuracy falls below this is rolled back"
    )
    recheck_interval_s: float = Field(
        0.0, ge=0.0, description="re-check the promoted version this often in the auditor (0 = only on Recheck RPC)"
    )


# Short, unambiguous facts a small instruction-tuned model tends to know. Answers are the
# shortest form the lexical grader accepts inside a chatty reply. Topics are interleaved so that a
# probe cut at probe_size still covers geography, science, people and everyday facts.
BUILTIN_QUESTIONS: tuple[Question, ...] = tuple(
    Question(q, a)
    for q, a in (
        ("What is the capital of France?", "Paris"),
        ("What is the largest planet in the solar system?", "Jupiter"),
        ("Which planet is known as the Red Planet?", "Mars"),
        ("Which planet is closest to the Sun?", "Mercury"),
        ("What is the chemical symbol for gold?", "Au"),
        ("What is the capital of Japan?", "Tokyo"),
        ("What is the chemical formula of water?", "H2O"),
        ("Who wrote Romeo and Juliet?", "Shakespeare"),
        ("Who painted the Mona Lisa?", "Leonardo da Vinci"),
        ("Who developed the theory of relativity?", "Albert Einstein"),
        ("What is the capital of Italy?", "Rome"),
        ("Who invented the telephone?", "Alexander Graham Bell"),
        ("Who discovered penicillin?", "Alexander Fleming"),
        ("What is the largest ocean on Earth?", "Pacific Ocean"),
        ("What is the longest river in Africa?", "Nile"),
        ("What is the capital of Germany?", "Berlin"),
        ("What is the tallest mountain in the world?", "Mount Everest"),
        ("What gas do plants absorb from the air for photosynthesis?", "carbon dioxide"),
        ("What language is spoken in Brazil?", "Portuguese"),
        ("What language is spoken in Mexico?", "Spanish"),
        ("What is the capital of Spain?", "Madrid"),
        ("What is the currency of Japan?", "yen"),
        ("On which continent is Kenya?", "Africa"),
        ("What is the hardest natural substance?", "diamond"),
        ("What do bees make?", "honey"),
        ("What is the capital of the United Kingdom?", "London"),
        ("What is the largest mammal?", "blue whale"),
        ("Which organ pumps blood through the human body?", "heart"),
        ("What is the largest country in the world by area?", "Russia"),
        ("Which country is home to the kangaroo?", "Australia"),
        ("What is the capital of Russia?", "Moscow"),
        ("Which ocean lies between Africa and Australia?", "Indian Ocean"),
        ("What is the main ingredient of guacamole?", "avocado"),
        ("Which musical instrument has 88 keys?", "piano"),
        ("What is the freezing point of water in degrees Celsius?", "0"),
        ("What is the capital of Egypt?", "Cairo"),
        ("How many continents are there on Earth?", "seven"),
        ("What is the closest star to the Earth?", "Sun"),
        ("Which animal is known as the king of the jungle?", "lion"),
        ("What is the name of the natural satellite that orbits the Earth?", "Moon"),
        ("What is the capital of China?", "Beijing"),
        ("In which country are the pyramids of Giza?", "Egypt"),
        ("What is the official language of the United States?", "English"),
        ("Which metal is liquid at room temperature?", "mercury"),
        ("What is frozen water called?", "ice"),
        ("What is the capital of Canada?", "Ottawa"),
        ("Who was the first person to walk on the Moon?", "Neil Armstrong"),
        ("In which city is the Eiffel Tower?", "Paris"),
        # Added when the default probe grew from 24 to 60 questions: SmolLM2-135M-Instruct got 33
        # of the 48 above right and 2 of 96 screened SQuAD questions, too few for a probe on
        # which a 0.05 drop means three questions rather than one.
        ("What is the capital of India?", "New Delhi"),
        ("Who painted The Starry Night?", "van Gogh"),
        ("What is the chemical symbol for iron?", "Fe"),
        ("What is the largest continent?", "Asia"),
        ("What language is spoken in Germany?", "German"),
        ("What is the capital of South Korea?", "Seoul"),
        ("Who wrote War and Peace?", "Tolstoy"),
        ("What is the fastest land animal?", "cheetah"),
        ("What is the currency of the United States?", "dollar"),
        ("What is the capital of Ireland?", "Dublin"),
        ("Who was the first President of the United States?", "George Washington"),
        ("What is the name of our galaxy?", "Milky Way"),
        ("What language is spoken in Italy?", "Italian"),
        ("What is the capital of Austria?", "Vienna"),
        ("Who invented the light bulb?", "Edison"),
        ("What is the center of an atom called?", "nucleus"),
        ("In which country is the Taj Mahal?", "India"),
        ("What is the capital of Poland?", "Warsaw"),
        ("Who composed the Fifth Symphony?", "Beethoven"),
        ("What is the largest organ of the human body?", "skin"),
        ("What is the currency of the United Kingdom?", "pound"),
        ("What is the capital of Thailand?", "Bangkok"),
        ("Which famous ship sank in 1912 after hitting an iceberg?", "Titanic"),
        ("What is the longest river in South America?", "Amazon"),
        ("What is the main language spoken in France?", "French"),
        ("What is the capital of Cuba?", "Havana"),
        ("Who wrote the Harry Potter books?", "Rowling"),
        ("What is the largest desert in Africa?", "Sahara"),
        ("What is the tallest animal in the world?", "giraffe"),
        ("What is the capital of Peru?", "Lima"),
        ("Who discovered the law of universal gravitation?", "Isaac Newton"),
        ("What is the chemical symbol for silver?", "Ag"),
        ("What is the capital of the Netherlands?", "Amsterdam"),
        ("What is a baby cat called?", "kitten"),
        ("In which city is the Colosseum?", "Rome"),
        ("What is the capital of Kenya?", "Nairobi"),
        ("What is the study of living things called?", "biology"),
        ("What is the capital of Denmark?", "Copenhagen"),
        ("Which planet do we live on?", "Earth"),
        ("What is the capital of Hungary?", "Budapest"),
        ("What is the capital of Belgium?", "Brussels"),
        ("What is the capital of Finland?", "Helsinki"),
        ("What is the capital of Mexico?", "Mexico City"),
        ("What is the capital of Vietnam?", "Hanoi"),
        ("What is the capital of the Philippines?", "Manila"),
        ("What is the capital of Scotland?", "Edinburgh"),
        ("What is the capital of Saudi Arabia?", "Riyadh"),
        ("What is the capital of Indonesia?", "Jakarta"),
        ("What is the capital of Pakistan?", "Islamabad"),
        ("What is the capital of Nigeria?", "Abuja"),
    )
)


@dataclass(frozen=True)
class RetentionProbe:
    fingerprint: str
    questions: tuple[Question, ...]
    # "built" (screened against the base model) or "explicit" (given by an operator or a test).
    source: str = "built"
    screened: int = 0
    built_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    notes: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "questions", tuple(self.questions))

    @property
    def probe_id(self) -> str:
        """Content digest of the questions: two probes with the same id measure the same thing."""
        body = json.dumps([[q.question, q.answer] for q in self.questions], ensure_ascii=False)
        return hashlib.sha256(body.encode()).hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.questions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": PROBE_FORMAT,
            "fingerprint": self.fingerprint,
            "probe_id": self.probe_id,
            "source": self.source,
            "screened": self.screened,
            "built_at": self.built_at,
            "notes": self.notes,
            "questions": [{"question": q.question, "answer": q.answer} for q in self.questions],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RetentionProbe:
        if data.get("format") != PROBE_FORMAT:
            raise ValueError(f"retention probe format {data.get('format')!r} is not {PROBE_FORMAT}; rebuild it")
        probe = cls(
            fingerprint=data["fingerprint"],
            questions=tuple(Question(q["question"], q["answer"]) for q in data["questions"]),
            source=data.get("source", "built"),
            screened=int(data.get("screened", 0)),
            built_at=data.get("built_at", ""),
            notes=data.get("notes", ""),
        )
        if data.get("probe_id") not in (None, probe.probe_id):
            raise ValueError("retention probe questions do not match their recorded probe_id (edited by hand?)")
        return probe


# --- candidates ------------------------------------------------------------------------------


def squad_questions(path: Path | str, *, limit: int, seed: int) -> list[Question]:
    """A seeded sample of a SQuAD-format file's questions, one per passage first so that one long
    article cannot fill the probe with near-duplicates."""
    contexts = load_squad(path)
    rng = random.Random(seed)
    order = list(range(len(contexts)))
    rng.shuffle(order)
    picked: list[Question] = []
    for round_index in range(max((len(c.questions) for c in contexts), default=0)):
        for index in order:
            questions = contexts[index].questions
            if round_index < len(questions):
                picked.append(questions[round_index])
                if len(picked) >= limit:
                    return picked
    return picked


def candidate_questions(settings: RetentionSettings, *, base_dir: Path | None = None) -> tuple[list[Question], str]:
    """The questions to screen, in screening order, and a note saying where they came from."""
    candidates: list[Question] = list(BUILTIN_QUESTIONS) if settings.include_builtin else []
    notes = [f"{len(candidates)} built-in"] if candidates else []
    if settings.squad_file:
        path = Path(settings.squad_file)
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        if path.is_file():
            room = max(0, settings.max_candidates - len(candidates))
            extra = squad_questions(path, limit=room, seed=settings.seed) if room else []
            candidates.extend(extra)
            notes.append(f"{len(extra)} from {path.name}")
        else:
            notes.append(f"{path} not found")
    return dedupe(candidates)[: settings.max_candidates], ", ".join(notes)


def dedupe(questions: Iterable[Question]) -> list[Question]:
    seen: set[str] = set()
    kept = []
    for question in questions:
        key = normalize_answer(question.question)
        if key and key not in seen:
            seen.add(key)
            kept.append(question)
    return kept


# --- building --------------------------------------------------------------------------------

# questions → one correctness flag per question, asked closed-book of the base model
GradeClosedBook = Callable[[Sequence[Question]], Sequence[bool]]


def build_probe(
    fingerprint: str,
    candidates: Sequence[Question],
    grade: GradeClosedBook,
    *,
    size: int,
    chunk: int = 16,
    notes: str = "",
) -> RetentionProbe:
    """Screen candidates in order, in chunks, keeping those the base model gets right, until
    ``size`` are kept: stopping early matters because each screened question is a generation."""
    check_fingerprint(fingerprint)
    if size < 1:
        raise ValueError(f"probe size must be >= 1, got {size}")
    kept: list[Question] = []
    screened = 0
    for start in range(0, len(candidates), chunk):
        batch = list(candidates[start : start + chunk])
        flags = list(grade(batch))
        if len(flags) != len(batch):
            raise ValueError(f"grading returned {len(flags)} results for {len(batch)} questions")
        screened += len(batch)
        kept.extend(q for q, ok in zip(batch, flags, strict=True) if ok)
        if len(kept) >= size:
            break
    return RetentionProbe(fingerprint, tuple(kept[:size]), "built", screened, notes=notes)


def self_consistency_probe(
    fingerprint: str, questions: Sequence[Question], predictions: Sequence[str], *, notes: str = ""
) -> RetentionProbe:
    """A probe whose gold answers are the base model's own greedy answers.

    For a base model that knows almost nothing (a random test model), this still measures
    whether an update changed what the model says about things unrelated to the edit."""
    check_fingerprint(fingerprint)
    kept = [Question(q.question, p.strip()) for q, p in zip(questions, predictions, strict=True) if normalize_answer(p)]
    return RetentionProbe(fingerprint, tuple(kept), "explicit", len(questions), notes=notes or "self-consistency")


def load_explicit_probe(path: Path | str, fingerprint: str) -> RetentionProbe:
    """An operator-supplied probe: a JSON list of {question, answer}, or a saved probe file."""
    data = json.loads(Path(path).read_text(encoding="utf-8"))
    if isinstance(data, dict) and "questions" in data and "format" in data:
        probe = RetentionProbe.from_dict(data)
        return RetentionProbe(fingerprint, probe.questions, "explicit", probe.screened, probe.built_at, f"from {path}")
    if not isinstance(data, list):
        raise ValueError(f"{path}: a retention probe is a JSON list of {{question, answer}}")
    try:
        questions = tuple(Question(item["question"], item["answer"]) for item in data)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path}: every probe item needs question and answer ({exc})") from exc
    return RetentionProbe(fingerprint, questions, "explicit", len(questions), notes=f"from {path}")


def check_fingerprint(fingerprint: str) -> str:
    # It becomes a file name, so it must be plain hex.
    if not isinstance(fingerprint, str) or not _FINGERPRINT.fullmatch(fingerprint):
        raise ValueError(f"base model fingerprint {fingerprint!r} is not a hex digest")
    return fingerprint


class ProbeStore:
    """One JSON file per base model fingerprint, written atomically."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path_for(self, fingerprint: str) -> Path:
        return self.root / f"{check_fingerprint(fingerprint)}.json"

    def load(self, fingerprint: str) -> RetentionProbe | None:
        path = self.path_for(fingerprint)
        if not path.is_file():
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
        if data.get("format") != PROBE_FORMAT:
            log.info("%s was built by an older screening (format %s); building it again", path, data.get("format"))
            return None
        probe = RetentionProbe.from_dict(data)
        if probe.fingerprint != fingerprint:
            raise ValueError(f"{path} holds the probe of {probe.fingerprint}, not {fingerprint}")
        return probe

    def save(self, probe: RetentionProbe) -> Path:
        path = self.path_for(probe.fingerprint)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, probe.to_dict(), indent=1, ensure_ascii=False)
        return path


# --- scheduled re-check ------------------------------------------------------------------------


@dataclass(frozen=True)
class CanarySignal:
    """A live health number from serving (e.g. a canary's answer agreement) with its minimum.

    This is the hook for the Triton canary: whatever it measures arrives here and takes part in
    the same rollback verdict as the retention probe."""

    name: str
    value: float
    minimum: float

    @property
    def passed(self) -> bool:
        return self.value >= self.minimum


@dataclass(frozen=True)
class RecheckVerdict:
    rollback: bool
    reason: str
    retention_accuracy: float | None
    baseline_retention_accuracy: float | None
    floor: float
    signals: tuple[CanarySignal, ...] = ()


def recheck_verdict(
    retention_accuracy: float | None,
    baseline_retention_accuracy: float | None,
    floor: float,
    signals: Sequence[CanarySignal] = (),
) -> RecheckVerdict:
    """Roll back when the promoted version's probe accuracy is below ``floor`` or any live signal
    is below its minimum. An unmeasured probe alone never rolls back: it says nothing bad about
    the version, only that there was nothing to ask."""
    if not 0.0 <= floor <= 1.0:
        raise ValueError(f"floor must be within [0, 1], got {floor}")
    for name, value in (("retention_accuracy", retention_accuracy), ("baseline_retention_accuracy", baseline_retention_accuracy)):
        if value is not None and not 0.0 <= value <= 1.0:
            raise ValueError(f"{name} must be within [0, 1], got {value}")
    reasons = []
    if retention_accuracy is not None and retention_accuracy < floor - 1e-9:
        baseline = "" if baseline_retention_accuracy is None else f" (base model {baseline_retention_accuracy:.3f})"
        reasons.append(f"retention {retention_accuracy:.3f} is below the floor {floor:.3f}{baseline}")
    for signal in signals:
        if not signal.passed:
            reasons.append(f"canary {signal.name} {signal.value:.3f} is below its minimum {signal.minimum:.3f}")
    if reasons:
        return RecheckVerdict(True, "; ".join(reasons), retention_accuracy, baseline_retention_accuracy, floor, tuple(signals))
    if retention_accuracy is None:
        reason = "retention not measured (empty probe); no live signal failed"
    else:
        reason = f"retention {retention_accuracy:.3f} is at or above the floor {floor:.3f}"
    return RecheckVerdict(False, reason, retention_accuracy, baseline_retention_accuracy, floor, tuple(signals))
