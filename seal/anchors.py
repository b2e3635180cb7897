"""Anchors: what the base model already says, kept as a reference while it learns a passage.

Two fixed, built-in sets of general prompts, disjoint on purpose:

- ``ANCHOR_PROMPTS`` are *trained on*. The base model answers them once (greedy) per base-model
  fingerprint; the answers are cached on disk (``AnchorStore``) and mixed into every LoRA update
  as rehearsal (cross-entropy on the base's own answer) and/or a KL-to-base penalty
  (``seal.update.lora_sft``). No external data is needed: the model rehearses itself.
- ``DRIFT_TEXTS`` are *never trained on*. :func:`kl_drift` measures, in one batched forward pass
  with the adapter on and off, the mean token-level KL(candidate ‖ base) over their replies: a
  cheap, sensitive retention number next to the QA probe. It must not share prompts with the
  anchors, because training on greedy answers sharpens the distribution on exactly those prompts
  (the KL there goes *up* while retention improves), which would make the measure lie.

Neither set shares a question with the retention probe's built-in list (``seal.retention``):
rehearsing the probe's own questions would protect the probe, not the model.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from seal.cancellation import install_stop_hook
from seal.chat import chat_prompt_ids
from seal.domains.knowledge import build_question_prompt
from seal.durable import atomic_write_json

log = logging.getLogger(__name__)

ANCHOR_FORMAT = 1

# Half in the closed-book format τ and the probe are asked in (so rehearsal keeps the short-answer
# chat behaviour they depend on), half open instructions (so it keeps general chat behaviour too).
# Facts and answers avoid every retention-probe question; tests/test_retention_aware.py checks it.
ANCHOR_PROMPTS: tuple[str, ...] = (
    *(
        build_question_prompt(question)
        for question in (
            "What is the capital of Portugal?",
            "What is the capital of Greece?",
            "What is the capital of Norway?",
            "What is the capital of Argentina?",
            "What is 12 plus 15?",
            "How many legs does a spider have?",
            "What color is a ripe banana?",
            "Which animal has a long trunk?",
            "What do caterpillars turn into?",
            "What is the opposite of cold?",
            "What is the plural of mouse?",
            "How many days are in a leap year?",
            "Which shape has three sides?",
            "What color is grass?",
            "Who wrote Pride and Prejudice?",
            "What is the square root of 81?",
            "Which season comes after winter?",
            "Which gas do humans need to breathe to stay alive?",
            "Which bird is a symbol of peace?",
            "How many hours are in a day?",
            "What instrument does a drummer play?",
            "What is a young dog called?",
            "What is the capital of Sweden?",
            "Who wrote the Odyssey?",
        )
    ),
    "Give one synonym for the word 'happy'.",
    "Translate 'thank you' into French.",
    "Write one sentence about the ocean.",
    "List three fruits.",
    "What is a verb? Explain in one sentence.",
    "Write a short greeting for a birthday card.",
    "Explain what a triangle is in one sentence.",
    "Give a tip for staying healthy.",
    "Name two things you can find in a kitchen.",
    "Suggest a name for a pet cat.",
    "Write a haiku about rain.",
    "Summarize in one sentence: The cat sat on the mat all afternoon and watched the birds outside.",
    "What is the past tense of 'run'?",
    "Rewrite this sentence politely: Give me the salt.",
    "Count from one to five.",
    "What should you do if you feel tired?",
    "Give an example of a vegetable.",
    "Explain in one sentence why we need sleep.",
    "Write a question you could ask a new friend.",
    "What does a thermometer measure?",
    "Complete the sentence: An apple a day",
    "Tell me a fun fact about cats.",
    "How do you make a cup of tea? Answer in two sentences.",
    "What is the difference between a lake and a river?",
)


@dataclass(frozen=True)
class DriftText:
    """A context and a continuation written by hand; KL is measured where the continuation is
    predicted. ``chat``: the context is a user message in the chat template and the continuation
    the assistant's reply; otherwise both are plain text (the form self-edits are trained in)."""

    context: str
    continuation: str
    chat: bool = True


def _qa(question: str, answer: str) -> DriftText:
    return DriftText(build_question_prompt(question), answer)


DRIFT_TEXTS: tuple[DriftText, ...] = (
    _qa("How many sides does a hexagon have?", "Six."),
    _qa("What is the capital of Australia?", "Canberra."),
    _qa("Who wrote the play Hamlet?", "William Shakespeare."),
    _qa("What is the boiling point of water at sea level in degrees Celsius?", "100 degrees Celsius."),
    _qa("Which planet has the most prominent rings?", "Saturn."),
    _qa("What is the capital of Brazil?", "Brasília."),
    _qa("How many minutes are in an hour?", "Sixty minutes."),
    _qa("What is the smallest prime number?", "Two."),
    _qa("What is the largest land animal?", "The African elephant."),
    _qa("What color do you get by mixing blue and yellow?", "Green."),
    DriftText("What is photosynthesis?", "Photosynthesis is the process by which plants use sunlight, water and carbon dioxide to make sugar and release oxygen."),
    DriftText("Give me a synonym for 'big'.", "Large."),
    DriftText("Translate 'good night' into Spanish.", "Buenas noches."),
    DriftText("Write one sentence about autumn.", "In autumn the leaves turn red and gold and fall from the trees."),
    DriftText("Explain what a noun is.", "A noun is a word that names a person, a place, a thing or an idea."),
    DriftText("How can I save money?", "Make a budget, keep track of what you spend, and put a fixed amount into savings every month."),
    DriftText("What is the difference between weather and climate?", "Weather is the state of the air on a given day, while climate is the average weather of a region over many years."),
    DriftText("Suggest a healthy breakfast.", "Oatmeal with fresh fruit and a glass of milk is a healthy breakfast."),
    DriftText("What does a doctor do?", "A doctor examines patients, finds out what makes them ill and prescribes treatments to help them get well."),
    DriftText("Why is exercise important?", "Exercise strengthens the heart and the muscles, improves mood and helps prevent disease."),
    DriftText("Name three colors of the rainbow.", "Red, green and violet."),
    DriftText("What is 9 times 6?", "9 times 6 is 54."),
    DriftText("Write a short thank-you note to a teacher.", "Dear teacher, thank you for your patience and for everything you taught me this year."),
    DriftText("What do the lungs do?", "The lungs bring oxygen into the body and remove carbon dioxide when we breathe."),
    DriftText("The history of the printing press", " begins in the fifteenth century, when Johannes Gutenberg built a press that used movable metal type.", chat=False),
    DriftText("Water is made of", " two hydrogen atoms and one oxygen atom bonded together.", chat=False),
    DriftText("Mount Kilimanjaro is", " the highest mountain in Africa and rises almost 5,900 metres above sea level.", chat=False),
    DriftText("A computer program is", " a list of instructions that tells a computer what to do, step by step.", chat=False),
    DriftText("The Great Wall of China", " stretches for thousands of kilometres across the hills of northern China.", chat=False),
    DriftText("In a healthy diet,", " vegetables, fruits and whole grains make up most of what we eat each day.", chat=False),
    DriftText("The French Revolution began in", " 1789 and changed the way France was governed.", chat=False),
    DriftText("Elephants are", " the largest land animals and live in the forests and grasslands of Africa and Asia.", chat=False),
)


# --- the anchor set: the base model's own answers ------------------------------------------------


def prompt_list_id(prompts: Sequence[str]) -> str:
    """Digest of an ordered prompt list.

    >>> prompt_list_id(["a", "b"]) == prompt_list_id(["a", "b"]) != prompt_list_id(["b", "a"])
    True
    """
    digest = hashlib.sha256()
    for prompt in prompts:
        digest.update(prompt.encode() + b"\x1e")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class AnchorSet:
    """The base model's greedy answers to ``ANCHOR_PROMPTS``, for one base-model fingerprint."""

    fingerprint: str
    prompts: tuple[str, ...]
    answers: tuple[str, ...]
    max_new_tokens: int
    built_at: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))
    # Digest of the prompt list the base model was asked (answered or not): how a store tells a set
    # built by an older release, from other prompts, from one it can keep. Empty = unknown.
    asked_id: str = ""

    def __post_init__(self) -> None:
        object.__setattr__(self, "prompts", tuple(self.prompts))
        object.__setattr__(self, "answers", tuple(self.answers))
        if len(self.prompts) != len(self.answers):
            raise ValueError(f"{len(self.prompts)} anchor prompts but {len(self.answers)} answers")

    @property
    def anchor_set_id(self) -> str:
        """Content digest: two sets with the same id rehearse exactly the same text."""
        digest = hashlib.sha256()
        for prompt, answer in zip(self.prompts, self.answers, strict=True):
            digest.update(prompt.encode() + b"\x1f" + answer.encode() + b"\x1e")
        return digest.hexdigest()[:16]

    def __len__(self) -> int:
        return len(self.prompts)

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": ANCHOR_FORMAT,
            "fingerprint": self.fingerprint,
            "anchor_set_id": self.anchor_set_id,
            "max_new_tokens": self.max_new_tokens,
            "built_at": self.built_at,
            "asked_id": self.asked_id,
            "items": [{"prompt": p, "answer": a} for p, a in zip(self.prompts, self.answers, strict=True)],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AnchorSet:
        if data.get("format") != ANCHOR_FORMAT:
            raise ValueError(f"anchor set format {data.get('format')!r} is not {ANCHOR_FORMAT}; delete it to rebuild")
        anchors = cls(
            fingerprint=data["fingerprint"],
            prompts=tuple(item["prompt"] for item in data["items"]),
            answers=tuple(item["answer"] for item in data["items"]),
            max_new_tokens=int(data["max_new_tokens"]),
            built_at=data.get("built_at", ""),
            asked_id=data.get("asked_id", ""),
        )
        if data.get("anchor_set_id") not in (None, anchors.anchor_set_id):
            raise ValueError("anchor answers do not match their recorded anchor_set_id (edited by hand?)")
        return anchors


def generate_anchor_set(
    model: Any,
    tokenizer: Any,
    fingerprint: str,
    *,
    prompts: Sequence[str] = ANCHOR_PROMPTS,
    max_new_tokens: int = 48,
    batch_size: int = 8,
) -> AnchorSet:
    """Ask the base model every anchor prompt, greedy; prompts it answers with nothing are
    dropped (an empty answer would rehearse only the end-of-turn token)."""
    from seal.models import SamplingParams, TransformersEngine
    from seal.retention import check_fingerprint

    check_fingerprint(fingerprint)
    # Under a cancellation scope (seal.cancellation.stop_when) the build stops at the next forward
    # pass once the caller leaves; the hook goes again so training passes never pay for it.
    hook = install_stop_hook(model)
    try:
        generations = TransformersEngine(model, tokenizer).generate(
            list(prompts), SamplingParams(max_new_tokens=max_new_tokens), chat=True, batch_size=batch_size
        )
    finally:
        hook.remove()
    kept = [(p, g.text.strip()) for p, g in zip(prompts, generations, strict=True) if g.text.strip()]
    if not kept:
        raise ValueError("the base model answered none of the anchor prompts; rehearsal has nothing to train on")
    return AnchorSet(
        fingerprint, tuple(p for p, _ in kept), tuple(a for _, a in kept), max_new_tokens,
        asked_id=prompt_list_id(prompts),
    )


class AnchorStore:
    """One JSON file per base-model fingerprint (``<root>/<fingerprint>.json``), written atomically."""

    def __init__(self, root: Path | str) -> None:
        self.root = Path(root)

    def path_for(self, fingerprint: str) -> Path:
        from seal.retention import check_fingerprint

        return self.root / f"{check_fingerprint(fingerprint)}.json"

    def load(
        self, fingerprint: str, *, max_new_tokens: int | None = None, prompts: Sequence[str] = ANCHOR_PROMPTS
    ) -> AnchorSet | None:
        """The stored set, or None when there is none, or it was built with another answer length
        or from another list of prompts (an older release's): either would rehearse differently
        than this code asks, so it is rebuilt."""
        path = self.path_for(fingerprint)
        if not path.is_file():
            return None
        import json

        anchors = AnchorSet.from_dict(json.loads(path.read_text(encoding="utf-8")))
        if anchors.fingerprint != fingerprint:
            raise ValueError(f"{path} holds the anchors of {anchors.fingerprint}, not {fingerprint}")
        if max_new_tokens is not None and anchors.max_new_tokens != max_new_tokens:
            return None
        if anchors.asked_id != prompt_list_id(prompts):
            return None
        return anchors

    def save(self, anchors: AnchorSet) -> Path:
        path = self.path_for(anchors.fingerprint)
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, anchors.to_dict(), indent=1)
        return path

    def load_or_build(
        self, fingerprint: str, model: Any, tokenizer: Any, *, max_new_tokens: int, batch_size: int = 8
    ) -> AnchorSet:
        anchors = self.load(fingerprint, max_new_tokens=max_new_tokens)
        if anchors is None:
            anchors = generate_anchor_set(
                model, tokenizer, fingerprint, max_new_tokens=max_new_tokens, batch_size=batch_size
            )
            path = self.save(anchors)
            log.info("anchor set for %s: %d base-model answers → %s", fingerprint[:12], len(anchors), path)
        return anchors


# --- tokenisation --------------------------------------------------------------------------------


def chat_pair_ids(tokenizer: Any, prompt: str, reply: str) -> tuple[list[int], list[int]]:
    """(input_ids, labels) of one chat turn: the prompt in the chat template exactly as
    ``TransformersEngine`` encodes it for generation, then the reply and the end-of-turn token.
    Labels are -100 over the prompt, so only the reply is learned (or compared)."""
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no EOS token; a chat reply needs an end-of-turn token")
    prompt_ids = chat_prompt_ids(tokenizer, prompt)
    reply_ids = [*tokenizer(reply, add_special_tokens=False)["input_ids"], tokenizer.eos_token_id]
    return [*prompt_ids, *reply_ids], [-100] * len(prompt_ids) + reply_ids


def anchor_examples(tokenizer: Any, anchors: AnchorSet, *, max_seq_len: int) -> list[tuple[list[int], list[int]]]:
    """The anchor set as training examples for ``LoraSFTTrainer.train_tokenized(anchors=...)``;
    an example longer than ``max_seq_len`` is cut (its prompt is kept, the reply shortened)."""
    examples = []
    for prompt, answer in zip(anchors.prompts, anchors.answers, strict=True):
        ids, labels = chat_pair_ids(tokenizer, prompt, answer)
        ids, labels = ids[:max_seq_len], labels[:max_seq_len]
        if any(label != -100 for label in labels[1:]):
            examples.append((ids, labels))
    if not examples:
        raise ValueError(f"no anchor example fits in max_seq_len={max_seq_len} tokens")
    return examples


def drift_examples(tokenizer: Any, texts: Sequence[DriftText] = DRIFT_TEXTS) -> list[tuple[list[int], list[int]]]:
    examples = []
    for text in texts:
        if text.chat:
            examples.append(chat_pair_ids(tokenizer, text.context, text.continuation))
        else:
            context = tokenizer(text.context, add_special_tokens=True)["input_ids"]
            continuation = tokenizer(text.continuation, add_special_tokens=False)["input_ids"]
            examples.append(([*context, *continuation], [-100] * len(context) + continuation))
    return examples


# --- the KL drift measure ------------------------------------------------------------------------


def kl_drift(
    model: Any,
    tokenizer: Any,
    texts: Sequence[DriftText] = DRIFT_TEXTS,
    *,
    base_model: Any = None,
    batch_size: int = 64,
) -> float:
    """Mean token-level KL(candidate ‖ base), in nats, over the continuation tokens of ``texts``.

    ``model`` is a PeftModel whose base logits come from the same weights with the adapter
    disabled (no second copy in memory), or any model when ``base_model`` is given (e.g. a
    merged continual model against the original). 0 means the candidate predicts exactly what
    the base does on text it was never trained on."""
    import torch

    from seal.update.lora_sft import _right_padded, token_kl

    examples = drift_examples(tokenizer, texts)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    device = model.device
    total = torch.zeros((), dtype=torch.float64)
    count = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(examples), batch_size):
                input_ids, attention_mask, labels = _right_padded(examples[start : start + batch_size], pad_id)
                input_ids, attention_mask = input_ids.to(device), attention_mask.to(device)
                # Position t predicts token t+1: compare where that next token is a continuation token.
                where = (labels[:, 1:] != -100).to(device)
                candidate = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][where]
                if base_model is not None:
                    base = base_model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][where]
                else:
                    with model.disable_adapter():
                        base = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1][where]
                total += token_kl(candidate, base).double().sum().cpu()
                count += int(where.sum())
    finally:
        if was_training:
            model.train()
    return float(total / max(count, 1))
