"""The student's Triton backend: one supervised tritonserver whose routing follows the registry.

The registry stays the record of what is promoted; this module only makes Triton serve it. Every
switch happens after the registry has accepted the change (and verified the weights), and on
start-up the routing is rebuilt from the registry, so a restart serves what the manifest says
whatever an earlier process left in the serving-state file.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from student_svc.triton.state import BASE_VERSION, ServingState, read_state, state_lock, write_state

log = logging.getLogger(__name__)


def resolve_backend(settings: Any) -> str:
    """'triton' or 'in_process' for ``settings.student_serving.backend``."""
    serving = settings.student_serving
    if serving.backend != "auto":
        return serving.backend
    from student_svc.triton.server import TritonInstall, TritonNotInstalled

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


class TritonServing:
    def __init__(self, settings: Any, model_path: Path, registry: Any) -> None:
        from student_svc.triton.server import TritonSupervisor

        cfg = settings.student_serving
        self.cfg = cfg
        self.registry = registry
        self.supervisor = TritonSupervisor(
            settings.home / "student" / "triton",
            model_path,
            install=cfg.tritonserver or None,
            grpc_port=cfg.grpc_port or None,
            metrics_port=cfg.metrics_port or None,
            instance_count=cfg.instance_count,
            max_batch_size=cfg.max_batch_size,
            kind=cfg.kind,
            # The model refuses adapter directories outside the registry.
            adapter_root=registry.root,
            model_parameters={"torch_threads": str(settings.model.torch_threads), "dtype": settings.model.dtype,
                              "seed": str(settings.seed)},
            extra_args=cfg.extra_args,
        )
        self.client: Any = None
        # Candidates share one slot (the canary); evaluating two at once would evict each other.
        self._evaluation_lock = threading.Lock()

    @property
    def metrics_url(self) -> str:
        return self.supervisor.metrics_url

    def start(self, promoted: Any | None) -> None:
        """Serve ``promoted`` (a verified registry manifest, or None for the base model)."""
        path = self.supervisor.state_path
        with state_lock(path):
            old = read_state(path)
            adapters = {promoted.adapter_id: str(self.registry.path_of(promoted))} if promoted else {}
            # A fresh state rather than the old file: the registry, not the last process, decides.
            write_state(path, ServingState(generation=old.generation + 1,
                                           promoted=promoted.adapter_id if promoted else None,
                                           adapters=adapters, reason="start-up: promoted version from the registry",
                                           updated_at=time.time()))
        started = time.perf_counter()
        self.supervisor.start(timeout_s=self.cfg.startup_timeout_s)
        self.client = self.supervisor.client(timeout_s=self.cfg.request_timeout_s)
        self.client.swap_timeout_s = self.cfg.swap_timeout_s
        log.info("tritonserver ready in %.1fs at %s serving %s; Triton metrics at %s (log %s)",
                 time.perf_counter() - started, self.supervisor.grpc_url,
                 promoted.adapter_id if promoted else "the base model", self.metrics_url, self.supervisor.log_path)

    def state(self) -> ServingState:
        return self.client.current_state()

    def generate(self, prompts: Sequence[str], adapter: str | None, params: Any, chat: bool) -> list[Any]:
        return self.client.generate(list(prompts), adapter=adapter, max_new_tokens=params.max_new_tokens,
                                    temperature=params.temperature, top_p=params.top_p, seed=params.seed, chat=chat)

    def generate_with(self, manifest: Any, prompts: Sequence[str], params: Any, chat: bool) -> list[Any]:
        """Answer with a version named explicitly; one Triton does not keep loaded (a candidate
        the auditor scores) becomes the canary first. Its share of unnamed traffic is
        ``canary_fraction`` for a candidate, 0 (loaded but not routed) for any other status."""
        version = manifest.adapter_id
        state = self.state()
        if version in (state.promoted, state.previous):
            return self.generate(prompts, version, params, chat)
        with self._evaluation_lock:
            if self.state().canary != version:
                self.registry.verify(manifest)  # never load weights that differ from the record
                fraction = self.cfg.canary_fraction if manifest.status == "candidate" else 0.0
                self.client.set_canary(version, self.registry.path_of(manifest), fraction,
                                       f"evaluate {version}")
            return self.generate(prompts, version, params, chat)

    def promote(self, manifest: Any) -> None:
        self.client.promote(manifest.adapter_id, self.registry.path_of(manifest), f"promote {manifest.adapter_id}")

    def rollback(self, restored: Any | None) -> None:
        state = self.state()
        if restored is None:
            self.client.serve_base("rollback to the base model")
        elif state.previous == restored.adapter_id:
            self.client.rollback(f"rollback to {restored.adapter_id}")  # still loaded: a routing change
        else:
            self.client.promote(restored.adapter_id, self.registry.path_of(restored),
                                f"rollback to {restored.adapter_id}")

    def forget(self, adapter_id: str) -> None:
        """A rejected candidate stops taking canary traffic."""
        if self.state().canary == adapter_id:
            self.client.clear_canary(f"{adapter_id} rejected")

    def served(self) -> dict[str, str]:
        state = self.state()
        roles = {"promoted": state.promoted or BASE_VERSION}
        if state.canary is not None:
            roles["canary"] = state.canary
        return roles

    def close(self) -> None:
        if self.client is not None:
            self.client.close()
            self.client = None
        self.supervisor.stop()
