"""``seal up``'s supervisor (seal.cli.supervisor.local_services): three ``seal serve`` children
on their configured addresses — free ports picked here, never the defaults a developer's own
``seal up`` holds — serving until the block ends, and gone after it."""

from __future__ import annotations

import socket
import urllib.request
from pathlib import Path

import pytest

from seal.cli.supervisor import FULL_NAMES, SERVICES, local_services
from seal.config import Settings
from seal.rpc import wait_until_serving


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_seal_up_serves_the_three_services_and_stops_them(
    tiny_model_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The children read the environment, as `seal serve` in a container does.
    env = {
        "SEAL_HOME": str(tmp_path / "home"), "SEAL_MODEL__PATH": str(tiny_model_dir), "SEAL_AUTH__INSECURE": "true",
        "SEAL_MODEL__TORCH_THREADS": "1", "SEAL_STUDENT_SERVING__BACKEND": "in_process",
    }
    metrics: dict[str, int] = {}
    for name in SERVICES:
        port, metrics[name] = _free_port(), _free_port()
        env[f"SEAL_SERVICES__{name.upper()}_PORT"] = str(port)
        env[f"SEAL_SERVICES__{name.upper()}_ADDRESS"] = f"127.0.0.1:{port}"
        env[f"SEAL_SERVICES__{name.upper()}_METRICS_PORT"] = str(metrics[name])
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    settings = Settings()
    with local_services(settings, startup_timeout=240) as addresses:
        assert set(addresses) == set(SERVICES)
        for name, address in addresses.items():
            wait_until_serving(address, FULL_NAMES[name], timeout=10)
            # No --metrics-port on the command line: the configured one (here a free one) is used.
            body = urllib.request.urlopen(f"http://127.0.0.1:{metrics[name]}/metrics", timeout=10).read().decode()
            assert f"seal_{name}_rpc_requests_total" in body
    for name, address in addresses.items():
        with pytest.raises(TimeoutError):
            wait_until_serving(address, FULL_NAMES[name], timeout=2)
    for name in SERVICES:
        log = (tmp_path / "home" / "logs" / f"{name}.log").read_text(errors="replace")
        assert f"{name} serving on 127.0.0.1:" in log
