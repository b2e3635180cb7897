"""Knowledge incorporation (SEAL §3.2 / §4.2): absorb a passage so that questions about it can
be answered *without* the passage in context.

Each step of the loop is a small pure function here:
  context C ──build_self_edit_prompt──▶ teacher ──parse_self_edit──▶ lines
  lines + passage ──build_training_sequences──▶ LoRA SFT
  question ──build_question_prompt──▶ student (closed book) ──grade──▶ accuracy ──reward──▶ teacher
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import unicodedata
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

PromptStyle = Literal["implications", "rewrite", "self_qa"]
PROMPT_STYLES: tuple[PromptStyle, ...] = ("implications", "rewrite", "self_qa")


@dataclass(frozen=True)
class Question:
    question: str
    answer: str


@dataclass(frozen=True)
class KnowledgeContext:
    title: str
    passage: str
    questions: tuple[Question, ...] = field(default=())

    @property
    def context_id(self) -> str:
        """Content digest, so the same passage gets the same id on every machine."""
        return context_digest(self.title, self.passage)


def context_digest(title: str, passage: str) -> str:
    payload = json.dumps([title, passage], ensure_ascii=False).encode()
    return hashlib.sha256(payload).hexdigest()[:16]


def load_squad(path: str | Path) -> list[KnowledgeContext]:
    """Read SEAL's grouped SQuAD format: a JSON list of {title, context, questions:[{question, answer}]}."""
    raw = json.loads(Path(path).read_text(encoding="utf-8"))
    if not isinstance(raw, list):
        raise ValueError(f"{path}: expected a JSON list of passages, got {type(raw).__name__}")
    contexts = []
    for index, item in enumerate(raw):
        try:
            questions = tuple(Question(q["question"], q["answer"]) for q in item["questions"])
            contexts.append(KnowledgeContext(item["title"], item["context"], questions))
        except (KeyError, TypeError) as exc:
            raise ValueError(
                f"{path}: passage {index} lacks {exc}; each needs title, context and "
                "questions [{question, answer}]"
            ) from exc
    return contexts


# --- self-edit generation -------------------------------------------------------------------

_SELF_EDIT_INSTRUCTIONS: dict[PromptStyle, str] = {
    # SEAL's default: implications of the passage, each a standalone statement, so every line
    # is a self-contained training sequence.
    "implications": (
        "Read the passage below and list the implications that follow from it, directly or "
        "indirectly. Write one self-contained statement per line, naming the subject in full "
        "instead of using pronouns."
    ),
    "rewrite": (
        "Rewrite the passage below in several different ways, keeping every fact. Write each "
        "rewritten sentence on its own line and name the subject in full instead of using pronouns."
    ),
    "self_qa": (
        "Write questions about the passage below together with their answers. Put each pair on "
        "one line, as: Question? Answer."
    ),
}


def build_self_edit_prompt(title: str, passage: str, style: PromptStyle = "implications") -> str:
    """The user message the teacher receives; the engine wraps it in the chat template."""
    try:
        instruction = _SELF_EDIT_INSTRUCTIONS[style]
    except KeyError:
        raise ValueError(f"unknown prompt style {style!r}; choose one of {PROMPT_STYLES}") from None
    return f"{instruction}\n\nTitle: {title}\nPassage: {passage}\n"


_LIST_MARKER = re.compile(r"^\s*(?:[-*•·]+|\(?\d{1,3}[.)]|\(?[a-zA-Z][.)](?=\s))\s*")
_PREAMBLE = re.compile(
    r"^(?:here (?:are|is)|sure[,!.]|certainly[,!.]|implications?:|rewrites?:|questions?:)", re.I
)


def parse_self_edit(text: str, *, max_lines: int = 64, min_chars: int = 8) -> list[str]:
    """Turn a generated self-edit into training lines: one per non-empty line.

    List markers are stripped because they carry no knowledge; chatty preambles ("Here are…")
    and fragments shorter than ``min_chars`` are dropped, as are exact duplicates, so a
    degenerate sample that repeats one line cannot dominate the update.
    """
    lines: list[str] = []
    seen: set[str] = set()
    for raw_line in text.splitlines():
        line = _LIST_MARKER.sub("", raw_line).strip()
        if len(line) < min_chars or _PREAMBLE.match(line) and line.endswith(":"):
            continue
        key = line.casefold()
        if key in seen:
            continue
        seen.add(key)
        lines.append(line)
        if len(lines) == max_lines:
            break
    return lines


def build_training_sequences(
    title: str, passage: str, self_edit_lines: Sequence[str], *, include_passage: bool = True
) -> list[str]:
    """SEAL trains on each self-edit line as its own sequence, plus the raw passage once."""
    sequences = [line for line in self_edit_lines]
    if include_passage:
        sequences.append(f"{title}\n{passage}" if title else passage)
    return sequences


# --- closed-book evaluation -----------------------------------------------------------------


def build_question_prompt(question: str) -> str:
    """Closed book: the passage is deliberately absent, the adapter must carry the knowledge."""
    return f"Answer with a short phrase.\nQuestion: {question}"


# Two more ways to ask a closed-book question. The retention probe keeps a question only if the
# base model answers it right in every phrasing: an answer the model gets right in one wording
# only is known by a hair, flips under almost any update, and would be counted as forgetting
# (measured: such questions were lost 5x as often as the others; bench/results/forgetting.md).
QUESTION_REPHRASINGS: tuple[Callable[[str], str], ...] = (
    lambda question: question,
    lambda question: f"Question: {question}\nAnswer briefly.",
)


def build_open_book_prompt(title: str, passage: str, question: str) -> str:
    return f"Title: {title}\nPassage: {passage}\n\nAnswer with a short phrase.\nQuestion: {question}"


_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = str.maketrans("", "", string.punctuation + "‘’“”–—")


def normalize_answer(text: str) -> str:
    """SQuAD normalisation: lower case, no punctuation, no articles, single spaces."""
    text = unicodedata.normalize("NFKC", text).lower().translate(_PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact_match(prediction: str, gold: str) -> bool:
    return normalize_answer(prediction) == normalize_answer(gold)


def token_f1(prediction: str, gold: str) -> float:
    predicted_tokens = normalize_answer(prediction).split()
    gold_tokens = normalize_answer(gold).split()
    if not predicted_tokens or not gold_tokens:
        return float(predicted_tokens == gold_tokens)
    overlap = sum((Counter(predicted_tokens) & Counter(gold_tokens)).values())
    if overlap == 0:
        return 0.0
    precision = overlap / len(predicted_tokens)
    recall = overlap / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def contains_answer(prediction: str, gold: str) -> bool:
    """Gold answer inside the prediction on word boundaries: "187 meters" does not contain "7"."""
    gold_normalized = normalize_answer(gold)
    if not gold_normalized:
        return False
    return f" {gold_normalized} " in f" {normalize_answer(prediction)} "


@dataclass(frozen=True)
class Grade:
    correct: bool
    exact_match: bool
    f1: float
    contains: bool


GraderMode = Literal["exact_match", "f1", "containment", "any"]


class Grader(Protocol):
    def grade_batch(
        self, questions: Sequence[str], golds: Sequence[str], predictions: Sequence[str]
    ) -> list[Grade]: ...


@dataclass(frozen=True)
class LexicalGrader:
    """Whole-reply lexical rules. ``any`` counts an answer correct if it matches exactly, contains
    the gold answer on word boundaries, or reaches the F1 threshold. It is lenient: a reply that
    lists several candidates is credited for any of them, which is why the default grader is
    :class:`seal.grading.CommittedGrader` and ``any`` is kept only by name (``auditor.grader``)."""

    mode: GraderMode = "any"
    f1_threshold: float = 0.5

    def grade(self, gold: str, prediction: str) -> Grade:
        em = exact_match(prediction, gold)
        f1 = token_f1(prediction, gold)
        contains = contains_answer(prediction, gold)
        correct = {
            "exact_match": em,
            "f1": f1 >= self.f1_threshold,
            "containment": contains,
            "any": em or contains or f1 >= self.f1_threshold,
        }[self.mode]
        return Grade(correct=correct, exact_match=em, f1=f1, contains=contains)

    def grade_batch(
        self, questions: Sequence[str], golds: Sequence[str], predictions: Sequence[str]
    ) -> list[Grade]:
        return [self.grade(gold, prediction) for gold, prediction in zip(golds, predictions, strict=True)]


def accuracy(grades: Sequence[Grade]) -> float:
    if not grades:
        raise ValueError("accuracy of zero questions is undefined; τ needs at least one question")
    return sum(grade.correct for grade in grades) / len(grades)


def extract_answer(completion: str) -> str:
    """Keep the first line: a chatty model often continues past its answer."""
    stripped = completion.strip()
    first_line = stripped.splitlines()[0] if stripped else ""
    return re.sub(r"^(?:answer\s*:\s*)", "", first_line, flags=re.I).strip()
