"""The default executor: the candidates of a batch trained in the student's own process.

With ``student.batch_candidates`` (the default) the trainer trains the lora_sft candidates of a
batch together, as adapters of its one base model in shared forward/backward passes
(``seal.update.multi_lora``); otherwise, and for candidates that cannot be batched, one after the
other. Either way a candidate that fails fails alone."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from seal.executors import (
    REFUSAL_CODES,
    CandidateJob,
    CandidateOutcome,
    CandidateResult,
    CandidateTrainerPort,
    StepCallback,
)

log = logging.getLogger(__name__)


def failure_code(exc: BaseException) -> str:
    """The transport-free status name of a training error: its own ``code``, else
    invalid_argument for a ValueError (bad input), else internal."""
    code = getattr(exc, "code", None)
    if isinstance(code, str):
        return code
    return "invalid_argument" if isinstance(exc, ValueError) else "internal"


class BatchingTrainerPort(CandidateTrainerPort, Protocol):
    """A trainer that can also train a batch together (:class:`seal.student.CandidateTrainer`)."""

    settings: Any

    def train_candidates_together(
        self,
        jobs: Sequence[CandidateJob],
        *,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[CandidateResult | Exception]: ...


class InProcessExecutor:
    name = "in_process"

    def __init__(self, trainer: BatchingTrainerPort, *, batch_candidates: bool | None = None) -> None:
        """``batch_candidates``: train a batch together; None = ``student.batch_candidates``."""
        self._trainer = trainer
        self.batch_candidates = (
            trainer.settings.student.batch_candidates if batch_candidates is None else batch_candidates
        )

    def run(
        self,
        jobs: Sequence[CandidateJob],
        *,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[CandidateOutcome]:
        if self.batch_candidates and len(jobs) > 1:
            finished = self._trainer.train_candidates_together(jobs, on_step=on_step, should_stop=should_stop)
            return [outcome_of(position, result) for position, result in enumerate(finished)]
        return [self._run_one(position, job, on_step, should_stop) for position, job in enumerate(jobs)]

    def _run_one(
        self,
        position: int,
        job: CandidateJob,
        on_step: StepCallback | None,
        should_stop: Callable[[], bool] | None,
    ) -> CandidateOutcome:
        def report(step: int, total: int, loss: float) -> None:
            if on_step is not None:
                on_step(position, step, total, loss)

        try:
            result = self._trainer.train_candidate(**job.train_kwargs(), on_step=report, should_stop=should_stop)
        except Exception as exc:  # noqa: BLE001 - one candidate's failure is its outcome, not the batch's
            return outcome_of(position, exc)
        return outcome_of(position, result)


def outcome_of(position: int, finished: CandidateResult | Exception) -> CandidateOutcome:
    """The outcome of the job at ``position`` from its result or the exception it alone raised."""
    if not isinstance(finished, Exception):
        return CandidateOutcome(position, result=finished)
    code = failure_code(finished)
    if code not in REFUSAL_CODES:
        log.warning("candidate %d of the batch failed: %s", position, finished, exc_info=finished)
    return CandidateOutcome(position, failure=str(finished) or type(finished).__name__, code=code, error=finished)
