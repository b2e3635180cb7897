"""The student's versions served in this process: PEFT adapters over a copy of the base model."""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from pathlib import Path

from seal.cancellation import install_stop_hook
from seal.config import Settings
from seal.models import Generation, SamplingParams, TransformersEngine, load_model_and_tokenizer
from seal.registry import AdapterRegistry, Manifest
from seal.serving import ROUTED, BackendKind, Target
from seal.serving.adapters import PeftAdapterCache, adapter_key

#: Versions kept loaded; an Adapt step scores a few candidates beside the promoted one.
MAX_LOADED_ADAPTERS = 8


class InProcessBackend:
    """Reads the registry on every request that names no version, so it follows promotions and
    rollbacks without being told (``promote``/``rollback`` have nothing to switch)."""

    name: BackendKind = "in_process"
    metrics_url = ""

    def __init__(self, settings: Settings, registry: AdapterRegistry, model_path: Path) -> None:
        self.registry = registry
        self._lineage = settings.adapter_name
        self._batch_size = settings.auditor.batch_size
        # A copy of its own: PEFT injects LoRA layers into the model it serves, and the student
        # trains every candidate from a base that must stay clean.
        model, self.tokenizer = load_model_and_tokenizer(
            model_path, dtype=settings.model.dtype, device=settings.model.device
        )
        # Generation under a cancellation scope (seal.cancellation.stop_when, opened by the
        # service around a call) stops within a token once its caller's deadline passes: one
        # generation holds the adapters' lock, so an abandoned one would delay every later call.
        install_stop_hook(model)
        self.adapters = PeftAdapterCache(model, capacity=MAX_LOADED_ADAPTERS)

    def start(self, promoted: Manifest | None) -> None:
        """Nothing to start: a version is loaded (and verified) when a request first needs it."""

    def generate(
        self, prompts: Sequence[str], target: Target, params: SamplingParams, *, chat: bool
    ) -> tuple[list[Generation], str]:
        manifest = self.registry.promoted(self._lineage) if target is ROUTED else target
        key = path = check = None
        if manifest is not None:
            key, path = adapter_key(manifest.adapter_id), self.registry.path_of(manifest)
            # Weights are checked before they ever answer a request (once, when first loaded).
            check = partial(self.registry.verify, manifest)
        with self.adapters.use(key, path, check=check) as model:
            engine = TransformersEngine(model, self.tokenizer)
            generations = engine.generate(prompts, params, chat=chat, batch_size=self._batch_size)
        return generations, manifest.adapter_id if manifest is not None else ""

    def generate_mixed(
        self, prompts: Sequence[str], targets: Sequence[Manifest | None], params: SamplingParams, *, chat: bool
    ) -> list[Generation]:
        """``prompts[i]`` answered by ``targets[i]`` (None = the base model), the versions' rows
        together in each batch (``seal.serving.MixedBatchServing``). More versions than the cache
        keeps loaded are answered in groups of that many, in order of first appearance."""
        if len(targets) != len(prompts):
            raise ValueError(f"{len(targets)} versions for {len(prompts)} prompts: name one per prompt")
        versions = list(dict.fromkeys(m.adapter_id for m in targets if m is not None))
        capacity = self.adapters.capacity
        groups = [set(versions[start : start + capacity]) for start in range(0, len(versions), capacity)] or [set()]
        results: list[Generation | None] = [None] * len(prompts)
        for number, group in enumerate(groups):
            # Base-model rows ride along with the first group.
            rows = [i for i, m in enumerate(targets) if (m.adapter_id in group if m is not None else number == 0)]
            loads = {
                m.adapter_id: (adapter_key(m.adapter_id), self.registry.path_of(m), partial(self.registry.verify, m))
                for m in (targets[i] for i in rows) if m is not None
            }
            names = [adapter_key(targets[i].adapter_id) if targets[i] is not None else "__base__" for i in rows]  # type: ignore[union-attr]
            with self.adapters.use_many(list(loads.values())) as model:
                engine = TransformersEngine(model, self.tokenizer)
                generations = engine.generate(
                    [prompts[i] for i in rows], params, chat=chat, batch_size=self._batch_size,
                    adapter_names=names if loads else None,
                )
            for i, generation in zip(rows, generations, strict=True):
                results[i] = generation
        return [g for g in results if g is not None]

    def promote(self, manifest: Manifest) -> None:
        """Nothing to switch: unnamed requests read the registry."""

    def rollback(self, restored: Manifest | None) -> None:
        """Nothing to switch: unnamed requests read the registry."""

    def forget(self, adapter_id: str) -> None:
        self.adapters.forget(adapter_key(adapter_id))

    def served(self) -> dict[str, str]:
        promoted = self.registry.promoted(self._lineage)
        return {"promoted": promoted.adapter_id if promoted else "base"}

    def close(self) -> None:
        """Nothing outside the process heap; the model goes with the last reference."""
