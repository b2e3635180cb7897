"""Continual adaptation: absorb passages one after another into the same weights, and watch what
happens to the earlier ones (SEAL §4.4, "catastrophic forgetting").

Each step trains a LoRA adapter on the current weights and merges it in (PEFT
``merge_and_unload``), so the next step starts from a model that already carries every earlier
edit: that is what a continually self-adapting model would serve. After each step the model is
asked, closed-book, the questions of every passage seen so far, giving a matrix

    rows    = "before any step", "after step 1", …, "after step n"
    columns = passage 1 … n

whose lower triangle shows retention of earlier passages and whose diagonal shows the passage
just learned.

The update at each step is either rule of the student: LoRA SFT on the passage and its self-edit
(optionally rehearsing the base model's own answers and paying a KL penalty, see
:mod:`seal.update.lora_sft`), or SDFT (:mod:`seal.update.sdft`), distilling on the step's training
prompts with the passage and self-edit as the teacher's privileged context.

Mitigation for SFT: a replay buffer. Every training sequence of every earlier step (self-edit lines and,
when trained on, the passage) goes into a buffer, and each new update mixes a seeded sample of it
into its own sequences — rehearsal, the simplest remedy against forgetting.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from seal.domains.knowledge import (
    Grader,
    KnowledgeContext,
    build_question_prompt,
    build_training_sequences,
    extract_answer,
)
from seal.durable import atomic_write_json
from seal.grading import CommittedGrader
from seal.update.lora_sft import LoraSFTConfig, LoraSFTTrainer, TokenizedExample
from seal.update.sdft import SDFTUpdate, SDFTUpdateConfig, privileged_context


@dataclass(frozen=True)
class ContinualStep:
    context: KnowledgeContext
    self_edit_lines: tuple[str, ...]
    # Questions about the passage the SDFT student answers on policy (never the passage's own τ,
    # which measures the step); unused by LoRA SFT.
    training_prompts: tuple[str, ...] = ()


@dataclass(frozen=True)
class ContinualConfig:
    # The update rule of every step, with its settings.
    update: LoraSFTConfig | SDFTUpdateConfig
    # LoRA SFT only: earlier training sequences mixed into each update; 0 = no replay.
    replay_size: int = 0
    replay_seed: int = 0
    include_passage: bool = True
    answer_max_new_tokens: int = 24
    batch_size: int = 8
    # Also ask the questions of passages not yet learned (the upper triangle): a control that
    # costs generation time, so off by default.
    evaluate_future: bool = False
    # The original base model's anchor examples (seal.anchors.anchor_examples), required when
    # ``lora`` rehearses or pays a KL penalty: every step rehearses what the model knew before
    # the first passage, and the KL is taken against the model as it was before that step.
    anchors: Sequence[TokenizedExample] = ()


@dataclass
class StepRecord:
    step: int
    title: str
    new_sequences: int
    replayed_sequences: int
    final_loss: float
    train_seconds: float
    eval_seconds: float


@dataclass
class ContinualResult:
    titles: list[str]
    # rows[0] = before any step; rows[i] = after step i. None = not asked.
    matrix: list[list[float | None]]
    steps: list[StepRecord] = field(default_factory=list)
    # Per row and passage: the predictions, so a surprising cell can be inspected.
    predictions: list[list[list[str] | None]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, float | None]:
        return continual_summary(self.matrix)

    def to_dict(self) -> dict[str, Any]:
        return {
            "titles": self.titles,
            "matrix": self.matrix,
            "summary": self.summary(),
            "steps": [asdict(s) for s in self.steps],
            "predictions": self.predictions,
            "config": self.config,
        }


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def continual_summary(matrix: Sequence[Sequence[float | None]]) -> dict[str, float | None]:
    """Headline numbers of an accuracy matrix with rows "before any step", "after step 1", …
    (a run in progress has fewer than n + 1 rows; "last" then means the last step done).

    - ``just_learned``: mean accuracy on a passage right after its own step (the diagonal);
    - ``final_seen``: mean accuracy on every passage learned so far, after the last step;
    - ``forgetting``: mean, over passages learned before the last step, of (accuracy right after
      learning it − accuracy after the last step): positive = forgotten;
    - ``net_gain_final``: mean (after the last step − before any step) over passages learned.
    """
    n = len(matrix[0]) if matrix else 0
    steps = len(matrix) - 1
    if not 1 <= steps <= n:
        raise ValueError(f"expected 2 to {n + 1} rows for {n} passages, got {len(matrix)}")

    def present(values: Iterable[float | None]) -> list[float]:
        return [v for v in values if v is not None]

    last = matrix[steps]
    forgetting = [
        matrix[j + 1][j] - last[j]  # type: ignore[operator]
        for j in range(steps - 1)
        if matrix[j + 1][j] is not None and last[j] is not None
    ]
    gains = [last[j] - matrix[0][j] for j in range(steps) if last[j] is not None and matrix[0][j] is not None]  # type: ignore[operator]
    return {
        "steps": float(steps),
        "base": _mean(present(matrix[0][j] for j in range(steps))),
        "just_learned": _mean(present(matrix[j + 1][j] for j in range(steps))),
        "final_seen": _mean(present(last[j] for j in range(steps))),
        "forgetting": _mean(forgetting),
        "net_gain_final": _mean(gains),
    }


class ReplayBuffer:
    def __init__(self, seed: int) -> None:
        self._items: list[str] = []
        self._seed = seed

    def __len__(self) -> int:
        return len(self._items)

    def add(self, sequences: Sequence[str]) -> None:
        self._items.extend(sequences)

    def sample(self, size: int, step: int) -> list[str]:
        """A seeded sample without replacement; the same (seed, step) gives the same sample."""
        if size <= 0 or not self._items:
            return []
        return random.Random(self._seed * 1_000_003 + step).sample(self._items, min(size, len(self._items)))


def closed_book_accuracy(
    model: Any,
    tokenizer: Any,
    contexts: Sequence[KnowledgeContext],
    *,
    max_new_tokens: int,
    batch_size: int,
    grader: Grader | None = None,
) -> tuple[list[float], list[list[str]]]:
    """Accuracy per passage on its own questions, asked closed-book in one batched pass.
    ``grader`` None = the default committed-answer grader (pass ``build_grader(settings.auditor)``)."""
    from seal.models import SamplingParams, TransformersEngine

    grader = grader or CommittedGrader()
    questions = [(index, q) for index, context in enumerate(contexts) for q in context.questions]
    if not questions:
        return [], []
    engine = TransformersEngine(model, tokenizer)
    generations = engine.generate(
        [build_question_prompt(q.question) for _, q in questions],
        SamplingParams(max_new_tokens=max_new_tokens),
        batch_size=batch_size,
    )
    predictions = [extract_answer(g.text) for g in generations]
    grades = grader.grade_batch([q.question for _, q in questions], [q.answer for _, q in questions], predictions)
    correct: list[list[bool]] = [[] for _ in contexts]
    said: list[list[str]] = [[] for _ in contexts]
    for (index, _), grade, prediction in zip(questions, grades, predictions, strict=True):
        correct[index].append(grade.correct)
        said[index].append(prediction)
    return [sum(flags) / len(flags) if flags else 0.0 for flags in correct], said


def run_continual(
    model: Any,
    tokenizer: Any,
    steps: Sequence[ContinualStep],
    config: ContinualConfig,
    *,
    baseline: tuple[list[float], list[list[str]]] | None = None,
    on_step: Callable[[ContinualResult], None] | None = None,
    grader: Grader | None = None,
) -> ContinualResult:
    """Adapt ``model`` to each step's passage in turn. ``model`` itself is left untouched (each
    update trains on a copy); the merged model after the last step is discarded.

    ``baseline`` — row 0 computed earlier for the same base model and passages — saves asking
    the base model again when several runs share it. ``on_step`` sees the partial result after
    every step, so a long run can save as it goes."""
    if not steps:
        raise ValueError("no steps: continual adaptation needs at least one passage")
    sdft = isinstance(config.update, SDFTUpdateConfig)
    if sdft and config.replay_size:
        raise ValueError("replay mixes earlier SFT sequences into an update; SDFT distils on prompts, use replay_size=0")
    for step in steps:
        if not step.context.questions:
            raise ValueError(f"passage {step.context.title!r} has no questions to measure retention with")
        if sdft and not step.training_prompts:
            raise ValueError(f"passage {step.context.title!r} has no training prompts for SDFT to distil on")
    contexts = [s.context for s in steps]
    n = len(steps)
    result = ContinualResult(
        titles=[c.title for c in contexts],
        matrix=[],
        config={
            "update_rule": "sdft" if sdft else "lora_sft",
            "update": asdict(config.update),
            "replay_size": config.replay_size,
            "replay_seed": config.replay_seed,
            "include_passage": config.include_passage,
            "answer_max_new_tokens": config.answer_max_new_tokens,
            "evaluate_future": config.evaluate_future,
        },
    )

    def ask(current: Any, upto: int) -> tuple[list[float | None], list[list[str] | None]]:
        asked = contexts if config.evaluate_future else contexts[:upto]
        accuracies, said = closed_book_accuracy(
            current, tokenizer, asked, max_new_tokens=config.answer_max_new_tokens, batch_size=config.batch_size,
            grader=grader,
        )
        row: list[float | None] = [*accuracies, *([None] * (n - len(accuracies)))]
        texts: list[list[str] | None] = [*said, *([None] * (n - len(said)))]
        return row, texts

    if baseline is None:
        baseline = closed_book_accuracy(
            model, tokenizer, contexts, max_new_tokens=config.answer_max_new_tokens, batch_size=config.batch_size,
            grader=grader,
        )
    if len(baseline[0]) != n:
        raise ValueError(f"baseline has {len(baseline[0])} passages, the run has {n}")
    result.matrix.append(list(baseline[0]))
    result.predictions.append(list(baseline[1]))

    buffer = ReplayBuffer(config.replay_seed)
    current = model
    for index, step in enumerate(steps, start=1):
        new = build_training_sequences(
            step.context.title, step.context.passage, list(step.self_edit_lines), include_passage=config.include_passage
        )
        replayed = buffer.sample(config.replay_size, index)
        started = time.perf_counter()
        if isinstance(config.update, SDFTUpdateConfig):
            context = privileged_context(step.context.title, step.context.passage, "\n".join(step.self_edit_lines))
            trained = SDFTUpdate(current, tokenizer, config.update).train(
                [build_question_prompt(q) for q in step.training_prompts], context
            )
        else:
            trained = LoraSFTTrainer(current, tokenizer, config.update).train(
                [*new, *replayed], anchors=config.anchors or None
            )
        # The merged weights become the model every later step trains on and is measured with.
        merged = trained.model.merge_and_unload()
        merged.eval()
        train_seconds = time.perf_counter() - started
        if current is not model:
            del current
        current = merged
        buffer.add(new)

        started = time.perf_counter()
        row, texts = ask(current, index)
        result.matrix.append(row)
        result.predictions.append(texts)
        result.steps.append(
            StepRecord(
                step=index,
                title=step.context.title,
                new_sequences=len(step.training_prompts) if sdft else len(new),
                replayed_sequences=len(replayed),
                final_loss=trained.losses[-1] if trained.losses else math.nan,
                train_seconds=train_seconds,
                eval_seconds=time.perf_counter() - started,
            )
        )
        if on_step is not None:
            on_step(result)
    return result


def save_heatmaps(
    panels: dict[str, Sequence[Sequence[float | None]]], titles: Sequence[str], path: Path | str
) -> Path:
    """One accuracy heatmap per run, side by side, cells annotated; unasked cells left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    if not panels:
        raise ValueError("no matrices to plot")
    n = len(titles)
    figure, axes = plt.subplots(1, len(panels), figsize=(1.6 + 1.3 * n * len(panels), 1.4 + 0.7 * (n + 1)), squeeze=False)
    for axis, (name, matrix) in zip(axes[0], panels.items(), strict=True):
        values = np.array([[np.nan if v is None else v for v in row] for row in matrix], dtype=float)
        if values.shape != (n + 1, n):
            raise ValueError(f"{name}: matrix shape {values.shape} is not {(n + 1, n)}")
        image = axis.imshow(np.ma.masked_invalid(values), vmin=0.0, vmax=1.0, cmap="viridis", aspect="auto")
        for i in range(n + 1):
            for j in range(n):
                if not np.isnan(values[i, j]):
                    axis.text(j, i, f"{values[i, j]:.2f}", ha="center", va="center",
                              color="white" if values[i, j] < 0.6 else "black", fontsize=8)
        axis.set_xticks(range(n), [f"P{j + 1}" for j in range(n)])
        axis.set_yticks(range(n + 1), ["base", *[f"after {i}" for i in range(1, n + 1)]])
        axis.set_xlabel("passage (questions asked closed-book)")
        axis.set_title(name, fontsize=10)
    figure.colorbar(image, ax=axes[0].tolist(), shrink=0.8, label="accuracy")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(figure)
    return path


def write_json(data: dict[str, Any], path: Path | str) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, data, indent=2, default=str)
    return path
