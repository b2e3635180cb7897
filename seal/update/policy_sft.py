"""Supervised fine-tuning of the teacher's policy on (prompt → self-edit) pairs: the "M" step of
ReST^EM (SEAL §3.1). The LoRA machinery is ``LoraSFTTrainer``; what differs from the student's
inner loop is the data: each example is a chat exchange, and only the assistant's turn is learned.

The prompt is encoded exactly as the engines encode it at sampling time (the chat template with
the generation prompt, no extra special tokens), and the completion is the self-edit followed by
EOS, exactly what the engine emitted before it stopped. Training on that very token layout is what
makes the fine-tuned adapter change what the engine samples next round.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from seal.chat import chat_prompt_ids
from seal.update.lora_sft import LoraSFTConfig, LoraSFTTrainer, TrainResult

log = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass(frozen=True)
class PolicyExample:
    prompt: str  # the user message (build_self_edit_prompt); the template is applied here
    completion: str  # the winning self-edit


def chat_sft_example(tokenizer: Any, example: PolicyExample, max_seq_len: int) -> tuple[list[int], list[int]]:
    """``(input_ids, labels)`` with the prompt masked out of the loss.

    A completion that does not fit is cut, but never the prompt: a truncated prompt would teach
    the policy to answer a context it will never see."""
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no EOS token; the policy must learn where a self-edit ends")
    prompt_ids = chat_prompt_ids(tokenizer, example.prompt)
    if len(prompt_ids) >= max_seq_len:
        raise ValueError(
            f"the self-edit prompt has {len(prompt_ids)} tokens, not below restem.policy.max_seq_len="
            f"{max_seq_len}; raise it so the completion fits after the prompt"
        )
    completion_ids = [*tokenizer(example.completion.strip(), add_special_tokens=False)["input_ids"], eos_id]
    room = max_seq_len - len(prompt_ids)
    if len(completion_ids) > room:
        # Cut without EOS: teaching an EOS mid-thought would teach the policy to stop early.
        completion_ids = completion_ids[:room]
    input_ids = prompt_ids + completion_ids
    labels = [IGNORE_INDEX] * len(prompt_ids) + completion_ids
    return input_ids, labels


def train_policy(
    base_model: Any,
    tokenizer: Any,
    examples: Sequence[PolicyExample],
    config: LoraSFTConfig,
    *,
    on_step: Callable[[int, int, float], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """A fresh LoRA policy adapter on ``base_model`` (never modified) from the kept examples."""
    usable = [e for e in examples if e.completion.strip()]
    if not usable:
        raise ValueError("no policy examples with a non-empty self-edit to learn from")
    sequences = [chat_sft_example(tokenizer, example, config.max_seq_len) for example in usable]
    trainer = LoraSFTTrainer(base_model, tokenizer, config)
    return trainer.train_tokenized(sequences, on_step=on_step, should_stop=should_stop)
