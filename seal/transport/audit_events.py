"""Delivery of audit-outbox events (seal.audit_outbox) to the auditor's RecordEvent.

The outbox is transport-free and retries any ``send(event)`` that raises; this is the gRPC one.
Each service reports under its own identity (``auth.<identity>_token_file`` and/or its client
certificate), and the auditor accepts from each only the kinds that are its to report: the
student its adapters' transitions, the teacher its policy's (``seal.audit.policy_kind``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from seal.rpc import dial
from seal.transport import convert
from seal.v1 import auditor_pb2, auditor_pb2_grpc

if TYPE_CHECKING:
    from seal.config import AuthSettings


class AuditEventSender:
    """``send(event)`` for an outbox: one RecordEvent per event, under ``identity``. ``kind_of``
    maps the registry's transition kind to the audit kind reported (the teacher's policy:
    ``policy_kind``)."""

    def __init__(
        self, address: str, auth: AuthSettings, *, identity: str, kind_of: Callable[[str], str] = str
    ) -> None:
        self._channel = dial(address, auth, identity=identity)
        self._stub = auditor_pb2_grpc.AuditorServiceStub(self._channel)
        self._kind_of = kind_of

    def __call__(self, event: dict[str, Any]) -> None:
        self._stub.RecordEvent(
            auditor_pb2.RecordEventRequest(
                event_id=event["event_id"],
                kind=self._kind_of(event["kind"]),
                adapter_id=event["adapter_id"],
                cause=event["cause"],
                details=convert.struct(event["details"]),
                at=convert.timestamp(event["at"]),
                source=event["source"],
            ),
            timeout=10,
        )

    def close(self) -> None:
        self._channel.close()
