"""The default executor: each candidate of a batch trained in the student's own process, one
after the other (one training run at a time is all a node's accelerator does well anyway)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

from seal.executors import (
    REFUSAL_CODES,
    CandidateJob,
    CandidateOutcome,
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


class InProcessExecutor:
    name = "in_process"

    def __init__(self, trainer: CandidateTrainerPort) -> None:
        self._trainer = trainer

    def run(
        self,
        jobs: Sequence[CandidateJob],
        *,
        on_step: StepCallback | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> list[CandidateOutcome]:
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
            code = failure_code(exc)
            if code not in REFUSAL_CODES:
                log.warning("candidate %d of the batch failed: %s", position, exc, exc_info=exc)
            return CandidateOutcome(position, failure=str(exc) or type(exc).__name__, code=code, error=exc)
        return CandidateOutcome(position, result=result)
