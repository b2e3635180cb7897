"""The files a Kubernetes training batch shares between the student and its pods, under SEAL_HOME
(the student's home volume, mounted in every pod)::

    <home>/training-jobs/<batch_id>/spec.json                 the candidates, the shard size, the base model
    <home>/training-jobs/<batch_id>/settings.json             the student's effective settings (SEAL_CONFIG_FILE)
    <home>/training-jobs/<batch_id>/results/index-00003.json  what index 3 did with each of its candidates

Every file is replaced whole and atomically (seal.durable), so a reader on either side sees an
old version or a new one, never half a file. The spec and settings exist before the Job does;
each index rewrites its own result file after every candidate, so a retried pod knows which
candidates are already done and a pod that died says which candidate it died on. The adapters
themselves go to ``<home>/registry`` through the registry's own atomic code, never through here.
"""

from __future__ import annotations

import json
import math
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal

from seal.durable import atomic_write_json
from seal.executors import CandidateJob

BATCHES_DIR = "training-jobs"
SPEC_FILE = "spec.json"
SETTINGS_FILE = "settings.json"
RESULTS_DIR = "results"
SPEC_FORMAT = 1

# --- the worker's exit codes; the Job's podFailurePolicy turns them into Kubernetes actions ---
EXIT_OK = 0  # every candidate of the shard is trained
EXIT_RETRY = 1  # a candidate failed for a reason a new pod may not meet (any crash exits 1 too): Count
EXIT_BAD_RECIPE = 42  # done, and at least one candidate's recipe is unusable: FailIndex (a retry fails alike)
EXIT_BAD_SPEC = 43  # the batch itself is unusable here (spec unreadable, another base model): FailJob

CandidateStatus = Literal["running", "trained", "refused", "failed"]
# A candidate in one of these states is not trained again by a retried pod.
FINAL_STATUSES = frozenset({"trained", "refused"})


def new_batch_id() -> str:
    """12 hex digits: unique enough per home, short enough for Job and pod names (63 characters)."""
    return uuid.uuid4().hex[:12]


@dataclass(frozen=True)
class BatchSpec:
    batch_id: str
    base_model_fingerprint: str
    candidates_per_index: int
    jobs: tuple[CandidateJob, ...]

    @property
    def completions(self) -> int:
        """Indexes of the Job: one per shard of ``candidates_per_index`` candidates."""
        return math.ceil(len(self.jobs) / self.candidates_per_index)

    def index_of(self, position: int) -> int:
        return position // self.candidates_per_index

    def shard(self, index: int) -> list[tuple[int, CandidateJob]]:
        """(position in the batch, job) for each candidate index ``index`` trains."""
        if not 0 <= index < self.completions:
            raise ValueError(f"index {index} is outside the batch's {self.completions} indexes")
        start = index * self.candidates_per_index
        return [(p, self.jobs[p]) for p in range(start, min(start + self.candidates_per_index, len(self.jobs)))]

    def to_json(self) -> dict[str, Any]:
        return {
            "format": SPEC_FORMAT,
            "batch_id": self.batch_id,
            "base_model_fingerprint": self.base_model_fingerprint,
            "candidates_per_index": self.candidates_per_index,
            "jobs": [job.to_json() for job in self.jobs],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> BatchSpec:
        if data.get("format") != SPEC_FORMAT:
            raise ValueError(
                f"batch spec format {data.get('format')!r} is not {SPEC_FORMAT}: the training image and the "
                "student run different seal versions"
            )
        return cls(
            batch_id=str(data["batch_id"]),
            base_model_fingerprint=str(data["base_model_fingerprint"]),
            candidates_per_index=int(data["candidates_per_index"]),
            jobs=tuple(CandidateJob.from_json(job) for job in data["jobs"]),
        )


@dataclass(frozen=True)
class BatchPaths:
    directory: Path

    @property
    def spec(self) -> Path:
        return self.directory / SPEC_FILE

    @property
    def settings(self) -> Path:
        return self.directory / SETTINGS_FILE

    def result(self, index: int) -> Path:
        return self.directory / RESULTS_DIR / f"index-{index:05d}.json"

    def relative_to(self, home: Path) -> Path:
        return self.directory.relative_to(home)

    @classmethod
    def of_spec(cls, spec_file: Path) -> BatchPaths:
        return cls(Path(spec_file).parent)


def batch_paths(home: Path, batch_id: str) -> BatchPaths:
    return BatchPaths(Path(home) / BATCHES_DIR / batch_id)


def write_batch(home: Path, spec: BatchSpec, settings_snapshot: Mapping[str, Any]) -> BatchPaths:
    """The spec and the settings the pods will read, written before the Job is created."""
    paths = batch_paths(home, spec.batch_id)
    (paths.directory / RESULTS_DIR).mkdir(parents=True, exist_ok=False)
    atomic_write_json(paths.settings, dict(settings_snapshot))
    atomic_write_json(paths.spec, spec.to_json())  # last: a spec on disk means the batch is complete
    return paths


def remove_stale_batches(home: Path, *, older_than: float, now: float | None = None) -> list[Path]:
    """Remove batch directories created more than ``older_than`` seconds ago: their student
    stopped waiting long since (it crashed or restarted mid-batch), so nobody reads them."""
    root = Path(home) / BATCHES_DIR
    if not root.is_dir():
        return []
    now = time.time() if now is None else now
    removed = []
    for directory in root.iterdir():
        try:
            age = now - directory.stat().st_mtime
        except FileNotFoundError:
            continue
        if directory.is_dir() and age > older_than:
            shutil.rmtree(directory, ignore_errors=True)
            removed.append(directory)
    return removed


def read_spec(path: Path) -> BatchSpec:
    """The spec at ``path``; ValueError with the reason when it is missing or unreadable."""
    try:
        return BatchSpec.from_json(json.loads(Path(path).read_text(encoding="utf-8")))
    except FileNotFoundError:
        raise ValueError(
            f"batch spec {path} does not exist: is the student's home volume mounted at the same place "
            "(student.kubernetes.home_claim_name, home_mount_path)?"
        ) from None
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"batch spec {path} is unreadable: {exc}") from exc


# --- per-index results ----------------------------------------------------------------------------


@dataclass(frozen=True)
class CandidateRecord:
    """What happened to one candidate of an index, as its pod recorded it."""

    position: int
    status: CandidateStatus
    adapter_id: str = ""
    training_sequences: int = 0
    losses: tuple[float, ...] = ()
    seconds: float = 0.0
    failure: str = ""
    code: str = ""
    attempt: int = 0  # the index's attempt (pod) that wrote this record, from 1

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CandidateRecord:
        return cls(**{**data, "losses": tuple(data.get("losses") or ())})


@dataclass(frozen=True)
class IndexResult:
    index: int
    attempts: int = 0
    records: Mapping[int, CandidateRecord] = field(default_factory=dict)

    def with_record(self, record: CandidateRecord) -> IndexResult:
        return replace(self, records={**self.records, record.position: record})

    def to_json(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "attempts": self.attempts,
            "candidates": [asdict(r) for _, r in sorted(self.records.items())],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> IndexResult:
        records = [CandidateRecord.from_json(r) for r in data.get("candidates") or ()]
        return cls(int(data["index"]), int(data.get("attempts", 0)), {r.position: r for r in records})


def write_index_result(paths: BatchPaths, result: IndexResult) -> None:
    atomic_write_json(paths.result(result.index), result.to_json())


def read_index_result(paths: BatchPaths, index: int) -> IndexResult | None:
    """The index's result file; None when the index never wrote one."""
    try:
        return IndexResult.from_json(json.loads(paths.result(index).read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None
