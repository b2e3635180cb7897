"""All three services in one process: ``seal up`` and ``seal demo`` on their configured ports,
tests, benchmarks and notebooks on ephemeral ones. Production runs each service in its own
process or pod (``seal serve``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Literal

from seal.config import Settings
from seal.rpc import CONFIGURED, RunningService
from seal.tracing import Tracing


@dataclass
class LocalStack:
    settings: Settings
    student: RunningService
    auditor: RunningService
    teacher: RunningService

    @property
    def addresses(self) -> dict[str, str]:
        return {"student": self.student.address, "auditor": self.auditor.address, "teacher": self.teacher.address}


@contextmanager
def local_stack(
    settings: Settings,
    *,
    ports: Literal["free", "configured"] = "free",
    student_backend: str | None = "in_process",
    tracing: Mapping[str, Tracing] | None = None,
    grace_s: float = 1.0,
) -> Iterator[LocalStack]:
    """Start student, auditor and teacher, each told the others' real addresses; stop them (each
    draining for up to ``grace_s``) when the block ends.

    ``ports``: "free" = ephemeral gRPC and /metrics ports (tests and benches never collide with a
    running ``seal up``); "configured" = the ones ``settings.services`` gives (``seal up``).

    ``student_backend`` overrides ``settings.student_serving.backend``; in_process by default, so
    that pipeline tests do not pay a tritonserver start each (tests/test_student_triton.py runs
    the stack with "triton"). None keeps what the settings say.

    ``tracing`` maps a service name to the tracing it uses instead of what ``settings.tracing``
    says (tests give each service its own in-memory exporter)."""
    tracing = tracing or {}
    if student_backend is not None:
        settings = settings.model_copy(update={"student_serving": settings.student_serving.model_copy(
            update={"backend": student_backend})})
    from auditor_svc.servicer import serve_auditor
    from student_svc.servicer import serve_student
    from teacher_svc.servicer import serve_teacher

    port = metrics_port = 0 if ports == "free" else CONFIGURED
    started: list[RunningService] = []
    try:
        student = serve_student(settings, port=port, metrics_port=metrics_port, tracing=tracing.get("student"))
        started.append(student)
        settings = settings.model_copy(
            update={"services": settings.services.model_copy(update={"student_address": student.address})}
        )
        auditor = serve_auditor(settings, port=port, metrics_port=metrics_port, tracing=tracing.get("auditor"))
        started.append(auditor)
        if "auditor" in student.connect:
            student.connect["auditor"](auditor.address)
        settings = settings.model_copy(
            update={"services": settings.services.model_copy(update={"auditor_address": auditor.address})}
        )
        teacher = serve_teacher(settings, port=port, metrics_port=metrics_port, tracing=tracing.get("teacher"))
        started.append(teacher)
        yield LocalStack(settings, student, auditor, teacher)
    finally:
        for service in reversed(started):
            service.stop(grace=grace_s)
