"""The transformers teacher engine with a hot-swappable policy adapter (PEFT)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from seal.cancellation import install_stop_hook
from seal.engines import PolicyRef
from seal.models import Generation, SamplingParams, TransformersEngine
from seal.serving.adapters import PeftAdapterCache, adapter_key


class PeftPolicyEngine:
    """``TransformersEngine`` over a base model that gains a PEFT wrapper on the first policy load.

    The base model passed in is modified in place by PEFT (LoRA layers are injected into it), so it
    must not also be the model a trainer copies from: the teacher keeps a separate training base."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        # Sampling under a cancellation scope (opened by the teacher around Adapt and
        # ProposeSelfEdits) stops once the caller's deadline passes or it goes away.
        install_stop_hook(model)
        # Only the serving policy stays resident: old versions are on disk if needed again.
        self._adapters = PeftAdapterCache(model, capacity=1)
        self._policy: PolicyRef | None = None

    @property
    def policy(self) -> PolicyRef | None:
        return self._policy

    def load_policy(self, policy: PolicyRef) -> None:
        # The cache's lock also covers generation: a batch never straddles two policies.
        with self._adapters.lock:
            if self._policy == policy:
                return
            # reload: the same version may have been stored again (e.g. repaired) at another path.
            self._adapters.load(adapter_key(policy.adapter_id), policy.path, reload=True)
            self._policy = policy

    def unload_policy(self) -> None:
        with self._adapters.lock:
            # The adapter stays resident until the next load replaces it; generation bypasses it.
            self._policy = None

    def close(self) -> None:
        """Nothing outside the process heap to release; the model goes with the last reference."""

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        *,
        chat: bool = True,
        batch_size: int = 8,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[Generation]:
        with self._adapters.lock:
            policy = self._policy
            key, path = (None, None) if policy is None else (adapter_key(policy.adapter_id), policy.path)
            with self._adapters.use(key, path) as model:
                engine = TransformersEngine(model, self.tokenizer)
                return engine.generate(prompts, params, chat=chat, batch_size=batch_size, on_progress=on_progress)
