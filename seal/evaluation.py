"""Knowledge-incorporation evaluation of a teacher policy (SEAL §4.2, Table 2).

Per passage: closed-book accuracy of the base student, after training on the passage alone, and
after training on self-edits the policy wrote (each on its lines plus the passage), with the wall
time of each phase. Accuracies are question-weighted over passages, as in the paper.

One function serves ``bench/knowledge.py`` (the base policy), ``seal eval --policy-version N``
and ``bench/restem.py`` (before and after a ReST^EM round). It runs the core engines in one
process: no services, nothing promoted, every adapter it trains is a throwaway candidate.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from seal.auditor import Auditor, accuracy_of
from seal.domains.knowledge import KnowledgeContext, build_training_sequences
from seal.models import SamplingParams
from seal.student import AdapterChoice, Student
from seal.teacher import SelfEditProposer


@dataclass(frozen=True)
class EvalConfig:
    k: int = 1  # self-edits per passage; the mean over them estimates the policy, max is best-of-k
    seed: int = 0
    prompt_style: str = "implications"
    passage_only: bool = True  # skip when the same passages were already measured (it ignores the policy)
    answer_max_new_tokens: int = 32
    adapter_prefix: str = "eval"

    def __post_init__(self) -> None:
        if self.k < 1:
            raise ValueError(f"k must be >= 1 self-edit per passage, got {self.k}")


def evaluate_policy(
    contexts: Sequence[KnowledgeContext],
    *,
    student: Student,
    proposer: SelfEditProposer,
    auditor: Auditor,
    config: EvalConfig,
    on_passage: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """``{"summary": ..., "passages": [...]}``; ``on_passage`` sees each passage's row when done."""
    if not contexts:
        raise ValueError("no passages to evaluate on")
    answer_params = SamplingParams(max_new_tokens=config.answer_max_new_tokens)

    def answer(prompts: list[str], adapter_id: str) -> list[str]:
        choice = AdapterChoice(adapter_id=adapter_id) if adapter_id else AdapterChoice(base_model=True)
        generations, _ = student.generate(prompts, choice, answer_params)
        return [g.text for g in generations]

    rows: list[dict[str, Any]] = []
    for index, context in enumerate(contexts):
        row: dict[str, Any] = {"index": index, "title": context.title, "questions": len(context.questions)}
        phase = {"generation": 0.0, "training": 0.0, "scoring": 0.0}

        t0 = time.perf_counter()
        row["baseline"] = accuracy_of(auditor.baseline(answer, context.questions))
        phase["scoring"] += time.perf_counter() - t0

        if config.passage_only:
            t0 = time.perf_counter()
            passage_only = student.train_sequences(
                adapter_name=f"{config.adapter_prefix}-passage",
                sequences=build_training_sequences(context.title, context.passage, []),
                context_id=context.context_id,
                self_edit_sha256="",
                seed=config.seed,
            )
            phase["training"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            outcomes = auditor.closed_book(answer, context.questions, passage_only.manifest.adapter_id)
            row["passage_only"] = accuracy_of(outcomes)
            phase["scoring"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        edits = proposer.propose(context.title, context.passage, config.k, config.prompt_style, config.seed + index)  # type: ignore[arg-type]
        phase["generation"] += time.perf_counter() - t0
        candidates: list[dict[str, Any]] = []
        for edit in edits:
            t0 = time.perf_counter()
            try:
                trained = student.train_candidate(
                    adapter_name=f"{config.adapter_prefix}-self-edit",
                    title=context.title,
                    passage=context.passage,
                    self_edit=edit.text,
                    context_id=context.context_id,
                    seed=config.seed + edit.index,
                )
            except ValueError as exc:
                # An unusable self-edit teaches nothing: it scores as the untouched base model.
                candidates.append({"index": edit.index, "accuracy": row["baseline"], "failure": str(exc), "self_edit": edit.text})
                continue
            finally:
                phase["training"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            outcomes = auditor.closed_book(answer, context.questions, trained.manifest.adapter_id)
            phase["scoring"] += time.perf_counter() - t0
            candidates.append({
                "index": edit.index,
                "accuracy": accuracy_of(outcomes),
                "training_sequences": trained.training_sequences,
                "completion_tokens": edit.completion_tokens,
                "self_edit": edit.text,
            })
        row["self_edit_candidates"] = candidates
        row["self_edit_best_of_k"] = max(c["accuracy"] for c in candidates)
        row["self_edit_mean"] = sum(c["accuracy"] for c in candidates) / len(candidates)
        row["seconds"] = phase
        rows.append(row)
        if on_passage is not None:
            on_passage(row)
    return {"summary": summarize(rows, config.k), "passages": rows}


def summarize(rows: Sequence[dict[str, Any]], k: int) -> dict[str, Any]:
    total = sum(int(r["questions"]) for r in rows)

    def weighted(key: str) -> float | None:
        if any(key not in r for r in rows):
            return None
        return sum(float(r[key]) * int(r["questions"]) for r in rows) / total

    return {
        "passages": len(rows),
        "questions": total,
        "k": k,
        "baseline": weighted("baseline"),
        "passage_only": weighted("passage_only"),
        "self_edit_best_of_k": weighted("self_edit_best_of_k"),
        "self_edit_mean": weighted("self_edit_mean"),
        "seconds": {p: sum(r["seconds"][p] for r in rows) for p in ("generation", "training", "scoring")},
    }
