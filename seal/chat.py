"""How a prompt becomes chat tokens, and which tokens end a reply: one place for every engine and
trainer, so that what a model is trained on and what it is asked at generation time never drift.

The prompt is one user turn plus the assistant header, rendered by the tokenizer's own chat
template (never hard-coded special tokens):

    >>> from transformers import AutoTokenizer                      # doctest: +SKIP
    >>> tok = AutoTokenizer.from_pretrained("path/to/SmolLM2-135M-Instruct")  # doctest: +SKIP
    >>> tok.decode(chat_prompt_ids(tok, "Who founded Velmora?"))    # doctest: +SKIP
    '<|im_start|>system\\n...<|im_end|>\\n<|im_start|>user\\nWho founded Velmora?<|im_end|>\\n<|im_start|>assistant\\n'
    >>> stop_token_ids(2, [2, 0], None)
    [0, 2]
"""

from __future__ import annotations

from typing import Any

USER_ROLE = "user"


def chat_prompt_text(tokenizer: Any, prompt: str) -> str:
    """The chat template's rendering of one user turn, ready for the assistant's reply."""
    if not tokenizer.chat_template:
        raise ValueError("this tokenizer has no chat template; ask the model without the chat layout (chat=False)")
    return tokenizer.apply_chat_template(
        [{"role": USER_ROLE, "content": prompt}], add_generation_prompt=True, tokenize=False
    )


def chat_prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of :func:`chat_prompt_text`. The template already spells out every special token
    it wants, so the tokenizer adds none of its own (a second BOS would shift every position)."""
    return list(tokenizer(chat_prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"])


def stop_token_ids(*sources: int | list[int] | tuple[int, ...] | None) -> list[int]:
    """Every end-of-reply id the sources name (a generation config's ``eos_token_id`` may be one id
    or a list; a tokenizer's is one id or None), once each, sorted. Instruct models often end a
    turn with a token other than the tokenizer's EOS (SmolLM2: ``<|im_end|>``), so both count."""
    ids: set[int] = set()
    for source in sources:
        if isinstance(source, int):
            ids.add(source)
        elif source:
            ids.update(int(i) for i in source)
    return sorted(ids)
