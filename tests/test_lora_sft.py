"""LoRA SFT on the tiny random Llama: learning, isolation from the base, saving, failure modes."""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file

from seal.models import SamplingParams, TransformersEngine, load_model_and_tokenizer
from seal.update.lora_sft import (
    LoraSFTConfig,
    LoraSFTTrainer,
    TrainingCancelled,
    TrainingDiverged,
    save_adapter,
)

FACT = "The lighthouse keeper of Velmora collects blue teapots."
TEXTS = [
    FACT,
    "Velmora is a fishing town on the Quill estuary.",
    "The Quill estuary freezes every February.",
]
FAST = {"rank": 8, "alpha": 16, "batch_size": 2}


# One torch thread and the tiny model: fixtures in tests/conftest.py.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def snapshot(model) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


def test_training_lowers_loss_and_leaves_the_base_untouched(tiny) -> None:
    model, tokenizer = tiny
    before = snapshot(model)
    engine = TransformersEngine(model, tokenizer)
    greedy = SamplingParams(max_new_tokens=8)
    base_answer = engine.generate(["The lighthouse keeper"], greedy, chat=False)

    steps: list[tuple[int, int, float]] = []
    config = LoraSFTConfig(learning_rate=1e-2, epochs=6, **FAST)
    result = LoraSFTTrainer(model, tokenizer, config).train(TEXTS, on_step=lambda *step: steps.append(step))

    assert isinstance(result.model, PeftModel) and not result.model.training
    assert result.steps == 6 * math.ceil(len(TEXTS) / 2) == len(result.losses) == len(steps)
    assert [s[:2] for s in steps] == [(i, result.steps) for i in range(1, result.steps + 1)]
    assert result.losses[-1] < 0.6 * result.losses[0]
    expected_tokens = 6 * sum(len(tokenizer(t)["input_ids"]) + 1 for t in TEXTS)
    assert result.tokens == expected_tokens
    assert result.seconds > 0

    after = snapshot(model)
    assert after.keys() == before.keys()
    assert all(torch.equal(before[name], after[name]) for name in before), "the base model's weights changed"
    assert not any("lora" in name for name, _ in model.named_modules())
    assert engine.generate(["The lighthouse keeper"], greedy, chat=False) == base_answer


def test_trained_adapter_recalls_the_text_and_stops_at_eos(tiny) -> None:
    model, tokenizer = tiny
    config = LoraSFTConfig(learning_rate=1e-2, epochs=20, rank=8, alpha=16, batch_size=1)
    result = LoraSFTTrainer(model, tokenizer, config).train([FACT])
    generation = TransformersEngine(result.model, tokenizer).generate(
        ["The lighthouse keeper"], SamplingParams(max_new_tokens=20), chat=False
    )[0]
    assert generation.text == " of Velmora collects blue teapots."
    assert generation.completion_tokens < 20, "the adapter should have learned to end with EOS"


def test_adapter_saves_as_plain_peft_dir_and_reloads_with_same_logits(tiny, tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = tiny
    result = LoraSFTTrainer(model, tokenizer, LoraSFTConfig(learning_rate=1e-2, epochs=2, **FAST)).train(TEXTS)
    written = save_adapter(result.model, tmp_path / "adapter")
    assert sorted(p.name for p in (tmp_path / "adapter").iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert written == [tmp_path / "adapter" / "adapter_config.json", tmp_path / "adapter" / "adapter_model.safetensors"]
    adapter_config = json.loads(written[0].read_text())
    assert adapter_config["r"] == 8 and adapter_config["lora_alpha"] == 16 and adapter_config["peft_type"] == "LORA"
    assert adapter_config["target_modules"] == [
        "down_proj", "gate_proj", "k_proj", "o_proj", "q_proj", "up_proj", "v_proj"
    ]
    tensors = load_file(written[1])
    assert tensors and all(t.dtype == torch.float32 for t in tensors.values())

    fresh_base, _ = load_model_and_tokenizer(tiny_model_dir)
    reloaded = PeftModel.from_pretrained(fresh_base, str(tmp_path / "adapter")).eval()
    inputs = tokenizer(["Velmora is a fishing town"], return_tensors="pt")
    with torch.no_grad():
        expected = result.model(**inputs).logits
        actual = reloaded(**inputs).logits
        base_logits = model(**inputs).logits
    torch.testing.assert_close(actual, expected)
    assert not torch.allclose(base_logits, expected), "the adapter should change the model's outputs"


def test_training_is_deterministic_under_a_seed(tiny) -> None:
    model, tokenizer = tiny

    def run(seed: int, dropout: float = 0.1):
        config = LoraSFTConfig(learning_rate=1e-2, epochs=2, dropout=dropout, seed=seed, **FAST)
        return LoraSFTTrainer(model, tokenizer, config).train(TEXTS)

    first, second, other = run(3), run(3), run(4)
    assert first.losses == second.losses
    first_weights = {k: v for k, v in first.model.state_dict().items() if "lora" in k}
    second_weights = {k: v for k, v in second.model.state_dict().items() if "lora" in k}
    assert first_weights and all(torch.equal(first_weights[k], second_weights[k]) for k in first_weights)
    assert first.losses != other.losses


def test_training_leaves_the_global_rng_alone(tiny) -> None:
    model, tokenizer = tiny
    torch.manual_seed(11)
    expected = torch.rand(4)
    torch.manual_seed(11)
    LoraSFTTrainer(model, tokenizer, LoraSFTConfig(epochs=1, **FAST)).train(TEXTS)
    assert torch.equal(torch.rand(4), expected)


def test_huge_learning_rate_raises_diverged_before_applying_the_step(tiny) -> None:
    model, tokenizer = tiny
    # 1e10 is not enough: RMSNorm rescales the blown-up activations and the loss stays finite.
    config = LoraSFTConfig(learning_rate=1e30, epochs=5, **FAST)
    losses: list[float] = []
    with pytest.raises(TrainingDiverged, match=r"step \d+ of 10.*[Ll]ower the learning rate") as caught:
        LoraSFTTrainer(model, tokenizer, config).train(TEXTS, on_step=lambda s, t, loss: losses.append(loss))
    assert all(math.isfinite(loss) for loss in losses), "no non-finite step may be reported as done"
    assert f"step {len(losses) + 1} of" in str(caught.value)


def test_poisoned_weight_diverges_at_the_first_step(tiny) -> None:
    model, tokenizer = tiny
    poisoned = copy.deepcopy(model)
    with torch.no_grad():
        poisoned.model.layers[0].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(TrainingDiverged, match="step 1 of"):
        LoraSFTTrainer(poisoned, tokenizer, LoraSFTConfig(epochs=1, **FAST)).train(TEXTS)


def test_should_stop_cancels_between_steps(tiny) -> None:
    model, tokenizer = tiny
    polls: list[int] = []
    steps: list[int] = []

    def should_stop() -> bool:
        polls.append(1)
        return len(polls) > 2

    with pytest.raises(TrainingCancelled, match="before step 3 of"):
        LoraSFTTrainer(model, tokenizer, LoraSFTConfig(epochs=3, **FAST)).train(
            TEXTS, on_step=lambda s, t, loss: steps.append(s), should_stop=should_stop
        )
    assert steps == [1, 2]


@pytest.mark.parametrize("texts", [[], ["", "   "]])
def test_empty_texts_are_refused(tiny, texts: list[str]) -> None:
    model, tokenizer = tiny
    with pytest.raises(ValueError, match="no training texts"):
        LoraSFTTrainer(model, tokenizer, LoraSFTConfig()).train(texts)


def test_long_texts_are_cut_to_max_seq_len(tiny) -> None:
    model, tokenizer = tiny
    trainer = LoraSFTTrainer(model, tokenizer, LoraSFTConfig(max_seq_len=16))
    sequences = trainer.tokenize(["word " * 100, FACT])
    assert len(sequences[0]) == 16
    assert sequences[1][-1] == tokenizer.eos_token_id


def test_named_target_modules_limit_where_lora_goes(tiny) -> None:
    model, tokenizer = tiny
    config = LoraSFTConfig(epochs=1, target_modules="q_proj, v_proj", **FAST)
    result = LoraSFTTrainer(model, tokenizer, config).train(TEXTS)
    adapted = {name.split(".")[-1] for name, module in result.model.named_modules() if hasattr(module, "lora_A")}
    assert adapted == {"q_proj", "v_proj"}


def test_layers_limit_lora_to_the_named_blocks_and_the_saved_config_says_so(tiny, tmp_path: Path) -> None:
    model, tokenizer = tiny
    config = LoraSFTConfig(epochs=1, layers="1", **FAST)
    result = LoraSFTTrainer(model, tokenizer, config).train(TEXTS)
    blocks = {int(name.split(".layers.")[1].split(".")[0])
              for name, module in result.model.named_modules() if hasattr(module, "lora_A")}
    assert blocks == {1}
    save_adapter(result.model, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())["layers_to_transform"] == [1]


def test_layers_past_the_models_last_block_are_refused_with_the_range_to_use(tiny) -> None:
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=r"has 2 \(0-1\)"):
        LoraSFTTrainer(model, tokenizer, LoraSFTConfig(epochs=1, layers="0-5", **FAST)).train(TEXTS)


def test_delta_scale_keeps_that_share_of_the_trained_update(tiny) -> None:
    """Same seed, same training: the scaled adapter's B·A is exactly ``delta_scale`` times the
    full one's, so its logits sit between the base model's and the full candidate's."""
    model, tokenizer = tiny
    full = LoraSFTTrainer(model, tokenizer, LoraSFTConfig(epochs=2, **FAST)).train(TEXTS)
    half = LoraSFTTrainer(model, tokenizer, LoraSFTConfig(epochs=2, delta_scale=0.5, **FAST)).train(TEXTS)
    assert half.losses == full.losses  # the scale is applied once training ends
    full_b = {n: p for n, p in full.model.named_parameters() if "lora_B" in n}
    half_b = {n: p for n, p in half.model.named_parameters() if "lora_B" in n}
    assert full_b.keys() == half_b.keys() and full_b
    for name, weight in full_b.items():
        torch.testing.assert_close(half_b[name], 0.5 * weight)
    ids = torch.tensor([tokenizer(FACT)["input_ids"]])
    with torch.no_grad():
        base_logits = model(ids).logits
        full_logits, half_logits = full.model(ids).logits, half.model(ids).logits
    assert 0 < (half_logits - base_logits).abs().max() < (full_logits - base_logits).abs().max()


def test_half_precision_base_trains_in_float32_and_stays_half(tiny) -> None:
    model, tokenizer = tiny
    half = copy.deepcopy(model).to(torch.bfloat16)
    result = LoraSFTTrainer(half, tokenizer, LoraSFTConfig(epochs=1, **FAST)).train(TEXTS)
    assert half.dtype == torch.bfloat16
    assert all(p.dtype == torch.float32 for p in result.model.parameters() if p.requires_grad)


def test_a_peft_model_is_refused_as_base(tiny) -> None:
    model, tokenizer = tiny
    trained = LoraSFTTrainer(model, tokenizer, LoraSFTConfig(epochs=1, **FAST)).train(TEXTS[:1]).model
    with pytest.raises(TypeError, match="plain base model"):
        LoraSFTTrainer(trained, tokenizer, LoraSFTConfig(epochs=1, **FAST)).train(TEXTS)


@pytest.mark.parametrize(
    "field, value",
    [
        ("learning_rate", 0.0),
        ("learning_rate", float("nan")),
        ("epochs", 0),
        ("epochs", 1.5),
        ("rank", 0),
        ("alpha", -1),
        ("dropout", 1.0),
        ("target_modules", " , "),
        ("batch_size", 0),
        ("max_seq_len", 1),
        ("grad_clip", 0.0),
        ("seed", -1),
        ("layers", "top"),
        ("layers", "5-2"),
        ("layers", "-1"),
        ("delta_scale", 0.0),
        ("delta_scale", 1.5),
    ],
)
def test_config_validation_names_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        LoraSFTConfig(**{field: value})


def test_config_layers_forms() -> None:
    from seal.update.lora_sft import parse_layers

    assert parse_layers("") is None and parse_layers("  ") is None
    assert parse_layers("3") == [3]
    assert parse_layers("4, 0-1, 4") == [0, 1, 4]


def test_config_target_modules_forms() -> None:
    assert LoraSFTConfig().target_module_list() == "all-linear"
    assert LoraSFTConfig(target_modules="q_proj, v_proj").target_module_list() == ["q_proj", "v_proj"]
    assert LoraSFTConfig(target_modules=("k_proj",)).target_module_list() == ["k_proj"]


def test_config_from_settings_takes_overrides_and_ignores_other_keys() -> None:
    from seal.config import LoraSettings
    from seal.update.lora_sft import lora_sft_config

    settings = LoraSettings(learning_rate=2e-4, rank=4, alpha=8, max_examples=3)
    config = lora_sft_config(settings, seed=9, overrides={"epochs": 3, "augmentations": 2, "seed": 1})
    assert (config.learning_rate, config.rank, config.alpha, config.epochs, config.seed) == (2e-4, 4, 8, 3, 9)
    assert config.batch_size == settings.batch_size and config.target_modules == settings.target_modules
    with pytest.raises(ValueError, match="learning_rate"):
        lora_sft_config(settings, seed=0, overrides={"learning_rate": -1.0})
