"""Adapt from a document alone: the teacher writes question–answer pairs about C.

Services that call ``Adapt`` often hold a document and no gold questions. Then the teacher writes
them (self-QA), and a pair is kept only if the base model, *with the passage in its context*,
answers it correctly: a question the model cannot answer even open book is either wrong or
unanswerable from C, and would make τ measure noise. A seeded split gives training prompts (the
questions SDFT distils on) and held-out τ (the reward and the gate), never overlapping.

>>> text = "Q: Who is the mayor of Velmora?\\nA: Ana Dirk\\nQ: What does Velmora export?\\nA: salt"
>>> [(q.question, q.answer) for q in parse_question_answer_pairs(text)]
[('Who is the mayor of Velmora?', 'Ana Dirk'), ('What does Velmora export?', 'salt')]
>>> training, held_out = split_questions(parse_question_answer_pairs(text), held_out_fraction=0.5, seed=0)
>>> len(training), len(held_out), set(training).isdisjoint(held_out)
(1, 1, True)
"""

from __future__ import annotations

import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from seal.domains.knowledge import Question, build_open_book_prompt, normalize_answer


def build_question_writing_prompt(title: str, passage: str, n: int) -> str:
    """The teacher's instruction: n factual pairs, one fact each, answerable from the passage."""
    return (
        f"Read the passage and write {n} different questions that it answers, each followed by its "
        "short answer taken from the passage. Use exactly this format, one pair after another:\n"
        "Q: <question>\nA: <short answer>\n\n"
        f"Title: {title}\nPassage: {passage}\n"
    )


_QUESTION = re.compile(r"^\s*(?:\d{1,3}[.)]\s*)?(?:Q|Question)\s*\d*\s*[:.)]\s*(?P<text>.+?)\s*$", re.I)
_ANSWER = re.compile(r"^\s*(?:A|Answer)\s*\d*\s*[:.)]\s*(?P<text>.+?)\s*$", re.I)


def parse_question_answer_pairs(text: str, *, max_pairs: int = 64, max_chars: int = 300) -> list[Question]:
    """Pairs in ``Q: … / A: …`` form (``Question:``/``Answer:`` too, numbered or not). A question
    without an answer on a following line, overlong pairs and duplicates (by normalised question)
    are dropped."""
    pairs: list[Question] = []
    seen: set[str] = set()
    pending: str | None = None
    for line in text.splitlines():
        question = _QUESTION.match(line)
        if question:
            pending = question.group("text")
            continue
        answer = _ANSWER.match(line)
        if answer and pending is not None:
            key = normalize_answer(pending)
            if key and key not in seen and len(pending) <= max_chars and len(answer.group("text")) <= max_chars:
                seen.add(key)
                pairs.append(Question(pending, answer.group("text").rstrip(".")))
            pending = None
            if len(pairs) == max_pairs:
                break
    return pairs


def split_questions(
    questions: Sequence[Question], *, held_out_fraction: float, seed: int
) -> tuple[list[Question], list[Question]]:
    """A seeded split into (training prompts, held-out τ); at least one held out when any exist."""
    if not 0.0 < held_out_fraction <= 1.0:
        raise ValueError(f"held_out_fraction must be in (0, 1], got {held_out_fraction}")
    order = list(questions)
    random.Random(seed).shuffle(order)
    held = max(1, round(len(order) * held_out_fraction)) if order else 0
    return order[held:], order[:held]


class NotEnoughQuestions(RuntimeError):
    """Too few written questions survived verification to measure anything."""

    code = "failed_precondition"


@dataclass(frozen=True)
class WrittenQuestions:
    """What the teacher wrote about C and what survived: ``training`` (prompts SDFT may train on)
    and ``held_out`` (τ: the reward and the gate), disjoint; ``dropped`` counts pairs that could
    not be parsed or that the base model answered wrongly even with the passage in context."""

    training: tuple[Question, ...]
    held_out: tuple[Question, ...]
    written: int
    dropped: int
    min_held_out: int = 1

    def require_held_out(self) -> tuple[Question, ...]:
        """τ, or :class:`NotEnoughQuestions` when fewer than ``min_held_out`` survived."""
        if len(self.held_out) < self.min_held_out:
            kept = len(self.training) + len(self.held_out)
            raise NotEnoughQuestions(
                f"the teacher wrote {self.written} questions about the passage and {kept} survived open-book "
                f"verification, leaving {len(self.held_out)} for τ (at least {self.min_held_out} needed): send "
                "questions with the request, or lower teacher.min_written_questions"
            )
        return self.held_out


def write_questions(
    title: str,
    passage: str,
    *,
    generate: Callable[[str], str],
    answer_open_book: Callable[[list[str]], list[str]],
    grade: Callable[[list[Question], list[str]], list[bool]],
    n: int,
    held_out_fraction: float,
    min_held_out: int,
    seed: int,
) -> WrittenQuestions:
    """Self-QA about C, verified open book, split by ``seed``; ``require_held_out()`` on the result
    refuses too small a τ."""
    text = generate(build_question_writing_prompt(title, passage, n))
    raw_lines = sum(1 for line in text.splitlines() if _QUESTION.match(line))
    pairs = parse_question_answer_pairs(text)
    kept: list[Question] = []
    if pairs:
        answers = answer_open_book([build_open_book_prompt(title, passage, q.question) for q in pairs])
        kept = [q for q, ok in zip(pairs, grade(pairs, answers), strict=True) if ok]
    training, held_out = split_questions(kept, held_out_fraction=held_out_fraction, seed=seed)
    written = max(raw_lines, len(pairs))
    return WrittenQuestions(tuple(training), tuple(held_out), written, written - len(kept), min_held_out)
