"""The transformers teacher engine with a hot-swappable policy adapter (PEFT)."""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Any

from seal.engines import PolicyRef
from seal.models import Generation, SamplingParams, TransformersEngine


def _peft_key(policy: PolicyRef) -> str:
    # PEFT uses adapter names as module attribute keys: '@' and '.' are not allowed there.
    return f"{policy.name}-v{policy.version}".replace(".", "_")


class PeftPolicyEngine:
    """``TransformersEngine`` over a base model that gains a PEFT wrapper on the first policy load.

    The base model passed in is modified in place by PEFT (LoRA layers are injected into it), so it
    must not also be the model a trainer copies from: the teacher keeps a separate training base."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self._base = model
        self._peft: Any = None
        self._policy: PolicyRef | None = None
        # One lock for generation and swaps: a batch never straddles two policies.
        self._lock = threading.RLock()

    @property
    def policy(self) -> PolicyRef | None:
        return self._policy

    @property
    def model(self) -> Any:
        return self._peft if self._peft is not None else self._base

    def load_policy(self, policy: PolicyRef) -> None:
        from peft import PeftModel

        key = _peft_key(policy)
        with self._lock:
            if self._policy == policy:
                return
            if self._peft is None:
                self._peft = PeftModel.from_pretrained(self._base, str(policy.path), adapter_name=key)
            else:
                if key in self._peft.peft_config:
                    self._peft.delete_adapter(key)  # the same version stored again (e.g. repaired)
                self._peft.load_adapter(str(policy.path), adapter_name=key)
            self._peft.set_adapter(key)
            self._peft.eval()
            previous, self._policy = self._policy, policy
            if previous is not None and _peft_key(previous) != key:
                # Only the serving policy stays resident: old versions are on disk if needed again.
                self._peft.delete_adapter(_peft_key(previous))

    def unload_policy(self) -> None:
        with self._lock:
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
        with self._lock:
            engine = TransformersEngine(self.model, self.tokenizer)
            if self._peft is not None and self._policy is None:
                with self._peft.disable_adapter():
                    return engine.generate(prompts, params, chat=chat, batch_size=batch_size, on_progress=on_progress)
            return engine.generate(prompts, params, chat=chat, batch_size=batch_size, on_progress=on_progress)
