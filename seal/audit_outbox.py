"""A durable outbox for audit events reported by a process that does not own the audit log.

The auditor owns the hash-chained log; the student changes adapter statuses. A promote, reject
or rollback is first written here (fsynced), then delivered in order by a background thread,
retried with backoff until the owner acknowledges it. Each event carries an id the owner
de-duplicates on, so a delivery retried after a lost acknowledgement is recorded once.

Why an outbox rather than a direct call: a status change must never be blocked or undone
because the auditor is briefly unavailable (a rollback during an incident least of all), and
it must never be silently lost either. Events wait on disk until delivered, across restarts.

Transport-free: delivery is any ``send(event)`` callable that raises on failure.
"""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from seal.durable import JsonLinesLog

log = logging.getLogger(__name__)

Sender = Callable[[dict[str, Any]], None]


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
        self._source = source
        self._send = send
        self._min_backoff, self._max_backoff = min_backoff_s, max_backoff_s
        self._condition = threading.Condition()
        self._log = JsonLinesLog(self.path)
        self._pending: list[dict[str, Any]] = self._log.read()
        self._delivered = 0
        self._failures = 0
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=f"{source}-audit-outbox", daemon=True)
        self._thread.start()

    def _persist(self) -> None:
        # Rewritten whole and renamed into place: the file is small (undelivered events only),
        # and a crash leaves either the old or the new list, never a mix.
        self._log.rewrite(self._pending)

    # -- API ----------------------------------------------------------------------------------

    def set_sender(self, send: Sender | None) -> None:
        with self._condition:
            self._send = send
            self._condition.notify_all()

    def record(self, kind: str, adapter_id: str, cause: str, **details: Any) -> dict[str, Any]:
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
        self.flush(timeout)
        with self._condition:
            self._closed = True
            self._condition.notify_all()
        self._thread.join(timeout=timeout + 1)

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
