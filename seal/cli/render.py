"""What the CLI prints: the console, one renderer for a streamed call's events (progress bars fed
by a view per stream), and the tables of an Adapt result and a ReST^EM round report."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)
from rich.table import Table

from seal.v1 import common_pb2, teacher_pb2

console = Console()


def stream_progress() -> Progress:
    return Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[note]}"),
        TimeElapsedColumn(), console=console, transient=False,
    )


def follow_stream(responses: Iterable[Any], view: object, *, final: str, call: str) -> Any:
    """Show a streamed call's events and return its ``final`` event (the last one, if several).

    Each response holds one event in its ``event`` oneof; ``view`` shows an event with its method
    of the same name (AdaptView, TrainView) and skips kinds it has no method for."""
    last = None
    for response in responses:
        kind = response.WhichOneof("event")
        if kind is None:
            continue
        if kind == final:
            last = getattr(response, kind)
        elif (show := getattr(view, kind, None)) is not None:
            show(getattr(response, kind))
    if last is None:
        raise RuntimeError(f"the {call} stream ended without a {final}")
    return last


# --- Adapt --------------------------------------------------------------------------------------


class AdaptView:
    """An Adapt call: one bar over the self-edits, one per candidate's training."""

    def __init__(self, progress: Progress) -> None:
        self._progress = progress
        self._overall = progress.add_task("self-edits", total=None, note="sampling…")
        self._training: dict[int, TaskID] = {}

    def self_edits_proposed(self, item: teacher_pb2.SelfEditsProposed) -> None:
        self._progress.update(self._overall, total=len(item.self_edits), completed=0,
                              note=f"{len(item.self_edits)} proposed in {item.seconds:.0f}s")

    def questions_written(self, item: teacher_pb2.QuestionsWritten) -> None:
        self._progress.console.print(
            f"the teacher wrote {item.written} questions about the passage: {len(item.held_out)} held out as τ, "
            f"{len(item.training_prompts)} training prompts, {item.dropped} dropped (unparseable or not "
            f"answered open book) in {item.seconds:.0f}s"
        )

    def baseline_scored(self, item: teacher_pb2.BaselineScored) -> None:
        self._progress.console.print(f"baseline closed-book accuracy: {item.accuracy:.1%}")

    def candidate_progress(self, item: teacher_pb2.CandidateProgress) -> None:
        if item.index not in self._training:
            self._training[item.index] = self._progress.add_task(
                f"  train #{item.index}", total=item.training.total_steps, note="")
        self._progress.update(self._training[item.index], completed=item.training.step,
                              note=f"loss {item.training.loss:.3f}")

    def candidate_scored(self, item: teacher_pb2.CandidateScored) -> None:
        self._progress.update(self._overall, advance=1, note=f"#{item.index} reward {item.reward:+.3f}")

    def candidate_failed(self, item: teacher_pb2.CandidateFailed) -> None:
        self._progress.update(self._overall, advance=1, note=f"#{item.index} failed")
        self._progress.console.print(f"[yellow]candidate #{item.index} failed:[/] {item.reason}")

    def promotion_decided(self, item: teacher_pb2.PromotionDecided) -> None:
        colour = "green" if item.promoted else "yellow"
        self._progress.console.print(f"[{colour}]{item.reason}[/]")


def print_result(result: teacher_pb2.AdaptResult) -> None:
    table = Table(title=f"Adapt {result.request_id} — context {result.context_id}")
    for column in ("#", "adapter", "train seqs", "accuracy", "reward", "gates", "train s"):
        table.add_column(column)
    for c in result.candidates:
        gates = "pass" if c.passed_gates else (c.failure or "; ".join(g.gate for g in c.gates if not g.passed) or "fail")
        table.add_row(str(c.index), c.adapter_id or "—", str(c.training_sequences), f"{c.accuracy:.1%}",
                      f"{c.reward:+.3f}", gates, f"{c.train_seconds:.1f}")
    console.print(table)
    questions = Table(title="closed-book answers (baseline → adapted)")
    for column in ("question", "gold", "baseline", "adapted"):
        questions.add_column(column, overflow="fold")

    def mark(outcome: common_pb2.QuestionOutcome) -> str:
        return ("✓ " if outcome.correct else "✗ ") + outcome.prediction

    for before, after in zip(result.baseline_outcomes, result.adapted_outcomes):
        questions.add_row(before.question, before.gold_answer, mark(before), mark(after))
    console.print(questions)
    phases = ", ".join(f"{name} {seconds:.1f}s" for name, seconds in result.phase_seconds.items())
    console.print(f"phases: {phases}")
    if result.questions_written:
        console.print("[dim]τ was written by the teacher (no questions were sent) and verified open book[/]")
    console.print(
        f"[bold]baseline accuracy {result.baseline_accuracy:.1%} → adapted accuracy {result.adapted_accuracy:.1%}[/] "
        + (f"(promoted {result.adapter_id})" if result.promoted else "(nothing promoted)")
    )


# --- Train (one ReST^EM round) ------------------------------------------------------------------


class TrainView:
    """A Train call: bars over scored samples and contexts, and one over the policy SFT."""

    def __init__(self, progress: Progress, contexts: int) -> None:
        self._progress = progress
        self._samples = progress.add_task("scored samples", total=None, note="")
        self._contexts = progress.add_task("contexts", total=contexts, note="")
        self._policy: TaskID | None = None

    def round_started(self, item: teacher_pb2.RoundStarted) -> None:
        self._progress.update(self._samples, total=item.contexts * item.k * item.seeds_per_edit, completed=0)
        self._progress.update(self._contexts, completed=0)
        what = "resuming" if item.resumed else "starting"
        self._progress.console.print(
            f"{what} round {item.round} ({item.round_id}): {item.contexts} contexts × k={item.k} × "
            f"{item.seeds_per_edit} seed(s), policy {item.policy_adapter_id or 'base model'}"
            + (f"; {item.samples_done} samples already scored" if item.resumed else "")
        )

    def context_sampled(self, item: teacher_pb2.ContextSampled) -> None:
        note = "reused" if item.reused else f"sampled in {item.seconds:.0f}s"
        self._progress.update(self._contexts, note=f"#{item.context_index} {note}")

    def sample_scored(self, item: teacher_pb2.SampleScored) -> None:
        result = f"{item.reward:+.3f}" if item.HasField("reward") else "failed"
        self._progress.update(self._samples, advance=1,
                              note=f"ctx {item.context_index} edit {item.edit_index}: {result} ({item.source})")

    def context_done(self, item: teacher_pb2.ContextDone) -> None:
        kept = f"kept #{item.kept_edit_index} ({item.kept_reward:+.3f})" if item.kept else "nothing kept"
        self._progress.update(self._contexts, advance=1, note=f"#{item.context_index} {kept}")

    def policy_progress(self, item: common_pb2.TrainingProgress) -> None:
        if self._policy is None:
            self._policy = self._progress.add_task("policy SFT", total=item.total_steps, note="")
        self._progress.update(self._policy, completed=item.step, note=f"loss {item.loss:.3f}")


KEEP_RULE_NAMES = {teacher_pb2.KEEP_RULE_BEST_OF_K: "best_of_k", teacher_pb2.KEEP_RULE_BEST_POSITIVE: "best_positive"}


def print_round_report(report: teacher_pb2.RoundReport) -> None:
    def opt(name: str, fmt: str) -> str:
        return format(getattr(report, name), fmt) if report.HasField(name) else "—"

    table = Table(title=f"ReST^EM round {report.round} ({report.round_id})")
    table.add_column("")
    table.add_column("value")
    rows = [
        ("domain", report.domain or "knowledge"),
        ("keep rule", KEEP_RULE_NAMES.get(report.keep_rule, "?")),
        ("contexts × k × seeds", f"{report.contexts} × {report.k} × {report.seeds_per_edit}"),
        ("samples scored / failed / resumed", f"{report.samples_scored} / {report.samples_failed} / {report.samples_resumed}"),
        ("mean reward of sampled self-edits", opt("mean_reward", "+.3f")),
        ("best reward", opt("max_reward", "+.3f")),
        ("kept (with positive gain)", f"{report.kept} ({report.positive_kept})"),
        ("mean reward of kept", opt("mean_kept_reward", "+.3f")),
        ("policy SFT loss first → final",
         f"{opt('policy_sft_first_loss', '.3f')} → {opt('policy_sft_final_loss', '.3f')} ({report.policy_sft_steps} steps)"),
        ("new policy", (report.policy_adapter_id + (" (hot-loaded)" if report.hot_loaded else "")) or "unchanged (nothing kept)"),
        ("phases", ", ".join(f"{name} {seconds:.0f}s" for name, seconds in report.phase_seconds.items())),
        ("wall time", f"{report.wall_seconds:.0f}s"),
    ]
    for name, value in rows:
        table.add_row(name, value)
    console.print(table)
