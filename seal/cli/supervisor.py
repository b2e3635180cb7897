"""A service as a child process: :class:`ServiceProcess` is the one way a ``seal serve NAME``
child is started, waited for and stopped, for whatever needs real processes (the SIGKILL tests,
the load bench). ``seal up`` and ``seal demo`` run the three services in their own process
instead (``seal.stack.local_stack`` on the configured ports)."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from pathlib import Path

from seal.config import AuthSettings

SERVICES = ("student", "auditor", "teacher")  # start order: each needs the ones before it
FULL_NAMES = {  # the gRPC service each child is healthy for
    "student": "seal.v1.StudentService",
    "auditor": "seal.v1.AuditorService",
    "teacher": "seal.v1.TeacherService",
}


class ServiceProcess:
    """One ``seal serve NAME`` child in its own session, its output appended to ``log``.

    ``port`` / ``metrics_port``: passed as ``--port`` / ``--metrics-port`` when given (0 = a free
    one, whose number :meth:`wait_for_address` reads from the log); otherwise the configured ones."""

    def __init__(
        self,
        name: str,
        *,
        env: dict[str, str],
        log: Path,
        port: int | None = None,
        metrics_port: int | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name, self.log = name, Path(log)
        args = [sys.executable, "-m", "seal.cli", "serve", name]
        if port is not None:
            args += ["--port", str(port)]
        if metrics_port is not None:
            args += ["--metrics-port", str(metrics_port)]
        self.log.parent.mkdir(parents=True, exist_ok=True)
        self._log_start = self.log.stat().st_size if self.log.exists() else 0  # earlier starts wrote above it
        with self.log.open("ab") as out:
            self.process = subprocess.Popen(
                args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd, start_new_session=True
            )

    @property
    def pid(self) -> int:
        return self.process.pid

    def output(self) -> str:
        """What this start wrote to the log."""
        return self.log.read_bytes()[self._log_start:].decode(errors="replace")

    def _check_alive(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with status {self.process.returncode}:\n{self.output()[-4000:]}")

    def wait_for_address(self, timeout: float) -> str:
        """The address the child printed once it was serving (``NAME serving on HOST:PORT``)."""
        pattern = re.compile(rf"{re.escape(self.name)} serving on ([0-9.]+:[0-9]+)")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if match := pattern.search(self.output()):
                return match[1]
            self._check_alive()
            time.sleep(0.1)
        raise TimeoutError(f"{self.name} not serving after {timeout:.0f}s:\n{self.output()[-4000:]}")

    def wait_serving(self, address: str, timeout: float, auth: AuthSettings | None = None) -> None:
        """Until the child's health service says SERVING for its own gRPC service at ``address``."""
        from seal.rpc import wait_until_serving

        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                wait_until_serving(address, FULL_NAMES[self.name], timeout=5, auth=auth)
                return
            except TimeoutError:
                continue
        raise TimeoutError(f"{self.name} not serving after {timeout:.0f}s:\n{self.output()[-4000:]}")

    def terminate(self) -> None:
        """SIGTERM (graceful: the service drains) without waiting; see :meth:`stop`."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)

    def stop(self, grace: float = 60.0) -> int:
        """SIGTERM, then SIGKILL if it has not exited after ``grace`` seconds; its exit status."""
        self.terminate()
        try:
            return self.process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            self.process.kill()
            return self.process.wait()

    def kill(self) -> None:
        """SIGKILL, as a crash would."""
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)
