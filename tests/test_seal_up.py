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


def test_seal_up_serves_the_three_services_until_ctrl_c(tiny_model_dir: Path, tmp_path: Path) -> None:
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
        up = subprocess.Popen([sys.executable, "-m", "seal.cli", "up", "--insecure"], stdout=out,
                              stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT, start_new_session=True)
    try:
        for name in SERVICES:
            try:
                wait_until_serving(addresses[name], FULL_NAMES[name], timeout=240)
            except TimeoutError:
                pytest.fail(f"{name} not serving:\n{log.read_text(errors='replace')[-4000:]}")
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics[name]}/metrics", timeout=10).read().decode()
            assert f"seal_{name}_rpc_requests_total" in body
        up.send_signal(signal.SIGINT)  # Ctrl-C
        assert up.wait(timeout=120) == 0, log.read_text(errors="replace")[-4000:]
    finally:
        if up.poll() is None:
            up.kill()
            up.wait()
    for name in SERVICES:
        with pytest.raises(TimeoutError):
            wait_until_serving(addresses[name], FULL_NAMES[name], timeout=2)
    output = log.read_text(errors="replace")
    assert "auth.insecure is on" in output  # a warning: on the console too
    # Everything else the services log goes to <home>/logs/services.log, not over the command's output.
    assert "listening on" not in output
    services_log = (tmp_path / "home" / "logs" / "services.log").read_text(errors="replace")
    assert all(f"{name} listening on 127.0.0.1:" in services_log for name in SERVICES)
