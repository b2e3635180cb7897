"""Where candidate trainings run: the student hands a batch of :class:`CandidateJob` to a
:class:`TrainingExecutor` and gets one :class:`CandidateOutcome` per job back, in order.

Two executors exist (``student.executor``):

- ``in_process`` (:mod:`seal.executors.in_process`, the default): the student's own process,
  one candidate after the other, with per-step progress and cancellation;
- ``kubernetes`` (:mod:`seal.executors.kubernetes`): the batch as one Kubernetes Indexed Job whose
  pods run :mod:`seal.executors.worker` on the shared registry volume.

Both train a candidate through the same code (:meth:`seal.student.CandidateTrainer.train_candidate`)
and save it through the same registry code, so a candidate is the same whichever ran it. A
candidate that fails fails alone: its outcome carries the reason and a transport-free status
code, and the other candidates of the batch are unaffected. Only a failure of the executor itself
(the Job could not be created) raises, since then no candidate ran at all.

This package stays light: the Kubernetes client is imported only when that executor is chosen.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from seal.registry import Manifest

if TYPE_CHECKING:
    from seal.config import Settings
    from seal.registry import AdapterRegistry

__all__ = [
    "REFUSAL_CODES",
    "CandidateJob",
    "CandidateOutcome",
    "CandidateResult",
    "CandidateTrainingFailed",
    "ExecutorError",
    "StepCallback",
    "TrainingExecutor",
    "resolve_executor",
]

# Status codes that blame the candidate's own recipe (self-edit, overrides): retrying it cannot
# help. The same pair seal.adapt treats as a refusal and seal.rpc maps to INVALID_ARGUMENT and
# FAILED_PRECONDITION.
REFUSAL_CODES = ("invalid_argument", "failed_precondition")

# (position of the job in the batch, step, total steps, loss)
StepCallback = Callable[[int, int, int, float], None]


@dataclass(frozen=True)
class CandidateResult:
    """A trained and registered candidate."""

    manifest: Manifest
    training_sequences: int
    losses: list[float]
    seconds: float


@dataclass(frozen=True)
class CandidateJob:
    """One candidate to train: exactly the arguments of ``CandidateTrainer.train_candidate`` that
    describe the candidate, as JSON-able data (a Kubernetes batch writes them into its spec file)."""

    adapter_name: str
    title: str
    passage: str
    self_edit: str
    context_id: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    include_passage: bool = True
    seed: int | None = None
    training_prompts: tuple[str, ...] = ()
    # A few-shot ARC task (``seal.domains.fewshot.task_to_dict``): the self-edit is its recipe.
    fewshot_task: Mapping[str, Any] | None = None

    def train_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            "adapter_name": self.adapter_name,
            "title": self.title,
            "passage": self.passage,
            "self_edit": self.self_edit,
            "context_id": self.context_id,
            "overrides": dict(self.overrides),
            "include_passage": self.include_passage,
            "seed": self.seed,
            "training_prompts": list(self.training_prompts),
        }
        if self.fewshot_task is not None:  # absent for knowledge jobs: their specs stay as they were
            kwargs["fewshot_task"] = dict(self.fewshot_task)
        return kwargs

    def to_json(self) -> dict[str, Any]:
        return self.train_kwargs()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CandidateJob:
        return cls(
            adapter_name=str(data["adapter_name"]),
            title=str(data["title"]),
            passage=str(data["passage"]),
            self_edit=str(data["self_edit"]),
            context_id=str(data["context_id"]),
            overrides=dict(data.get("overrides") or {}),
            include_passage=bool(data.get("include_passage", True)),
            seed=None if data.get("seed") is None else int(data["seed"]),
            training_prompts=tuple(str(p) for p in data.get("training_prompts") or ()),
            fewshot_task=data.get("fewshot_task"),
        )


class CandidateTrainingFailed(RuntimeError):
    """A candidate ended without an adapter for a reason reported by its executor. ``code`` is a
    transport-free status name (seal.rpc maps it): invalid_argument = the recipe is unusable,
    deadline_exceeded = the wait ran out, aborted = its pod failed, …"""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class ExecutorError(RuntimeError):
    """The executor could not run the batch at all (no candidate was trained): the Job could not
    be created, the executor is misconfigured. The message says what to change."""

    def __init__(self, message: str, code: str = "unavailable") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class CandidateOutcome:
    """What became of the job at ``position`` of a batch: a result, or a failure with a reason."""

    position: int
    result: CandidateResult | None = None
    failure: str = ""
    code: str = ""
    # The exception itself when the candidate failed in this process, so the caller can re-raise
    # exactly what an in-process training raised (same gRPC status, same message).
    error: BaseException | None = field(default=None, compare=False, repr=False)

    @property
    def trained(self) -> bool:
        return self.result is not None

    @property
    def refused(self) -> bool:
        """The candidate's recipe is at fault (a retry with the same self-edit would fail alike)."""
        return self.code in REFUSAL_CODES

    @classmethod
    def failed(cls, position: int, failure: str, code: str) -> CandidateOutcome:
        return cls(position, failure=failure, code=code)

    def result_or_raise(self) -> CandidateResult:
        if self.result is not None:
            return self.result
        if self.error is not None:
            raise self.error
        raise CandidateTrainingFailed(self.failure, self.code)


class TrainingExecutor(Protocol):
    """Trains a batch of candidates; one outcome per job, in the jobs' order."""

    name: str

    def run(
        self,
        jobs: Sequence[CandidateJob],
        *,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[CandidateOutcome]:
        """``on_step`` reports training steps where the executor can see them (in process only);
        ``should_stop`` ends the batch early (the caller left): unfinished candidates then fail."""
        ...


class CandidateTrainerPort(Protocol):
    """What an executor needs of the student's trainer (:class:`seal.student.CandidateTrainer`)."""

    registry: AdapterRegistry
    fingerprint: str

    def train_candidate(self, **kwargs: Any) -> CandidateResult: ...


def resolve_executor(settings: Settings, trainer: CandidateTrainerPort) -> TrainingExecutor:
    """The executor ``settings.student.executor`` names."""
    if settings.student.executor == "kubernetes":
        from seal.executors.kubernetes import KubernetesExecutor

        return KubernetesExecutor(settings, trainer.registry, base_model_fingerprint=trainer.fingerprint)
    from seal.executors.in_process import InProcessExecutor

    return InProcessExecutor(trainer)
