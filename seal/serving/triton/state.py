"""The serving state: which LoRA adapter versions the Triton model serves, and how it routes.

It is a small JSON file next to the model repository. The student is its only writer; every Triton
model instance reads it. Transitions are pure functions returning a new state with ``generation``
bumped, so the routing decisions can be tested without a server, and a half-written file is never
seen because writes go through a temp file and ``os.replace``.

The JSON schema is duplicated (read-only) in ``model_repository/model.py``, which must run inside
Triton without this package installed: keep the two in step.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time
from collections.abc import Iterator, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from seal.durable import atomic_write_text, file_lock

#: Version name a request uses to ask for the base model explicitly; never a registry version.
BASE_VERSION = "base"
SCHEMA_VERSION = 1


class ServingStateError(ValueError):
    """The requested state is inconsistent (unknown version, bad fraction, nothing to roll back to)."""


@dataclass(frozen=True)
class ServingState:
    """Routing table for the served student.

    ``adapters`` maps every version the instances keep loaded to its adapter directory; roles
    (promoted/canary/previous) name entries of it. Requests that name a version may use any of
    them; requests that name none get ``promoted`` (the base model when ``None``), except a
    ``canary_fraction`` share that goes to ``canary``. ``previous`` is kept loaded so a rollback
    is a routing change only, with no adapter load on the hot path.
    """

    generation: int = 0
    promoted: str | None = None
    canary: str | None = None
    canary_fraction: float = 0.0
    previous: str | None = None
    adapters: Mapping[str, str] = field(default_factory=dict)
    reason: str = ""
    updated_at: float = 0.0

    def __post_init__(self) -> None:
        object.__setattr__(self, "adapters", {str(k): str(v) for k, v in dict(self.adapters).items()})
        self.validate()

    def validate(self) -> None:
        for version in self.adapters:
            if not version or version == BASE_VERSION:
                raise ServingStateError(f"invalid adapter version name {version!r}")
        for role in ("promoted", "canary", "previous"):
            version = getattr(self, role)
            if version is not None and version not in self.adapters:
                raise ServingStateError(f"{role} version {version!r} has no adapter directory in the state")
        fraction = self.canary_fraction
        if not (isinstance(fraction, (int, float)) and math.isfinite(fraction) and 0.0 <= fraction <= 1.0):
            raise ServingStateError(f"canary_fraction must be within [0, 1], got {fraction!r}")
        if self.canary is None and fraction:
            raise ServingStateError("canary_fraction is set but there is no canary version")

    # --- transitions: each returns the next state; nothing is written here -------------------

    def _next(self, reason: str, **changes: Any) -> ServingState:
        draft = replace(self, generation=self.generation + 1, reason=reason, updated_at=time.time(), **changes)
        # Drop directories no role references any more, so instances unload them; pinned
        # versions survive only through a role, which keeps memory bounded to three adapters.
        keep = {v for v in (draft.promoted, draft.canary, draft.previous) if v is not None}
        return replace(draft, adapters={v: p for v, p in draft.adapters.items() if v in keep})

    def promote(self, version: str, adapter_dir: str | os.PathLike[str], reason: str = "") -> ServingState:
        adapters = dict(self.adapters)
        adapters[version] = str(Path(adapter_dir))
        previous = self.promoted if self.promoted != version else self.previous
        canary = None if self.canary == version else self.canary
        return self._next(
            reason or f"promote {version}",
            promoted=version,
            previous=previous,
            canary=canary,
            canary_fraction=self.canary_fraction if canary else 0.0,
            adapters=adapters,
        )

    def with_canary(
        self, version: str, adapter_dir: str | os.PathLike[str], fraction: float, reason: str = ""
    ) -> ServingState:
        if version == self.promoted:
            raise ServingStateError(f"{version!r} is already the promoted version")
        adapters = dict(self.adapters)
        adapters[version] = str(Path(adapter_dir))
        return self._next(reason or f"canary {version} at {fraction:.3f}", canary=version,
                          canary_fraction=float(fraction), adapters=adapters)

    def without_canary(self, reason: str = "") -> ServingState:
        return self._next(reason or "end canary", canary=None, canary_fraction=0.0)

    def rollback(self, reason: str = "") -> ServingState:
        """Serve ``previous`` again; the rolled-back version stays loaded as the new ``previous``
        so that an undo of the rollback is equally cheap."""
        if self.previous is None:
            raise ServingStateError("nothing to roll back to: no previous version is kept")
        return self._next(reason or f"rollback {self.promoted} -> {self.previous}",
                          promoted=self.previous, previous=self.promoted)

    def serve_base(self, reason: str = "") -> ServingState:
        return self._next(reason or "serve the base model", promoted=None, canary=None, canary_fraction=0.0,
                          previous=self.promoted if self.promoted is not None else self.previous)

    # --- (de)serialisation ------------------------------------------------------------------

    def to_json(self) -> str:
        body = asdict(self)
        body["adapters"] = dict(self.adapters)
        body["schema"] = SCHEMA_VERSION
        return json.dumps(body, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ServingState:
        try:
            body = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ServingStateError(f"serving state is not valid JSON: {exc}") from exc
        if not isinstance(body, dict):
            raise ServingStateError("serving state must be a JSON object")
        if body.pop("schema", SCHEMA_VERSION) != SCHEMA_VERSION:
            raise ServingStateError("serving state has an unsupported schema version")
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(body) - known
        if unknown:
            raise ServingStateError(f"serving state has unknown fields {sorted(unknown)}")
        return cls(**body)


def read_state(path: str | os.PathLike[str]) -> ServingState:
    """The state at ``path``; an absent file means 'nothing published yet': the base model."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return ServingState()
    return ServingState.from_json(text)


def write_state(path: str | os.PathLike[str], state: ServingState) -> None:
    """Replace the state file atomically: readers see the old or the new file, never a mix."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    # The rename is fsynced too (in the directory), or a restarted server could read the old routing.
    atomic_write_text(target, state.to_json())


@contextlib.contextmanager
def state_lock(path: str | os.PathLike[str]) -> Iterator[None]:
    """Serialise read-modify-write cycles of the state between writers (threads or processes)."""
    with file_lock(f"{os.fspath(path)}.lock"):
        yield
