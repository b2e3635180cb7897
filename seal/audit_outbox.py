"""A durable outbox for audit events reported by a process that does not own the audit log.

The auditor owns the hash-chained log; the student changes adapter statuses. A promote, reject
or rollback is first written here (fsynced), then delivered in order by a background thread,
retried with backoff until the owner acknowledges it. Each event carries an id the owner
de-duplicates on, so a delivery retried after a lost acknowledgement is recorded once.

Why an outbox rather than a direct call: a status change must never be blocked or undone
because the auditor is briefly unavailable (a rollback during an incident least of all), and
it must never be silently lost either. Events wait on disk until delivered, across restarts.

Exactly one event per registry transition, even under SIGKILL: the outbox is also the registry's
``TransitionJournal``. The registry writes an intent here (fsynced) before it touches a manifest,
under a transition id that every manifest write carries and that becomes the event id. After the
writes, the caller's ``record`` turns the intent into the event with the request's details (who
asked). A kill at any point leaves either the intent, which the next start reconciles against the
manifests (``AdapterRegistry.reconcile``: reported once if it happened, dropped if not), or the
event itself. The process holds an ``flock`` on ``<outbox>.lock`` for the outbox's lifetime: one
owner per file, and temporary files found at open belong to a dead owner and are removed.

Transport-free: delivery is any ``send(event)`` callable that raises on failure.
"""

from __future__ import annotations

import fcntl
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from seal.durable import JsonLinesLog, abandoned_temporaries
from seal.registry import Transition

log = logging.getLogger(__name__)

Sender = Callable[[dict[str, Any]], None]

# An intent is stored as {"intent": <Transition.to_dict()>}; everything else in the file is an event.
_INTENT = "intent"


class OutboxInUse(RuntimeError):
    """Another open outbox (in this process or another) owns the file."""


def event_from_transition(transition: Transition, source: str, *, cause: str | None = None,
                          details: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The audit event reporting ``transition``; its id is the transition's, so however often it
    is produced (a retried delivery, a report after recovery) the auditor records it once."""
    return {
        "event_id": transition.transition_id,
        "kind": transition.kind,
        "adapter_id": transition.adapter_id,
        "cause": cause if cause is not None else transition.cause,
        "details": {**dict(transition.details), **dict(details or {})},
        "at": transition.at,
        "source": source,
    }


def _hold_owner_lock(path: Path) -> int:
    descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(descriptor)
        raise OutboxInUse(f"{path} is held: another audit outbox on this file is open (one owner per file)") from None
    return descriptor


class AuditOutbox:
    def __init__(
        self,
        path: Path | str,
        send: Sender | None = None,
        *,
        source: str,
        min_backoff_s: float = 0.2,
        max_backoff_s: float = 30.0,
    ) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._owner_lock = _hold_owner_lock(self.path.with_name(self.path.name + ".lock"))
        try:
            stored = self._open_owned()
        except BaseException:
            os.close(self._owner_lock)
            raise
        self._source = source
        self._send = send
        self._min_backoff, self._max_backoff = min_backoff_s, max_backoff_s
        self._condition = threading.Condition()
        self._pending: list[dict[str, Any]] = [r for r in stored if _INTENT not in r]
        # Intents of a previous process stay until the registry reconciles them (``unsettled``).
        self._intents: dict[str, Transition] = {
            t.transition_id: t for t in (Transition.from_dict(r[_INTENT]) for r in stored if _INTENT in r)
        }
        # Made by this process and written to the manifests: waiting for the caller's report.
        self._awaiting_report: set[str] = set()
        self._delivered = 0
        self._failures = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"{source}-audit-outbox", daemon=True)
        self._thread.start()

    def _open_owned(self) -> list[dict[str, Any]]:
        """Clean up after a dead owner (we hold the owner lock now) and read what it left."""
        for leftover in abandoned_temporaries(self.path):
            # A temporary beside the file is a rewrite a dead owner never renamed into place.
            leftover.unlink(missing_ok=True)
            log.info("removed %s, left by an outbox writer that died", leftover)
        self._log = JsonLinesLog(self.path)
        return self._log.read()

    def _persist(self) -> None:
        # Rewritten whole and renamed into place: the file is small (open intents and undelivered
        # events only), and a crash leaves either the old or the new list, never a mix.
        self._log.rewrite([*({_INTENT: t.to_dict()} for t in self._intents.values()), *self._pending])

    # -- the registry's journal ------------------------------------------------------------------

    def intend(self, transition: Transition) -> None:
        with self._condition:
            self._log.append({_INTENT: transition.to_dict()})  # fsynced before the manifest changes
            self._intents[transition.transition_id] = transition

    def settle(self, transition_id: str, *, happened: bool, awaits_report: bool) -> None:
        with self._condition:
            transition = self._intents.get(transition_id)
            if transition is None:
                return
            if happened and awaits_report:
                self._awaiting_report.add(transition_id)  # ``record`` will add who asked
                return
            del self._intents[transition_id]
            if happened:
                self._pending.append(event_from_transition(transition, self._source))
            self._persist()
            self._condition.notify_all()

    def unsettled(self) -> list[Transition]:
        with self._condition:
            return [t for t in self._intents.values() if t.transition_id not in self._awaiting_report]

    def _claim(self, kind: str, adapter_id: str) -> Transition | None:
        """The oldest transition of ``kind`` on ``adapter_id`` that awaits its report."""
        for transition_id in list(self._intents):
            transition = self._intents[transition_id]
            if transition_id in self._awaiting_report and (transition.kind, transition.adapter_id) == (kind, adapter_id):
                self._awaiting_report.discard(transition_id)
                del self._intents[transition_id]
                return transition
        return None

    def _release_awaiting(self) -> None:
        """Unreported transitions (the caller failed after the registry change) go out as they are."""
        for transition_id in sorted(self._awaiting_report, key=list(self._intents).index):
            self._pending.append(event_from_transition(self._intents.pop(transition_id), self._source))
        if self._awaiting_report:
            self._awaiting_report.clear()
            self._persist()

    # -- API ----------------------------------------------------------------------------------

    def set_sender(self, send: Sender | None) -> None:
        with self._condition:
            self._send = send
            self._condition.notify_all()

    def record(self, kind: str, adapter_id: str, cause: str, **details: Any) -> dict[str, Any]:
        """Report a status change. If the registry journaled it here (a transition of ``kind`` on
        ``adapter_id`` awaiting its report), the event is that transition's, with ``details``
        added: one event per transition, never a second one."""
        with self._condition:
            transition = self._claim(kind, adapter_id)
            if transition is not None:
                event = event_from_transition(transition, self._source, cause=cause, details=details)
                self._pending.append(event)
                self._persist()  # intent out, event in: one atomic rewrite
                self._condition.notify_all()
                return event
        event = {
            "event_id": uuid.uuid4().hex,
            "kind": kind,
            "adapter_id": adapter_id,
            "cause": cause,
            "details": details,
            "at": datetime.now(UTC).isoformat(timespec="microseconds"),
            "source": self._source,
        }
        with self._condition:
            # On disk (fsynced) before it is pending: an event that failed to persist is not
            # delivered either, and the caller sees the error.
            self._log.append(event)
            self._pending.append(event)
            self._condition.notify_all()
        return event

    def flush(self, timeout: float) -> bool:
        """Wait until everything recorded so far is delivered; False if time ran out."""
        with self._condition:
            return self._condition.wait_for(lambda: not self._pending or self._closed, timeout=timeout) and not self._pending

    @property
    def pending(self) -> int:
        with self._condition:
            return len(self._pending)

    @property
    def delivered(self) -> int:
        with self._condition:
            return self._delivered

    @property
    def failures(self) -> int:
        with self._condition:
            return self._failures

    def close(self, timeout: float = 2.0) -> None:
        """Try to deliver what is pending, then stop; anything left stays on disk for next time."""
        with self._condition:
            self._release_awaiting()
            self._condition.notify_all()
        self.flush(timeout)
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join(timeout=timeout + 1)
        with self._condition:
            owner_lock, self._owner_lock = self._owner_lock, -1
        if owner_lock >= 0:
            os.close(owner_lock)  # the next owner may open the outbox now

    # -- delivery -----------------------------------------------------------------------------

    def _run(self) -> None:
        backoff = self._min_backoff
        while True:
            with self._condition:
                self._condition.wait_for(lambda: self._closed or (self._pending and self._send is not None))
                if self._closed:
                    return
                event, send = self._pending[0], self._send
            try:
                send(event)  # type: ignore[misc]
            except Exception as exc:  # noqa: BLE001 - any failure means: keep it and retry later
                with self._condition:
                    self._failures += 1
                    log.warning("audit event %s (%s %s) not delivered yet: %s", event["event_id"], event["kind"], event["adapter_id"], exc)
                    self._condition.wait(backoff)
                backoff = min(backoff * 2, self._max_backoff)
                continue
            backoff = self._min_backoff
            with self._condition:
                if self._pending and self._pending[0]["event_id"] == event["event_id"]:
                    self._pending.pop(0)
                    self._persist()
                self._delivered += 1
                self._condition.notify_all()
