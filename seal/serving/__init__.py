"""How the student's versions answer Generate: one protocol, two backends.

``Student`` trains versions and keeps the registry; a ``ServingBackend`` turns a registry version
(or the base model) into answers. ``InProcessBackend`` generates with PEFT in this process;
``TritonBackend`` (``seal.serving.triton``) supervises a tritonserver and routes through it. The
student is given one (``Student(settings, serving=...)``); ``resolve_backend`` builds the one the
settings ask for, which is what the service does.

The registry stays the record of what is promoted: a backend is told about every change only
after the registry has accepted it, and it never decides what is promoted itself.
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol, TypeAlias, runtime_checkable

from seal.models import Generation, SamplingParams
from seal.registry import Manifest

if TYPE_CHECKING:
    from seal.config import Settings
    from seal.registry import AdapterRegistry

log = logging.getLogger(__name__)

BackendKind: TypeAlias = Literal["in_process", "triton"]


class Route(enum.Enum):
    """``ROUTED``: the request named no version, so the backend's own routing picks one: the
    served lineage's promoted version (or the base model when none is), or, with a traffic split,
    the canary for its share. It is a target of its own rather than the promoted manifest so
    that a backend which already knows its routing (Triton) answers without a registry read."""

    ROUTED = "routed"


ROUTED = Route.ROUTED

#: What ``ServingBackend.generate`` answers with: a version, the base model (None) or ``ROUTED``.
Target: TypeAlias = Manifest | None | Literal[Route.ROUTED]


class ServingBackend(Protocol):
    """What ``Student`` needs from whatever serves its versions.

    The backend serves one lineage (``settings.adapter_name``) to requests that name no version;
    any version, of any lineage, can be named explicitly. Weights are verified against the
    registry before they first answer.
    """

    @property
    def name(self) -> BackendKind:
        """Reported to clients (``x-seal-serving-backend``) and in the student's metrics."""
        ...

    @property
    def metrics_url(self) -> str:
        """The serving engine's own /metrics, '' when it has none apart from the student's."""
        ...

    def start(self, promoted: Manifest | None) -> None:
        """Begin serving. ``promoted`` is the registry's promoted version of the served lineage
        (None: the base model), not yet verified; a backend that loads it now verifies it and
        serves the base model if that fails, so that a rollback can still reach it."""
        ...

    def generate(
        self, prompts: Sequence[str], target: Target, params: SamplingParams, *, chat: bool
    ) -> tuple[list[Generation], str]:
        """One generation per prompt, and the version that served them ('' = the base model).

        With a canary split one call's prompts can be served by different versions; the
        version returned is the first prompt's."""
        ...

    def promote(self, manifest: Manifest) -> None:
        """The registry has promoted ``manifest`` of the served lineage: serve it by default."""
        ...

    def rollback(self, restored: Manifest | None) -> None:
        """The registry has rolled the served lineage back to ``restored`` (None: the base model)."""
        ...

    def forget(self, adapter_id: str) -> None:
        """The registry has rejected ``adapter_id``: it takes no more unnamed traffic, and leaves
        any cache, so that it is verified again should it ever be named (its weights may be gone)."""
        ...

    def served(self) -> dict[str, str]:
        """role -> version served to requests that name none ('base' = the base model)."""
        ...

    def close(self) -> None:
        """Release what the backend holds outside this process's heap (a tritonserver)."""
        ...


@runtime_checkable
class MixedBatchServing(Protocol):
    """A backend that answers prompts of several versions in one batch (the in-process one: PEFT's
    mixed-batch forward routes each row to its adapter). ``Student.generate_mixed`` uses it when
    the backend has it, else asks the backend once per version; the answers are the same."""

    def generate_mixed(
        self, prompts: Sequence[str], targets: Sequence[Manifest | None], params: SamplingParams, *, chat: bool
    ) -> list[Generation]:
        """One generation per prompt, ``prompts[i]`` answered by ``targets[i]`` (None = the base model)."""
        ...


def backend_kind(settings: Settings) -> BackendKind:
    """``settings.student_serving.backend``, with ``auto`` decided: triton when a tritonserver
    binary and tritonclient are found, else in_process (with a warning)."""
    serving = settings.student_serving
    if serving.backend != "auto":
        return serving.backend
    from seal.serving.triton.server import TritonInstall, TritonNotInstalled

    try:
        if serving.tritonserver:
            TritonInstall.from_binary(serving.tritonserver)
        else:
            TritonInstall.discover()
        import tritonclient.grpc  # noqa: F401
    except (TritonNotInstalled, ImportError) as exc:
        log.warning("student_serving.backend=auto: no usable Triton (%s); generating in-process", exc)
        return "in_process"
    return "triton"


def resolve_backend(
    settings: Settings, registry: AdapterRegistry | None = None, model_path: Path | None = None
) -> ServingBackend:
    """The backend ``settings.student_serving.backend`` asks for, not started yet (``Student``
    starts it). ``registry`` and ``model_path`` default to the ones the settings name."""
    from seal.models import resolve_model_path
    from seal.registry import AdapterRegistry

    registry = registry if registry is not None else AdapterRegistry(settings.registry_dir)
    model_path = model_path if model_path is not None else resolve_model_path(settings.model)
    if backend_kind(settings) == "triton":
        from seal.serving.triton.backend import TritonBackend

        return TritonBackend(settings, registry, model_path)
    from seal.serving.in_process import InProcessBackend

    return InProcessBackend(settings, registry, model_path)


__all__ = [
    "ROUTED",
    "BackendKind",
    "MixedBatchServing",
    "Route",
    "ServingBackend",
    "Target",
    "backend_kind",
    "resolve_backend",
]
