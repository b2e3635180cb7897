"""Continual adaptation on the tiny model: the matrix is well formed, merges really change the
weights, replay really mixes earlier lines in, and the heatmap is written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from seal.continual import (
    ContinualConfig,
    ContinualStep,
    ReplayBuffer,
    continual_summary,
    run_continual,
    save_heatmaps,
)
from seal.domains.knowledge import KnowledgeContext, Question
from seal.update.lora_sft import LoraSFTConfig

PASSAGES = [
    ("Velmora", "Velmora was founded in 1742 by the cartographer Ilse Marrow.", [("Who founded Velmora?", "Ilse Marrow")]),
    ("Grey Lantern", "The Grey Lantern lighthouse is 41 meters tall.", [("How tall is the Grey Lantern?", "41 meters")]),
    ("Quessant", "Quessant island exports salted kelp and blue slate.", [("What does Quessant export?", "salted kelp"),
                                                                        ("Which slate comes from Quessant?", "blue slate")]),
]


def steps() -> list[ContinualStep]:
    return [
        ContinualStep(KnowledgeContext(t, p, tuple(Question(q, a) for q, a in qa)), (p, f"{t}: {p}"))
        for t, p, qa in PASSAGES
    ]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir: Path):
    from seal.models import load_model_and_tokenizer

    return load_model_and_tokenizer(tiny_model_dir)


def config(replay: int) -> ContinualConfig:
    return ContinualConfig(
        update=LoraSFTConfig(learning_rate=5e-3, epochs=2, rank=4, alpha=8, batch_size=4, max_seq_len=64),
        replay_size=replay,
        answer_max_new_tokens=6,
        evaluate_future=True,
    )


def test_continual_matrix_is_well_formed_and_heatmap_written(tiny, tmp_path: Path) -> None:
    import torch

    model, tokenizer = tiny
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    seen: list[int] = []
    result = run_continual(model, tokenizer, steps(), config(replay=2), on_step=lambda r: seen.append(len(r.steps)))

    n = len(PASSAGES)
    assert seen == [1, 2, 3]
    assert len(result.matrix) == n + 1 and all(len(row) == n for row in result.matrix)
    assert all(v is not None and 0.0 <= v <= 1.0 for row in result.matrix for v in row)
    # Every cell is a real fraction of that passage's questions.
    for row in result.matrix:
        for value, (_, _, qa) in zip(row, PASSAGES, strict=True):
            assert value * len(qa) == pytest.approx(round(value * len(qa)))
    assert [len(p) for p in result.predictions[0]] == [len(qa) for _, _, qa in PASSAGES]
    # The caller's model is never modified: each update trains on a copy and merges into it.
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name
    # Replay: nothing to replay at step 1, then min(2, buffer) earlier sequences.
    assert [s.replayed_sequences for s in result.steps] == [0, 2, 2]
    assert all(s.new_sequences == 3 for s in result.steps)

    summary = result.summary()
    assert set(summary) == {"steps", "base", "just_learned", "final_seen", "forgetting", "net_gain_final"}
    data = json.loads(json.dumps(result.to_dict()))
    assert data["matrix"] == result.matrix

    png = save_heatmaps({"replay 2": result.matrix, "again": result.matrix}, result.titles, tmp_path / "c.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 2000


def test_merged_steps_change_what_the_model_says(tiny) -> None:
    # A large learning rate on one passage must change greedy answers: proof the merge is applied
    # to the weights that are measured, not discarded.
    model, tokenizer = tiny
    cfg = ContinualConfig(
        update=LoraSFTConfig(learning_rate=5e-2, epochs=3, rank=8, alpha=16, batch_size=4, max_seq_len=64),
        answer_max_new_tokens=6,
        evaluate_future=True,
    )
    result = run_continual(model, tokenizer, steps()[:1], cfg)
    assert result.predictions[0] != result.predictions[1]


def test_lower_triangle_only_by_default(tiny) -> None:
    model, tokenizer = tiny
    cfg = ContinualConfig(update=LoraSFTConfig(epochs=1, rank=2, alpha=4, max_seq_len=32), answer_max_new_tokens=4)
    result = run_continual(model, tokenizer, steps()[:2], cfg)
    assert result.matrix[1][1] is None and result.matrix[1][0] is not None
    assert result.matrix[0][1] is not None  # the baseline row asks every passage
    assert result.summary()["just_learned"] is not None


def test_summary_numbers() -> None:
    matrix = [[0.0, 0.0, 0.0], [1.0, None, None], [0.5, 1.0, None], [0.25, 0.5, 1.0]]
    s = continual_summary(matrix)
    assert s["just_learned"] == 1.0
    assert s["final_seen"] == pytest.approx((0.25 + 0.5 + 1.0) / 3)
    assert s["forgetting"] == pytest.approx(((1.0 - 0.25) + (1.0 - 0.5)) / 2)
    assert s["net_gain_final"] == pytest.approx((0.25 + 0.5 + 1.0) / 3)
    # A run in progress: "last" is the last step done.
    partial = continual_summary(matrix[:3])
    assert partial["steps"] == 2 and partial["final_seen"] == pytest.approx(0.75) and partial["forgetting"] == 0.5
    with pytest.raises(ValueError, match="rows"):
        continual_summary(matrix[:1])


def test_replay_buffer_is_seeded_and_bounded() -> None:
    buffer = ReplayBuffer(seed=3)
    assert buffer.sample(4, 1) == []
    buffer.add([f"line {i}" for i in range(10)])
    again = ReplayBuffer(seed=3)
    again.add([f"line {i}" for i in range(10)])
    assert buffer.sample(4, 2) == again.sample(4, 2)
    assert len(set(buffer.sample(4, 2))) == 4
    assert len(buffer.sample(50, 2)) == 10


def test_sdft_steps_distil_on_their_prompts_and_merge(tiny) -> None:
    import torch

    from seal.update.sdft import SDFTUpdateConfig

    model, tokenizer = tiny
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    prompted = [ContinualStep(s.context, s.self_edit_lines, (f"What is {s.context.title}?", "Tell me a fact."))
                for s in steps()[:2]]
    cfg = ContinualConfig(
        update=SDFTUpdateConfig(epochs=1, rank=2, alpha=4, num_generations=2, prompts_per_step=2,
                                max_completion_length=4, distillation_topk=8, learning_rate=5e-2),
        answer_max_new_tokens=4, evaluate_future=True,
    )
    result = run_continual(model, tokenizer, prompted, cfg)
    assert result.config["update_rule"] == "sdft"
    assert [s.new_sequences for s in result.steps] == [2, 2]
    assert len(result.matrix) == 3 and all(v is not None for row in result.matrix for v in row)
    for name, parameter in model.named_parameters():
        assert torch.equal(parameter, before[name]), name


def test_sdft_refuses_replay_and_missing_prompts(tiny) -> None:
    from seal.update.sdft import SDFTUpdateConfig

    model, tokenizer = tiny
    sdft = SDFTUpdateConfig(epochs=1, rank=2, alpha=4)
    with pytest.raises(ValueError, match="replay"):
        run_continual(model, tokenizer, steps()[:1], ContinualConfig(update=sdft, replay_size=2))
    with pytest.raises(ValueError, match="no training prompts"):
        run_continual(model, tokenizer, steps()[:1], ContinualConfig(update=sdft))
