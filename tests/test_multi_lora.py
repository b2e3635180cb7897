"""Batched multi-LoRA training (seal.update.multi_lora) against the sequential trainer, on the tiny model.

Tolerance: both paths run the same float32 arithmetic (training rows and anchor rows are summed
apart in both, each in forwards over rows of similar length: seal.update.lora_sft.row_sums), and on these three candidates the
adapters came out bit-identical. They need not be in general: when a pass holds rows of other
lengths or other candidates (another max_rows_per_pass, a wider neighbour) the matmuls have other
shapes, sums run in another order and a loss moves by ~1e-7 relative; a few AdamW steps carry that
into the weights (on SmolLM2-135M: 2e-5 after one step with two candidates in one pass, ~2e-4
after 20 steps of an earlier layout that padded anchors to the passage's width). On this tiny
model ATOL = 2e-5 leaves room for such rounding and is 25x below one AdamW step of the smallest
learning rate here (an Adam step moves each weight by about lr = 5e-4), so a wrong batch, learning
rate, seed, an extra or missing step or a shared optimizer fails it.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from seal.update.lora_sft import (
    LoraSFTConfig,
    LoraSFTTrainer,
    TrainingCancelled,
    TrainingDiverged,
    chat_example,
    length_groups,
    row_sums,
    save_adapter,
)
from seal.update.multi_lora import AdapterSpec, MultiLoraConfig, MultiLoraTrainer, pack_passes

pytestmark = pytest.mark.usefixtures("one_torch_thread")

ATOL = 2e-5
RTOL = 1e-4

TEXTS = [
    "The Varnholt bridge was finished in 1873 by the engineer Ilse Marrow.",
    "Its central span is 212 metres long and carries two tram lines.",
    "The bridge was painted ochre in 1921 after a vote of the city council.",
    "Marrow also designed the lighthouse at Keldport, lit in 1880.",
    "A flood in 1952 closed the bridge for eleven weeks.",
]
ANCHORS = [
    ("What is the capital of France?", "Paris."),
    ("Name a primary colour.", "Red."),
    ("How many legs does a spider have?", "Eight."),
]


def sequences(tokenizer, texts):
    return LoraSFTTrainer(None, tokenizer, LoraSFTConfig()).tokenize(texts)


def anchors(tokenizer):
    return [chat_example(tokenizer, prompt, reply) for prompt, reply in ANCHORS]


def config(**overrides) -> LoraSFTConfig:
    values = dict(rank=4, alpha=8, target_modules="all-linear", batch_size=2, max_seq_len=64, seed=0)
    values.update(overrides)
    return LoraSFTConfig(**values)


def lora_weights(model, adapter: str) -> dict[str, object]:
    """The adapter's LoRA tensors under adapter-independent names."""
    marker = f".{adapter}."
    return {
        name.replace(marker, "."): parameter.detach().clone()
        for name, parameter in model.named_parameters()
        if "lora_" in name and marker in name
    }


def assert_same_weights(batched: dict, sequential: dict) -> float:
    import torch

    assert batched.keys() == sequential.keys() and batched
    worst = 0.0
    for name, tensor in sequential.items():
        torch.testing.assert_close(batched[name], tensor, atol=ATOL, rtol=RTOL, msg=name)
        worst = max(worst, float((batched[name] - tensor).abs().max()))
    return worst


def three_candidates(tokenizer, **shared) -> list[AdapterSpec]:
    """Different learning rates, epochs, seeds and data: each must come out as if trained alone."""
    seqs = sequences(tokenizer, TEXTS)
    return [
        AdapterSpec("c0", config(learning_rate=1e-3, epochs=2, seed=11, **shared), seqs, anchors(tokenizer)),
        AdapterSpec("c1", config(learning_rate=3e-3, epochs=3, seed=12, **shared), seqs[:3], anchors(tokenizer)),
        AdapterSpec("c2", config(learning_rate=5e-4, epochs=1, seed=13, **shared), seqs[1:], anchors(tokenizer)),
    ]


def train_alone(model, tokenizer, spec: AdapterSpec):
    return LoraSFTTrainer(model, tokenizer, spec.config).train_tokenized(
        spec.sequences, anchors=list(spec.anchors) if spec.config.uses_anchors else None
    )


@pytest.mark.parametrize("retention", [
    {"rehearsal_ratio": 0.0, "kl_beta": 0.0},
    {"rehearsal_ratio": 1.0, "kl_beta": 5.0},
    {"rehearsal_ratio": 1.0, "kl_beta": 5.0, "delta_scale": 0.5},
], ids=["plain", "rehearsal+kl", "rehearsal+kl+scaled"])
def test_batched_adapters_equal_each_trained_alone(tiny, retention) -> None:
    model, tokenizer = tiny
    specs = three_candidates(tokenizer, **retention)
    reported: list[tuple[int, int, int]] = []
    with MultiLoraTrainer(model, tokenizer, specs).train(
        on_step=lambda position, step, total, _loss: reported.append((position, step, total))
    ) as trained:
        batched = {run.name: lora_weights(trained.model, run.name) for run in trained.runs}
        runs = {run.name: run for run in trained.runs}
    for spec in specs:
        alone = train_alone(model, tokenizer, spec)
        run = runs[spec.name]
        assert run.error is None and run.steps == alone.steps == run.total_steps
        assert run.losses == pytest.approx(alone.losses, rel=RTOL)
        assert run.rehearsal_losses == pytest.approx(alone.rehearsal_losses, rel=RTOL)
        assert run.kl_losses == pytest.approx(alone.kl_losses, rel=1e-3, abs=1e-7)
        assert run.tokens == alone.tokens
        assert_same_weights(batched[spec.name], lora_weights(alone.model, "default"))
    # Each candidate stops after its own epochs: 3 steps per epoch for c0, 2 for c1 and c2.
    totals = {position: total for position, _step, total in reported}
    assert totals == {0: 6, 1: 6, 2: 2}
    assert [step for position, step, _ in reported if position == 2] == [1, 2]


def test_batched_adapters_on_some_blocks_equal_each_trained_alone(tiny) -> None:
    """``layers`` reaches the batched trainer the same way: one block's matrices, equal weights."""
    model, tokenizer = tiny
    specs = three_candidates(tokenizer, layers="1")
    with MultiLoraTrainer(model, tokenizer, specs).train() as trained:
        batched = {run.name: lora_weights(trained.model, run.name) for run in trained.runs}
    for spec in specs:
        alone = lora_weights(train_alone(model, tokenizer, spec).model, "default")
        assert all(".layers.1." in name for name in alone)
        assert_same_weights(batched[spec.name], alone)


def test_a_small_pass_limit_changes_nothing(tiny) -> None:
    """Passes split by whole candidates are the same training (candidates are independent)."""
    model, tokenizer = tiny
    specs = three_candidates(tokenizer, rehearsal_ratio=1.0, kl_beta=5.0)
    with MultiLoraTrainer(model, tokenizer, specs).train() as together:
        one_pass = {run.name: lora_weights(together.model, run.name) for run in together.runs}
    with MultiLoraTrainer(model, tokenizer, specs, MultiLoraConfig(max_rows_per_pass=1)).train() as split:
        for run in split.runs:
            assert_same_weights(lora_weights(split.model, run.name), one_pass[run.name])


def test_a_diverging_candidate_fails_alone(tiny) -> None:
    model, tokenizer = tiny
    specs = three_candidates(tokenizer)
    specs[1] = AdapterSpec("c1", config(learning_rate=1e30, epochs=3, seed=12), specs[1].sequences)
    with MultiLoraTrainer(model, tokenizer, specs).train() as trained:
        runs = {run.name: run for run in trained.runs}
        survivors = {name: lora_weights(trained.model, name) for name in ("c0", "c2")}
    assert isinstance(runs["c1"].error, TrainingDiverged) and "Lower the learning rate" in str(runs["c1"].error)
    assert runs["c1"].steps < runs["c1"].total_steps
    with pytest.raises(TrainingDiverged):  # the sequential path gives up on it too
        train_alone(model, tokenizer, specs[1])
    for spec in (specs[0], specs[2]):
        assert runs[spec.name].error is None and runs[spec.name].steps == runs[spec.name].total_steps
        assert_same_weights(survivors[spec.name], lora_weights(train_alone(model, tokenizer, spec).model, "default"))


def test_the_base_model_comes_back_untouched(tiny) -> None:
    import torch

    model, tokenizer = tiny
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    grads = {name: p.requires_grad for name, p in model.named_parameters()}
    modules = [type(module) for module in model.modules()]
    ids = torch.tensor([sequences(tokenizer, TEXTS[:1])[0]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    with MultiLoraTrainer(model, tokenizer, three_candidates(tokenizer)[:2]).train():
        assert [type(module) for module in model.modules()] != modules  # trained in place, no copy
    assert [type(module) for module in model.modules()] == modules and not hasattr(model, "peft_config")
    assert model.state_dict().keys() == before.keys()
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in before.items())
    assert {name: p.requires_grad for name, p in model.named_parameters()} == grads
    with torch.no_grad():
        assert torch.equal(model(input_ids=ids).logits, logits)


def test_cancellation_ends_the_whole_batch_and_restores_the_base(tiny) -> None:
    model, tokenizer = tiny
    modules = [type(module) for module in model.modules()]
    polls = iter([False, False, True])
    with pytest.raises(TrainingCancelled, match="before step 3"):
        with MultiLoraTrainer(model, tokenizer, three_candidates(tokenizer)).train(should_stop=lambda: next(polls)):
            pass
    assert [type(module) for module in model.modules()] == modules


def test_exported_adapters_are_plain_peft_directories(tiny, tiny_model_dir: Path, tmp_path: Path) -> None:
    import torch
    from peft import PeftModel

    from seal.models import load_model_and_tokenizer

    model, tokenizer = tiny
    specs = three_candidates(tokenizer)[:2]
    with MultiLoraTrainer(model, tokenizer, specs).train() as trained:
        for run in trained.runs:
            written = save_adapter(trained.model_for(run.name), tmp_path / run.name)
            assert sorted(path.name for path in (tmp_path / run.name).iterdir()) == sorted(p.name for p in written)
        trained_weights = {run.name: lora_weights(trained.model, run.name) for run in trained.runs}
    alone = train_alone(model, tokenizer, specs[0])
    save_adapter(alone.model, tmp_path / "alone")
    assert json.loads((tmp_path / "c0" / "adapter_config.json").read_text()) == json.loads(
        (tmp_path / "alone" / "adapter_config.json").read_text()
    )
    prompt = torch.tensor([sequences(tokenizer, TEXTS[:1])[0][:6]])
    outputs = []
    for spec in specs:
        fresh, _ = load_model_and_tokenizer(tiny_model_dir)
        loaded = PeftModel.from_pretrained(fresh, str(tmp_path / spec.name))
        assert_same_weights(lora_weights(loaded, "default"), trained_weights[spec.name])
        generated = loaded.generate(input_ids=prompt, max_new_tokens=4, do_sample=False)
        assert generated.shape == (1, prompt.shape[1] + 4) or generated.shape[1] > prompt.shape[1]
        outputs.append(loaded(input_ids=prompt).logits)
    assert not torch.allclose(outputs[0], outputs[1])  # two different adapters, not one saved twice


def test_batches_the_sequential_trainer_cannot_match_are_refused(tiny) -> None:
    model, tokenizer = tiny
    seqs = sequences(tokenizer, TEXTS[:2])
    with pytest.raises(ValueError, match="dropout 0"):
        MultiLoraTrainer(model, tokenizer, [AdapterSpec("a", config(dropout=0.1), seqs)])
    with pytest.raises(ValueError, match="unique"):
        MultiLoraTrainer(model, tokenizer, [AdapterSpec("a", config(), seqs), AdapterSpec("a", config(), seqs)])
    with pytest.raises(ValueError, match="no anchor examples"):
        MultiLoraTrainer(model, tokenizer, [AdapterSpec("a", config(rehearsal_ratio=1.0), seqs)])


@given(st.lists(st.integers(1, 300), min_size=1, max_size=24), st.sampled_from([0.0, 0.25, 0.5]))
def test_length_groups_cover_every_row_once_within_the_padding_share(lengths, share) -> None:
    groups = length_groups(lengths, share)
    assert sorted(i for group in groups for i in group) == list(range(len(lengths)))
    for group in groups:
        width = max(lengths[i] for i in group)
        assert lengths[group[0]] == width  # the longest row opens its group
        padding = len(group) * width - sum(lengths[i] for i in group)
        assert len(group) == 1 or padding <= share * len(group) * width


def test_row_sums_over_length_groups_give_the_loss_of_one_padded_pass(tiny) -> None:
    import torch

    from seal.update.lora_sft import _right_padded

    model, tokenizer = tiny
    rows = [*sequences(tokenizer, TEXTS), *anchors(tokenizer)]
    pad = tokenizer.pad_token_id
    forward = lambda ids, mask, _rows: model(input_ids=ids, attention_mask=mask, use_cache=False).logits  # noqa: E731
    with torch.no_grad():
        grouped = row_sums(rows, pad, model.device, forward, forward, max_padding_share=0.0)
        one = row_sums(rows, pad, model.device, forward, max_padding_share=1.0)
        ids, mask, labels = _right_padded(rows, pad)
        expected = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    assert len(length_groups([len(r[0]) if isinstance(r, tuple) else len(r) for r in rows], 0.0)) > 1
    torch.testing.assert_close(grouped.mean(grouped.ce), expected, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(one.mean(one.ce), expected, atol=1e-6, rtol=1e-5)
    # Per row, in the given order: the first row's loss is that row alone.
    ids, mask, labels = _right_padded(rows[:1], pad)
    with torch.no_grad():
        first = model(input_ids=ids, attention_mask=mask, labels=labels, use_cache=False).loss
    torch.testing.assert_close(grouped.mean(grouped.ce, slice(0, 1)), first, atol=1e-6, rtol=1e-5)
    assert int(grouped.tokens.sum()) == int(mask.sum()) + sum(
        len(r[0]) if isinstance(r, tuple) else len(r) for r in rows[1:]
    )
    # The model against itself: no divergence.
    assert float(grouped.kl.abs().max()) < 1e-5


def test_passes_hold_whole_candidates_within_the_row_limit() -> None:
    assert pack_passes([4, 4, 4], 8) == [[0, 1], [2]]
    assert pack_passes([10, 2, 2], 8) == [[0], [1, 2]]  # one too big for the cap still gets a pass
    assert pack_passes([3], 1) == [[0]]


# --- through the student: student.batch_candidates on and off ------------------------------------------------

PASSAGE = "Velmora is a harbour town founded in 1742 by Ilse Marrow. Its lighthouse, the Grey Lantern, is 41 meters tall."
EDITS = (
    "Velmora was founded in 1742.\nIlse Marrow founded the town of Velmora.\nThe Grey Lantern is 41 meters tall.",
    "The Grey Lantern stands in Velmora.\nVelmora is a harbour town.",
    "ok\n- yes",  # no usable line: refused, alone
    "Ilse Marrow founded Velmora in 1742.\nThe lighthouse of Velmora is called the Grey Lantern.",
)


def student_jobs():
    from seal.executors import CandidateJob

    overrides = [{}, {"learning_rate": 3e-3, "epochs": 3}, {}, {"update_rule": "sdft"}]
    return [
        CandidateJob(adapter_name="kb", title="Velmora", passage=PASSAGE, self_edit=edit, context_id="ctx-velmora",
                     seed=seed, overrides=extra)
        for seed, (edit, extra) in enumerate(zip(EDITS, overrides, strict=True))
    ]


def test_the_student_trains_a_batch_together_with_the_same_outcome(tiny_model_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    from seal.config import Settings
    from seal.executors.in_process import InProcessExecutor
    from seal.registry import AdapterRegistry
    from seal.student import CandidateTrainer

    settings = Settings(
        home=tmp_path, model={"path": str(tiny_model_dir), "torch_threads": 1},
        lora={"epochs": 2, "batch_size": 2, "max_seq_len": 64, "target_modules": "mlp", "rehearsal_ratio": 1.0,
              "kl_beta": 5.0, "anchor_max_new_tokens": 4},
    )
    assert settings.student.batch_candidates  # the default
    trainer = CandidateTrainer(settings, AdapterRegistry(settings.registry_dir))
    outcomes = {}
    for batched in (True, False):
        steps: list[int] = []
        outcomes[batched] = InProcessExecutor(trainer, batch_candidates=batched).run(
            student_jobs(), on_step=lambda position, *_: steps.append(position)
        )
        assert set(steps) == {0, 1}  # progress reported per candidate; sdft without prompts never starts
    for together, alone in zip(outcomes[True], outcomes[False], strict=True):
        assert (together.trained, together.code) == (alone.trained, alone.code)
        if not together.trained:
            continue
        kept, reference = together.result.manifest, alone.result.manifest
        assert kept.hyperparameters.pop("trained_with") == "multi_lora x2"
        assert kept.hyperparameters == reference.hyperparameters and kept.seed == reference.seed
        assert together.result.losses == pytest.approx(alone.result.losses, rel=RTOL)
        batched_weights = load_file(trainer.registry.path_of(kept) / "adapter_model.safetensors")
        assert_same_weights(batched_weights, load_file(trainer.registry.path_of(reference) / "adapter_model.safetensors"))
    assert [o.code for o in outcomes[True]] == ["", "", "invalid_argument", "invalid_argument"]
