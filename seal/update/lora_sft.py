"""LoRA supervised fine-tuning: SEAL's inner-loop update (§3.1), one adapter per self-edit.

The base model is never modified: each run trains LoRA matrices on a private deep copy, so the
caller can keep generating with the base while candidates train.

Retention-aware options: ``rehearsal_ratio`` mixes the base model's own answers to general
prompts (``seal.anchors``) into every step, and ``kl_beta`` adds a KL(base ‖ candidate) penalty on
them; both need the anchor examples passed to :meth:`LoraSFTTrainer.train`. This dataclass's own
defaults are plain SFT on all linear layers (what SEAL's paper does); the product's defaults live
in ``seal.config.LoraSettings`` and were chosen by ``bench/forgetting.py``: on SmolLM2-135M the
plain update learned invented facts (0 → ~50% closed book) but lost 55-93% of the retention probe;
MLP-only LoRA with rehearsal 1.0 and β 5 keeps the loss near 0.05 while still learning.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from seal.chat import USER_ROLE, chat_prompt_text
from seal.durable import fsync_file

if TYPE_CHECKING:
    from seal.config import LoraSettings

log = logging.getLogger(__name__)

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
# Token ids (every token is a target), or (input_ids, labels) with -100 where no loss is taken.
TokenizedExample = list[int] | tuple[list[int], list[int]]


@dataclass
class LoraSFTConfig:
    learning_rate: float = 1e-3
    epochs: int = 10
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    # "all-linear", or module names separated by commas ("q_proj,v_proj").
    target_modules: str | Sequence[str] = "all-linear"
    # Transformer blocks that get LoRA matrices: "" = every block, else indices and inclusive
    # ranges separated by commas ("15-29", "0,2,4-6"); see parse_layers.
    layers: str = ""
    batch_size: int = 8
    max_seq_len: int = 256
    grad_clip: float = 1.0
    seed: int = 0
    # Retention-aware SFT (see the module docstring). Anchor examples per training sequence added
    # to every step, trained with cross-entropy on the base model's own answer; 0 = no rehearsal.
    rehearsal_ratio: float = 0.0
    # Weight of KL(base ‖ candidate) on the anchor examples' answer tokens; 0 = no penalty.
    kl_beta: float = 0.0
    # Anchor examples per step for the KL term when rehearsal adds none of its own.
    kl_anchors_per_step: int = 4
    # Share of the trained update that is kept: LoRA's B matrices are multiplied by it once
    # training ends (weight-space interpolation toward the base, as WiSE-FT does); 1 = as trained.
    delta_scale: float = 1.0

    def __post_init__(self) -> None:
        def require(condition: bool, message: str) -> None:
            if not condition:
                raise ValueError(f"invalid LoRA config: {message}")

        def is_int(value: Any) -> bool:
            return isinstance(value, int) and not isinstance(value, bool)

        require(
            isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate) and self.learning_rate > 0,
            f"learning_rate must be a positive finite number (try 1e-3), got {self.learning_rate!r}",
        )
        require(is_int(self.epochs) and self.epochs >= 1, f"epochs must be an integer >= 1, got {self.epochs!r}")
        require(is_int(self.rank) and self.rank >= 1, f"rank must be an integer >= 1 (try 16), got {self.rank!r}")
        require(
            isinstance(self.alpha, (int, float)) and self.alpha > 0,
            f"alpha must be > 0 (commonly 2 x rank), got {self.alpha!r}",
        )
        require(
            isinstance(self.dropout, (int, float)) and 0.0 <= self.dropout < 1.0,
            f"dropout must be in [0, 1), got {self.dropout!r}",
        )
        require(self.target_module_list() != [], "target_modules is empty; use 'all-linear' or e.g. 'q_proj,v_proj'")
        require(isinstance(self.layers, str), f"layers must be a string such as '15-29' or '' (all), got {self.layers!r}")
        try:
            parse_layers(self.layers)
        except ValueError as exc:
            require(False, str(exc))
        require(
            is_int(self.batch_size) and self.batch_size >= 1, f"batch_size must be an integer >= 1, got {self.batch_size!r}"
        )
        require(
            is_int(self.max_seq_len) and self.max_seq_len >= 2,
            f"max_seq_len must be an integer >= 2 (a token and its successor), got {self.max_seq_len!r}",
        )
        require(
            isinstance(self.grad_clip, (int, float)) and math.isfinite(self.grad_clip) and self.grad_clip > 0,
            f"grad_clip must be a positive finite max gradient norm (try 1.0), got {self.grad_clip!r}",
        )
        require(is_int(self.seed) and self.seed >= 0, f"seed must be a non-negative integer, got {self.seed!r}")
        for name in ("rehearsal_ratio", "kl_beta"):
            value = getattr(self, name)
            require(
                isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0,
                f"{name} must be a finite number >= 0 (0 = off), got {value!r}",
            )
        require(
            isinstance(self.delta_scale, (int, float)) and not isinstance(self.delta_scale, bool)
            and math.isfinite(self.delta_scale) and 0.0 < self.delta_scale <= 1.0,
            f"delta_scale must be in (0, 1] (1 = the update as trained), got {self.delta_scale!r}",
        )
        require(
            is_int(self.kl_anchors_per_step) and self.kl_anchors_per_step >= 1,
            f"kl_anchors_per_step must be an integer >= 1, got {self.kl_anchors_per_step!r}",
        )

    @property
    def uses_anchors(self) -> bool:
        """Whether training needs anchor examples (rehearsal or the KL penalty is on)."""
        return self.rehearsal_ratio > 0 or self.kl_beta > 0

    def anchors_per_step(self, batch_rows: int) -> int:
        """Anchor examples in a step whose training batch has ``batch_rows`` sequences."""
        if self.rehearsal_ratio > 0:
            return max(1, math.ceil(self.rehearsal_ratio * batch_rows))
        return self.kl_anchors_per_step if self.kl_beta > 0 else 0

    def target_module_list(self) -> str | list[str]:
        """What PEFT's ``target_modules`` expects: the 'all-linear' shorthand or a list of names."""
        if isinstance(self.target_modules, str):
            if self.target_modules.strip() in SHORTHANDS:
                return self.target_modules.strip()
            return [name.strip() for name in self.target_modules.split(",") if name.strip()]
        return [str(name).strip() for name in self.target_modules if str(name).strip()]


class TrainingDiverged(RuntimeError):
    """The loss or the gradients became NaN/inf; no update from that step was applied."""

    code = "failed_precondition"  # the request's hyperparameters must change before a retry


class TrainingCancelled(RuntimeError):
    """``should_stop`` asked to stop (deadline passed or the client went away)."""

    code = "deadline_exceeded"


def lora_sft_config(
    lora: LoraSettings, *, seed: int, overrides: Mapping[str, Any] | None = None
) -> LoraSFTConfig:
    """The inner-loop config that ``settings.lora`` gives, with a self-edit's or a request's
    overrides on top; keys that are not fields of :class:`LoraSFTConfig` are ignored."""
    names = {f.name for f in fields(LoraSFTConfig)}
    values = {name: value for name, value in lora.model_dump().items() if name in names}
    values.update({name: value for name, value in (overrides or {}).items() if name in names})
    values["seed"] = seed
    return LoraSFTConfig(**values)


# Which tokens of a chat example carry the loss: the assistant's reply only, or every token.
CHAT_LOSS_TARGETS = ("output_tokens", "all_tokens")


def chat_example(tokenizer: Any, prompt: str, reply: str, *, loss_on: str = "output_tokens") -> tuple[list[int], list[int]]:
    """One user turn and the assistant's reply as ``(input_ids, labels)`` for
    :meth:`LoraSFTTrainer.train_tokenized`, laid out by the tokenizer's own chat template, so the
    model trains on exactly the tokens it reads and writes when it generates with ``chat=True``.

    The reply's tokens are found from the template, not from hard-coded token ids: the exchange
    is rendered up to the assistant's header (``add_generation_prompt``) and in full, and the
    reply is what the full rendering adds. ``output_tokens`` takes the loss on those alone (the
    template's end-of-turn marker included, which teaches the model where to stop);
    ``all_tokens`` on every token. No length limit is applied: the caller decides what to do
    with an example too long to train on."""
    if loss_on not in CHAT_LOSS_TARGETS:
        raise ValueError(f"loss_on must be one of {', '.join(CHAT_LOSS_TARGETS)}, got {loss_on!r}")
    prefix = chat_prompt_text(tokenizer, prompt)
    exchange = [{"role": USER_ROLE, "content": prompt}, {"role": "assistant", "content": reply}]
    full = tokenizer.apply_chat_template(exchange, tokenize=False)
    if not full.startswith(prefix):
        raise ValueError("the chat template does not render the prompt as a prefix of the full exchange")
    prefix_ids = list(tokenizer(prefix, add_special_tokens=False)["input_ids"])
    input_ids = list(tokenizer(full, add_special_tokens=False)["input_ids"])
    if input_ids[: len(prefix_ids)] != prefix_ids or len(input_ids) == len(prefix_ids):
        raise ValueError("the reply's tokens cannot be told apart from the prompt's (a token spans the boundary)")
    if loss_on == "all_tokens":
        return input_ids, list(input_ids)
    return input_ids, [-100] * len(prefix_ids) + input_ids[len(prefix_ids) :]


@dataclass
class TrainResult:
    model: Any  # peft.PeftModel, in eval mode
    losses: list[float] = field(default_factory=list)  # one per optimizer step
    steps: int = 0
    seconds: float = 0.0
    tokens: int = 0  # non-padding tokens seen, summed over all steps
    # Per step, when anchors were used: cross-entropy on the base model's own anchor answers, and
    # the KL(base ‖ candidate) penalty before its β. ``losses`` stays the loss on the training texts.
    rehearsal_losses: list[float] = field(default_factory=list)
    kl_losses: list[float] = field(default_factory=list)


class LoraSFTTrainer:
    """Causal-LM fine-tuning of LoRA matrices on plain texts (each followed by EOS)."""

    def __init__(self, base_model: Any, tokenizer: Any, config: LoraSFTConfig) -> None:
        self.base_model = base_model
        self.tokenizer = tokenizer
        self.config = config

    def tokenize(self, texts: Sequence[str]) -> list[list[int]]:
        """Plain text, not chat-formatted: SEAL trains on self-edit lines as raw continuation text."""
        if isinstance(texts, str):
            raise TypeError("texts must be a sequence of strings, not one string")
        kept = [text for text in texts if text and text.strip()]
        if not kept:
            raise ValueError("no training texts: pass at least one non-empty string")
        eos_id = self.tokenizer.eos_token_id
        if eos_id is None:
            raise ValueError("the tokenizer has no EOS token; SFT appends EOS to teach where a text ends")
        sequences = []
        truncated = 0
        for ids in self.tokenizer(kept, add_special_tokens=True)["input_ids"]:
            ids = [*ids, eos_id]
            if len(ids) > self.config.max_seq_len:
                truncated += 1
                ids = ids[: self.config.max_seq_len]
            sequences.append(ids)
        if truncated:
            log.warning(
                "%d of %d training texts were cut to max_seq_len=%d tokens; raise max_seq_len to keep them whole",
                truncated,
                len(sequences),
                self.config.max_seq_len,
            )
        return sequences

    def _wrap_copy(self) -> Any:
        import torch
        from peft import PeftModel, get_peft_model

        if isinstance(self.base_model, PeftModel):
            raise TypeError("pass the plain base model, not a PeftModel: each run trains a fresh adapter")
        model = copy.deepcopy(self.base_model)
        if getattr(model, "device", torch.device("cpu")).type == "cpu" and model.dtype != torch.float32:
            # bf16/fp16 matmuls are emulated on most CPUs: a bf16 LoRA step measured >15x slower.
            model = model.float()
        return get_peft_model(model, peft_lora_config(model, self.config))

    def train(
        self,
        texts: Sequence[str],
        *,
        on_step: Callable[[int, int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        anchors: Sequence[TokenizedExample] | None = None,
    ) -> TrainResult:
        """Train a fresh adapter. ``on_step(step, total_steps, loss)`` follows every optimizer
        step; ``should_stop()`` is polled before each one and ends the run with TrainingCancelled.
        ``anchors``: see :meth:`train_tokenized`."""
        return self.train_tokenized(self.tokenize(texts), on_step=on_step, should_stop=should_stop, anchors=anchors)

    def train_tokenized(
        self,
        sequences: Sequence[TokenizedExample],
        *,
        on_step: Callable[[int, int, float], None] | None = None,
        should_stop: Callable[[], bool] | None = None,
        anchors: Sequence[TokenizedExample] | None = None,
    ) -> TrainResult:
        """Like :meth:`train` on already tokenised sequences. A sequence given as ``(input_ids,
        labels)`` is trained only where its label is not -100: that is how a chat example keeps
        its prompt out of the loss (``seal.update.policy_sft``).

        ``anchors`` (``seal.anchors.anchor_examples``: the base model's own answers to general
        prompts, the prompt masked) are required when ``rehearsal_ratio`` or ``kl_beta`` is set.
        Each step then also takes the next few anchors of a seeded cycle and adds their
        cross-entropy (rehearsal) and/or ``kl_beta`` × KL(base ‖ candidate) over their answer
        tokens; the base's logits come from the same model with the adapter disabled."""
        import torch

        if not sequences:
            raise ValueError("no training sequences: pass at least one")
        for index, item in enumerate(sequences):
            if isinstance(item, tuple) and len(item[0]) != len(item[1]):
                raise ValueError(f"sequence {index}: input_ids and labels differ in length")
        config = self.config
        anchors = list(anchors or [])
        if config.uses_anchors and not anchors:
            raise ValueError(
                "rehearsal_ratio or kl_beta is set but no anchor examples were given "
                "(build them with seal.anchors.anchor_examples, or set both to 0)"
            )
        for index, item in enumerate(anchors):
            if not isinstance(item, tuple) or len(item[0]) != len(item[1]):
                raise ValueError(f"anchor {index}: expected (input_ids, labels) of equal length")
        steps_per_epoch = math.ceil(len(sequences) / config.batch_size)
        total_steps = config.epochs * steps_per_epoch
        pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        started = time.perf_counter()
        losses: list[float] = []
        rehearsal_losses: list[float] = []
        kl_losses: list[float] = []
        tokens = 0

        # Forked RNG: LoRA init, dropout and shuffling are seeded without disturbing the caller's
        # global RNG (the teacher's seeded sampling relies on it).
        base_device = getattr(self.base_model, "device", torch.device("cpu"))
        with torch.random.fork_rng(devices=[base_device] if base_device.type == "cuda" else []):
            torch.manual_seed(config.seed)
            model = self._wrap_copy()
            model.train()
            device = model.device
            trainable = [parameter for parameter in model.parameters() if parameter.requires_grad]
            optimizer = torch.optim.AdamW(trainable, lr=config.learning_rate, weight_decay=0.0)
            shuffler = torch.Generator().manual_seed(config.seed)
            anchor_order: list[int] = []
            step = 0
            for _epoch in range(config.epochs):
                order = torch.randperm(len(sequences), generator=shuffler).tolist()
                for start in range(0, len(order), config.batch_size):
                    if should_stop is not None and should_stop():
                        raise TrainingCancelled(
                            f"training cancelled before step {step + 1} of {total_steps}; no adapter was saved"
                        )
                    step += 1
                    batch = [sequences[i] for i in order[start : start + config.batch_size]]
                    sums = row_sums(batch, pad_id, device, _plain_forward(model))
                    loss = sums.mean(sums.ce)
                    objective = loss
                    wanted = config.anchors_per_step(len(batch)) if anchors else 0
                    if wanted:
                        picked = []
                        while len(picked) < wanted:
                            if not anchor_order:
                                # A seeded cycle: every anchor is used before any repeats.
                                anchor_order = torch.randperm(len(anchors), generator=shuffler).tolist()
                            picked.append(anchors[anchor_order.pop()])
                        rehearsal, kl = self._anchor_terms(model, picked, pad_id, device)
                        if config.rehearsal_ratio > 0:
                            objective = objective + rehearsal
                            rehearsal_losses.append(rehearsal.item())
                        if config.kl_beta > 0:
                            objective = objective + config.kl_beta * kl
                            kl_losses.append(kl.item())
                        tokens += sum(len(ids) for ids, _ in picked)
                    if not torch.isfinite(objective):
                        value = (loss if not torch.isfinite(loss) else objective).item()
                        raise TrainingDiverged(_diverged_message(step, total_steps, "loss", value, config))
                    objective.backward()
                    grad_norm = torch.nn.utils.clip_grad_norm_(trainable, config.grad_clip)
                    if not torch.isfinite(grad_norm):
                        raise TrainingDiverged(
                            _diverged_message(step, total_steps, "gradient norm", grad_norm.item(), config)
                        )
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    loss_value = loss.item()
                    losses.append(loss_value)
                    tokens += int(sums.tokens.sum())
                    if on_step is not None:
                        on_step(step, total_steps, loss_value)
        scale_lora_delta(model, "default", config.delta_scale)
        model.eval()
        return TrainResult(
            model=model,
            losses=losses,
            steps=step,
            seconds=time.perf_counter() - started,
            tokens=tokens,
            rehearsal_losses=rehearsal_losses,
            kl_losses=kl_losses,
        )

    def _anchor_terms(self, model: Any, picked: Sequence[TokenizedExample], pad_id: int, device: Any) -> tuple[Any, Any]:
        """(cross-entropy on the anchors' answers, mean KL(base ‖ candidate) over the positions
        that predict an answer token). The KL is only built when ``kl_beta`` > 0: the extra base
        forward pass costs about a third of a training step."""
        import torch

        def base(input_ids: Any, attention_mask: Any, _rows: list[int]) -> Any:
            with model.disable_adapter():
                return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

        # Forward KL (the distillation direction): the candidate must keep covering what the base
        # would say, which also keeps the base's greedy answer on top.
        sums = row_sums(picked, pad_id, device, _plain_forward(model), base if self.config.kl_beta > 0 else None)
        kl = sums.mean(sums.kl) if sums.kl is not None else torch.zeros((), device=device)
        return sums.mean(sums.ce), kl


def token_kl(p_logits: Any, q_logits: Any) -> Any:
    """KL(p ‖ q) per row of two ``(..., vocabulary)`` logit tensors, in nats, computed in float32
    from log-softmaxes (stable for large logits)."""
    import torch

    log_p = torch.log_softmax(p_logits.float(), dim=-1)
    log_q = torch.log_softmax(q_logits.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1)


# "all-linear": every linear layer but the output head; "mlp": the linear layers of the
# feed-forward blocks only (gate/up/down in Llama, Qwen and Mistral; c_fc/c_proj in GPT-2), which
# bench/forgetting.py measured to forget less than all-linear at equal learning.
SHORTHANDS = ("all-linear", "mlp")
_MLP_BLOCKS = frozenset({"mlp", "feed_forward", "ffn"})


def scale_lora_delta(model: Any, adapter_name: str, scale: float) -> None:
    """Multiply adapter ``adapter_name``'s update B·A by ``scale`` in place (its B matrices), so
    every later use (saving, serving, merging, the KL measure) sees the interpolated update:
    base + scale · ΔW. A no-op for 1."""
    import torch

    if scale == 1.0:
        return
    with torch.no_grad():
        for module in model.modules():
            lora_b = getattr(module, "lora_B", None)
            if isinstance(lora_b, torch.nn.ModuleDict) and adapter_name in lora_b:
                lora_b[adapter_name].weight.mul_(scale)


def peft_lora_config(model: Any, config: LoraSFTConfig) -> Any:
    """The PEFT ``LoraConfig`` of ``config`` on ``model``: what both trainers (sequential and
    batched) build, so their adapter_config.json files are the same."""
    from peft import LoraConfig

    layers = parse_layers(config.layers)
    if layers is not None:
        blocks = getattr(model.config, "num_hidden_layers", None)
        if isinstance(blocks, int) and max(layers) >= blocks:
            raise ValueError(
                f"layers {config.layers!r} names block {max(layers)}, but this model has {blocks} "
                f"(0-{blocks - 1}); use e.g. '{blocks // 2}-{blocks - 1}'"
            )
    # Shorthands are spelled out as leaf names: PEFT would record every full module path
    # instead (210 for SmolLM2), which bloats adapter_config.json and ties it to one layer count.
    return LoraConfig(
        r=config.rank,
        lora_alpha=config.alpha,
        lora_dropout=config.dropout,
        target_modules=resolve_target_modules(model, config.target_module_list()),
        layers_to_transform=layers,
        bias="none",
        task_type="CAUSAL_LM",
    )


def parse_layers(spec: str) -> list[int] | None:
    """Block indices named by a ``layers`` setting: None (every block) for an empty string, else
    the sorted, distinct indices of its comma-separated items, each an index or an inclusive range.

    >>> parse_layers("")
    >>> parse_layers("15-17")
    [15, 16, 17]
    >>> parse_layers("4, 0-1, 4")
    [0, 1, 4]
    """
    if not spec.strip():
        return None
    indices: set[int] = set()
    for item in spec.split(","):
        item = item.strip()
        low, dash, high = item.partition("-")
        try:
            first, last = int(low), int(high if dash else low)
        except ValueError:
            raise ValueError(
                f"layers: {item!r} is not a block index or a range like '15-29' (in {spec!r})"
            ) from None
        if first < 0 or last < first:
            raise ValueError(f"layers: {item!r} must be an index >= 0 or a range low-high with low <= high")
        indices.update(range(first, last + 1))
    return sorted(indices)


def resolve_target_modules(model: Any, targets: str | list[str]) -> list[str]:
    """Leaf module names for PEFT's ``target_modules`` from a shorthand or a list of names."""
    if targets == "all-linear":
        return linear_module_names(model)
    if targets == "mlp":
        return mlp_module_names(model)
    return list(targets)


def mlp_module_names(model: Any) -> list[str]:
    """Leaf names of the linear layers inside feed-forward blocks (a module path with an ``mlp``,
    ``feed_forward`` or ``ffn`` component)."""
    import torch
    from transformers.pytorch_utils import Conv1D

    names = sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and _MLP_BLOCKS & set(name.split(".")[:-1])
        }
    )
    if not names:
        raise ValueError(
            "target_modules 'mlp' found no feed-forward block (a module path with mlp, feed_forward or ffn) "
            "in this model; name the layers instead, e.g. 'up_proj,down_proj'"
        )
    return names


def linear_module_names(model: Any) -> list[str]:
    """Leaf names of every linear layer except the output head: what PEFT's 'all-linear' means."""
    import torch
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    return sorted(
        {
            name.rsplit(".", 1)[-1]
            for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D)) and module is not head and name
        }
    )


def _pair(example: TokenizedExample) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of an example; plain token ids are their own labels."""
    return example if isinstance(example, tuple) else (example, example)


def _right_padded(batch: Sequence[TokenizedExample], pad_id: int) -> tuple[Any, Any, Any]:
    # Right padding keeps real tokens at positions 0..n-1, the positions a causal LM's forward
    # assumes when no position_ids are passed; -100 keeps padding (even when pad == EOS) out of the loss.
    import torch

    pairs = [_pair(item) for item in batch]
    width = max(len(ids) for ids, _ in pairs)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), -100, dtype=torch.long)
    for row, (ids, targets) in enumerate(pairs):
        input_ids[row, : len(ids)] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, : len(ids)] = 1
        labels[row, : len(ids)] = torch.tensor(targets, dtype=torch.long)
    return input_ids, attention_mask, labels


# The rows of one step are padded to the longest row of their forward pass. A step mixes short
# self-edit lines (~25 tokens) with the passage (~100-250) and anchors (~45-85): padded together,
# a CPU, where a forward costs what its tokens cost, computed up to 4x the real tokens. So rows
# go through passes grouped by length, each padded by at most this share of its tokens (a lone
# long row gets a pass of its own); per-row sums keep every loss the masked mean one padded pass
# gives, up to float rounding (tests/test_multi_lora.py, bench/candidates.py).
MAX_PADDING_SHARE = 0.25


def length_groups(lengths: Sequence[int], max_padding_share: float = MAX_PADDING_SHARE) -> list[list[int]]:
    """Row indices in groups for separate forward passes: longest rows first, and a row joins
    the current group while padding stays within ``max_padding_share`` of the group's tokens.

    >>> length_groups([23, 99, 25])
    [[1], [2, 0]]
    """
    groups: list[list[int]] = []
    real = 0
    for index in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        if groups:
            width, rows = lengths[groups[-1][0]], len(groups[-1]) + 1
            if rows * width - (real + lengths[index]) <= max_padding_share * rows * width:
                groups[-1].append(index)
                real += lengths[index]
                continue
        groups.append([index])
        real = lengths[index]
    return groups


# (input_ids, attention_mask, the rows' indices in the caller's list) → logits
RowForward = Callable[[Any, Any, list[int]], Any]


def _plain_forward(model: Any) -> RowForward:
    return lambda input_ids, attention_mask, _rows: model(
        input_ids=input_ids, attention_mask=attention_mask, use_cache=False
    ).logits


@dataclass
class RowSums:
    """Per-row sums over each row's target tokens (label not -100), in the rows' given order: a
    masked mean over any subset of rows is ``sum / targets`` of that subset."""

    ce: Any  # cross-entropy sums, float32, carrying the graph
    kl: Any  # KL(base ‖ model) sums, or None when no base forward was asked for
    targets: Any  # target tokens per row
    tokens: Any  # real (unpadded) tokens per row

    def mean(self, values: Any, rows: slice | None = None) -> Any:
        picked = slice(None) if rows is None else rows
        return values[picked].sum() / self.targets[picked].sum()


def row_sums(
    rows: Sequence[TokenizedExample],
    pad_id: int,
    device: Any,
    forward: RowForward,
    base_forward: RowForward | None = None,
    *,
    max_padding_share: float = MAX_PADDING_SHARE,
) -> RowSums:
    """Cross-entropy (as transformers' causal-LM loss computes it: float32, labels shifted by one)
    and, with ``base_forward``, KL(base ‖ model) per row, from forward passes over length groups
    (:func:`length_groups`). ``base_forward`` runs without gradients."""
    import torch

    order: list[int] = []
    ce_parts, kl_parts, target_parts, token_parts = [], [], [], []
    lengths = [len(_pair(row)[0]) for row in rows]
    for group in length_groups(lengths, max_padding_share):
        input_ids, attention_mask, labels = (t.to(device) for t in _right_padded([rows[i] for i in group], pad_id))
        logits = forward(input_ids, attention_mask, group)[:, :-1]
        targets = labels[:, 1:]
        where = targets != -100
        ce_parts.append(
            torch.nn.functional.cross_entropy(
                logits.float().reshape(-1, logits.shape[-1]), targets.reshape(-1), ignore_index=-100, reduction="none"
            ).view(targets.shape).sum(dim=1)
        )
        if base_forward is not None:
            with torch.no_grad():
                base = base_forward(input_ids, attention_mask, group)[:, :-1][where]
            per_token = token_kl(base, logits[where])
            owners = where.nonzero()[:, 0]
            kl_parts.append(torch.zeros(len(group), device=per_token.device, dtype=per_token.dtype).index_add(0, owners, per_token))
        target_parts.append(where.sum(dim=1))
        token_parts.append(attention_mask.sum(dim=1))
        order.extend(group)
    back = torch.argsort(torch.tensor(order, device=device))
    return RowSums(
        ce=torch.cat(ce_parts)[back],
        kl=torch.cat(kl_parts)[back] if kl_parts else None,
        targets=torch.cat(target_parts)[back],
        tokens=torch.cat(token_parts)[back],
    )


def _diverged_message(step: int, total: int, what: str, value: float, config: LoraSFTConfig) -> str:
    return (
        f"training diverged at step {step} of {total}: the {what} is {value}; the step was not applied. "
        f"Lower the learning rate (now {config.learning_rate:g}, try {config.learning_rate / 10:g}) "
        "or the grad_clip norm."
    )


def save_adapter(model: Any, out_dir: Path) -> list[Path]:
    """Write the active adapter as a plain PEFT directory (adapter_config.json and
    adapter_model.safetensors, nothing else) that PeftModel.from_pretrained and vLLM load."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    adapter_name = model.active_adapter
    if not isinstance(adapter_name, str):
        raise TypeError(f"expected exactly one active adapter, got {adapter_name!r}")
    card_existed = (out_dir / "README.md").exists()
    model.save_pretrained(str(out_dir), selected_adapters=[adapter_name], safe_serialization=True)
    if adapter_name != "default":
        # PEFT files any adapter not named "default" under a subfolder of its name.
        nested = out_dir / adapter_name
        for name in ADAPTER_FILES:
            os.replace(nested / name, out_dir / name)
        if nested.is_dir():
            for leftover in nested.iterdir():
                leftover.unlink()
            nested.rmdir()
    # PEFT also writes a model card; it is not part of the adapter and would make an adapter's
    # bytes depend on PEFT's card template.
    if not card_existed:
        (out_dir / "README.md").unlink(missing_ok=True)
    # PEFT keeps target_modules as a set and saves it in hash order, which changes from one
    # process to the next; sorted, the same training run writes byte-identical files.
    config_path = out_dir / "adapter_config.json"
    adapter_config = json.loads(config_path.read_text(encoding="utf-8"))
    if isinstance(adapter_config.get("target_modules"), list):
        adapter_config["target_modules"] = sorted(adapter_config["target_modules"])
        config_path.write_text(json.dumps(adapter_config, indent=2, sort_keys=True), encoding="utf-8")
    written = [out_dir / name for name in ADAPTER_FILES]
    for path in written:
        if not path.is_file():
            raise RuntimeError(f"PEFT did not write {path}")
        fsync_file(path)
    return written
