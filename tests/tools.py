"""External binaries the deployment checks run for real: helm, promtool, prometheus, checkov,
hadolint. `make tools` installs them; a missing one skips its tests on a developer's machine
(with the command that installs it) and fails them in CI, where `make test` installed them."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

_CANDIDATES = {
    "helm": [ROOT / ".tools/bin/helm"],
    "checkov": [ROOT / ".tools/checkov/bin/checkov"],
    "hadolint": [Path(sys.executable).parent / "hadolint"],
    "promtool": [],
    "prometheus": [],
}


def tool(name: str) -> str:
    """Path of ``name``: the project's own copy first, then PATH."""
    for candidate in _CANDIDATES.get(name, []):
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    found = shutil.which(name)
    if found:
        return found
    message = f"{name} not found: run `make tools` (it installs helm, promtool, prometheus and checkov)"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(message)
    pytest.skip(message)
