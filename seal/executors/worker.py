"""One pod of a Kubernetes training batch: ``python -m seal.executors.worker --spec <spec.json>``.

It reads the batch spec the student wrote (seal.executors.batch), takes the shard of its
completion index (``JOB_COMPLETION_INDEX``, which Kubernetes sets in every pod of an Indexed
Job), loads the base model once and trains each candidate of the shard with
:class:`seal.student.CandidateTrainer`, the class the student trains with in process, into the
registry under ``SEAL_HOME``. Settings come from ``SEAL_CONFIG_FILE``: the student's own settings,
written next to the spec, so a pod trains exactly as the student would.

After each candidate the index's result file is rewritten. A retried pod (another attempt of the
same index) skips the candidates already trained or refused; a pod that dies leaves its current
candidate recorded as ``running``, which is how the student tells which candidate killed it.

Exit codes, which the Job's ``podFailurePolicy`` turns into Kubernetes actions:

- 0: every candidate of the shard was trained;
- 1: a candidate failed for another reason than its recipe (any crash also exits 1 or is killed):
  counted against ``backoffLimitPerIndex``, so the index is retried;
- 42: every candidate was handled and at least one recipe is unusable (the self-edit has no
  usable line, an override is out of range, training diverged): ``FailIndex``, no retry, because
  the same recipe would fail the same way;
- 43: the batch cannot run here at all (spec missing or unreadable, settings invalid, the pod's
  base model is not the student's): ``FailJob``, because every index would fail alike.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from dataclasses import replace
from pathlib import Path

from seal.executors import REFUSAL_CODES, CandidateJob, CandidateTrainerPort
from seal.executors.batch import (
    EXIT_BAD_RECIPE,
    EXIT_BAD_SPEC,
    EXIT_OK,
    EXIT_RETRY,
    FINAL_STATUSES,
    BatchPaths,
    BatchSpec,
    CandidateRecord,
    IndexResult,
    read_index_result,
    read_spec,
    write_index_result,
)
from seal.executors.in_process import failure_code

log = logging.getLogger("seal.executors.worker")

INDEX_VARIABLE = "JOB_COMPLETION_INDEX"


def train_one(trainer: CandidateTrainerPort, position: int, job: CandidateJob, attempt: int) -> CandidateRecord:
    try:
        result = trainer.train_candidate(**job.train_kwargs())
    except Exception as exc:  # noqa: BLE001 - recorded for the student; the exit code says the rest
        code = failure_code(exc)
        refused = code in REFUSAL_CODES
        log.log(logging.INFO if refused else logging.ERROR, "candidate %d: %s", position, exc, exc_info=not refused)
        return CandidateRecord(
            position, "refused" if refused else "failed", failure=str(exc) or type(exc).__name__, code=code,
            attempt=attempt,
        )
    log.info("candidate %d: trained %s in %.1fs", position, result.manifest.adapter_id, result.seconds)
    return CandidateRecord(
        position, "trained", adapter_id=result.manifest.adapter_id, training_sequences=result.training_sequences,
        losses=tuple(result.losses), seconds=result.seconds, attempt=attempt,
    )


def shard_exit_code(result: IndexResult) -> int:
    statuses = {record.status for record in result.records.values()}
    if statuses & {"failed", "running"}:
        return EXIT_RETRY
    return EXIT_BAD_RECIPE if "refused" in statuses else EXIT_OK


def train_shard(trainer: CandidateTrainerPort, spec: BatchSpec, index: int, paths: BatchPaths) -> int:
    """Train the shard of ``index``, recording after every candidate; the exit code."""
    previous = read_index_result(paths, index) or IndexResult(index)
    result = replace(previous, attempts=previous.attempts + 1)
    write_index_result(paths, result)
    for position, job in spec.shard(index):
        done = result.records.get(position)
        if done is not None and done.status in FINAL_STATUSES:
            continue  # an earlier attempt of this index finished it
        result = result.with_record(CandidateRecord(position, "running", attempt=result.attempts))
        write_index_result(paths, result)
        result = result.with_record(train_one(trainer, position, job, result.attempts))
        write_index_result(paths, result)
    return shard_exit_code(result)


def completion_index(explicit: int | None) -> int:
    if explicit is not None:
        return explicit
    value = os.environ.get(INDEX_VARIABLE, "")
    if not value.isdigit():
        raise ValueError(
            f"{INDEX_VARIABLE} is {value!r}: this runs as a pod of an Indexed Job (or pass --index)"
        )
    return int(value)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m seal.executors.worker", description=__doc__.split("\n\n")[0])
    parser.add_argument("--spec", type=Path, required=True, help="the batch's spec.json on the shared volume")
    parser.add_argument("--index", type=int, help=f"shard to train; default ${INDEX_VARIABLE}")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    # Imported here: the settings file must be in place (SEAL_CONFIG_FILE) and argparse errors
    # should not wait for torch.
    from pydantic import ValidationError

    from seal.config import Settings
    from seal.registry import AdapterRegistry
    from seal.student import CandidateTrainer

    try:
        index = completion_index(args.index)
        spec = read_spec(args.spec)
        spec.shard(index)  # an index outside the batch is a spec/Job mismatch
        settings = Settings()
    except (ValueError, ValidationError) as exc:
        log.error("cannot run this batch: %s", exc)
        return EXIT_BAD_SPEC
    trainer = CandidateTrainer(settings, AdapterRegistry(settings.registry_dir), load_model=False)
    if trainer.fingerprint != spec.base_model_fingerprint:
        log.error(
            "the base model here (%s, fingerprint %s) is not the student's (fingerprint %s): the training image "
            "or model volume differs from the student's; candidates trained here would not fit its base model",
            trainer.model_path, trainer.fingerprint, spec.base_model_fingerprint,
        )
        return EXIT_BAD_SPEC
    log.info("batch %s, index %d: %d candidates", spec.batch_id, index, len(spec.shard(index)))
    return train_shard(trainer, spec, index, BatchPaths.of_spec(args.spec))


if __name__ == "__main__":
    sys.exit(main())
