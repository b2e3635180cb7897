"""Versioned, checksummed LoRA adapter artifacts on disk.

Layout::

    <root>/<adapter_name>/.lock              fcntl lock: version allocation and status changes
    <root>/<adapter_name>/.staging-<uuid>/   a version being written; never listed
    <root>/<adapter_name>/v000001/           a plain PEFT directory plus manifest.json

A version directory appears by one ``os.rename`` of a fully written, hashed and fsynced staging
directory, so a reader never sees half an adapter. Statuses live in each version's manifest and
change only along ``TRANSITIONS``. Operations that touch two manifests (promote, rollback) write
them in an order that ``repair`` can finish after a crash. This module stays free of torch: it only
deals with files, so the CLI and the services can import it cheaply.

Audited changes: with a ``journal`` (the student's audit outbox), every status change is first
recorded there as an intent (durably) under a transition id, then written to the manifests, each
history entry carrying that id. A kill between the two leaves an intent the next start reconciles
against the manifests (``reconcile``): finished if any manifest carries its id, abandoned if none
does. So the audit trail gets exactly one event per transition, whichever moment the process died.

Staging directories are decided by their writer's liveness, not their age: a writer holds an
``flock`` on ``.staging-<id>.lock`` for as long as it fills ``.staging-<id>/``; a staging
directory whose lock nobody holds belongs to a writer that died and is removed.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from pathlib import Path, PurePosixPath
from types import MappingProxyType
from typing import Any, Protocol

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from seal.durable import atomic_write_text, file_lock, fsync_directory, is_lock_held, liveness_lock

log = logging.getLogger(__name__)

__all__ = [
    "TRANSITIONS",
    "AdapterNotFound",
    "AdapterRegistry",
    "ChecksumMismatch",
    "CorruptManifest",
    "InvalidAdapterId",
    "InvalidAdapterName",
    "InvalidTransition",
    "Manifest",
    "NothingToRollBack",
    "RegistryError",
    "Status",
    "StatusChange",
    "Transition",
    "TransitionJournal",
    "check_transition",
    "format_adapter_id",
    "parse_adapter_id",
    "validate_adapter_name",
]

MANIFEST_FILE = "manifest.json"
_MANIFEST_TMP = "manifest.json.tmp"
_RESERVED_FILES = frozenset({MANIFEST_FILE, _MANIFEST_TMP})
_LOCK_FILE = ".lock"
STAGING_PREFIX = ".staging-"
STAGING_LOCK_SUFFIX = ".lock"
# Only for staging directories without a lock file, which writers before the liveness lock made:
# for those, age is the only clue. Every directory written now is decided by its lock.
DEFAULT_STALE_STAGING_SECONDS = 15 * 60

# The one spelling of a lineage name: settings validate their adapter names with it too.
ADAPTER_NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
_ADAPTER_NAME = re.compile(ADAPTER_NAME_PATTERN)
_ADAPTER_ID = re.compile(r"^(?P<name>[^@]*)@v(?P<version>[1-9][0-9]*)$")
_VERSION_DIR = re.compile(r"^v(?P<version>[0-9]{6,})$")
_SHA256_HEX = re.compile(r"^[0-9a-f]{64}$")
_HASH_CHUNK = 1 << 20


# --- errors ------------------------------------------------------------------------------------
# ``code`` is a transport-free status name; the gRPC layer maps it without knowing these classes.


class RegistryError(Exception):
    code = "failed_precondition"


class InvalidAdapterId(RegistryError, ValueError):
    code = "invalid_argument"


class InvalidAdapterName(InvalidAdapterId):
    code = "invalid_argument"


class AdapterNotFound(RegistryError):
    code = "not_found"


class InvalidTransition(RegistryError):
    code = "failed_precondition"

    def __init__(self, message: str, *, current: Status, requested: Status) -> None:
        super().__init__(message)
        self.current = current
        self.requested = requested


class ChecksumMismatch(RegistryError):
    code = "data_loss"

    def __init__(self, message: str, *, filename: str, expected: str | None, actual: str | None) -> None:
        super().__init__(message)
        self.filename = filename
        self.expected = expected
        self.actual = actual


class NothingToRollBack(RegistryError):
    code = "failed_precondition"


class CorruptManifest(RegistryError):
    code = "data_loss"


class WeightsDiscarded(RegistryError):
    """The version's manifest is kept as a record, but its adapter files were deleted."""

    code = "failed_precondition"


# --- ids and names -----------------------------------------------------------------------------


def validate_adapter_name(adapter_name: str) -> str:
    if not isinstance(adapter_name, str) or not _ADAPTER_NAME.fullmatch(adapter_name):
        raise InvalidAdapterName(
            f"adapter_name {adapter_name!r} is not valid: use 1 to 63 characters of lowercase letters, "
            "digits, '_' or '-', starting with a letter or digit (e.g. 'default')"
        )
    return adapter_name


def format_adapter_id(adapter_name: str, version: int) -> str:
    return f"{adapter_name}@v{version}"


def parse_adapter_id(adapter_id: str) -> tuple[str, int]:
    """``"default@v3"`` → ``("default", 3)``; only the canonical spelling is accepted, so one
    version never has two ids (``@v03`` is refused)."""
    match = _ADAPTER_ID.fullmatch(adapter_id) if isinstance(adapter_id, str) else None
    if match is None:
        raise InvalidAdapterId(
            f"adapter id {adapter_id!r} is not valid: expected '<adapter_name>@v<version>', "
            "e.g. 'default@v3' (version from 1, no leading zeros)"
        )
    return validate_adapter_name(match["name"]), int(match["version"])


def _version_dir_name(version: int) -> str:
    return f"v{version:06d}"


# --- statuses ----------------------------------------------------------------------------------


class Status(StrEnum):
    CANDIDATE = "candidate"
    PROMOTED = "promoted"
    SUPERSEDED = "superseded"  # was promoted until a newer promotion replaced it
    REJECTED = "rejected"
    ROLLED_BACK = "rolled_back"


# The whole lifecycle. superseded → promoted is what rollback restores. rolled_back → promoted is
# reachable only through an explicit ``promote`` of that id: rollback never picks a rolled-back
# version. rejected is final, so an adapter judged bad cannot drift back into serving.
TRANSITIONS: Mapping[Status, frozenset[Status]] = MappingProxyType(
    {
        Status.CANDIDATE: frozenset({Status.PROMOTED, Status.REJECTED}),
        Status.PROMOTED: frozenset({Status.SUPERSEDED, Status.ROLLED_BACK}),
        Status.SUPERSEDED: frozenset({Status.PROMOTED}),
        Status.REJECTED: frozenset(),
        Status.ROLLED_BACK: frozenset({Status.PROMOTED}),
    }
)


def check_transition(current: Status | str, requested: Status | str, adapter_id: str = "") -> None:
    current, requested = Status(current), Status(requested)
    allowed = TRANSITIONS[current]
    if requested in allowed:
        return
    subject = adapter_id or "an adapter"
    if allowed:
        choices = " or ".join(f"'{status}'" for status in sorted(allowed))
        hint = f"from '{current}' it can only become {choices}"
    else:
        hint = f"'{current}' is final"
    raise InvalidTransition(
        f"cannot change {subject} from '{current}' to '{requested}': {hint}",
        current=current,
        requested=requested,
    )


def _now() -> datetime:
    return datetime.now(UTC)


def _iso(moment: datetime) -> str:
    return moment.isoformat(timespec="microseconds")


def _parse_time(value: str) -> datetime:
    moment = datetime.fromisoformat(value)
    if moment.tzinfo is None:
        raise ValueError(f"timestamp {value!r} has no timezone; the registry writes UTC")
    return moment


# --- manifest ----------------------------------------------------------------------------------


class StatusChange(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: Status
    at: str
    reason: str
    # The audited transition this change belongs to ('' before transitions had ids): a promote's
    # two manifest writes share one, and so does the audit event that reports them.
    transition_id: str = ""

    @field_validator("at")
    @classmethod
    def _timezone_aware(cls, value: str) -> str:
        _parse_time(value)
        return value


class Manifest(BaseModel):
    """Everything needed to reproduce, audit and serve one adapter version; ``manifest.json``."""

    model_config = ConfigDict(frozen=True)

    schema_version: int = 1
    adapter_name: str
    version: int = Field(ge=1)
    adapter_id: str
    base_model: str
    base_model_fingerprint: str
    context_id: str
    self_edit_sha256: str
    files: dict[str, str]
    seed: int
    hyperparameters: dict[str, Any] = Field(default_factory=dict)
    metrics: dict[str, Any] = Field(default_factory=dict)
    created_at: str
    status: Status
    history: list[StatusChange]
    # Set when the adapter files of a rejected version were deleted to reclaim disk (a ReST^EM
    # round scores hundreds of candidates it never serves); the manifest stays as the record.
    weights_discarded_at: str = ""

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        validate_adapter_name(self.adapter_name)
        if self.adapter_id != format_adapter_id(self.adapter_name, self.version):
            raise ValueError(
                f"adapter_id {self.adapter_id!r} does not match adapter_name and version "
                f"({format_adapter_id(self.adapter_name, self.version)!r})"
            )
        _parse_time(self.created_at)
        if not self.files:
            raise ValueError("files is empty: a version must hold at least one adapter file")
        for filename, digest in self.files.items():
            _check_relative_filename(filename)
            if not _SHA256_HEX.fullmatch(digest):
                raise ValueError(f"files[{filename!r}] is not a lowercase sha256 hex digest: {digest!r}")
        if not self.history or self.history[-1].status != self.status:
            raise ValueError("history must end with the current status")
        return self

    def last_time(self, status: Status) -> datetime | None:
        """When this version last entered ``status``; orders promotions and supersessions."""
        for change in reversed(self.history):
            if change.status == status:
                return _parse_time(change.at)
        return None

    def with_status(self, status: Status, reason: str, at: str, transition_id: str = "") -> Manifest:
        check_transition(self.status, status, self.adapter_id)
        change = StatusChange(status=status, at=at, reason=reason, transition_id=transition_id)
        return self.model_copy(update={"status": status, "history": [*self.history, change]})

    def has_transition(self, transition_id: str) -> bool:
        return any(change.transition_id == transition_id for change in self.history)


# --- audited transitions -----------------------------------------------------------------------

KIND_REPAIR = "repair"  # a status change made by start-up repair, not by a request


@dataclass(frozen=True)
class Transition:
    """One audited change of a lineage: the manifest writes it makes, in order, and what the audit
    event says about it. ``changes`` is what lets recovery finish it after a crash."""

    transition_id: str
    kind: str  # promote | reject | rollback | repair
    adapter_id: str  # the version the event is about (promoted, rejected, rolled back, repaired)
    cause: str
    at: str
    changes: tuple[tuple[str, Status], ...]  # (adapter_id, new status), in write order
    details: Mapping[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "transition_id": self.transition_id, "kind": self.kind, "adapter_id": self.adapter_id,
            "cause": self.cause, "at": self.at, "changes": [[a, str(s)] for a, s in self.changes],
            "details": dict(self.details),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Transition:
        return cls(
            transition_id=data["transition_id"], kind=data["kind"], adapter_id=data["adapter_id"],
            cause=data["cause"], at=data["at"], changes=tuple((a, Status(s)) for a, s in data["changes"]),
            details=dict(data.get("details") or {}),
        )


class TransitionJournal(Protocol):
    """Where intents go before the manifests change (the student's audit outbox implements it)."""

    def intend(self, transition: Transition) -> None:
        """Record ``transition`` durably; raising stops the change before any manifest is written."""

    def settle(self, transition_id: str, *, happened: bool, awaits_report: bool) -> None:
        """The manifests are written (``happened``) or nothing was. ``awaits_report``: the caller
        will report it with the request's details (``AuditOutbox.record``); else it is complete."""

    def unsettled(self) -> list[Transition]:
        """Intents whose outcome this process has not settled (a previous one died first)."""


def _new_transition_id() -> str:
    return uuid.uuid4().hex


def _check_relative_filename(filename: str) -> None:
    path = PurePosixPath(filename)
    if (
        not filename
        or path.is_absolute()
        or ".." in path.parts
        or str(path) != filename
        or filename in _RESERVED_FILES
    ):
        raise ValueError(f"file name {filename!r} must be a plain relative path and not a manifest file")


# --- filesystem helpers ------------------------------------------------------------------------


def _hash_file(path: Path, *, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(_HASH_CHUNK):
            digest.update(chunk)
        if sync:
            # Writers (PEFT's save_pretrained) rarely fsync; a renamed directory whose data
            # blocks never reached the disk would survive a power cut as zero-length files.
            os.fsync(handle.fileno())
    return digest.hexdigest()


def _adapter_files(directory: Path) -> Iterator[tuple[str, Path]]:
    """Every adapter file below ``directory`` as (relative posix name, path); manifests excluded."""
    for dirpath, dirnames, filenames in os.walk(directory):
        dirnames.sort()
        current = Path(dirpath)
        for filename in sorted(filenames):
            path = current / filename
            relative = path.relative_to(directory).as_posix()
            if relative in _RESERVED_FILES:
                continue
            yield relative, path


def _hash_and_sync_tree(directory: Path) -> dict[str, str]:
    files: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(directory):
        current = Path(dirpath)
        for entry in [*dirnames, *filenames]:
            path = current / entry
            if path.is_symlink() or not (path.is_file() or path.is_dir()):
                raise RegistryError(
                    f"{path.relative_to(directory)} is not a regular file or directory; an adapter "
                    "version holds plain files only, so its checksums describe what is served"
                )
        for filename in filenames:
            path = current / filename
            relative = path.relative_to(directory).as_posix()
            if relative in _RESERVED_FILES:
                raise RegistryError(
                    f"the adapter files include {relative!r}, a name the registry reserves for its "
                    "own manifest; save the adapter without it"
                )
            files[relative] = _hash_file(path, sync=True)
        fsync_directory(current)
    return dict(sorted(files.items()))


def _write_manifest(version_dir: Path, manifest: Manifest) -> Manifest:
    """Replace ``manifest.json`` atomically and durably; returns the manifest as it reads back,
    so callers hold exactly what a later ``get`` returns (tuples become lists, and so on)."""
    text = manifest.model_dump_json(indent=2) + "\n"
    # model_copy does not validate; checking before the write keeps a bad manifest off the disk.
    written = Manifest.model_validate_json(text)
    # A fixed temporary name (reserved, and removed by repair) rather than a random one: a crash
    # must not leave an unknown file among the adapter's files. The name lock makes it safe.
    atomic_write_text(version_dir / MANIFEST_FILE, text, temporary=version_dir / _MANIFEST_TMP)
    return written


def _newest_mtime(directory: Path) -> float:
    newest = directory.lstat().st_mtime
    for dirpath, dirnames, filenames in os.walk(directory):
        for entry in [*dirnames, *filenames]:
            with contextlib.suppress(OSError):
                newest = max(newest, (Path(dirpath) / entry).lstat().st_mtime)
    return newest


AdapterSource = Path | Callable[[Path], None]


class AdapterRegistry:
    """Adapter versions under ``root``; safe for many threads and, for every write, many processes.

    Opening the registry removes staging directories whose writers died (``stale_staging_seconds``
    only judges lock-less ones left by older writers), settles the ``journal``'s intents a crash
    left (``reconcile``) and repairs promotions or rollbacks a crash interrupted. With a
    ``journal`` every status change, repairs included, is recorded there before it is made."""

    def __init__(
        self,
        root: Path | str,
        *,
        journal: TransitionJournal | None = None,
        stale_staging_seconds: float = DEFAULT_STALE_STAGING_SECONDS,
    ) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.journal = journal
        self._guard = threading.Lock()
        self._name_locks: dict[str, threading.Lock] = {}
        self._remove_staging(older_than=stale_staging_seconds)
        self.reconcile()
        self.repair()

    # --- locking ------------------------------------------------------------------------------

    def _thread_lock(self, adapter_name: str) -> threading.Lock:
        with self._guard:
            return self._name_locks.setdefault(adapter_name, threading.Lock())

    @contextlib.contextmanager
    def _exclusive(self, adapter_name: str) -> Iterator[Path]:
        """Hold the name against other threads and other processes (flock is per open file, so it
        also separates two registries on one root inside a process)."""
        name_dir = self._name_dir(adapter_name)
        with self._thread_lock(adapter_name), file_lock(name_dir / _LOCK_FILE):
            yield name_dir

    # --- paths and reading --------------------------------------------------------------------

    def _name_dir(self, adapter_name: str) -> Path:
        return self.root / validate_adapter_name(adapter_name)

    def path_of(self, manifest: Manifest) -> Path:
        return self._name_dir(manifest.adapter_name) / _version_dir_name(manifest.version)

    def _adapter_names(self) -> list[str]:
        return sorted(
            entry.name for entry in self.root.iterdir() if _ADAPTER_NAME.fullmatch(entry.name) and entry.is_dir()
        )

    def _versions(self, adapter_name: str) -> list[int]:
        name_dir = self._name_dir(adapter_name)
        if not name_dir.is_dir():
            return []
        versions = []
        for entry in name_dir.iterdir():
            match = _VERSION_DIR.fullmatch(entry.name)
            if match and entry.is_dir():
                versions.append(int(match["version"]))
        return sorted(versions)

    def _read(self, adapter_name: str, version: int) -> Manifest:
        version_dir = self._name_dir(adapter_name) / _version_dir_name(version)
        adapter_id = format_adapter_id(adapter_name, version)
        try:
            text = (version_dir / MANIFEST_FILE).read_text(encoding="utf-8")
        except FileNotFoundError:
            if version_dir.is_dir():
                raise CorruptManifest(f"{adapter_id}: {version_dir} has no {MANIFEST_FILE}") from None
            raise AdapterNotFound(self._not_found_message(adapter_id, adapter_name)) from None
        try:
            manifest = Manifest.model_validate_json(text)
        except ValidationError as exc:
            raise CorruptManifest(
                f"{adapter_id}: {version_dir / MANIFEST_FILE} is not a valid manifest: {exc}"
            ) from exc
        if manifest.adapter_id != adapter_id:
            raise CorruptManifest(
                f"{version_dir / MANIFEST_FILE} describes {manifest.adapter_id}, not {adapter_id}; "
                "was a version directory copied or renamed by hand?"
            )
        return manifest

    def _read_all(self, adapter_name: str) -> list[Manifest]:
        """Every readable version of one name; unreadable ones are logged, not fatal, so one
        damaged directory does not take the whole lineage out of service."""
        manifests = []
        for version in self._versions(adapter_name):
            try:
                manifests.append(self._read(adapter_name, version))
            except (CorruptManifest, AdapterNotFound) as exc:
                log.warning("skipping unreadable adapter version: %s", exc)
        return manifests

    def _not_found_message(self, adapter_id: str, adapter_name: str) -> str:
        same_name = [format_adapter_id(adapter_name, v) for v in self._versions(adapter_name)]
        existing = same_name or [
            format_adapter_id(name, v) for name in self._adapter_names() for v in self._versions(name)
        ]
        if not existing:
            return f"adapter {adapter_id} not found: the registry at {self.root} holds no adapters yet"
        shown = ", ".join(existing[:20]) + (f" and {len(existing) - 20} more" if len(existing) > 20 else "")
        return f"adapter {adapter_id} not found; existing: {shown}"

    def get(self, adapter: str | tuple[str, int]) -> Manifest:
        # A (name, version) pair goes through the id parser too, so both spellings validate alike.
        adapter_id = adapter if isinstance(adapter, str) else format_adapter_id(*adapter)
        return self._read(*parse_adapter_id(adapter_id))

    def list(self, adapter_name: str | None = None, status: Status | str | None = None) -> list[Manifest]:
        wanted = Status(status) if status is not None else None
        names = [validate_adapter_name(adapter_name)] if adapter_name is not None else self._adapter_names()
        found = []
        for name in names:
            # The name lock gives in-process readers a snapshot between the two writes of a promote.
            with self._thread_lock(name):
                found.extend(m for m in self._read_all(name) if wanted is None or m.status == wanted)
        return found

    def promoted(self, adapter_name: str) -> Manifest | None:
        with self._thread_lock(adapter_name):
            return _serving(self._read_all(adapter_name))

    # --- creating -----------------------------------------------------------------------------

    def create_version(
        self,
        adapter_name: str,
        source: AdapterSource,
        *,
        base_model: str,
        base_model_fingerprint: str,
        context_id: str,
        self_edit_sha256: str,
        seed: int,
        hyperparameters: Mapping[str, Any],
        metrics: Mapping[str, Any] | None = None,
    ) -> Manifest:
        """Store a new candidate version from a directory or from a writer that fills the given
        directory (the trainer saves straight into staging, no copy). All or nothing: on any
        failure the staging directory is removed and no version number is taken."""
        name_dir = self._name_dir(adapter_name)
        if not name_dir.is_dir():
            name_dir.mkdir(exist_ok=True)
            fsync_directory(self.root)
        staging = name_dir / f"{STAGING_PREFIX}{uuid.uuid4().hex}"
        with contextlib.ExitStack() as writer_alive:
            # Under the name lock, which the cleaner takes too: it never sees the directory before
            # its liveness lock is held. The lock outlives the directory (the stack exits last).
            with self._exclusive(adapter_name):
                writer_alive.enter_context(liveness_lock(_staging_lock_path(staging)))
                staging.mkdir()
            published = False
            try:
                if callable(source):
                    source(staging)
                else:
                    source_dir = Path(source)
                    if not source_dir.is_dir():
                        raise RegistryError(f"adapter source {source_dir} is not a directory")
                    shutil.copytree(source_dir, staging, dirs_exist_ok=True, ignore=_ignore_manifests_at(source_dir))
                files = _hash_and_sync_tree(staging)
                if not files:
                    raise RegistryError(
                        f"no adapter files were written into {staging}; the writer must save the adapter "
                        "(adapter_config.json, adapter_model.safetensors) into the directory it is given"
                    )
                created_at = _iso(_now())
                with self._exclusive(adapter_name):
                    versions = self._versions(adapter_name)
                    version = versions[-1] + 1 if versions else 1
                    manifest = _write_manifest(
                        staging,
                        Manifest(
                            adapter_name=adapter_name,
                            version=version,
                            adapter_id=format_adapter_id(adapter_name, version),
                            base_model=base_model,
                            base_model_fingerprint=base_model_fingerprint,
                            context_id=context_id,
                            self_edit_sha256=self_edit_sha256,
                            files=files,
                            seed=seed,
                            hyperparameters=dict(hyperparameters),
                            metrics=dict(metrics or {}),
                            created_at=created_at,
                            status=Status.CANDIDATE,
                            history=[StatusChange(status=Status.CANDIDATE, at=created_at, reason="trained")],
                        ),
                    )
                    # rename, not replace: it refuses a non-empty target, so a version is never overwritten.
                    os.rename(staging, name_dir / _version_dir_name(version))
                    published = True
                    fsync_directory(name_dir)
            finally:
                if not published:
                    shutil.rmtree(staging, ignore_errors=True)
        log.info("stored adapter %s (%d files)", manifest.adapter_id, len(files))
        return manifest

    # --- integrity ----------------------------------------------------------------------------

    def verify(self, manifest: Manifest) -> None:
        if manifest.weights_discarded_at:
            raise WeightsDiscarded(
                f"{manifest.adapter_id} was rejected and its weights were discarded at "
                f"{manifest.weights_discarded_at}; only its manifest is kept, so it cannot be served "
                "(retrain it from the recorded self-edit and hyperparameters if it is needed)"
            )
        directory = self.path_of(manifest)
        on_disk = dict(_adapter_files(directory)) if directory.is_dir() else {}
        for filename, expected in manifest.files.items():
            path = on_disk.get(filename)
            if path is None:
                raise ChecksumMismatch(
                    f"{manifest.adapter_id}: {filename} is missing from {directory} "
                    f"(manifest records sha256 {expected}); the version cannot be served",
                    filename=filename,
                    expected=expected,
                    actual=None,
                )
            actual = _hash_file(path)
            if actual != expected:
                raise ChecksumMismatch(
                    f"{manifest.adapter_id}: {filename} has sha256 {actual} but the manifest records "
                    f"{expected}; the file changed after it was stored, so it is not served",
                    filename=filename,
                    expected=expected,
                    actual=actual,
                )
        for filename in sorted(set(on_disk) - set(manifest.files)):
            actual = _hash_file(on_disk[filename])
            raise ChecksumMismatch(
                f"{manifest.adapter_id}: {filename} (sha256 {actual}) is in {directory} but not in the "
                "manifest; a loader could pick it up, so the version is not served until it is removed",
                filename=filename,
                expected=None,
                actual=actual,
            )

    # --- status changes -----------------------------------------------------------------------

    def _existing_name_and_version(self, adapter_id: str) -> tuple[str, int]:
        adapter_name, version = parse_adapter_id(adapter_id)
        if not self._name_dir(adapter_name).is_dir():
            raise AdapterNotFound(self._not_found_message(adapter_id, adapter_name))
        return adapter_name, version

    def update_metrics(self, adapter_id: str, metrics: Mapping[str, Any]) -> Manifest:
        """Merge ``metrics`` into the version's metrics (later evaluations add keys, e.g. rewards)."""
        adapter_name, version = self._existing_name_and_version(adapter_id)
        with self._exclusive(adapter_name):
            manifest = self._read(adapter_name, version)
            updated = manifest.model_copy(update={"metrics": {**manifest.metrics, **dict(metrics)}})
            return _write_manifest(self.path_of(manifest), updated)

    def _apply(self, transition: Transition, changed: list[Manifest], *, awaits_report: bool) -> list[Manifest]:
        """Make one transition: journal the intent (durably), write ``changed`` in order, settle.
        Called under the name lock. A failure after the first write leaves the intent unsettled
        on purpose: the next start finds its id in a manifest and finishes it (``reconcile``)."""
        if self.journal is not None:
            self.journal.intend(transition)
        written: list[Manifest] = []
        try:
            for manifest in changed:
                written.append(_write_manifest(self.path_of(manifest), manifest))
        except BaseException:
            if not written and self.journal is not None:
                self.journal.settle(transition.transition_id, happened=False, awaits_report=False)
            raise
        if self.journal is not None:
            self.journal.settle(transition.transition_id, happened=True, awaits_report=awaits_report)
        return written

    def mark_rejected(self, adapter_id: str, reason: str) -> Manifest:
        adapter_name, version = self._existing_name_and_version(adapter_id)
        with self._exclusive(adapter_name):
            lineage = self._repair_locked(adapter_name)
            manifest = _find(lineage, version) or self._read(adapter_name, version)
            at, transition_id = _stamp_after(lineage), _new_transition_id()
            rejected = manifest.with_status(Status.REJECTED, reason, at, transition_id)
            transition = _transition_of("reject", rejected, reason, at, [rejected])
            [written] = self._apply(transition, [rejected], awaits_report=True)
            return written

    def discard_weights(self, adapter_id: str) -> Manifest:
        """Delete a rejected version's adapter files and keep its manifest (sha256 of every
        file, seed, hyperparameters, history) as the record. Only rejected versions qualify:
        'rejected' is final, so nothing can ever need those weights to serve again.

        The manifest is marked first: a crash before the files are gone leaves a version that
        says so and is finished by calling this again, never one whose files vanished unrecorded."""
        adapter_name, version = self._existing_name_and_version(adapter_id)
        with self._exclusive(adapter_name):
            manifest = self._read(adapter_name, version)
            if manifest.status != Status.REJECTED:
                raise InvalidTransition(
                    f"cannot discard the weights of {adapter_id}: it is '{manifest.status}', and only a "
                    "rejected version, which can never be served again, may lose its weights",
                    current=manifest.status,
                    requested=Status.REJECTED,
                )
            directory = self.path_of(manifest)
            if not manifest.weights_discarded_at:
                manifest = _write_manifest(directory, manifest.model_copy(update={"weights_discarded_at": _iso(_now())}))
            for filename in manifest.files:
                (directory / filename).unlink(missing_ok=True)
            fsync_directory(directory)
        log.info("discarded the weights of %s (manifest kept)", adapter_id)
        return manifest

    def promote(self, adapter_id: str, reason: str) -> Manifest:
        """Serve ``adapter_id`` for its name; the version served so far becomes superseded.
        Nothing changes unless the target's files match their checksums."""
        adapter_name, version = self._existing_name_and_version(adapter_id)
        with self._exclusive(adapter_name):
            lineage = self._repair_locked(adapter_name)
            target = _find(lineage, version) or self._read(adapter_name, version)
            check_transition(target.status, Status.PROMOTED, target.adapter_id)
            self.verify(target)
            at, transition_id = _stamp_after(lineage), _new_transition_id()
            # Target first: a crash in between leaves two promoted, and repair keeps the newer one.
            # The other order would leave a window where nothing is served at all.
            changed = [target.with_status(Status.PROMOTED, reason, at, transition_id)]
            previous_ids = []
            for previous in lineage:
                if previous.status == Status.PROMOTED and previous.version != version:
                    changed.append(previous.with_status(
                        Status.SUPERSEDED, f"superseded by {adapter_id}: {reason}", at, transition_id))
                    previous_ids.append(previous.adapter_id)
            transition = _transition_of("promote", changed[0], reason, at, changed,
                                        previous_adapter_id=", ".join(previous_ids))
            promoted = self._apply(transition, changed, awaits_report=True)[0]
        log.info("promoted %s: %s", adapter_id, reason)
        return promoted

    def rollback(self, adapter_name: str, reason: str, *, to_base_ok: bool = False) -> Manifest | None:
        """Stop serving the promoted version (it becomes rolled_back, never picked again by a
        rollback) and serve the most recently superseded one again. Returns what is served now;
        ``None`` means the base model, allowed only with ``to_base_ok`` when nothing was superseded."""
        validate_adapter_name(adapter_name)
        if not self._versions(adapter_name):
            raise AdapterNotFound(self._not_found_message(adapter_name, adapter_name))
        with self._exclusive(adapter_name):
            lineage = self._repair_locked(adapter_name)
            current = _serving(lineage)
            if current is None:
                raise NothingToRollBack(f"no version of {adapter_name} is promoted, so there is nothing to roll back")
            restore = _latest_superseded(lineage)
            if restore is None and not to_base_ok:
                raise NothingToRollBack(
                    f"{current.adapter_id} is served and no earlier promoted version of {adapter_name} "
                    "is left to restore; roll back to the base model explicitly (to_base_ok) or "
                    "promote another version"
                )
            if restore is not None:
                self.verify(restore)
            at, transition_id = _stamp_after(lineage), _new_transition_id()
            # Rolled-back first: a crash in between leaves nothing promoted while a superseded
            # version exists, a state no finished operation produces, so repair can finish the
            # restore. Promoting first would make repair demote the bad version to superseded,
            # where a later rollback could serve it again.
            changed = [current.with_status(Status.ROLLED_BACK, reason, at, transition_id)]
            if restore is not None:
                changed.append(restore.with_status(
                    Status.PROMOTED, f"restored by rollback of {current.adapter_id}: {reason}", at, transition_id))
            transition = _transition_of("rollback", changed[0], reason, at, changed,
                                        now_serving_adapter_id=restore.adapter_id if restore is not None else "")
            written = self._apply(transition, changed, awaits_report=True)
            if restore is None:
                log.warning(
                    "rolled back %s; %s now serves the base model: %s", current.adapter_id, adapter_name, reason
                )
                return None
            restored = written[1]
        log.warning("rolled back %s to %s: %s", current.adapter_id, restored.adapter_id, reason)
        return restored

    # --- recovery -----------------------------------------------------------------------------

    def repair(self, adapter_name: str | None = None) -> list[Manifest]:
        """Finish promotions and rollbacks that a crash cut between their two manifest writes;
        returns the manifests it changed."""
        names = [validate_adapter_name(adapter_name)] if adapter_name is not None else self._adapter_names()
        changed: list[Manifest] = []
        for name in names:
            if not self._versions(name):
                continue
            with self._exclusive(name):
                before = {m.adapter_id: m for m in self._read_all(name)}
                after = self._repair_locked(name)
                changed.extend(m for m in after if before.get(m.adapter_id) != m)
        return changed

    def recover(self) -> list[Path]:
        """At a service's start after a crash: remove the staging directories of dead writers
        (lock-less ones too, whatever their age), settle the journal's intents, repair. A live
        writer in another process keeps its staging directory. Returns what was removed."""
        removed = self._remove_staging(older_than=0.0)
        self.reconcile()
        self.repair()
        return removed

    def reconcile(self) -> list[Transition]:
        """Settle every intent the journal holds from a process that died: a transition whose id
        some manifest carries happened (at least its first write), so its remaining writes are
        made and it is reported once; one no manifest carries never happened and is dropped.
        Returns the transitions found to have happened."""
        if self.journal is None:
            return []
        happened = []
        for transition in self.journal.unsettled():
            adapter_name, _ = parse_adapter_id(transition.adapter_id)
            with self._exclusive(adapter_name):
                if transition not in self.journal.unsettled():
                    continue  # this process's own, settled by its writer while we waited for the lock
                lineage = self._read_all(adapter_name)
                if not any(m.has_transition(transition.transition_id) for m in lineage):
                    self.journal.settle(transition.transition_id, happened=False, awaits_report=False)
                    log.info("start-up: %s of %s never reached the registry; dropped", transition.kind,
                             transition.adapter_id)
                    continue
                self._finish_locked(transition, lineage)
                self.journal.settle(transition.transition_id, happened=True, awaits_report=False)
                happened.append(transition)
        return happened

    def _finish_locked(self, transition: Transition, lineage: list[Manifest]) -> None:
        """The writes of ``transition`` a crash cut off, made now under its own id."""
        at = _stamp_after(lineage)
        for adapter_id, status in transition.changes:
            manifest = _find(lineage, parse_adapter_id(adapter_id)[1])
            if manifest is None or manifest.has_transition(transition.transition_id):
                continue
            reason = f"{transition.cause} (finished at start-up after an interrupted {transition.kind})"
            try:
                fixed = manifest.with_status(status, reason, at, transition.transition_id)
            except InvalidTransition as exc:  # changed since by someone else: theirs stands
                log.warning("start-up: could not finish %s of %s: %s", transition.kind, transition.adapter_id, exc)
                continue
            lineage = _replace(lineage, _write_manifest(self.path_of(fixed), fixed))
            log.warning("start-up: finished the interrupted %s of %s: %s is %s", transition.kind,
                        transition.adapter_id, adapter_id, status)

    def _repair_locked(self, adapter_name: str) -> list[Manifest]:
        lineage = self._read_all(adapter_name)
        for version in self._versions(adapter_name):
            with contextlib.suppress(FileNotFoundError):
                (self._name_dir(adapter_name) / _version_dir_name(version) / _MANIFEST_TMP).unlink()
        promoted = [m for m in lineage if m.status == Status.PROMOTED]
        keep = _serving(lineage)
        if len(promoted) > 1 and keep is not None:
            for extra in promoted:
                if extra.version != keep.version:
                    lineage = self._repair_one(lineage, extra, Status.SUPERSEDED, "repaired after interrupted promote",
                                               interrupted=keep, kind="promote")
                    log.warning(
                        "repair: %s was still promoted next to %s; now superseded", extra.adapter_id, keep.adapter_id
                    )
        elif not promoted and (restore := _latest_superseded(lineage)) is not None:
            # The rollback verified this version before it wrote anything; finish it as it meant to.
            lineage = self._repair_one(lineage, restore, Status.PROMOTED, "repaired after interrupted rollback",
                                       interrupted=_latest_rolled_back(lineage), kind="rollback")
            log.warning("repair: finished an interrupted rollback; %s is promoted again", restore.adapter_id)
        return lineage

    def _repair_one(
        self, lineage: list[Manifest], manifest: Manifest, status: Status, reason: str, *,
        interrupted: Manifest | None, kind: str,
    ) -> list[Manifest]:
        """One repair write. It finishes the transition a crash cut short (whose first write is
        ``interrupted``'s last change), so it carries that transition's id and is reported as that
        transition: whoever repairs it (the student, or any process that opens the registry while
        the student is down), the manifests and the audit trail name one transition, and the
        intent the student journaled for it is reported once by its next start. Only a lineage
        written before transitions had ids gets a 'repair' transition of its own."""
        at = _stamp_after(lineage)
        origin = interrupted.history[-1] if interrupted is not None else None
        if interrupted is not None and origin is not None and origin.transition_id:
            fixed = manifest.with_status(status, reason, at, origin.transition_id)
            transition = _transition_of(kind, interrupted, origin.reason, at, [fixed], repaired_at_start=True)
        else:
            fixed = manifest.with_status(status, reason, at, _new_transition_id())
            transition = _transition_of(KIND_REPAIR, fixed, reason, at, [fixed], status=str(status))
        [written] = self._apply(transition, [fixed], awaits_report=False)
        return _replace(lineage, written)

    def _remove_staging(self, *, older_than: float) -> list[Path]:
        """Remove staging directories (and their lock files) whose writer is dead: its liveness
        lock is not held. ``older_than`` applies only to lock-less directories (older writers)."""
        removed = []
        cutoff = time.time() - older_than
        for name in self._adapter_names():
            with self._exclusive(name):  # a writer creates its lock and directory under it
                for entry in sorted((self.root / name).iterdir()):
                    if not entry.name.startswith(STAGING_PREFIX) or not entry.is_dir():
                        continue
                    lock_path = _staging_lock_path(entry)
                    if is_lock_held(lock_path):
                        continue  # its writer is alive, however long it takes
                    if not lock_path.exists() and older_than > 0 and _newest_mtime(entry) > cutoff:
                        continue
                    shutil.rmtree(entry, ignore_errors=True)
                    lock_path.unlink(missing_ok=True)
                    removed.append(entry)
                    log.info("removed the staging directory of a writer that died: %s", entry)
                for orphan in (self.root / name).glob(f"{STAGING_PREFIX}*{STAGING_LOCK_SUFFIX}"):
                    # A writer killed after its lock file and before its directory.
                    if not orphan.with_name(orphan.name.removesuffix(STAGING_LOCK_SUFFIX)).exists() \
                            and not is_lock_held(orphan):
                        orphan.unlink(missing_ok=True)
        return removed


# --- pure helpers over one lineage -------------------------------------------------------------


def _staging_lock_path(staging: Path) -> Path:
    return staging.with_name(staging.name + STAGING_LOCK_SUFFIX)


def _transition_of(
    kind: str, subject: Manifest, cause: str, at: str, changed: Iterable[Manifest], **details: Any
) -> Transition:
    """The transition whose writes are ``changed`` (each already carrying its id)."""
    changed = list(changed)
    return Transition(
        transition_id=changed[0].history[-1].transition_id,
        kind=kind,
        adapter_id=subject.adapter_id,
        cause=cause,
        at=at,
        changes=tuple((m.adapter_id, m.status) for m in changed),
        details=details,
    )


def _find(lineage: Iterable[Manifest], version: int) -> Manifest | None:
    return next((m for m in lineage if m.version == version), None)


def _replace(lineage: list[Manifest], manifest: Manifest) -> list[Manifest]:
    return [manifest if m.version == manifest.version else m for m in lineage]


def _serving(lineage: Iterable[Manifest]) -> Manifest | None:
    """The promoted version; if a promote was cut short there are two, and the newer wins."""
    promoted = [m for m in lineage if m.status == Status.PROMOTED]
    return max(promoted, key=lambda m: (m.last_time(Status.PROMOTED), m.version), default=None)


def _latest_superseded(lineage: Iterable[Manifest]) -> Manifest | None:
    superseded = [m for m in lineage if m.status == Status.SUPERSEDED]
    return max(superseded, key=lambda m: (m.last_time(Status.SUPERSEDED), m.version), default=None)


def _latest_rolled_back(lineage: Iterable[Manifest]) -> Manifest | None:
    rolled_back = [m for m in lineage if m.status == Status.ROLLED_BACK]
    return max(rolled_back, key=lambda m: (m.last_time(Status.ROLLED_BACK), m.version), default=None)


def _stamp_after(lineage: Iterable[Manifest]) -> str:
    """Now, but strictly after every recorded change of the lineage: ordering by time must not
    depend on clock resolution or on a clock that stepped back. Callers hold the name's lock."""
    moment = _now()
    latest = max((_parse_time(c.at) for m in lineage for c in m.history), default=None)
    if latest is not None and moment <= latest:
        moment = latest + timedelta(microseconds=1)
    return _iso(moment)


def _ignore_manifests_at(source_dir: Path) -> Callable[[str, list[str]], set[str]]:
    """Copying from another version's directory must not carry its manifest along."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        return _RESERVED_FILES & set(names) if Path(directory) == source_dir else set()

    return ignore
