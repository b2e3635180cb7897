"""SDFT, self-distillation fine-tuning (arXiv 2601.19897), as SEAL's other inner-loop update.

The model shown the passage in its context is its own teacher. The student sees only a question
about the passage, samples its own answers (on policy), and a LoRA adapter is trained so that
its token distribution on those answers matches the teacher's: the base model with the passage
(and the self-edit) in front of the same question. Because the targets are the model's own
distribution rather than foreign text, the update moves the model far less than SFT does; the
paper kept prior-task scores at 64.5 where SFT fell to 53.4, with higher new-task accuracy.

The training loop is TRL's (``trl.experimental.sdft.SDFTTrainer``); this module maps seal's
knobs onto it, trains on a private copy of the base (PEFT injects layers into the model it
wraps), and reports progress, cancellation and divergence the way :mod:`seal.update.lora_sft`
does, so the student treats both rules alike.

With PEFT and ``teacher_model_kind="base"``, TRL computes the teacher's logits with the adapter
disabled: no second copy of the model is held.

SDFT needs in-context learning to be good: the teacher is only as right as the model reading the
passage. Its authors used ~4B-parameter models and up; with the embedded 135M model the teacher
often answers wrongly even with the passage in view (``bench/forgetting.py`` measures it).
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any, Literal

from seal.update.lora_sft import SHORTHANDS, TrainingCancelled, TrainingDiverged, TrainResult, resolve_target_modules

if TYPE_CHECKING:
    from seal.config import SdftSettings

log = logging.getLogger(__name__)

# The teacher's prompt: the passage first, then the student's question, the way an open-book
# question is asked (seal.domains.knowledge.build_open_book_prompt), so the teacher answers as
# the model reading the passage would.
TEACHER_PROMPT_TEMPLATE = "{privileged_context}\n\n{prompt}"


@dataclass
class SDFTUpdateConfig:
    """One SDFT run. Every field is documented in ``seal.config.SdftSettings``."""

    learning_rate: float = 5e-4
    epochs: int = 2
    rank: int = 16
    alpha: int = 32
    target_modules: str | Sequence[str] = "all-linear"
    prompts_per_step: int = 4
    num_generations: int = 2
    max_completion_length: int = 24
    max_prompt_length: int = 1024
    temperature: float = 1.0
    teacher_model_kind: Literal["base", "live", "ema"] = "base"
    teacher_update_rate: float = 0.05
    distillation_mode: Literal["topk_logits", "full_logits", "sampled_token"] = "topk_logits"
    distillation_topk: int = 20
    distillation_alpha: float = 0.5
    num_loss_tokens_to_skip: int = 0
    grad_clip: float = 1.0
    seed: int = 0

    def __post_init__(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"invalid SDFT config: {message}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        def positive(value: Any) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0

        require(positive(self.learning_rate), f"learning_rate must be a positive finite number, got {self.learning_rate!r}")
        for name in ("epochs", "rank", "prompts_per_step", "max_completion_length", "max_prompt_length", "distillation_topk"):
            value = getattr(self, name)
            require(is_int(value) and value >= 1, f"{name} must be an integer >= 1, got {value!r}")
        # One sample per prompt cannot be compared with another, but SDFT needs no comparison:
        # unlike GRPO, a single on-policy answer already gives a distillation target.
        require(is_int(self.num_generations) and self.num_generations >= 1,
                f"num_generations must be an integer >= 1, got {self.num_generations!r}")
        require(positive(self.alpha), f"alpha must be > 0, got {self.alpha!r}")
        require(positive(self.temperature), f"temperature must be > 0 (on-policy sampling), got {self.temperature!r}")
        require(positive(self.grad_clip), f"grad_clip must be a positive finite norm, got {self.grad_clip!r}")
        require(self.teacher_model_kind in ("base", "live", "ema"),
                f"teacher_model_kind must be base, live or ema, got {self.teacher_model_kind!r}")
        require(self.distillation_mode in ("topk_logits", "full_logits", "sampled_token"),
                f"distillation_mode must be topk_logits, full_logits or sampled_token, got {self.distillation_mode!r}")
        require(isinstance(self.distillation_alpha, (int, float)) and 0.0 <= self.distillation_alpha <= 1.0,
                f"distillation_alpha must be in [0, 1], got {self.distillation_alpha!r}")
        if self.distillation_mode == "sampled_token":
            require(self.distillation_alpha == 1.0, "distillation_mode sampled_token needs distillation_alpha 1.0 (reverse KL)")
        require(isinstance(self.teacher_update_rate, (int, float)) and 0.0 < self.teacher_update_rate <= 1.0,
                f"teacher_update_rate must be in (0, 1], got {self.teacher_update_rate!r}")
        require(is_int(self.num_loss_tokens_to_skip) and self.num_loss_tokens_to_skip >= 0,
                f"num_loss_tokens_to_skip must be an integer >= 0, got {self.num_loss_tokens_to_skip!r}")
        require(is_int(self.seed) and self.seed >= 0, f"seed must be a non-negative integer, got {self.seed!r}")


def sdft_config(sdft: SdftSettings, *, seed: int, overrides: Mapping[str, Any] | None = None) -> SDFTUpdateConfig:
    """The run that ``settings.sdft`` gives, with a request's overrides on top (learning rate,
    epochs, rank… share their names with LoRA SFT's); keys that are not fields are ignored."""
    names = {f.name for f in fields(SDFTUpdateConfig)}
    values = {name: value for name, value in sdft.model_dump().items() if name in names}
    values.update({name: value for name, value in (overrides or {}).items() if name in names})
    values["seed"] = seed
    return SDFTUpdateConfig(**values)


def privileged_context(title: str, passage: str, self_edit: str = "") -> str:
    """What only the teacher sees: the passage as an open-book question shows it, and the
    self-edit's lines (the teacher model's notes on the passage) after it.

    >>> privileged_context("Brimwick", "Brimwick is a blue cheese.", "- It is blue.")
    'Title: Brimwick\\nPassage: Brimwick is a blue cheese.\\nNotes:\\n- It is blue.'
    """
    text = f"Title: {title}\nPassage: {passage}"
    if self_edit.strip():
        text += f"\nNotes:\n{self_edit.strip()}"
    return text


class SDFTUpdate:
    """Train a fresh LoRA adapter by on-policy self-distillation on ``prompts``."""

    def __init__(self, base_model: Any, tokenizer: Any, config: SDFTUpdateConfig) -> None:
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.config = config

    def train(
        self,
        prompts: Sequence[str],
        context: str,
        *,
        on_step: Callable[[int, int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
    ) -> TrainResult:
        """``prompts`` are user turns the student answers (already in the question format it is
        asked in); ``context`` is what the teacher reads before each. ``on_step(step, total,
        loss)`` follows every optimizer step; ``should_stop()`` is polled before each one."""
        import torch
        from datasets import Dataset
        from peft import LoraConfig, PeftModel
        from transformers import TrainerCallback
        from trl.experimental.sdft import SDFTConfig, SDFTTrainer

        if isinstance(prompts, str):
            raise TypeError("prompts must be a sequence of strings, not one string")
        prompts = [p for p in prompts if p and p.strip()]
        if not prompts:
            raise ValueError("no training prompts: SDFT distils on questions about the passage; pass at least one")
        if not context.strip():
            raise ValueError("no privileged context: the teacher must see the passage")
        if isinstance(self.base_model, PeftModel):
            raise TypeError("pass the plain base model, not a PeftModel: each run trains a fresh adapter")
        config = self.config
        # TRL repeats each prompt num_generations times inside a batch, so a batch is counted in
        # completions; fewer prompts than prompts_per_step shrink the batch rather than fail.
        prompts_per_step = min(config.prompts_per_step, len(prompts))
        batch = prompts_per_step * config.num_generations
        # TRL's sampler drops a last, incomplete batch: pad with the first prompts again so every
        # prompt is learned in every epoch.
        steps_per_epoch = math.ceil(len(prompts) / prompts_per_step)
        prompts = [*prompts, *prompts[: steps_per_epoch * prompts_per_step - len(prompts)]]
        total_steps = steps_per_epoch * config.epochs

        model = copy.deepcopy(self.base_model)
        device = getattr(model, "device", torch.device("cpu"))
        if device.type == "cpu" and model.dtype != torch.float32:
            model = model.float()  # bf16 matmuls are emulated on most CPUs (see lora_sft)
        targets = config.target_modules
        if isinstance(targets, str):
            targets = targets.strip() if targets.strip() in SHORTHANDS else [n.strip() for n in targets.split(",") if n.strip()]
        targets = resolve_target_modules(model, targets)
        lora = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0, target_modules=list(targets),
                          bias="none", task_type="CAUSAL_LM")
        dataset = Dataset.from_list(
            [{"prompt": [{"role": "user", "content": p}], "privileged_context": context} for p in prompts]
        )
        losses: list[float] = []
        tokens = [0]

        class Progress(TrainerCallback):
            def on_step_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
                if should_stop is not None and should_stop():
                    raise TrainingCancelled(
                        f"SDFT cancelled before step {state.global_step + 1} of {total_steps}; no adapter was saved"
                    )

            def on_log(self, args: Any, state: Any, control: Any, logs: dict[str, Any] | None = None, **kwargs: Any) -> None:
                if not logs or "loss" not in logs:
                    return
                loss = float(logs["loss"])
                grad_norm = logs.get("grad_norm")
                if not math.isfinite(loss) or (grad_norm is not None and not math.isfinite(float(grad_norm))):
                    what, value = ("loss", loss) if not math.isfinite(loss) else ("gradient norm", float(grad_norm))
                    raise TrainingDiverged(
                        f"SDFT diverged at step {state.global_step} of {total_steps}: the {what} is {value}. "
                        f"Lower the learning rate (now {config.learning_rate:g}, try {config.learning_rate / 10:g})."
                    )
                losses.append(loss)
                tokens[0] += int(float(logs.get("completions/mean_length", 0)) * batch)
                if on_step is not None:
                    on_step(state.global_step, total_steps, loss)

        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="seal-sdft-") as scratch, torch.random.fork_rng(
            devices=[device] if device.type == "cuda" else []
        ):
            args = SDFTConfig(
                output_dir=scratch,
                per_device_train_batch_size=batch,
                num_generations=config.num_generations,
                max_completion_length=config.max_completion_length,
                max_prompt_length=config.max_prompt_length,
                num_train_epochs=config.epochs,
                learning_rate=config.learning_rate,
                lr_scheduler_type="constant",
                warmup_steps=0,
                max_grad_norm=config.grad_clip,
                temperature=config.temperature,
                teacher_model_kind=config.teacher_model_kind,
                teacher_update_rate=config.teacher_update_rate,
                distillation_mode=config.distillation_mode,
                distillation_topk=config.distillation_topk,
                distillation_alpha=config.distillation_alpha,
                num_loss_tokens_to_skip=config.num_loss_tokens_to_skip,
                teacher_prompt_template=TEACHER_PROMPT_TEMPLATE,
                seed=config.seed,
                logging_steps=1,
                save_strategy="no",
                report_to=[],
                disable_tqdm=True,
                use_cpu=device.type == "cpu",
                bf16=False,
                # The scratch directory is deleted afterwards; nothing of TRL's is kept.
                dataloader_num_workers=0,
            )
            trainer = SDFTTrainer(
                model=model, args=args, train_dataset=dataset, processing_class=self.tokenizer,
                callbacks=[Progress()], peft_config=lora,
            )
            trainer.train()
            trained = trainer.model
        trained.eval()
        if not losses:
            raise RuntimeError("SDFT ran no optimizer step; nothing was learned")
        return TrainResult(
            model=trained, losses=losses, steps=len(losses), seconds=time.perf_counter() - started, tokens=tokens[0]
        )
