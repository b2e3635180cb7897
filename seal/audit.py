"""Append-only, hash-chained audit log of every candidate, promotion, rejection and rollback.

Each record's hash covers its own content and the previous record's hash, so editing, deleting,
inserting or reordering records breaks the chain at that point, and ``verify`` says where. A
one-row head table, written in the same transaction as each record, holds the latest sequence
number and hash; it catches a cut-off tail, which leaves the chain itself intact.

Scope of the guarantee: this detects accidents and casual edits (a hand-run UPDATE, a restored
old backup, a truncated copy). Someone able to rewrite the file can also recompute every hash;
against that, publish ``head()`` somewhere they cannot write (a ticket, a signed log) and compare.

SQLite in WAL mode with ``synchronous=FULL``: a record that ``append`` returned survives a power
cut, and readers never block the writer. Appends are serialised by ``BEGIN IMMEDIATE``, so
several processes may share one file, and by a lock within this process.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from seal.gates import CandidateScores, Decision
from seal.guardrails import GuardrailSettings, redact_sensitive

GENESIS_HASH = "0" * 64
# 2: the audit_events index (idempotent reported events); a version-1 file is migrated on open.
SCHEMA_VERSION = 2
PAYLOAD_VERSION = 1

KIND_CANDIDATE = "candidate"
KIND_PROMOTE = "promote"
KIND_REJECT = "reject"
KIND_ROLLBACK = "rollback"
# The teacher's policy (the adapter that writes self-edits, trained by ReST^EM) changes status
# in a registry of its own; its transitions are reported under kinds of their own
# ("policy_promote", …) so that they never read as the served student's.
POLICY_KIND_PREFIX = "policy_"


def policy_kind(kind: str) -> str:
    """The audit kind of a transition of the teacher's policy.

    >>> policy_kind("promote")
    'policy_promote'
    """
    return POLICY_KIND_PREFIX + kind
# Other kinds are allowed (the list of events will grow); the pattern keeps them filterable.
_KIND = re.compile(r"[a-z][a-z0-9_.:-]{0,63}")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS audit_records (
    seq        INTEGER PRIMARY KEY CHECK (seq >= 1),
    at         TEXT NOT NULL,
    kind       TEXT NOT NULL,
    adapter_id TEXT,
    payload    TEXT NOT NULL,
    prev_hash  TEXT NOT NULL,
    hash       TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_records_kind ON audit_records (kind, seq);
CREATE INDEX IF NOT EXISTS audit_records_adapter ON audit_records (adapter_id, seq);
CREATE TABLE IF NOT EXISTS audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);
-- Guard rails against accidental edits through this or any other client; verify() is what
-- catches someone who drops them first.
CREATE TRIGGER IF NOT EXISTS audit_records_no_update BEFORE UPDATE ON audit_records
BEGIN SELECT RAISE(ABORT, 'audit_records is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_records_no_delete BEFORE DELETE ON audit_records
BEGIN SELECT RAISE(ABORT, 'audit_records is append-only'); END;
-- One row per reported event (``append_once``): the PRIMARY KEY on event_id is what makes a
-- retried delivery land once, however many writers race. Written in the same transaction as its
-- record; not part of the hash chain, which it only indexes.
CREATE TABLE IF NOT EXISTS audit_events (
    event_id TEXT PRIMARY KEY,
    seq      INTEGER NOT NULL UNIQUE
);
CREATE TRIGGER IF NOT EXISTS audit_events_no_update BEFORE UPDATE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
CREATE TRIGGER IF NOT EXISTS audit_events_no_delete BEFORE DELETE ON audit_events
BEGIN SELECT RAISE(ABORT, 'audit_events is append-only'); END;
"""


def canonical_json(value: Any) -> str:
    """The one serialisation that is hashed: sorted keys, no insignificant whitespace, UTF-8
    text as is, and no NaN/Infinity (which JSON does not have and other readers would reject)."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def record_hash(prev_hash: str, seq: int, at: str, kind: str, adapter_id: str | None, payload: Any) -> str:
    body = canonical_json({"seq": seq, "at": at, "kind": kind, "adapter_id": adapter_id, "payload": payload})
    # prev_hash is fixed-length hex, so plain concatenation is unambiguous.
    return hashlib.sha256((prev_hash + body).encode("utf-8")).hexdigest()


_SELECT = "SELECT seq, at, kind, adapter_id, payload, prev_hash, hash FROM audit_records"


class EventIdReused(ValueError):
    """A reported event's id is already on record for a different event."""


@dataclass(frozen=True)
class AuditRecord:
    seq: int
    at: str
    kind: str
    adapter_id: str | None
    payload: dict[str, Any]
    prev_hash: str
    hash: str

    def to_dict(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "at": self.at,
            "kind": self.kind,
            "adapter_id": self.adapter_id,
            # A fresh copy: the record is frozen, its payload dict should behave as if it were.
            "payload": json.loads(canonical_json(self.payload)),
            "prev_hash": self.prev_hash,
            "hash": self.hash,
        }


@dataclass(frozen=True)
class VerifyReport:
    ok: bool
    checked: int
    problems: list[str] = field(default_factory=list)


def _utc_now() -> datetime:
    return datetime.now(UTC)


class AuditLog:
    def __init__(self, path: Path, *, clock: Callable[[], datetime] = _utc_now, busy_timeout_s: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._clock = clock
        self._lock = threading.Lock()
        # Autocommit mode: transactions are opened explicitly, so their extent is visible here.
        self._conn = sqlite3.connect(
            self.path, timeout=busy_timeout_s, isolation_level=None, check_same_thread=False
        )
        try:
            mode = self._conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if mode.lower() != "wal":
                raise RuntimeError(f"{self.path}: SQLite refused WAL mode (got {mode!r}); is it on a network file system?")
            self._conn.execute("PRAGMA synchronous=FULL")
            self._create_schema()
        except BaseException:
            self._conn.close()
            raise

    def _create_schema(self) -> None:
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                version = self._conn.execute("PRAGMA user_version").fetchone()[0]
                if version > SCHEMA_VERSION:
                    raise RuntimeError(
                        f"{self.path}: audit schema version {version} is newer than this code ({SCHEMA_VERSION})"
                    )
                for statement in _SCHEMA.split(";\n"):
                    if statement.strip():
                        self._conn.execute(statement)
                if version < 2:
                    self._index_reported_events()
                self._conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                self._conn.execute("COMMIT")
            except BaseException:
                self._conn.execute("ROLLBACK")
                raise

    def _index_reported_events(self) -> None:
        """Migration to version 2: index the events a version-1 log already holds, so a delivery
        retried across the upgrade is still recognised. Reads payloads in Python rather than with
        SQLite's JSON functions, which not every build has; the first record of an id wins, as
        the old scan returned the first match."""
        rows = self._conn.execute("SELECT seq, payload FROM audit_records ORDER BY seq").fetchall()
        for seq, payload_text in rows:
            try:
                event_id = json.loads(payload_text).get("event_id")
            except (ValueError, AttributeError):
                continue  # an unreadable payload is verify()'s to report, not the migration's
            if isinstance(event_id, str) and event_id:
                self._conn.execute("INSERT OR IGNORE INTO audit_events (event_id, seq) VALUES (?, ?)", (event_id, seq))

    # -- writing ------------------------------------------------------------------------------

    def append(self, kind: str, adapter_id: str | None, payload: Mapping[str, Any]) -> AuditRecord:
        record, _ = self._append(kind, adapter_id, payload, event_id=None)
        return record

    def append_once(
        self, event_id: str, kind: str, adapter_id: str | None, payload: Mapping[str, Any]
    ) -> tuple[AuditRecord, bool]:
        """Append a reported event at most once: (its record, False) the first time, (the record
        already written, True) for every later delivery of the same ``event_id``.

        The UNIQUE key on ``audit_events.event_id`` decides, inside the writing transaction, so
        concurrent deliveries (threads or processes) cannot both get through. An id reused for a
        different kind or adapter is refused rather than answered with someone else's record."""
        if not isinstance(event_id, str) or not event_id:
            raise ValueError("event_id must be a non-empty string")
        record, duplicate = self._append(kind, adapter_id, payload, event_id=event_id)
        if duplicate and (record.kind, record.adapter_id) != (kind, adapter_id):
            raise EventIdReused(
                f"event_id {event_id!r} was already recorded as {record.kind} of {record.adapter_id!r} "
                f"(seq {record.seq}), not {kind} of {adapter_id!r}"
            )
        return record, duplicate

    def _append(
        self, kind: str, adapter_id: str | None, payload: Mapping[str, Any], *, event_id: str | None
    ) -> tuple[AuditRecord, bool]:
        if not isinstance(kind, str) or not _KIND.fullmatch(kind):
            raise ValueError(f"kind {kind!r} must match {_KIND.pattern}")
        if adapter_id is not None and not isinstance(adapter_id, str):
            raise TypeError(f"adapter_id must be a string or None, got {type(adapter_id).__name__}")
        if not isinstance(payload, Mapping):
            raise TypeError(f"payload must be a mapping, got {type(payload).__name__}")
        payload_text = canonical_json(dict(payload))
        # What is stored and hashed is the JSON form; the returned record shows exactly that
        # (tuples become lists, and so on), not the caller's objects.
        stored_payload = json.loads(payload_text)
        now = self._clock()
        if now.tzinfo is None:
            raise ValueError("the audit clock must return timezone-aware datetimes")
        at = now.astimezone(UTC).isoformat(timespec="microseconds")
        with self._lock:
            self._conn.execute("BEGIN IMMEDIATE")
            try:
                # The head, not MAX(seq), decides what comes next: if the tail was cut, the next
                # record keeps its true number and the gap stays visible to verify().
                head = self._conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
                prev_seq, prev_hash = head if head else (0, GENESIS_HASH)
                seq = prev_seq + 1
                if event_id is not None:
                    claimed = self._conn.execute(
                        "INSERT INTO audit_events (event_id, seq) VALUES (?, ?) ON CONFLICT (event_id) DO NOTHING",
                        (event_id, seq),
                    ).rowcount
                    if not claimed:
                        # Already recorded: nothing is written, the chain and head stay as they were.
                        (existing,) = self._conn.execute(
                            "SELECT seq FROM audit_events WHERE event_id = ?", (event_id,)
                        ).fetchone()
                        row = self._conn.execute(f"{_SELECT} WHERE seq = ?", (existing,)).fetchone()
                        self._conn.execute("ROLLBACK")
                        if row is None:
                            raise RuntimeError(
                                f"{self.path}: event {event_id!r} is indexed at seq {existing}, which is missing"
                                " (run verify)"
                            )
                        return self._record(row), True
                digest = record_hash(prev_hash, seq, at, kind, adapter_id, stored_payload)
                self._conn.execute(
                    "INSERT INTO audit_records (seq, at, kind, adapter_id, payload, prev_hash, hash)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (seq, at, kind, adapter_id, payload_text, prev_hash, digest),
                )
                self._conn.execute(
                    "INSERT INTO audit_head (id, seq, hash) VALUES (1, ?, ?)"
                    " ON CONFLICT (id) DO UPDATE SET seq = excluded.seq, hash = excluded.hash",
                    (seq, digest),
                )
                self._conn.execute("COMMIT")
            except BaseException:
                if self._conn.in_transaction:
                    self._conn.execute("ROLLBACK")
                raise
        return AuditRecord(seq, at, kind, adapter_id, stored_payload, prev_hash, digest), False

    # -- reading ------------------------------------------------------------------------------

    @staticmethod
    def _record(row: tuple[Any, ...]) -> AuditRecord:
        seq, at, kind, adapter_id, payload, prev_hash, digest = row
        return AuditRecord(seq, at, kind, adapter_id, json.loads(payload), prev_hash, digest)

    def records(
        self,
        *,
        kind: str | None = None,
        adapter_id: str | None = None,
        limit: int | None = None,
        after_seq: int | None = None,
    ) -> list[AuditRecord]:
        """Matching records in sequence order; ``limit`` keeps the first ones, ``after_seq``
        resumes a reader where it stopped."""
        clauses, params = [], []
        if kind is not None:
            clauses.append("kind = ?")
            params.append(kind)
        if adapter_id is not None:
            clauses.append("adapter_id = ?")
            params.append(adapter_id)
        if after_seq is not None:
            clauses.append("seq > ?")
            params.append(after_seq)
        sql = "SELECT seq, at, kind, adapter_id, payload, prev_hash, hash FROM audit_records"
        if clauses:
            sql += " WHERE " + " AND ".join(clauses)
        sql += " ORDER BY seq"
        if limit is not None:
            if limit < 0:
                raise ValueError(f"limit must be >= 0, got {limit}")
            sql += " LIMIT ?"
            params.append(limit)
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [self._record(row) for row in rows]

    def get(self, seq: int) -> AuditRecord:
        with self._lock:
            row = self._conn.execute(
                "SELECT seq, at, kind, adapter_id, payload, prev_hash, hash FROM audit_records WHERE seq = ?", (seq,)
            ).fetchone()
        if row is None:
            raise KeyError(f"no audit record with seq {seq}")
        return self._record(row)

    def head(self) -> tuple[int, str]:
        """(latest seq, its hash); (0, GENESIS_HASH) for an empty log. Worth publishing
        elsewhere from time to time: it pins everything up to that point."""
        with self._lock:
            row = self._conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
        return (row[0], row[1]) if row else (0, GENESIS_HASH)

    # -- checking -----------------------------------------------------------------------------

    def verify(self) -> VerifyReport:
        """Walk the whole chain and report every inconsistency found (not just the first)."""
        problems: list[str] = []
        checked = 0
        expected_seq, expected_prev = 1, GENESIS_HASH
        last: tuple[int, str] | None = None
        with self._lock:
            # One read transaction: a consistent snapshot even while other processes append.
            self._conn.execute("BEGIN")
            try:
                cursor = self._conn.execute(
                    "SELECT seq, at, kind, adapter_id, payload, prev_hash, hash FROM audit_records ORDER BY seq"
                )
                for seq, at, kind, adapter_id, payload_text, prev_hash, stored_hash in cursor:
                    checked += 1
                    if seq != expected_seq:
                        problems.append(
                            f"seq {seq}: expected seq {expected_seq} — records {expected_seq}..{seq - 1} are missing"
                            if seq > expected_seq
                            else f"seq {seq}: out of order after seq {expected_seq - 1}"
                        )
                    if prev_hash != expected_prev:
                        problems.append(
                            f"seq {seq}: prev_hash does not match the hash of the record before it"
                            " (a record was deleted, inserted or reordered)"
                        )
                    try:
                        payload = json.loads(payload_text)
                    except ValueError:
                        problems.append(f"seq {seq}: payload is not valid JSON (edited)")
                    else:
                        if canonical_json(payload) != payload_text:
                            problems.append(f"seq {seq}: payload text is not in canonical form (edited)")
                        if record_hash(prev_hash, seq, at, kind, adapter_id, payload) != stored_hash:
                            problems.append(f"seq {seq}: content does not match its hash (record edited)")
                    expected_seq, expected_prev = seq + 1, stored_hash
                    last = (seq, stored_hash)
                head = self._conn.execute("SELECT seq, hash FROM audit_head WHERE id = 1").fetchone()
            finally:
                self._conn.execute("COMMIT")
        if head is None:
            if last is not None:
                problems.append(f"head record is missing, but the log holds {checked} records")
        elif last is None:
            problems.append(f"head says the log ends at seq {head[0]}, but the log is empty (truncated)")
        elif tuple(head) != last:
            if head[0] > last[0]:
                problems.append(
                    f"head says the log ends at seq {head[0]}, but it ends at seq {last[0]}: the tail was truncated"
                )
            else:
                problems.append(
                    f"head (seq {head[0]}, hash {head[1][:12]}…) disagrees with the last record "
                    f"(seq {last[0]}, hash {last[1][:12]}…): head or tail was tampered with"
                )
        return VerifyReport(ok=not problems, checked=checked, problems=problems)

    # -- lifecycle ----------------------------------------------------------------------------

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --- payloads --------------------------------------------------------------------------------
# The payload schema lives here, so every writer records the same fields under the same names.


def candidate_payload(
    *,
    context_digest: str,
    prompt: str,
    self_edit: str,
    hyperparameters: Mapping[str, Any],
    seed: int,
    scores: CandidateScores,
    decision: Decision,
) -> dict[str, Any]:
    """Everything needed to explain, and to re-run, one candidate: the inputs to training, the
    scores, and each gate's verdict."""
    return {
        "payload_version": PAYLOAD_VERSION,
        "context_digest": context_digest,
        "prompt": prompt,
        "self_edit": self_edit,
        "hyperparameters": dict(hyperparameters),
        "seed": seed,
        "scores": scores.to_dict(),
        "gates": [g.to_dict() for g in decision.gates],
        "decision": {"promote": decision.promote, "failed_reasons": decision.failed_reasons},
    }


def text_sha256(text: str) -> str:
    """The digest a manifest records of the self-edit it was trained on (``self_edit_sha256``,
    seal.student.self_edit_digest), so a redacted record can still be matched to its adapter."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def stored_self_edit(
    self_edit: str, prompt: str, *, context: str, guardrails: GuardrailSettings
) -> dict[str, Any]:
    """The ``self_edit``, ``prompt`` and ``self_edit_sha256`` fields of a record, as they may be
    kept: what the secrets and personal-data guardrails find is replaced by its masked form (the
    log is append-only, so a secret written once could never be purged), and the hash of the
    original text is kept so the record still identifies it. ``redacted_rules`` says which rules
    masked something; absent when the text is stored as written."""
    edit = redact_sensitive(self_edit, context, guardrails)
    asked = redact_sensitive(prompt, context, guardrails)
    fields: dict[str, Any] = {"self_edit": edit.text, "prompt": asked.text, "self_edit_sha256": text_sha256(self_edit)}
    rules = sorted(set(edit.rules) | set(asked.rules))
    if rules:
        fields["redacted_rules"] = rules
    return fields


def cause_payload(cause: str, **details: Any) -> dict[str, Any]:
    """Payload of a promote, reject or rollback record: why it happened, plus any details
    (previous adapter, operator, request id)."""
    if not cause or not cause.strip():
        raise ValueError("a promote/reject/rollback record needs a cause")
    reserved = {"cause", "payload_version"} & details.keys()
    if reserved:
        raise ValueError(f"detail names {sorted(reserved)} are reserved")
    return {"payload_version": PAYLOAD_VERSION, "cause": cause, **details}
