"""Generation engines for the teacher, and the choice between them.

Both engines implement ``seal.models.GenerationEngine`` plus a *policy slot*: one LoRA adapter
(the teacher's ReST^EM policy) that can be replaced while the engine runs, under a stable name.
``transformers`` is the CPU and test engine (PEFT ``load_adapter``/``set_adapter``); ``vllm`` is the
production teacher on GPU (``LoRARequest`` with a new integer id per version, loaded at run time).
"""

from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Protocol

from seal.models import GenerationEngine

if TYPE_CHECKING:
    from seal.config import Settings

log = logging.getLogger(__name__)

EngineKind = Literal["transformers", "vllm"]


@dataclass(frozen=True)
class PolicyRef:
    """One stored version of the teacher's policy adapter (a plain PEFT directory)."""

    name: str
    version: int
    path: Path

    def __post_init__(self) -> None:
        if self.version < 1:
            raise ValueError(f"policy versions start at 1, got {self.version}")

    @property
    def adapter_id(self) -> str:
        return f"{self.name}@v{self.version}"


class PolicyEngine(GenerationEngine, Protocol):
    @property
    def policy(self) -> PolicyRef | None:
        """The adapter every generation uses now; None = the base model."""
        ...

    def load_policy(self, policy: PolicyRef) -> None:
        """Load ``policy`` and make it the one generations use, atomically with respect to
        ``generate``: a call sees either the old policy or the new one, never a mix."""
        ...

    def unload_policy(self) -> None:
        """Generate with the base model again."""
        ...

    def close(self) -> None:
        """Release what the engine holds outside this process's heap (vLLM's engine-core process)."""
        ...


def vllm_importable() -> bool:
    return importlib.util.find_spec("vllm") is not None


def cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def resolve_engine_kind(requested: str) -> EngineKind:
    """``auto`` means vLLM where it pays off (a CUDA device and vLLM installed), else transformers.

    vLLM's CPU build is never chosen automatically: it starts in about a minute and on a small
    model is no faster than transformers, so it is only for CI and explicit requests."""
    if requested == "transformers":
        return "transformers"
    if requested == "vllm":
        if not vllm_importable():
            raise RuntimeError(
                "teacher.engine is 'vllm' but vllm is not importable in this environment: install "
                "vllm (GPU) or, for CPU tests, run `make venv-vllm` and use .venv-vllm; or set "
                "SEAL_TEACHER__ENGINE=transformers"
            )
        return "vllm"
    if requested != "auto":
        raise ValueError(f"teacher.engine {requested!r} is unknown; use auto, transformers or vllm")
    return "vllm" if cuda_available() and vllm_importable() else "transformers"


def create_policy_engine(settings: Settings, model_path: Path) -> PolicyEngine:
    """The teacher's engine for ``settings.teacher.engine``, on the base model at ``model_path``."""
    kind = resolve_engine_kind(settings.teacher.engine)
    log.info("teacher engine: %s (teacher.engine=%s)", kind, settings.teacher.engine)
    if kind == "vllm":
        from seal.engines.vllm_engine import VllmEngine

        teacher = settings.teacher
        return VllmEngine(
            model_path,
            dtype=teacher.vllm_dtype,
            max_model_len=teacher.vllm_max_model_len,
            gpu_memory_utilization=teacher.vllm_gpu_memory_utilization,
            max_lora_rank=max(teacher.vllm_max_lora_rank, settings.restem.policy.rank),
            seed=settings.seed,
        )
    from seal.engines.transformers_engine import PeftPolicyEngine
    from seal.models import load_model_and_tokenizer

    model, tokenizer = load_model_and_tokenizer(
        model_path, dtype=settings.model.dtype, torch_threads=settings.model.torch_threads,
        device=settings.model.device,
    )
    return PeftPolicyEngine(model, tokenizer)
