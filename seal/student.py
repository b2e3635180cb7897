"""The student engine: the base model, one LoRA candidate per self-edit, the registry of versions,
and generation with any version (transport-free; ``student_svc`` wraps it in gRPC)."""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from seal.config import Settings
from seal.domains.knowledge import build_training_sequences, parse_self_edit
from seal.models import (
    Generation,
    SamplingParams,
    TransformersEngine,
    load_model_and_tokenizer,
    model_fingerprint,
    resolve_model_path,
)
from seal.registry import AdapterRegistry, Manifest, parse_adapter_id
from seal.update.lora_sft import LoraSFTConfig, LoraSFTTrainer, lora_sft_config, save_adapter

log = logging.getLogger(__name__)


class UnusableSelfEdit(ValueError):
    code = "invalid_argument"


@dataclass(frozen=True)
class AdapterChoice:
    """Which weights answer a Generate call: base model, a named version, or a lineage's promoted one."""

    base_model: bool = False
    adapter_id: str = ""
    promoted_of: str = ""


@dataclass(frozen=True)
class CandidateResult:
    manifest: Manifest
    training_sequences: int
    losses: list[float]
    seconds: float


def self_edit_digest(self_edit: str) -> str:
    return hashlib.sha256(self_edit.encode()).hexdigest()


class Student:
    def __init__(self, settings: Settings, *, serving_backend: str | None = "in_process") -> None:
        """``serving_backend`` None follows ``settings.student_serving.backend`` (the service does);
        library users (benches, evaluation scripts) get in-process generation unless they ask, so
        that no tritonserver is started behind their back."""
        self.settings = settings
        self.model_path = resolve_model_path(settings.model)
        self.base_model_name = self.model_path.name
        self.fingerprint = model_fingerprint(self.model_path)
        # Two copies on purpose: PEFT injects LoRA layers into the model it wraps, so the copy
        # that serves loaded adapters must never be the one each training run starts from.
        self._train_base, self.tokenizer = load_model_and_tokenizer(
            self.model_path, dtype=settings.model.dtype, torch_threads=settings.model.torch_threads,
            device=settings.model.device,
        )
        self._serve_model: Any = None
        self._loaded_adapters: OrderedDict[str, None] = OrderedDict()
        self._serve_lock = threading.Lock()
        # One training run at a time: on a CPU node two runs only slow each other down.
        self._train_lock = threading.Lock()
        self.registry = AdapterRegistry(settings.registry_dir)
        from student_svc.triton.serving import resolve_backend

        if serving_backend is not None:
            settings = settings.model_copy(update={"student_serving": settings.student_serving.model_copy(
                update={"backend": serving_backend})})
        self.backend = resolve_backend(settings)
        self.triton: Any = None
        self._serve_base: Any = None
        if self.backend == "triton":
            from student_svc.triton.serving import TritonServing

            self.triton = TritonServing(settings, self.model_path, self.registry)
            self.triton.start(self._startup_version())
        else:
            self._serve_base, _ = load_model_and_tokenizer(
                self.model_path, dtype=settings.model.dtype, device=settings.model.device
            )

    def _startup_version(self) -> Manifest | None:
        promoted = self.registry.promoted(self.settings.adapter_name)
        if promoted is None:
            return None
        try:
            self.registry.verify(promoted)
        except Exception as exc:  # noqa: BLE001 - refusing to start would also block the rollback
            log.error("promoted %s fails verification, Triton serves the base model until it is "
                      "rolled back or another version is promoted: %s", promoted.adapter_id, exc)
            return None
        return promoted

    def close(self) -> None:
        if self.triton is not None:
            self.triton.close()

    def served_versions(self) -> dict[str, str]:
        """role -> version currently served for requests that name none ('base' = no adapter)."""
        if self.triton is not None:
            return self.triton.served()
        promoted = self.registry.promoted(self.settings.adapter_name)
        return {"promoted": promoted.adapter_id if promoted else "base"}

    # --- training --------------------------------------------------------------------------

    def lora_config(self, overrides: dict[str, Any], seed: int) -> LoraSFTConfig:
        return lora_sft_config(self.settings.lora, seed=seed, overrides=overrides)

    def train_candidate(
        self,
        *,
        adapter_name: str,
        title: str,
        passage: str,
        self_edit: str,
        context_id: str,
        overrides: dict[str, Any] | None = None,
        include_passage: bool = True,
        seed: int | None = None,
        on_step: Callable[[int, int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> CandidateResult:
        lines = parse_self_edit(self_edit, max_lines=self.settings.lora.max_examples)
        if not lines:
            raise UnusableSelfEdit(
                "the self-edit has no usable lines (each training line needs at least 8 characters "
                "of text besides list markers); send a self-edit with one statement per line"
            )
        return self.train_sequences(
            adapter_name=adapter_name,
            sequences=build_training_sequences(title, passage, lines, include_passage=include_passage),
            context_id=context_id,
            self_edit_sha256=self_edit_digest(self_edit),
            overrides=overrides,
            seed=seed,
            extra_hyperparameters={"include_passage": include_passage},
            on_step=on_step,
            should_stop=should_stop,
        )

    def train_sequences(
        self,
        *,
        adapter_name: str,
        sequences: Sequence[str],
        context_id: str,
        self_edit_sha256: str,
        overrides: dict[str, Any] | None = None,
        seed: int | None = None,
        extra_hyperparameters: dict[str, Any] | None = None,
        on_step: Callable[[int, int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> CandidateResult:
        """One LoRA SFT run on ready training sequences, saved as a new candidate version."""
        config = self.lora_config(overrides or {}, self.settings.seed if seed is None else seed)
        with self._train_lock:
            started = time.perf_counter()
            result = LoraSFTTrainer(self._train_base, self.tokenizer, config).train(
                sequences, on_step=on_step, should_stop=should_stop
            )
            hyperparameters = {
                **asdict(config),
                **(extra_hyperparameters or {}),
                "training_sequences": len(sequences),
            }
            manifest = self.registry.create_version(
                adapter_name,
                lambda directory: save_adapter(result.model, directory),
                base_model=self.base_model_name,
                base_model_fingerprint=self.fingerprint,
                context_id=context_id,
                self_edit_sha256=self_edit_sha256,
                seed=config.seed,
                hyperparameters=hyperparameters,
                metrics={"final_loss": result.losses[-1], "train_seconds": result.seconds},
            )
        return CandidateResult(manifest, len(sequences), result.losses, time.perf_counter() - started)

    # --- serving ---------------------------------------------------------------------------

    def resolve(self, choice: AdapterChoice) -> Manifest | None:
        if choice.base_model:
            return None
        if choice.adapter_id:
            parse_adapter_id(choice.adapter_id)
            return self.registry.get(choice.adapter_id)
        return self.registry.promoted(choice.promoted_of or self.settings.adapter_name)

    def generate(
        self, prompts: Sequence[str], choice: AdapterChoice, params: SamplingParams, *, chat: bool = True
    ) -> tuple[list[Generation], str]:
        if not prompts:
            raise ValueError("no prompts: send at least one prompt to generate from")
        if self.triton is not None:
            return self._generate_triton(prompts, choice, params, chat)
        manifest = self.resolve(choice)
        with self._serve_lock:
            if manifest is None:
                model = self._base_only_model()
                generations = self._generate_without_adapter(model, prompts, params, chat)
                return generations, ""
            model = self._activate(manifest)
            engine = TransformersEngine(model, self.tokenizer)
            generations = engine.generate(prompts, params, chat=chat, batch_size=self.settings.auditor.batch_size)
            return generations, manifest.adapter_id

    def _generate_triton(
        self, prompts: Sequence[str], choice: AdapterChoice, params: SamplingParams, chat: bool
    ) -> tuple[list[Generation], str]:
        lineage = choice.promoted_of or self.settings.adapter_name
        if choice.base_model:
            answers = self.triton.generate(prompts, "base", params, chat)
        elif choice.adapter_id or lineage != self.settings.adapter_name:
            # Triton's routing covers the served lineage only; anything else is named by version.
            manifest = self.resolve(choice)
            answers = (self.triton.generate(prompts, "base", params, chat) if manifest is None
                       else self.triton.generate_with(manifest, prompts, params, chat))
        else:
            answers = self.triton.generate(prompts, None, params, chat)
        generations = [Generation(a.text, a.prompt_tokens, a.completion_tokens) for a in answers]
        # With a canary split, prompts of one call can be served by different versions; the
        # response names the first one's (per-prompt versions are in Triton's answer).
        served = answers[0].adapter_version
        return generations, "" if served == "base" else served

    def _base_only_model(self) -> Any:
        return self._serve_model if self._serve_model is not None else self._serve_base

    def _generate_without_adapter(
        self, model: Any, prompts: Sequence[str], params: SamplingParams, chat: bool
    ) -> list[Generation]:
        engine = TransformersEngine(model, self.tokenizer)
        batch_size = self.settings.auditor.batch_size
        if model is self._serve_model:
            with model.disable_adapter():
                return engine.generate(prompts, params, chat=chat, batch_size=batch_size)
        return engine.generate(prompts, params, chat=chat, batch_size=batch_size)

    _MAX_LOADED_ADAPTERS = 8

    @staticmethod
    def _adapter_key(adapter_id: str) -> str:
        return adapter_id.replace("@", "_")  # PEFT adapter names may not hold '@'

    def _forget_loaded(self, adapter_id: str) -> None:
        """Drop a version from the in-process cache, so it never answers from memory again."""
        adapter_key = self._adapter_key(adapter_id)
        with self._serve_lock:
            if adapter_key not in self._loaded_adapters:
                return
            del self._loaded_adapters[adapter_key]
            others = [name for name in self._serve_model.peft_config if name != adapter_key]
            # A PeftModel cannot drop its last adapter: that one stays resident but unreachable,
            # since _activate verifies anything not in the cache and its files are gone.
            if others:
                # PEFT would keep naming a deleted active adapter; point it at a live one first.
                self._serve_model.set_adapter(others[-1])
                self._serve_model.delete_adapter(adapter_key)

    def _activate(self, manifest: Manifest) -> Any:
        from peft import PeftModel

        adapter_key = self._adapter_key(manifest.adapter_id)
        if adapter_key not in self._loaded_adapters:
            # Weights are checked before they ever answer a request.
            self.registry.verify(manifest)
            path = str(self.registry.path_of(manifest))
            if self._serve_model is None:
                self._serve_model = PeftModel.from_pretrained(self._serve_base, path, adapter_name=adapter_key)
                self._serve_model.eval()
            else:
                self._serve_model.load_adapter(path, adapter_name=adapter_key)
            self._loaded_adapters[adapter_key] = None
            while len(self._loaded_adapters) > self._MAX_LOADED_ADAPTERS:
                evicted, _ = self._loaded_adapters.popitem(last=False)
                if evicted != adapter_key:
                    self._serve_model.delete_adapter(evicted)
        self._loaded_adapters.move_to_end(adapter_key)
        self._serve_model.set_adapter(adapter_key)
        return self._serve_model

    # --- governance --------------------------------------------------------------------------

    def promote(self, adapter_id: str, reason: str) -> Manifest:
        # The registry verifies the weights against their recorded sha256 and raises before
        # anything is recorded; Triton is switched only once the registry has accepted it. If the
        # switch then fails, the record stands and the next start-up serves it.
        manifest = self.registry.promote(adapter_id, reason)
        if self.triton is not None:
            self.triton.promote(manifest)
        return manifest

    def reject(self, adapter_id: str, reason: str, *, discard_weights: bool = False) -> Manifest:
        manifest = self.registry.mark_rejected(adapter_id, reason)
        if self.triton is not None:
            self.triton.forget(adapter_id)
        if discard_weights:
            self._forget_loaded(adapter_id)
            manifest = self.registry.discard_weights(adapter_id)
        return manifest

    def rollback(self, adapter_name: str, reason: str, *, allow_base_model: bool) -> tuple[Manifest, Manifest | None]:
        current = self.registry.promoted(adapter_name)
        restored = self.registry.rollback(adapter_name, reason, to_base_ok=allow_base_model)
        if self.triton is not None and adapter_name == self.settings.adapter_name:
            self.triton.rollback(restored)
        rolled_back = self.registry.get(current.adapter_id) if current else None
        return rolled_back, restored
