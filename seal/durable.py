"""Files that survive a crash, written one way.

Every durable file in SEAL is one of three shapes, and each has exactly one implementation here:

- an append-only JSON-lines log (:class:`JsonLinesLog`): rewards, the teacher's reward buffer,
  the audit outbox, ReST^EM round state;
- a small file replaced whole (:func:`atomic_write_bytes` and its text/JSON forms): manifests,
  round metadata, probes, serving state;
- a lock between processes (:func:`file_lock`).

"Durable" means: once a call returns, the data is on the disk (fsynced, and the directory entry
too), so a power loss, not just a kill, keeps it; and a crash in the middle of a call leaves
either the old state or the new one, never a mix a reader would choke on.
"""

from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import logging
import os
import threading
import uuid
from collections.abc import Callable, Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

__all__ = [
    "JsonLinesLog",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "abandoned_temporaries",
    "file_lock",
    "fsync_directory",
    "fsync_file",
    "is_lock_held",
    "liveness_lock",
]


# --- fsync --------------------------------------------------------------------------------------


def fsync_directory(path: Path | str) -> None:
    """Make the directory's entries (a created, renamed or removed file) survive a power loss.

    fsync on a file persists its data, not its name: without this a renamed or new file can
    vanish after a crash although its bytes reached the disk.

    >>> import tempfile
    >>> fsync_directory(tempfile.mkdtemp())
    """
    descriptor = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def fsync_file(path: Path | str) -> None:
    """Flush a file someone else wrote (e.g. PEFT's ``save_pretrained``, which does not fsync).

    >>> import tempfile, pathlib
    >>> file = pathlib.Path(tempfile.mkdtemp()) / "weights.bin"
    >>> _ = file.write_bytes(b"0123")
    >>> fsync_file(file)
    """
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


# --- atomic replacement -------------------------------------------------------------------------


_TEMPORARY_SUFFIX = ".tmp"


def abandoned_temporaries(path: Path | str) -> list[Path]:
    """The random-named temporaries :func:`atomic_write_bytes` left beside ``path`` when it was
    killed before its rename. Only the caller knows no writer of ``path`` is alive (it holds the
    file's owner lock), so it decides whether to remove them.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "outbox.jsonl"
    >>> _ = (target.parent / ".outbox.jsonl.0123abcd.tmp").write_text("half")
    >>> [p.name for p in abandoned_temporaries(target)]
    ['.outbox.jsonl.0123abcd.tmp']
    """
    target = Path(path)
    return sorted(target.parent.glob(f".{glob.escape(target.name)}.*{_TEMPORARY_SUFFIX}"))


def atomic_write_bytes(path: Path | str, data: bytes, *, temporary: Path | str | None = None) -> None:
    """Replace ``path`` with ``data`` so that readers, and the disk after a crash, see the old
    file or the new one, never a partial one.

    The bytes go to a temporary file in the same directory (a rename is only atomic within one
    file system), are fsynced, renamed over ``path``, and the directory is fsynced so the rename
    itself survives a power loss. The temporary name is random unless ``temporary`` names it:
    a caller that holds a lock and removes leftovers by name after a crash (the adapter
    registry) passes its fixed name. The new file gets the usual permissions (0666 less the
    umask), like any file the process creates, so other service users can read it.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "state.bin"
    >>> atomic_write_bytes(target, b"v1")
    >>> atomic_write_bytes(target, b"v2")
    >>> target.read_bytes(), [p.name for p in target.parent.iterdir()]
    (b'v2', ['state.bin'])
    """
    target = Path(path)
    if temporary is None:
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}{_TEMPORARY_SUFFIX}")
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    else:
        staging = Path(temporary)
        if staging.parent != target.parent:
            raise ValueError(f"the temporary file {staging} must sit in {target.parent} for the rename to be atomic")
        flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC  # a fixed name may be a crash's leftover
    descriptor = os.open(staging, flags, 0o666)
    try:
        with open(descriptor, "wb", closefd=True) as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(staging, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            staging.unlink()
        raise
    fsync_directory(target.parent)


def atomic_write_text(path: Path | str, text: str, *, temporary: Path | str | None = None) -> None:
    """:func:`atomic_write_bytes` for UTF-8 text.

    >>> import tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "note.txt"
    >>> atomic_write_text(target, "héllo\\n")
    >>> target.read_text(encoding="utf-8")
    'héllo\\n'
    """
    atomic_write_bytes(path, text.encode("utf-8"), temporary=temporary)


def atomic_write_json(
    path: Path | str,
    value: Any,
    *,
    indent: int | None = 2,
    sort_keys: bool = False,
    ensure_ascii: bool = False,
    default: Callable[[Any], Any] | None = None,
) -> None:
    """:func:`atomic_write_bytes` for one JSON document (newline-terminated). The value is
    serialised before anything is written, so an unserialisable value leaves the old file.

    >>> import json, tempfile, pathlib
    >>> target = pathlib.Path(tempfile.mkdtemp()) / "round.json"
    >>> atomic_write_json(target, {"status": "running", "round": 1}, sort_keys=True)
    >>> json.loads(target.read_text())
    {'round': 1, 'status': 'running'}
    """
    text = json.dumps(value, indent=indent, sort_keys=sort_keys, ensure_ascii=ensure_ascii, default=default)
    atomic_write_text(path, text + "\n")


# --- locking ------------------------------------------------------------------------------------


@contextlib.contextmanager
def file_lock(path: Path | str, *, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive ``flock`` on ``path`` (created if missing) for the ``with`` block.

    The lock belongs to the open file, not the process: two ``file_lock`` calls on one path
    exclude each other across processes *and* across threads of one process (each opens its own
    descriptor). It is not re-entrant: the same thread locking twice waits for itself. The lock
    file is never deleted: removing it would let a third process lock a fresh inode while a
    second still holds the old one. ``on_wait`` is called once if the lock is held elsewhere,
    before blocking (e.g. to log why a start-up is slow). Closing the descriptor releases it,
    so a crashed holder never leaves it locked.

    >>> import tempfile, pathlib
    >>> lock = pathlib.Path(tempfile.mkdtemp()) / "state.lock"
    >>> with file_lock(lock):
    ...     pass  # read-modify-write here
    >>> lock.exists()
    True
    """
    lock_path = Path(path)
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(descriptor, fcntl.LOCK_EX)
        yield
    finally:
        os.close(descriptor)


@contextlib.contextmanager
def liveness_lock(path: Path | str) -> Iterator[None]:
    """Create ``path`` and hold an ``flock`` on it for the ``with`` block, then delete it.

    It marks work in progress that a crash would leave half done (a staging directory): whoever
    finds the work later asks :func:`is_lock_held`, and a lock nobody holds means the worker died,
    however recently. The kernel drops the lock with the process, so a SIGKILL frees it too. The
    file must not exist yet (each piece of work names its own); callers create it under a lock the
    cleaner also takes, so a cleaner never sees it between creation and locking.

    >>> import tempfile, pathlib
    >>> marker = pathlib.Path(tempfile.mkdtemp()) / ".staging-1.lock"
    >>> with liveness_lock(marker):
    ...     is_lock_held(marker)
    True
    >>> marker.exists()
    False
    """
    lock_path = Path(path)
    descriptor = os.open(lock_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        yield
    finally:
        # Unlinked before it is unlocked: a checker never finds it unlocked while the work is live.
        with contextlib.suppress(FileNotFoundError):
            lock_path.unlink()
        os.close(descriptor)


def is_lock_held(path: Path | str) -> bool:
    """Whether some open file (in any process, this one included) holds an ``flock`` on ``path``;
    False when the file does not exist.

    >>> import tempfile, pathlib
    >>> lock = pathlib.Path(tempfile.mkdtemp()) / "x.lock"
    >>> is_lock_held(lock)
    False
    >>> with file_lock(lock):
    ...     is_lock_held(lock)
    True
    """
    try:
        descriptor = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return False
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(descriptor)
    return False


# --- JSON lines ---------------------------------------------------------------------------------


def _salvage(line: bytes) -> Any:
    """The whole JSON object at the end of a line that does not parse, or None.

    Before this module, RewardLog appended after a torn fragment, gluing a complete record onto
    it (``{"seq..{"sequence": 3, ...}``). That record was acknowledged, so its sequence number
    must count; the fragment is what gets ignored. Only a suffix that is exactly one object is
    accepted, so a line damaged elsewhere is not mistaken for one."""
    decoder = json.JSONDecoder()
    start = line.find(b'{"', 1)
    while start != -1:
        try:
            text = line[start:].decode("utf-8").strip()
            value, end = decoder.raw_decode(text)
            if end == len(text) and isinstance(value, dict):
                return value
        except ValueError:
            pass
        start = line.find(b'{"', start + 1)
    return None


def _decode(line: bytes) -> dict[str, Any] | None:
    try:
        value = json.loads(line)
    except ValueError:
        value = _salvage(line)
    return value if isinstance(value, dict) else None


class JsonLinesLog:
    """An append-only file of JSON objects, one per line, each durable when ``append`` returns.

    - **Durable**: every append is written, flushed and fsynced; the directory is fsynced when
      the append creates the file. An append that fails part-way (a full disk) is cut back off,
      so the file stays whole.
    - **Torn-tail repair**: a kill or power loss mid-append leaves the bytes after the last
      newline incomplete. Opening the log truncates them, so the next append starts on a clean
      line instead of gluing onto the fragment (which would make both unreadable). A torn
      record's append never returned, so nobody was told about it.
    - **Damaged lines** elsewhere (complete but unparseable) are skipped with a warning and left
      on disk for a person to inspect; a whole record glued after a fragment is still read.
    - **Sequence numbers** (``sequence_key``): ``append`` stamps each record with the next
      number, starting after the highest on disk, so a number is never handed out twice, across
      restarts too. Such a log is strictly append-only (``rewrite`` refuses).
    - **Thread-safe** within one process; one process writes a given log.
    - ``read()`` returns every record on disk; ``rewrite(records)`` replaces the whole file
      atomically (a queue such as the audit outbox drops delivered entries that way).

    Formats: records are written with ``ensure_ascii=False``; ``sort_keys`` keeps the key order
    each existing file already had.

    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "rewards.jsonl"
    >>> rewards = JsonLinesLog(path, sequence_key="sequence")
    >>> rewards.append({"reward": 0.5})
    {'sequence': 1, 'reward': 0.5}
    >>> with path.open("a") as handle:
    ...     _ = handle.write('{"sequence": 2, "rew')  # killed mid-write
    >>> reopened = JsonLinesLog(path, sequence_key="sequence")
    >>> reopened.append({"reward": 1.0})
    {'sequence': 2, 'reward': 1.0}
    >>> [record["reward"] for record in reopened.read()], reopened.last_sequence
    ([0.5, 1.0], 2)
    """

    def __init__(self, path: Path | str, *, sequence_key: str | None = None, sort_keys: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._sequence_key = sequence_key
        self._sort_keys = sort_keys
        self._lock = threading.Lock()
        self._last_sequence = 0
        self._count = 0
        self._open()

    # -- loading -------------------------------------------------------------------------------

    def _parse(self, data: bytes, *, warn: bool) -> list[dict[str, Any]]:
        records = []
        complete = data[: data.rfind(b"\n") + 1]
        for number, line in enumerate(complete.split(b"\n"), start=1):
            if not line.strip():
                continue
            record = _decode(line)
            if record is None:
                if warn:
                    log.warning("%s: line %d is damaged (%d bytes); skipped and left in place", self.path, number, len(line))
                continue
            records.append(record)
        return records

    def _open(self) -> None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return
        records = self._parse(data, warn=True)
        complete = data.rfind(b"\n") + 1
        if complete != len(data):
            log.warning("%s: dropping %d bytes of a torn last record", self.path, len(data) - complete)
            with self.path.open("r+b") as handle:
                handle.truncate(complete)
                handle.flush()
                os.fsync(handle.fileno())
        self._count = len(records)
        if self._sequence_key is not None:
            self._last_sequence = max((self._sequence_of(r) for r in records), default=0)

    def _sequence_of(self, record: Mapping[str, Any]) -> int:
        value = record.get(self._sequence_key) if self._sequence_key else None
        # bool is an int subclass; True is no sequence number.
        return value if isinstance(value, int) and not isinstance(value, bool) else 0

    # -- API -----------------------------------------------------------------------------------

    @property
    def last_sequence(self) -> int:
        """The highest sequence number on disk or handed out (0 if none, or without a key)."""
        with self._lock:
            return self._last_sequence

    def __len__(self) -> int:
        """Readable records on disk (damaged lines not counted)."""
        with self._lock:
            return self._count

    def _encode(self, record: Mapping[str, Any]) -> bytes:
        return (json.dumps(record, ensure_ascii=False, sort_keys=self._sort_keys) + "\n").encode("utf-8")

    def append(self, record: Mapping[str, Any]) -> dict[str, Any]:
        """Write ``record`` durably and return it as written (with its sequence number, if the
        log numbers records). Nothing is written, and no number used, if it does not serialise."""
        with self._lock:
            written = dict(record)
            if self._sequence_key is not None:
                if self._sequence_key in written:
                    raise ValueError(f"{self.path} numbers its records itself; drop {self._sequence_key!r} from the record")
                written = {self._sequence_key: self._last_sequence + 1, **written}
            line = self._encode(written)
            created = not self.path.exists()
            descriptor = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o666)
            try:
                size = os.fstat(descriptor).st_size
                try:
                    view = memoryview(line)
                    while view:
                        view = view[os.write(descriptor, view) :]
                    os.fsync(descriptor)
                except BaseException:
                    # A half-written line would swallow the next append; cut it back off.
                    with contextlib.suppress(OSError):
                        os.ftruncate(descriptor, size)
                    raise
            finally:
                os.close(descriptor)
            if created:
                fsync_directory(self.path.parent)
            if self._sequence_key is not None:
                self._last_sequence += 1
            self._count += 1
            return written

    def read(self) -> list[dict[str, Any]]:
        """Every readable record on disk, in file order."""
        with self._lock:
            try:
                data = self.path.read_bytes()
            except FileNotFoundError:
                return []
        return self._parse(data, warn=False)

    def rewrite(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Replace the whole log with ``records``, atomically (old file or new, never a mix)."""
        if self._sequence_key is not None:
            raise ValueError(f"{self.path} is numbered and append-only: rewriting it could hand out a number again")
        with self._lock:
            lines = [self._encode(record) for record in records]
            atomic_write_bytes(self.path, b"".join(lines))
            self._count = len(lines)
