"""The three services as child processes (``seal serve NAME`` each) on their configured loopback
addresses: what ``seal up`` and ``seal demo`` run. Tests and benchmarks that want the services in
their own process use ``seal.stack.local_stack`` instead (ephemeral ports, no child processes)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from seal.cli import render
from seal.config import AuthSettings, Settings

SERVICES = ("student", "auditor", "teacher")  # start order: each needs the ones before it
FULL_NAMES = {  # the gRPC service each child is healthy for
    "student": "seal.v1.StudentService",
    "auditor": "seal.v1.AuditorService",
    "teacher": "seal.v1.TeacherService",
}


@contextmanager
def local_services(settings: Settings, *, startup_timeout: float = 600.0) -> Iterator[dict[str, str]]:
    """Run the three services as child processes on loopback; stop them on exit. They read the
    same settings as this process (environment and config file), plus auth.insecure when
    ``settings.auth.insecure`` is on (seal up/demo --insecure)."""
    from seal.auth import check_server_settings

    check_server_settings(settings.auth)  # a missing principals file or certificate fails here, not in a child log
    auth_env = {"SEAL_AUTH__INSECURE": "true"} if settings.auth.insecure else {}
    log_dir = settings.home / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    children: list[subprocess.Popen[bytes]] = []
    addresses = {name: settings.services.address_of(name) for name in SERVICES}
    try:
        for name in SERVICES:
            log_path = log_dir / f"{name}.log"
            with log_path.open("ab") as log_file:
                child = subprocess.Popen(
                    [sys.executable, "-m", "seal.cli", "serve", name],
                    stdout=log_file,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "SEAL_HOME": str(settings.home), **auth_env},
                    start_new_session=True,
                )
            children.append(child)
            with render.console.status(f"starting {name} (log: {log_path})"):
                try:
                    wait_for_child(child, addresses[name], FULL_NAMES[name], startup_timeout, settings.auth)
                except (TimeoutError, RuntimeError) as exc:
                    tail = log_path.read_text(errors="replace")[-3000:]
                    raise RuntimeError(f"{name} did not start: {exc}\n--- {log_path} ---\n{tail}") from exc
            render.console.print(f"[green]✓[/] {name} on {addresses[name]}")
        yield addresses
    finally:
        for child in reversed(children):
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)
        for child in reversed(children):
            try:
                child.wait(timeout=settings.services.shutdown_grace_s + 10)
            except subprocess.TimeoutExpired:
                child.kill()


def wait_for_child(
    child: subprocess.Popen[bytes], address: str, service: str, timeout: float, auth: AuthSettings | None = None
) -> None:
    from seal.rpc import wait_until_serving

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if child.poll() is not None:
            raise RuntimeError(f"exited with status {child.returncode}")
        try:
            wait_until_serving(address, service, timeout=5, auth=auth)
            return
        except TimeoutError:
            continue
    raise TimeoutError(f"not serving after {timeout:.0f}s")
