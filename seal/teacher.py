"""The teacher engine: writes k self-edits for a context, and keeps every reward the auditor
streams back in a durable buffer for ReST^EM (transport-free; ``teacher_svc`` wraps it)."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from seal.domains.knowledge import PROMPT_STYLES, PromptStyle, build_self_edit_prompt
from seal.durable import JsonLinesLog
from seal.models import GenerationEngine, SamplingParams


@dataclass(frozen=True)
class ProposedSelfEdit:
    index: int
    prompt: str
    text: str
    completion_tokens: int


def validate_prompt_style(style: str) -> PromptStyle:
    if style not in PROMPT_STYLES:
        raise ValueError(f"prompt_style {style!r} is unknown; use one of {', '.join(PROMPT_STYLES)}")
    return style  # type: ignore[return-value]


class SelfEditProposer:
    def __init__(self, engine: GenerationEngine, *, max_new_tokens: int, temperature: float, top_p: float) -> None:
        self._engine = engine
        self._max_new_tokens = max_new_tokens
        self._temperature = temperature
        self._top_p = top_p

    def propose(self, title: str, passage: str, k: int, style: PromptStyle, seed: int) -> list[ProposedSelfEdit]:
        """Sample k self-edits in one batch: at batch 8 this model generates ~4x the tokens/s of batch 1."""
        return self.propose_from_prompt(build_self_edit_prompt(title, passage, style), k, seed)

    def propose_from_prompt(self, prompt: str, k: int, seed: int) -> list[ProposedSelfEdit]:
        """k self-edits sampled for a ready prompt (a domain that builds its own, e.g. few-shot's recipe prompt)."""
        params = SamplingParams(
            max_new_tokens=self._max_new_tokens, temperature=self._temperature, top_p=self._top_p, seed=seed
        )
        generations = self._engine.generate([prompt] * k, params, chat=True, batch_size=k)
        return [
            ProposedSelfEdit(index, prompt, generation.text, generation.completion_tokens)
            for index, generation in enumerate(generations)
        ]

    def propose_many(self, requests: Sequence[tuple[str, int, int]]) -> list[list[ProposedSelfEdit]]:
        """For each (prompt, k, seed), k self-edits, all sampled in one batched generate (each
        prompt repeated k times): a ReST^EM round samples several contexts at once this way.

        One request is exactly ``propose_from_prompt``. Several share the generate's one seed
        (``batch_seed`` of theirs, as an engine seeds a generate, not each prompt), so what a
        prompt draws depends on the batch it is in: the same batch draws the same text, the same
        prompt in another batch may not."""
        if len(requests) == 1:
            prompt, k, seed = requests[0]
            return [self.propose_from_prompt(prompt, k, seed)]
        if not requests:
            return []
        prompts = [prompt for prompt, k, _ in requests for _ in range(k)]
        params = SamplingParams(
            max_new_tokens=self._max_new_tokens, temperature=self._temperature, top_p=self._top_p,
            seed=batch_seed([seed for _, _, seed in requests]),
        )
        generations = self._engine.generate(prompts, params, chat=True, batch_size=len(prompts))
        if len(generations) != len(prompts):
            raise RuntimeError(f"the engine returned {len(generations)} generations for {len(prompts)} prompts")
        proposed, start = [], 0
        for prompt, k, _ in requests:
            proposed.append([
                ProposedSelfEdit(index, prompt, generation.text, generation.completion_tokens)
                for index, generation in enumerate(generations[start : start + k])
            ])
            start += k
        return proposed

    def complete(self, prompt: str, *, seed: int, max_new_tokens: int) -> str:
        """One sampled chat completion of ``prompt`` (the question-writing step of self-QA)."""
        params = SamplingParams(max_new_tokens=max_new_tokens, temperature=self._temperature, top_p=self._top_p, seed=seed)
        return self._engine.generate([prompt], params, chat=True, batch_size=1)[0].text


def batch_seed(seeds: Sequence[int]) -> int:
    """The one seed of a generate that samples for several seeded requests: the seed itself for
    one, else a digest of them all in order (a non-negative 31-bit integer)."""
    if len(seeds) == 1:
        return seeds[0]
    digest = hashlib.sha256(json.dumps(list(seeds), separators=(",", ":")).encode()).digest()
    return int.from_bytes(digest[:4], "big") & 0x7FFFFFFF


class RewardBuffer:
    """The teacher's durable copy of the auditor's reward stream (JSON lines, one per event).

    Keyed by the auditor's event id, so a stream that reconnects and repeats events adds nothing
    twice; ``last_sequence`` is where a reconnect resumes."""

    def __init__(self, path: Path) -> None:
        self._path = path
        # Not numbered by the log: the sequence numbers are the auditor's. A torn last event is
        # cut off on open and not counted in last_sequence, so the stream sends it again.
        self._log = JsonLinesLog(path)
        self._lock = threading.Lock()
        self._events: dict[str, dict[str, Any]] = {}
        self._last_sequence = 0
        for event in self._log.read():
            try:
                self._remember(event)
            except (ValueError, KeyError, TypeError):
                continue  # not an auditor event: skipped, left on disk for a person to inspect

    def _remember(self, event: dict[str, Any]) -> None:
        sequence = int(event["sequence"])  # first, so a malformed event is not half-remembered
        self._events[event["event_id"]] = event
        self._last_sequence = max(self._last_sequence, sequence)

    @property
    def last_sequence(self) -> int:
        with self._lock:
            return self._last_sequence

    def add(self, event: dict[str, Any]) -> bool:
        """Append unless already present; True if it was new."""
        with self._lock:
            if event["event_id"] in self._events:
                return False
            # One event per scored candidate (minutes apart): the fsync per append costs nothing
            # here and keeps a reward the teacher acknowledged across a power loss, not just a kill.
            self._log.append(event)
            self._remember(event)
            return True

    def events(self) -> list[dict[str, Any]]:
        with self._lock:
            return sorted(self._events.values(), key=lambda event: event["sequence"])

    def __len__(self) -> int:
        with self._lock:
            return len(self._events)


def validate_k(k: int, max_k: int) -> int:
    if k < 1 or k > max_k:
        raise ValueError(f"k={k} is out of range: ask for between 1 and {max_k} candidate self-edits")
    return k


def validate_context(
    title: str, passage: str, questions: Sequence[Any], *, max_passage_chars: int, max_questions: int,
    max_question_chars: int, require_questions: bool = True,
) -> None:
    """Reject bad Adapt input before any model work starts, with a message saying what to change."""
    if not passage.strip():
        raise ValueError("context.passage is empty: send the text the model should learn")
    if len(passage) > max_passage_chars:
        raise ValueError(
            f"context.passage has {len(passage)} characters, above the limit of {max_passage_chars}; "
            "split it into several Adapt calls or raise limits.max_passage_chars"
        )
    if len(title) > 500:
        raise ValueError("context.title is longer than 500 characters; send a short title")
    if not questions and require_questions:
        raise ValueError("no questions: τ needs at least one held-out question with its gold answer")
    if len(questions) > max_questions:
        raise ValueError(f"{len(questions)} questions is above the limit of {max_questions}; send fewer")
    for index, question in enumerate(questions):
        if not question.question.strip() or not question.answer.strip():
            raise ValueError(f"questions[{index}] needs both a question and a gold answer")
        if len(question.question) > max_question_chars:
            raise ValueError(f"questions[{index}] is longer than {max_question_chars} characters")
