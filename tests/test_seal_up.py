"""``seal up`` as a developer runs it: one process serving student, auditor and teacher on their
configured addresses (``seal.stack.local_stack``, the function the tests use on free ports), until
Ctrl-C. Ports are free ones picked here, never the defaults a developer's own ``seal up`` holds."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from seal.cli.supervisor import FULL_NAMES, SERVICES
from seal.rpc import wait_until_serving

REPO_ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _up(tiny_model_dir: Path, tmp_path: Path) -> tuple[subprocess.Popen[bytes], Path, dict[str, str], dict[str, int]]:
    """``seal up --insecure`` on free configured ports, its output in ``tmp_path/up.log``."""
    env = {
        **os.environ, "SEAL_HOME": str(tmp_path / "home"), "SEAL_MODEL__PATH": str(tiny_model_dir),
        "SEAL_MODEL__TORCH_THREADS": "1", "SEAL_STUDENT_SERVING__BACKEND": "in_process",
    }
    addresses: dict[str, str] = {}
    metrics: dict[str, int] = {}
    for name in SERVICES:
        port, metrics[name] = _free_port(), _free_port()
        addresses[name] = f"127.0.0.1:{port}"
        env[f"SEAL_SERVICES__{name.upper()}_PORT"] = str(port)
        env[f"SEAL_SERVICES__{name.upper()}_ADDRESS"] = addresses[name]
        env[f"SEAL_SERVICES__{name.upper()}_METRICS_PORT"] = str(metrics[name])
    log = tmp_path / "up.log"
    with log.open("wb") as out:
        # -X faulthandler: a hang is diagnosed (SIGABRT dumps every thread's stack into the log).
        up = subprocess.Popen([sys.executable, "-X", "faulthandler", "-m", "seal.cli", "up", "--insecure"], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True)
    return up, log, addresses, metrics


def _assert_stopped(up: subprocess.Popen[bytes], log: Path, addresses: dict[str, str]) -> None:
    try:
        try:
            status = up.wait(timeout=180)
        except subprocess.TimeoutExpired:
            up.send_signal(signal.SIGABRT)
            up.wait(timeout=30)
            pytest.fail(f"seal up did not stop within 180 s of Ctrl-C:\n{log.read_text(errors='replace')[-8000:]}")
        assert status == 0, log.read_text(errors="replace")[-4000:]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    for name in SERVICES:
        with pytest.raises(TimeoutError):
            wait_until_serving(addresses[name], FULL_NAMES[name], timeout=2)


def test_seal_up_serves_the_three_services_until_ctrl_c(tiny_model_dir: Path, tmp_path: Path) -> None:
    up, log, addresses, metrics = _up(tiny_model_dir, tmp_path)
    try:
        for name in SERVICES:
            try:
                wait_until_serving(addresses[name], FULL_NAMES[name], timeout=240)
            except TimeoutError:
                pytest.fail(f"{name} not serving:\n{log.read_text(errors='replace')[-4000:]}")
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics[name]}/metrics", timeout=10).read().decode()
            assert f"seal_{name}_rpc_requests_total" in body
    finally:
        up.send_signal(signal.SIGINT)  # Ctrl-C
    _assert_stopped(up, log, addresses)
    output = log.read_text(errors="replace")
    assert "auth.insecure is on" in output  # a warning: on the console too
    # Everything else the services log goes to <home>/logs/services.log, not over the command's output.
    assert "listening on" not in output
    services_log = (tmp_path / "home" / "logs" / "services.log").read_text(errors="replace")
    assert all(f"{name} listening on 127.0.0.1:" in services_log for name in SERVICES)


def test_ctrl_c_while_the_services_start_stops_them_all(tiny_model_dir: Path, tmp_path: Path) -> None:
    """An interrupt in the middle of the start (here: the student serves, the others are still
    loading) is held until all three have started, then stops them all: no half-started service
    keeps the process alive."""
    up, log, addresses, _ = _up(tiny_model_dir, tmp_path)
    try:
        wait_until_serving(addresses["student"], FULL_NAMES["student"], timeout=240)
    finally:
        up.send_signal(signal.SIGINT)
    _assert_stopped(up, log, addresses)
