"""A tiny random Llama for tests and benches: every code path of the real model in milliseconds.

Test-only, so it lives here rather than in ``seal.models``. Tests import it as ``tiny_model``
(pytest puts ``tests/`` on ``sys.path``); benches, which put the project root there, as
``tests.tiny_model``.
"""

from __future__ import annotations

from pathlib import Path


def build_tiny_model(
    out_dir: Path, tokenizer_source: Path, *, seed: int = 0, hidden_size: int = 64, num_attention_heads: int = 4
) -> Path:
    """A randomly initialised 2-layer Llama with the given tokenizer, saved as a normal model
    directory: every code path of the real model in milliseconds instead of seconds.

    vLLM's CPU attention needs a head size of 32 or more (hidden_size / num_attention_heads);
    the default 16 is fine for transformers."""
    import torch
    from transformers import (
        AutoTokenizer,
        GenerationConfig,
        LlamaConfig,
        LlamaForCausalLM,
    )

    out_dir = Path(out_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_source))
    eos_id = tokenizer.eos_token_id
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=num_attention_heads,
        num_key_value_heads=num_attention_heads,
        max_position_embeddings=1024,
        # Wider than the usual 0.02 so that logits are peaked: with near-uniform logits greedy
        # decoding would hinge on float rounding, and batched/unbatched comparisons would be noise.
        initializer_range=0.2,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=eos_id,
        pad_token_id=tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
        if config.pad_token_id is not None:
            # The padding row is initialised to zeros, and SmolLM2 pads with its EOS token: with tied
            # embeddings a zero row would pin the EOS logit at 0, so the model could never learn to stop.
            with torch.no_grad():
                model.get_input_embeddings().weight[config.pad_token_id].normal_(0.0, config.initializer_range)
    model.generation_config = GenerationConfig(
        bos_token_id=config.bos_token_id, eos_token_id=eos_id, pad_token_id=config.pad_token_id
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    return out_dir
