"""seal.chat: one chat layout for every engine and trainer.

The point of having one place is that a model is trained on exactly the tokens it is asked with:
these tests hold the engines' encoding and the trainers' masked prompts to the same ids."""

from __future__ import annotations

from pathlib import Path

import pytest

from seal.chat import chat_prompt_ids, chat_prompt_text, stop_token_ids


@pytest.fixture(scope="module")
def tokenizer(embedded_tokenizer_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(embedded_tokenizer_dir))


PROMPT = "Answer with a short phrase.\nQuestion: Who founded Velmora?"


def test_stop_ids_merge_a_config_list_and_a_tokenizer_id_once_each() -> None:
    assert stop_token_ids(2, [2, 0], None) == [0, 2]
    assert stop_token_ids(None, None) == []
    assert stop_token_ids((7,), 3) == [3, 7]


def test_the_prompt_ends_in_the_assistant_header_with_no_extra_special_tokens(tokenizer) -> None:
    ids = chat_prompt_ids(tokenizer, PROMPT)
    text = chat_prompt_text(tokenizer, PROMPT)
    assert text.endswith("<|im_start|>assistant\n")
    assert PROMPT in text
    # add_special_tokens=False: the template's own tokens, no second BOS in front of them.
    assert ids == list(tokenizer(text, add_special_tokens=False)["input_ids"])
    assert tokenizer.decode(ids) == text


def test_engines_and_trainers_see_the_same_prompt_tokens(tokenizer) -> None:
    from seal.anchors import chat_pair_ids
    from seal.update.lora_sft import chat_example
    from seal.update.policy_sft import IGNORE_INDEX, PolicyExample, chat_sft_example

    asked = chat_prompt_ids(tokenizer, PROMPT)
    reply = "Ilse Marrow"
    for input_ids, labels in (
        chat_pair_ids(tokenizer, PROMPT, reply),
        chat_example(tokenizer, PROMPT, reply),
        chat_sft_example(tokenizer, PolicyExample(PROMPT, reply), 512),
    ):
        assert input_ids[: len(asked)] == asked
        assert labels[: len(asked)] == [IGNORE_INDEX] * len(asked)
        assert tokenizer.decode([t for t in labels if t != IGNORE_INDEX]).startswith(reply)


def test_the_transformers_engine_encodes_chat_prompts_the_same_way(tokenizer, tiny_model_dir: Path) -> None:
    from seal.models import TransformersEngine, load_model_and_tokenizer

    model, loaded = load_model_and_tokenizer(str(tiny_model_dir))
    engine = TransformersEngine(model, loaded)
    assert engine.encode([PROMPT], chat=True) == [chat_prompt_ids(loaded, PROMPT)]


def test_a_tokenizer_without_a_template_is_refused_with_what_to_do(tokenizer) -> None:
    from copy import deepcopy

    plain = deepcopy(tokenizer)
    plain.chat_template = None
    with pytest.raises(ValueError, match="no chat template"):
        chat_prompt_ids(plain, PROMPT)
