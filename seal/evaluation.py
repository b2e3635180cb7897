"""Knowledge-incorporation evaluation of a teacher policy (SEAL §4.2, Table 2).

Per passage: closed-book accuracy of the base student, after training on the passage alone, and
after training on self-edits the policy wrote (each on its lines plus the passage), with the wall
time of each phase. Accuracies are question-weighted over passages, as in the paper.

One function serves ``bench/knowledge.py`` (the base policy), ``seal eval --policy-version N``
and ``bench/restem.py`` (before and after a ReST^EM round). Each self-edit goes through the SEAL
step Adapt and ReST^EM use (``seal.adapt.score_candidate``: guardrails, update, closed-book
score) on the in-process ports (``seal.local``): no services, nothing promoted, every adapter it
trains is a throwaway candidate. A self-edit that fails (a guardrail, no usable line) teaches
nothing, so it scores as the untouched base model.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from seal.adapt import PhaseClock, Task, drain, proposer_fn, score_candidate
from seal.auditor import Auditor, accuracy_of
from seal.domains.knowledge import KnowledgeContext, build_training_sequences
from seal.guardrails import GuardrailSettings
from seal.local import LocalAuditorPort, LocalStudentPort
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
    guardrails: GuardrailSettings | None = None,
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

    student_port = LocalStudentPort(student)
    auditor_port = LocalAuditorPort(
        student, auditor, guardrails=guardrails or GuardrailSettings(),
        answer_max_new_tokens=config.answer_max_new_tokens,
    )
    propose = proposer_fn(proposer, config.prompt_style)

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

        task = Task(context.title, context.passage, tuple(context.questions))
        t0 = time.perf_counter()
        proposals = propose(task, config.k, config.seed + index)
        phase["generation"] += time.perf_counter() - t0
        candidates: list[dict[str, Any]] = []
        for proposal in proposals:
            clock = PhaseClock()
            outcome = drain(score_candidate(
                task, proposal, student=student_port, auditor=auditor_port,
                adapter_name=f"{config.adapter_prefix}-self-edit", seed=config.seed + proposal.index,
                request_id=f"eval-{index}", measure_retention=False, clock=clock,
            ))
            phase["training"] += clock.seconds["training"]
            phase["scoring"] += clock.seconds["scoring"]
            if outcome.score is None:
                candidates.append({"index": proposal.index, "accuracy": row["baseline"], "failure": outcome.failure,
                                   "self_edit": proposal.text})
                continue
            candidates.append({
                "index": proposal.index,
                "accuracy": outcome.score.accuracy,
                "training_sequences": outcome.adapter.training_sequences if outcome.adapter else 0,
                "completion_tokens": proposal.completion_tokens,
                "self_edit": proposal.text,
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


def evaluate_stored_policy(
    settings: Any,
    contexts: Sequence[KnowledgeContext],
    config: EvalConfig,
    *,
    policy_version: int | None = None,
    on_passage: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
    """:func:`evaluate_policy` on the teacher policy stored under ``settings.home`` (the served one,
    or ``policy_version``), with a student whose throwaway adapters live in a scratch directory,
    never in the real registry. What ``seal eval`` and ``bench/restem.py`` both run."""
    import gc
    import tempfile
    from pathlib import Path

    from seal.grading import build_grader
    from seal.rl.policy import open_teacher_policy

    started = time.perf_counter()
    policy = open_teacher_policy(settings)
    manifest = policy.load_serving() if policy_version is None else policy.activate(policy_version)
    student = Student(settings.model_copy(update={"home": Path(tempfile.mkdtemp(prefix="seal-eval-"))}))
    teacher = settings.teacher
    proposer = SelfEditProposer(
        policy.engine, max_new_tokens=teacher.max_new_tokens, temperature=teacher.temperature, top_p=teacher.top_p
    )
    auditor = Auditor(build_grader(settings.auditor), settings.gates)
    try:
        result = evaluate_policy(
            contexts, student=student, proposer=proposer, auditor=auditor, config=config,
            guardrails=settings.guardrails, on_passage=on_passage,
        )
    finally:
        student.close()
        policy.engine.close()
    result["policy"] = manifest.adapter_id if manifest else "base policy"
    result["wall_seconds"] = time.perf_counter() - started
    del policy, student, proposer
    gc.collect()
    return result
