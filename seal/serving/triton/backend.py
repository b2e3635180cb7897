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
from typing import TYPE_CHECKING

from seal.config import Settings
from seal.models import Generation, SamplingParams
from seal.registry import AdapterRegistry, Manifest
from seal.serving import ROUTED, BackendKind, Target
from seal.serving.triton.server import TritonSupervisor
from seal.serving.triton.state import BASE_VERSION, ServingState, read_state, state_lock, write_state

if TYPE_CHECKING:
    from seal.serving.triton.client import Generation as TritonGeneration
    from seal.serving.triton.client import TritonStudentClient

log = logging.getLogger(__name__)


class TritonBackend:
    """``seal.serving.ServingBackend`` answered by a supervised tritonserver."""

    name: BackendKind = "triton"

    def __init__(self, settings: Settings, registry: AdapterRegistry, model_path: Path) -> None:
        cfg = settings.student_serving
        self.cfg = cfg
        self.registry = registry
        self.supervisor = TritonSupervisor(
            settings.home / "student" / "triton",
            model_path,
            install=cfg.tritonserver or None,
            grpc_port=cfg.grpc_port or None,
            metrics_port=cfg.metrics_port or None,
            metrics_address=cfg.metrics_address,
            instance_count=cfg.instance_count,
            max_batch_size=cfg.max_batch_size,
            kind=cfg.kind,
            # The model refuses adapter directories outside the registry.
            adapter_root=registry.root,
            model_parameters={"torch_threads": str(settings.model.torch_threads), "dtype": settings.model.dtype,
                              "seed": str(settings.seed)},
            extra_args=cfg.extra_args,
        )
        self.client: TritonStudentClient | None = None
        # Candidates share one slot (the canary); evaluating two at once would evict each other.
        self._evaluation_lock = threading.Lock()

    @property
    def metrics_url(self) -> str:
        return self.supervisor.metrics_url

    def start(self, promoted: Manifest | None) -> None:
        """Serve ``promoted`` (the registry's promoted version, or None for the base model)."""
        promoted = self._verified_or_base(promoted)
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

    def _verified_or_base(self, promoted: Manifest | None) -> Manifest | None:
        if promoted is None:
            return None
        try:
            self.registry.verify(promoted)
        except Exception as exc:  # noqa: BLE001 - refusing to start would also block the rollback
            log.error("promoted %s fails verification, Triton serves the base model until it is "
                      "rolled back or another version is promoted: %s", promoted.adapter_id, exc)
            return None
        return promoted

    @property
    def _client(self) -> TritonStudentClient:
        if self.client is None:
            raise RuntimeError("the Triton backend is not started (or already closed)")
        return self.client

    def state(self) -> ServingState:
        return self._client.current_state()

    def generate(
        self, prompts: Sequence[str], target: Target, params: SamplingParams, *, chat: bool
    ) -> tuple[list[Generation], str]:
        if target is ROUTED:
            answers = self._generate(prompts, None, params, chat)  # Triton's routing decides
        elif target is None:
            answers = self._generate(prompts, BASE_VERSION, params, chat)
        else:
            answers = self._generate_with(target, prompts, params, chat)
        generations = [Generation(a.text, a.prompt_tokens, a.completion_tokens) for a in answers]
        # With a canary split, prompts of one call can be served by different versions; the
        # response names the first one's (per-prompt versions are in Triton's answer).
        served = answers[0].adapter_version
        return generations, "" if served == BASE_VERSION else served

    def _generate(
        self, prompts: Sequence[str], adapter: str | None, params: SamplingParams, chat: bool
    ) -> list[TritonGeneration]:
        # params.stop_after_first_sentence is not sent: the Python model cannot import seal's
        # grader (model.py is self-contained), so it generates to max_new_tokens; the committed
        # grader reads only the first sentence, so every grade is the same, the text only longer.
        return self._client.generate(list(prompts), adapter=adapter, max_new_tokens=params.max_new_tokens,
                                     temperature=params.temperature, top_p=params.top_p, seed=params.seed,
                                     chat=chat)

    def _generate_with(
        self, manifest: Manifest, prompts: Sequence[str], params: SamplingParams, chat: bool
    ) -> list[TritonGeneration]:
        """Answer with a version named explicitly; one Triton does not keep loaded (a candidate
        the auditor scores) becomes the canary first. Its share of unnamed traffic is
        ``canary_fraction`` for a candidate, 0 (loaded but not routed) for any other status."""
        version = manifest.adapter_id
        state = self.state()
        if version in (state.promoted, state.previous):
            return self._generate(prompts, version, params, chat)
        with self._evaluation_lock:
            if self.state().canary != version:
                self.registry.verify(manifest)  # never load weights that differ from the record
                fraction = self.cfg.canary_fraction if manifest.status == "candidate" else 0.0
                self._client.set_canary(version, self.registry.path_of(manifest), fraction,
                                        f"evaluate {version}")
            return self._generate(prompts, version, params, chat)

    def promote(self, manifest: Manifest) -> None:
        self._client.promote(manifest.adapter_id, self.registry.path_of(manifest),
                             f"promote {manifest.adapter_id}")

    def rollback(self, restored: Manifest | None) -> None:
        state = self.state()
        if restored is None:
            self._client.serve_base("rollback to the base model")
        elif state.previous == restored.adapter_id:
            self._client.rollback(f"rollback to {restored.adapter_id}")  # still loaded: a routing change
        else:
            self._client.promote(restored.adapter_id, self.registry.path_of(restored),
                                 f"rollback to {restored.adapter_id}")

    def forget(self, adapter_id: str) -> None:
        """A rejected candidate stops taking canary traffic."""
        if self.state().canary == adapter_id:
            self._client.clear_canary(f"{adapter_id} rejected")

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
