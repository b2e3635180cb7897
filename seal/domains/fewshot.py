"""Few-shot learning on ARC (SEAL §3.3 / §4.1): a self-edit is a *training recipe*, not text.

Given a handful of input → output grid pairs, the model writes a self-edit that chooses which
augmentations to generate and how to train on them; a LoRA adapter is trained on that data
(test-time training) and must then solve the held-out test grid. The roles match the knowledge
domain (``seal.domains.knowledge``), one small function each:

  task ──build_self_edit_prompt──▶ teacher ──parse_self_edit──▶ recipe (or a rejection reason)
  task + recipe ──build_training_examples──▶ chat examples ──prepare_update──▶ token ids + cost
      (over budget: refused here, before any training)
  token ids ──train_update──▶ LoRA SFT (seal.update.lora_sft, the knowledge domain's trainer)
  test input ──predict (one prompt per view, answers mapped back, voted)──▶ 2 attempts ──grade──▶ 0/1

What is a "task instance" here: :class:`ArcTask` (its ``context_id`` plays the knowledge
passage's part). The reward is binary: the task is solved or it is not.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import random
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from seal.domains.arc_grids import (
    AUGMENTATION_GROUPS,
    IDENTITY,
    MAX_SIDE,
    Grid,
    GridTransform,
    apply_to_all,
    as_grid,
    augmentation_group,
    shape,
    transform_named,
)

# --- task instances ---------------------------------------------------------------------------

# SEAL's task files, as shipped in ../shared/data/arc/ (see its README).
SEAL_EVAL_CHALLENGES = "arc-agi_evaluation_challenges_filtered_1B_eval_set.json"
SEAL_TRAIN_CHALLENGES = "arc-agi_training_challenges_filtered_1B_training_set.json"
# Tasks the paper leaves out of its reported numbers: 8 of the 10 evaluation tasks, 11 of the 12
# training tasks.
PAPER_DROPPED_EVAL_TASKS = ("358ba94e", "af24b4cc")
PAPER_DROPPED_TRAIN_TASKS = ("8e1813be",)


@dataclass(frozen=True)
class ArcPair:
    input: Grid
    output: Grid


@dataclass(frozen=True)
class ArcTask:
    """One ARC task: the demonstrations the model sees, the test inputs it must solve, and (when
    known) their gold outputs."""

    task_id: str
    demonstrations: tuple[ArcPair, ...]
    test_inputs: tuple[Grid, ...]
    test_outputs: tuple[Grid, ...] = ()

    @property
    def context_id(self) -> str:
        """Content digest of what the model is shown, so the same task has the same id everywhere."""
        payload = json.dumps(
            [self.task_id, [[p.input, p.output] for p in self.demonstrations], self.test_inputs]
        ).encode()
        return hashlib.sha256(payload).hexdigest()[:16]

    @property
    def has_solutions(self) -> bool:
        return len(self.test_outputs) == len(self.test_inputs)


def task_to_dict(task: ArcTask) -> dict[str, Any]:
    """The task as ARC's own JSON shape plus its id and gold outputs: what a request, a training
    job's spec or a log line carries."""
    return {
        "task_id": task.task_id,
        "train": [{"input": [list(r) for r in p.input], "output": [list(r) for r in p.output]}
                  for p in task.demonstrations],
        "test": [{"input": [list(r) for r in grid]} for grid in task.test_inputs],
        "solutions": [[list(r) for r in grid] for grid in task.test_outputs],
    }


def task_from_dict(data: Mapping[str, Any]) -> ArcTask:
    """Inverse of :func:`task_to_dict`; every grid is validated (ValueError says which is wrong)."""
    try:
        return ArcTask(
            str(data["task_id"]),
            tuple(ArcPair(as_grid(p["input"]), as_grid(p["output"])) for p in data["train"]),
            tuple(as_grid(p["input"]) for p in data["test"]),
            tuple(as_grid(g) for g in data.get("solutions", ())),
        )
    except (KeyError, TypeError) as exc:
        raise ValueError(f"an ARC task needs task_id, train [{{input, output}}] and test [{{input}}]: {exc}") from exc


def solutions_path_for(challenges_path: str | Path) -> Path:
    """ARC ships ``…_challenges….json`` next to ``…_solutions….json``."""
    path = Path(challenges_path)
    return path.with_name(path.name.replace("_challenges", "_solutions"))


def load_arc_tasks(
    challenges_path: str | Path,
    solutions_path: str | Path | None = None,
    *,
    exclude: Sequence[str] = (),
) -> list[ArcTask]:
    """Tasks from an ARC challenges file, in file order, with gold outputs from the solutions
    file (``None``: the sibling ``…_solutions…`` file if it exists, else no gold outputs)."""
    challenges_path = Path(challenges_path)
    raw = json.loads(challenges_path.read_text(encoding="utf-8"))
    if not isinstance(raw, dict):
        raise ValueError(f"{challenges_path}: expected a JSON object mapping task ids to tasks")
    if solutions_path is None:
        sibling = solutions_path_for(challenges_path)
        solutions = json.loads(sibling.read_text(encoding="utf-8")) if sibling.is_file() else {}
    else:
        solutions = json.loads(Path(solutions_path).read_text(encoding="utf-8"))
    tasks = []
    for task_id, item in raw.items():
        if task_id in exclude:
            continue
        try:
            demonstrations = tuple(ArcPair(as_grid(p["input"]), as_grid(p["output"])) for p in item["train"])
            test_inputs = tuple(as_grid(p["input"]) for p in item["test"])
            test_outputs = tuple(as_grid(g) for g in solutions.get(task_id, ()))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(
                f"{challenges_path}: task {task_id} is malformed ({exc}); each needs train [{{input, output}}] "
                "and test [{input}] grids"
            ) from exc
        if test_outputs and len(test_outputs) != len(test_inputs):
            raise ValueError(f"task {task_id}: {len(test_inputs)} test inputs but {len(test_outputs)} solutions")
        tasks.append(ArcTask(task_id, demonstrations, test_inputs, test_outputs))
    return tasks


def select_arc_tasks(tasks: Sequence[ArcTask], task_ids: Sequence[str], *, source: str = "the file") -> list[ArcTask]:
    """The tasks named by ``task_ids``, in that order; an unknown or repeated id is a ValueError
    that names it and what ``source`` does hold."""
    by_id = {task.task_id: task for task in tasks}
    unknown = [task_id for task_id in task_ids if task_id not in by_id]
    if unknown:
        known = ", ".join(t.task_id for t in tasks[:5]) + (", …" if len(tasks) > 5 else "")
        raise ValueError(f"{source} has no task {', '.join(map(repr, unknown))} ({len(tasks)} tasks: {known})")
    repeated = sorted({task_id for task_id in task_ids if list(task_ids).count(task_id) > 1})
    if repeated:
        raise ValueError(f"task {', '.join(map(repr, repeated))} is named more than once; name each task once")
    return [by_id[task_id] for task_id in task_ids]


def find_arc_task(challenges_path: str | Path, task_id: str) -> ArcTask:
    """One task of an ARC challenges file by id, with its gold outputs when the sibling solutions
    file has them (what ``seal adapt --arc-task FILE --task-id ID`` sends)."""
    tasks = load_arc_tasks(challenges_path)
    for task in tasks:
        if task.task_id == task_id:
            return task
    known = ", ".join(t.task_id for t in tasks[:5]) + (", …" if len(tasks) > 5 else "")
    raise ValueError(f"{challenges_path} has no task {task_id!r} ({len(tasks)} tasks: {known})")


# --- grids as text ----------------------------------------------------------------------------


def grid_to_text(grid: Grid) -> str:
    """One line per row, one digit per cell, no separators.

    SmolLM2's tokenizer (and Llama 3's for runs of one digit) gives one token per digit and one
    per newline, so an ``h × w`` grid costs ``h · (w + 1)`` tokens; separators would double that.

    >>> grid_to_text(((0, 1, 2), (3, 4, 5)))
    '012\\n345'
    >>> text_to_grid(grid_to_text(((0, 1, 2), (3, 4, 5))))
    ((0, 1, 2), (3, 4, 5))
    """
    return "\n".join("".join(str(cell) for cell in row) for row in grid)


def text_to_grid(text: str) -> Grid | None:
    """The first block of consecutive digit-only lines in a model's answer, as a grid; None when
    there is none or it is not rectangular. Spaces between digits are tolerated, prose lines
    ("Output:") and code fences before the block are skipped.

    >>> text_to_grid("Output:\\n0 1\\n2 3\\n\\nThat is the answer.")
    ((0, 1), (2, 3))
    >>> text_to_grid("01\\n234") is None  # ragged rows are no grid
    True
    """
    rows: list[tuple[int, ...]] = []
    for line in text.splitlines():
        compact = line.replace(" ", "").strip()
        if compact and compact.isdigit() and compact.isascii():
            rows.append(tuple(int(ch) for ch in compact))
        elif rows:
            break  # the block ended
    if not rows or len({len(row) for row in rows}) != 1:
        return None
    return tuple(rows)


def grid_tokens(grid: Grid) -> int:
    """Tokens of :func:`grid_to_text` under a one-token-per-digit tokenizer (SmolLM2's)."""
    height, width = shape(grid)
    return height * (width + 1)


SOLVE_INSTRUCTION = (
    "Each example below turns an input grid into an output grid by the same rule. Each digit is a "
    "colour. Find the rule, then write the output grid of the test input: one row per line, "
    "nothing else."
)


def build_solve_prompt(demonstrations: Sequence[ArcPair], query: Grid) -> str:
    """The user message asking for ``query``'s output; the engine wraps it in the chat template."""
    parts = [SOLVE_INSTRUCTION, ""]
    for number, pair in enumerate(demonstrations, start=1):
        parts += [f"Example {number}", "Input:", grid_to_text(pair.input), "Output:", grid_to_text(pair.output), ""]
    parts += ["Test", "Input:", grid_to_text(query), "Output:"]
    return "\n".join(parts)


# --- the self-edit: a training recipe as one JSON object --------------------------------------

Strategy = Literal["all_tokens", "output_tokens"]
STRATEGIES: tuple[Strategy, ...] = ("output_tokens", "all_tokens")


class FewShotSettings(BaseModel):
    """Knobs of the few-shot domain: the limits a self-edit must keep, how much data it may make,
    the cost guard, and how answers are voted on."""

    # --- what a self-edit may ask for (outside these it is malformed) ---
    min_learning_rate: float = Field(1e-6, gt=0, description="smallest learning rate a self-edit may choose")
    max_learning_rate: float = Field(1e-2, gt=0, le=1, description="largest learning rate a self-edit may choose")
    max_epochs: int = Field(10, ge=1, le=100, description="most epochs a self-edit may choose")
    # --- the data a recipe generates ---
    leave_two_out: bool = Field(
        True,
        description="besides leave-one-out tasks (each demonstration asked once, the others in context), also "
        "make tasks with a second demonstration dropped from the context: shorter prompts, more variety",
    )
    max_examples: int = Field(
        12, ge=1, le=4096,
        description="training examples kept per recipe after deduplication: the task's own leave-one-out "
        "examples first, then a seeded sample of the others",
    )
    max_seq_len: int = Field(
        1024, ge=32, le=8192,
        description="tokens per training example, chat template included; longer examples are dropped, never "
        "cut (a cut grid would teach a wrong answer)",
    )
    max_side: int = Field(MAX_SIDE, ge=1, le=60, description="an augmentation that makes a grid taller or wider "
                          "than this is skipped for the task")
    # One example per step: with a dozen examples, batching would leave a handful of updates (the
    # probe that first solved 66e6c45b took 32 steps); on one CPU thread a batch saves no time.
    batch_size: int = Field(1, ge=1, le=256, description="training examples per optimizer step")
    # --- the cost guard: refuse before training, never train a silent fraction ---
    # Sized for SmolLM2-135M on one CPU thread (~65 trained tokens/s measured): 24,000 tokens is
    # ~6 minutes, room for the oracle recipe (12 examples × 3 epochs) on tasks up to ~600 tokens.
    max_steps: int = Field(
        48, ge=1, description="most optimizer steps (epochs × ⌈examples / batch_size⌉) a recipe may take"
    )
    max_training_tokens: int = Field(
        24_000, ge=1,
        description="most tokens a recipe may train on, summed over epochs (on a CPU a step's cost grows with "
        "its length, so a step count alone would not bound the time)",
    )
    # --- evaluation ---
    vote_views: tuple[str, ...] = Field(
        ("identity", "transpose", "flip_horizontal", "rotate180"),
        description="transforms (seal.domains.arc_grids names) the test input is solved under; each answer is "
        "mapped back through the inverse and the most frequent answers are the attempts",
    )
    attempts: int = Field(2, ge=1, le=10, description="answers per test input; ARC's rule (pass@2) is 2")
    answer_max_new_tokens: int = Field(
        1024, ge=8, le=8192, description="ceiling on the tokens generated for one answer grid"
    )


class RefusedSelfEdit(ValueError):
    """The self-edit, not the system, is at fault; ``code`` is the core's error code
    (``seal.adapt.is_refusal`` and ``seal.rpc`` read it), so the candidate fails alone."""

    code = "invalid_argument"


class InvalidSelfEdit(RefusedSelfEdit):
    """The self-edit is not a well-formed recipe; the message lists every problem found."""


class OverBudget(RefusedSelfEdit):
    """The recipe would cost more than the step or token budget allows; nothing was trained."""

    code = "failed_precondition"


class NoTrainingExamples(RefusedSelfEdit):
    """The recipe, on this task, leaves no example to train on; nothing was trained."""

    code = "failed_precondition"


@dataclass(frozen=True)
class FewShotSelfEdit:
    """A parsed self-edit: which augmentation groups to generate and how to train.

    ``strategy`` picks the tokens that carry the loss: ``output_tokens`` = the answer grid only,
    ``all_tokens`` = the whole example, demonstrations included."""

    basic: bool
    size: bool
    chain: bool
    repeat: bool
    strategy: Strategy
    learning_rate: float
    epochs: int

    @property
    def groups(self) -> tuple[str, ...]:
        return tuple(group for group in AUGMENTATION_GROUPS if getattr(self, group))

    def to_json(self) -> str:
        return json.dumps({
            "basic": self.basic, "size": self.size, "chain": self.chain, "repeat": self.repeat,
            "strategy": self.strategy, "learning_rate": self.learning_rate, "epochs": self.epochs,
        })


SELF_EDIT_KEYS = ("basic", "size", "chain", "repeat", "strategy", "learning_rate", "epochs")

_SELF_EDIT_INSTRUCTION = """\
A small model will be trained on copies of the puzzle below before it solves the test input. \
Choose how: which extra copies to make and how to train. Reply with one JSON object and nothing \
else. Its keys:
"basic": true or false — add rotated, flipped and transposed copies
"size": true or false — add copies at double size, double height, double width, or shifted by one cell
"chain": true or false — add copies transformed twice, and copies with the colours swapped
"repeat": true or false — add copies with the grids tiled side by side and stacked
"strategy": "output_tokens" (learn the answers only) or "all_tokens" (learn the whole puzzle text)
"learning_rate": a number between {min_lr:g} and {max_lr:g}
"epochs": a whole number between 1 and {max_epochs}
For example: {example}"""

_EXAMPLE_SELF_EDIT = FewShotSelfEdit(True, False, False, False, "output_tokens", 1e-4, 2)


def build_self_edit_prompt(task: ArcTask, settings: FewShotSettings | None = None) -> str:
    """The user message the teacher receives: the recipe's format, then the puzzle itself (its
    demonstrations and test inputs, never the test outputs)."""
    settings = settings or FewShotSettings()
    instruction = _SELF_EDIT_INSTRUCTION.format(
        min_lr=settings.min_learning_rate, max_lr=settings.max_learning_rate, max_epochs=settings.max_epochs,
        example=_EXAMPLE_SELF_EDIT.to_json(),
    )
    parts = [instruction, "", "Puzzle:"]
    for number, pair in enumerate(task.demonstrations, start=1):
        parts += [f"Example {number}", "Input:", grid_to_text(pair.input), "Output:", grid_to_text(pair.output), ""]
    for number, grid in enumerate(task.test_inputs, start=1):
        parts += [f"Test input {number}", grid_to_text(grid), ""]
    return "\n".join(parts).rstrip() + "\n"


def _first_json_object(text: str) -> dict[str, Any]:
    """The first ``{...}`` in ``text`` that decodes to a JSON object (models add prose and fences)."""
    decoder = json.JSONDecoder()
    first_error: json.JSONDecodeError | None = None
    for start, char in enumerate(text):
        if char != "{":
            continue
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError as exc:
            first_error = first_error or exc
            continue
        if isinstance(value, dict):
            return value
    if first_error is not None:
        raise InvalidSelfEdit(f"the self-edit's JSON is malformed: {first_error.msg} at character {first_error.pos}")
    raise InvalidSelfEdit("the self-edit holds no JSON object; the recipe must be one {...} with keys "
                          + ", ".join(SELF_EDIT_KEYS))


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def parse_self_edit(text: str, settings: FewShotSettings | None = None) -> FewShotSelfEdit:
    """The recipe in a generated self-edit, or :class:`InvalidSelfEdit` listing every problem:
    no JSON object, unknown or missing keys, a wrong type, a value outside its range."""
    settings = settings or FewShotSettings()
    recipe = _first_json_object(text)
    problems = []
    unknown = sorted(set(recipe) - set(SELF_EDIT_KEYS))
    if unknown:
        problems.append(f"unknown key(s) {', '.join(unknown)}")
    missing = [key for key in SELF_EDIT_KEYS if key not in recipe]
    if missing:
        problems.append(f"missing key(s) {', '.join(missing)}")
    for group in AUGMENTATION_GROUPS:
        if group in recipe and not isinstance(recipe[group], bool):
            problems.append(f"{group} must be true or false, got {recipe[group]!r}")
    if "strategy" in recipe and recipe["strategy"] not in STRATEGIES:
        problems.append(f"strategy must be one of {', '.join(STRATEGIES)}, got {recipe['strategy']!r}")
    learning_rate = recipe.get("learning_rate")
    if "learning_rate" in recipe and not (
        _is_number(learning_rate) and settings.min_learning_rate <= learning_rate <= settings.max_learning_rate
    ):
        problems.append(
            f"learning_rate must be a number in [{settings.min_learning_rate:g}, {settings.max_learning_rate:g}], "
            f"got {learning_rate!r}"
        )
    epochs = recipe.get("epochs")
    if "epochs" in recipe and not (
        isinstance(epochs, int) and not isinstance(epochs, bool) and 1 <= epochs <= settings.max_epochs
    ):
        problems.append(f"epochs must be a whole number in [1, {settings.max_epochs}], got {epochs!r}")
    if problems:
        raise InvalidSelfEdit("invalid recipe: " + "; ".join(problems))
    return FewShotSelfEdit(
        basic=recipe["basic"], size=recipe["size"], chain=recipe["chain"], repeat=recipe["repeat"],
        strategy=recipe["strategy"], learning_rate=float(learning_rate), epochs=epochs,  # type: ignore[arg-type]
    )


def validate_fewshot_overrides(overrides: Mapping[str, Any]) -> Mapping[str, Any]:
    """A few-shot self-edit is its own training recipe (learning rate, epochs): a request may
    name the rule (lora_sft) but not override what the recipe decides, never silently ignored."""
    rule = overrides.get("update_rule")
    if rule not in (None, "lora_sft"):
        raise ValueError(f"few-shot tasks train by their recipe (lora_sft); update_rule {rule!r} does not apply")
    others = sorted(set(overrides) - {"update_rule"})
    if others:
        raise ValueError(
            f"a few-shot self-edit chooses its own training recipe: send no overrides ({', '.join(others)} set)"
        )
    return overrides


# --- training data: leave-out tasks × augmentations, deduplicated and capped -----------------


def leave_out_tasks(
    demonstrations: Sequence[ArcPair], *, leave_two_out: bool
) -> list[tuple[tuple[int, ...], tuple[ArcPair, ...], ArcPair]]:
    """Training tasks made from the demonstrations alone: ``(held_out, context, query)``.

    Leave-one-out: each demonstration in turn is the query and the others are the context (needs
    two or more). Leave-two-out: each ordered pair (j, k) — j is the query, k is dropped too —
    so the context has two fewer (needs three or more)."""
    n = len(demonstrations)
    tasks = []
    if n >= 2:
        for j in range(n):
            context = tuple(p for i, p in enumerate(demonstrations) if i != j)
            tasks.append(((j,), context, demonstrations[j]))
    if leave_two_out and n >= 3:
        for j, k in itertools.permutations(range(n), 2):
            context = tuple(p for i, p in enumerate(demonstrations) if i not in (j, k))
            tasks.append(((j, k), context, demonstrations[j]))
    return tasks


@dataclass(frozen=True)
class TrainingExample:
    prompt: str  # the user message: context demonstrations and the query input
    reply: str  # the query's output grid as text
    transform: str  # the augmentation that made it; "identity" = the task's own grids
    held_out: tuple[int, ...]  # demonstrations left out of the context; the first is the query


@dataclass(frozen=True)
class ExampleStats:
    """How a recipe's examples were made, so a report can say what was dropped and why."""

    generated: int  # leave-out tasks × transforms that fit within max_side
    duplicates: int  # identical (prompt, reply) pairs removed (e.g. a symmetric grid's rotation)
    too_long: int  # examples over max_seq_len tokens, dropped
    capped: int  # examples left out by the max_examples cap
    kept: int


def recipe_transforms(self_edit: FewShotSelfEdit, *, seed: int) -> list[GridTransform]:
    """The identity (the task's own grids, always) and every transform of the chosen groups."""
    rng = random.Random(seed)
    transforms = [IDENTITY]
    for group in self_edit.groups:
        transforms += augmentation_group(group, rng)
    return transforms


def dedupe(examples: Sequence[TrainingExample]) -> list[TrainingExample]:
    """The first of each identical (prompt, reply): a rotation of a symmetric task, or a
    leave-two-out task equal to another, would otherwise count twice in the loss."""
    seen: set[tuple[str, str]] = set()
    unique = []
    for example in examples:
        if (example.prompt, example.reply) not in seen:
            seen.add((example.prompt, example.reply))
            unique.append(example)
    return unique


def is_own_example(example: TrainingExample) -> bool:
    """Untransformed leave-one-out: the task exactly as posed, with one demonstration asked."""
    return example.transform == IDENTITY.name and len(example.held_out) == 1


def cap_examples(examples: Sequence[TrainingExample], cap: int, *, seed: int) -> list[TrainingExample]:
    """At most ``cap`` examples: the task's own leave-one-out examples first, since they are the
    task itself, then a seeded sample of the rest (leave-two-out and augmented), in their order."""
    own = [e for e in examples if is_own_example(e)][:cap]
    others = [e for e in examples if not is_own_example(e)]
    room = min(cap - len(own), len(others))
    chosen = sorted(random.Random(seed).sample(range(len(others)), room))
    return own + [others[i] for i in chosen]


def build_training_examples(
    task: ArcTask,
    self_edit: FewShotSelfEdit,
    settings: FewShotSettings,
    *,
    seed: int,
    count_tokens: Callable[[TrainingExample], int] | None = None,
) -> tuple[list[TrainingExample], ExampleStats]:
    """The recipe's training examples for ``task``: every leave-out task under every transform,
    deduplicated, without those over ``max_seq_len`` tokens (when ``count_tokens`` is given),
    and capped at ``max_examples`` (:func:`cap_examples`)."""
    generated: list[TrainingExample] = []
    for transform in recipe_transforms(self_edit, seed=seed):
        for held_out, context, query in leave_out_tasks(task.demonstrations, leave_two_out=settings.leave_two_out):
            grids = [grid for pair in context for grid in (pair.input, pair.output)] + [query.input, query.output]
            mapped = apply_to_all(transform, grids, settings.max_side)
            if mapped is None:
                continue
            pairs = [ArcPair(mapped[i], mapped[i + 1]) for i in range(0, len(mapped) - 2, 2)]
            generated.append(TrainingExample(
                build_solve_prompt(pairs, mapped[-2]), grid_to_text(mapped[-1]), transform.name, held_out
            ))
    unique = dedupe(generated)
    fitting = [e for e in unique if count_tokens is None or count_tokens(e) <= settings.max_seq_len]
    kept = cap_examples(fitting, settings.max_examples, seed=seed)
    stats = ExampleStats(
        generated=len(generated), duplicates=len(generated) - len(unique), too_long=len(unique) - len(fitting),
        capped=len(fitting) - len(kept), kept=len(kept),
    )
    return kept, stats


# --- the cost guard and the update ------------------------------------------------------------


@dataclass(frozen=True)
class UpdateCost:
    examples: int
    steps: int  # optimizer steps: epochs × ⌈examples / batch_size⌉
    tokens: int  # tokens trained on, summed over epochs


def update_cost(example_lengths: Sequence[int], *, epochs: int, batch_size: int) -> UpdateCost:
    return UpdateCost(
        examples=len(example_lengths),
        steps=epochs * math.ceil(len(example_lengths) / batch_size),
        tokens=epochs * sum(example_lengths),
    )


def check_budget(cost: UpdateCost, settings: FewShotSettings) -> None:
    """Refuse a recipe whose update would exceed the step or token budget, saying by how much and
    what to lower, before anything is trained."""
    over = []
    if cost.steps > settings.max_steps:
        over.append(f"{cost.steps} optimizer steps > max_steps={settings.max_steps}")
    if cost.tokens > settings.max_training_tokens:
        over.append(f"{cost.tokens} training tokens > max_training_tokens={settings.max_training_tokens}")
    if over:
        raise OverBudget(
            f"recipe refused before training: {' and '.join(over)} ({cost.examples} examples); "
            "choose fewer epochs or fewer augmentation groups"
        )


@dataclass(frozen=True)
class PreparedUpdate:
    """Everything the inner update needs, checked against the budget: train it with
    :func:`train_update` (or any ``LoraSFTTrainer.train_tokenized``) with :meth:`lora_overrides`."""

    self_edit: FewShotSelfEdit
    examples: tuple[TrainingExample, ...]
    sequences: tuple[tuple[list[int], list[int]], ...]  # (input_ids, labels), -100 = no loss
    cost: UpdateCost
    stats: ExampleStats
    batch_size: int
    max_seq_len: int

    def lora_overrides(self) -> dict[str, Any]:
        """What the recipe sets in the LoRA SFT config (``seal.update.lora_sft.lora_sft_config``)."""
        return {
            "learning_rate": self.self_edit.learning_rate,
            "epochs": self.self_edit.epochs,
            "batch_size": self.batch_size,
            "max_seq_len": self.max_seq_len,
        }


def prepare_update(
    task: ArcTask, self_edit: FewShotSelfEdit, tokenizer: Any, settings: FewShotSettings, *, seed: int
) -> PreparedUpdate:
    """The recipe's examples as token ids, loss where its strategy says (found from the chat
    template: ``seal.update.lora_sft.chat_example``), and its cost; raises
    :class:`NoTrainingExamples` or :class:`OverBudget` before any training."""
    from seal.update.lora_sft import chat_example

    encoded: dict[TrainingExample, tuple[list[int], list[int]]] = {}

    def count_tokens(example: TrainingExample) -> int:
        encoded[example] = chat_example(tokenizer, example.prompt, example.reply, loss_on=self_edit.strategy)
        return len(encoded[example][0])

    examples, stats = build_training_examples(task, self_edit, settings, seed=seed, count_tokens=count_tokens)
    if not examples:
        why = (
            f"the task has {len(task.demonstrations)} demonstration(s) and leave-one-out needs 2"
            if len(task.demonstrations) < 2
            else f"all {stats.generated} generated examples are longer than max_seq_len={settings.max_seq_len} tokens"
        )
        raise NoTrainingExamples(f"recipe refused before training: no training examples ({why})")
    sequences = tuple(encoded[e] for e in examples)
    cost = update_cost([len(ids) for ids, _ in sequences], epochs=self_edit.epochs, batch_size=settings.batch_size)
    check_budget(cost, settings)
    return PreparedUpdate(
        self_edit, tuple(examples), sequences, cost, stats, settings.batch_size, settings.max_seq_len
    )


def train_update(
    base_model: Any,
    tokenizer: Any,
    prepared: PreparedUpdate,
    lora: Any,
    *,
    seed: int,
    on_step: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    anchors: Sequence[Any] | None = None,
) -> Any:
    """The inner update: a fresh LoRA adapter on ``base_model`` (never modified) trained on the
    prepared examples, by the same trainer as knowledge incorporation. ``lora`` is a
    ``seal.config.LoraSettings`` (rank, targets, rehearsal…); the recipe sets learning rate,
    epochs, batch size and length. Returns ``seal.update.lora_sft.TrainResult``."""
    from seal.update.lora_sft import LoraSFTTrainer, lora_sft_config

    config = lora_sft_config(lora, seed=seed, overrides=prepared.lora_overrides())
    trainer = LoraSFTTrainer(base_model, tokenizer, config)
    return trainer.train_tokenized(list(prepared.sequences), on_step=on_step, should_stop=should_stop, anchors=anchors)


# --- evaluation: views, voting, pass@2 --------------------------------------------------------

GenerateFn = Callable[[Sequence[str], int], Sequence[str]]  # (prompts, max_new_tokens) → answer texts


@dataclass(frozen=True)
class ViewAnswer:
    view: str
    text: str  # what the model wrote
    grid: Grid | None  # its answer mapped back to the original orientation; None = no usable grid


@dataclass(frozen=True)
class Prediction:
    attempts: tuple[Grid, ...]  # at most ``settings.attempts`` answers, most voted first
    votes: tuple[int, ...]  # votes of each attempt
    answers: tuple[ViewAnswer, ...]


def vote(answers: Sequence[Grid | None], attempts: int = 2) -> tuple[tuple[Grid, int], ...]:
    """The ``attempts`` most frequent grids with their counts; a tie goes to the grid answered
    first (views are listed identity first, so the untransformed view breaks ties). None casts
    no vote."""
    counts = Counter(answer for answer in answers if answer is not None)
    first_seen = {answer: i for i, answer in reversed(list(enumerate(answers))) if answer is not None}
    ranked = sorted(counts, key=lambda grid: (-counts[grid], first_seen[grid]))
    return tuple((grid, counts[grid]) for grid in ranked[:attempts])


def view_requests(task: ArcTask, test_index: int, views: Sequence[GridTransform], max_side: int = MAX_SIDE
                  ) -> list[tuple[GridTransform, str]]:
    """One solve prompt per view: the whole task (demonstrations and test input) under the view;
    a view that would grow a grid past ``max_side`` is skipped."""
    requests = []
    for view in views:
        grids = [g for pair in task.demonstrations for g in (pair.input, pair.output)] + [task.test_inputs[test_index]]
        mapped = apply_to_all(view, grids, max_side)
        if mapped is None:
            continue
        pairs = [ArcPair(mapped[i], mapped[i + 1]) for i in range(0, len(mapped) - 1, 2)]
        requests.append((view, build_solve_prompt(pairs, mapped[-1])))
    return requests


def answer_budget(task: ArcTask, cap: int) -> int:
    """Tokens to allow for one answer: twice the largest demonstration output or test input
    (outputs are rarely bigger), plus room for an end marker; at most ``cap``. A bound from what
    the model is shown, never from the gold answer."""
    largest = max(grid_tokens(g) for g in [*(p.output for p in task.demonstrations), *task.test_inputs])
    return min(cap, 2 * largest + 8)


def _solve_requests(task: ArcTask, settings: FewShotSettings) -> list[tuple[int, GridTransform, str]]:
    views = [transform_named(name) for name in settings.vote_views]
    return [
        (test_index, view, prompt)
        for test_index in range(len(task.test_inputs))
        for view, prompt in view_requests(task, test_index, views, settings.max_side)
    ]


def solve_prompts(task: ArcTask, settings: FewShotSettings) -> list[str]:
    """Every prompt :func:`predict` asks for ``task``, in its order: the same for any adapter, so
    the answers of several candidates can be asked in one mixed-adapter generate."""
    return [prompt for _, _, prompt in _solve_requests(task, settings)]


def predict(task: ArcTask, generate: GenerateFn, settings: FewShotSettings) -> list[Prediction]:
    """Answers to every test input: each view's prompt is answered (one ``generate`` call for
    all), parsed, mapped back through the view's inverse, and voted on."""
    requests = _solve_requests(task, settings)
    texts = list(generate([prompt for _, _, prompt in requests], answer_budget(task, settings.answer_max_new_tokens)))
    if len(texts) != len(requests):
        raise RuntimeError(f"generate returned {len(texts)} answers for {len(requests)} prompts")
    predictions = []
    for test_index in range(len(task.test_inputs)):
        answers = []
        for (index, view, _), text in zip(requests, texts):
            if index != test_index:
                continue
            parsed = text_to_grid(text)
            answers.append(ViewAnswer(view.name, text, None if parsed is None else view.inverse(parsed)))
        ranked = vote([a.grid for a in answers], settings.attempts)
        predictions.append(Prediction(tuple(g for g, _ in ranked), tuple(n for _, n in ranked), tuple(answers)))
    return predictions


@dataclass(frozen=True)
class TaskGrade:
    """A task is solved when every test input's gold output is among its attempts (pass@2)."""

    solved: bool
    tests_solved: int
    tests: int

    @property
    def reward(self) -> float:
        """SEAL's binary reward for a (task, self-edit) pair."""
        return 1.0 if self.solved else 0.0


def grade(task: ArcTask, predictions: Sequence[Prediction]) -> TaskGrade:
    if not task.has_solutions:
        raise ValueError(f"task {task.task_id} has no gold outputs to grade against")
    if len(predictions) != len(task.test_outputs):
        raise ValueError(f"{len(predictions)} predictions for {len(task.test_outputs)} test inputs")
    hits = sum(gold in p.attempts for gold, p in zip(task.test_outputs, predictions))
    return TaskGrade(solved=hits == len(task.test_outputs), tests_solved=hits, tests=len(task.test_outputs))


@dataclass
class SuccessTable:
    """Per-task and per-(task, self-edit) success of one method (a row of the paper's table)."""

    pairs: dict[str, list[bool]] = field(default_factory=dict)  # task id → solved, one per self-edit

    def add(self, task_id: str, solved: bool) -> None:
        self.pairs.setdefault(task_id, []).append(solved)

    def summary(self) -> Mapping[str, Any]:
        outcomes = [s for per_task in self.pairs.values() for s in per_task]
        return {
            "tasks": len(self.pairs),
            "tasks_solved": sum(any(per_task) for per_task in self.pairs.values()),
            "pairs": len(outcomes),
            "pairs_solved": sum(outcomes),
            # The paper's success rate: solved (task, self-edit) pairs over all pairs.
            "success_rate": sum(outcomes) / len(outcomes) if outcomes else None,
        }
