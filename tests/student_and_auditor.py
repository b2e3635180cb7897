"""A student and an auditor on free ports, wired to each other, with a channel to each: the pair a
test of what those two services accept and store needs (the teacher is not involved)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc

from seal.config import Settings
from seal.v1 import auditor_pb2_grpc, student_pb2_grpc


@contextmanager
def student_and_auditor(settings: Settings) -> Iterator[dict[str, Any]]:
    """``settings`` (home, model) for both; yields the settings the auditor was started with (the
    student's address filled in), a stub and a channel per service."""
    from auditor_svc.servicer import serve_auditor
    from student_svc.servicer import serve_student

    started = []
    try:
        # metrics_port=0: a free /metrics port, never the default a running `seal up` holds.
        student = serve_student(settings, port=0, metrics_port=0)
        started.append(student)
        settings = settings.model_copy(
            update={"services": settings.services.model_copy(update={"student_address": student.address})}
        )
        auditor = serve_auditor(settings, port=0, metrics_port=0)
        started.append(auditor)
        student.connect["auditor"](auditor.address)
        with grpc.insecure_channel(student.address) as s_channel, grpc.insecure_channel(auditor.address) as a_channel:
            yield {
                "settings": settings,
                "student": student_pb2_grpc.StudentServiceStub(s_channel),
                "auditor": auditor_pb2_grpc.AuditorServiceStub(a_channel),
                "channels": {"StudentService": s_channel, "AuditorService": a_channel},
            }
    finally:
        for service in reversed(started):
            service.stop(grace=1.0)
