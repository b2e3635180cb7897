"""SDFT through TRL on the tiny random Llama: it trains a fresh adapter on a copy of the base,
reports progress, honours cancellation, and the student saves it as a candidate version."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from seal.config import SdftSettings, Settings
from seal.student import Student, UnusableSelfEdit
from seal.update.lora_sft import TrainingCancelled
from seal.update.sdft import SDFTUpdate, SDFTUpdateConfig, privileged_context, sdft_config

PASSAGE = "Velmora is a harbour town on the island of Quessant. It was founded in 1742 by Ilse Marrow."
PROMPTS = ["Who founded Velmora?", "On which island is Velmora?", "When was Velmora founded?"]
FAST = {"rank": 4, "alpha": 8, "prompts_per_step": 2, "num_generations": 2, "max_completion_length": 6,
        "epochs": 1, "distillation_topk": 8}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_sdft_trains_an_adapter_and_leaves_the_base_untouched(tiny) -> None:
    model, tokenizer = tiny
    before = {name: t.detach().clone() for name, t in model.state_dict().items()}
    steps: list[tuple[int, int, float]] = []
    result = SDFTUpdate(model, tokenizer, SDFTUpdateConfig(**FAST, learning_rate=1e-2)).train(
        PROMPTS, privileged_context("Velmora", PASSAGE), on_step=lambda *a: steps.append(a)
    )
    assert isinstance(result.model, PeftModel)
    assert not isinstance(model, PeftModel) and not hasattr(model, "peft_config")
    assert all(torch.equal(before[name], t) for name, t in model.state_dict().items())
    # 3 prompts, 2 per step: 2 steps, each reported with the total.
    assert [s[:2] for s in steps] == [(1, 2), (2, 2)]
    assert result.steps == 2 and all(loss == loss for loss in result.losses)
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and any(p.abs().sum() > 0 for p in lora_b), "the adapter did not move"


def test_sdft_cancels_before_a_step(tiny) -> None:
    model, tokenizer = tiny
    with pytest.raises(TrainingCancelled, match="before step 1"):
        SDFTUpdate(model, tokenizer, SDFTUpdateConfig(**FAST)).train(
            PROMPTS, privileged_context("Velmora", PASSAGE), should_stop=lambda: True
        )


@pytest.mark.parametrize(
    ("prompts", "context", "message"),
    [([], "ctx", "no training prompts"), (["  "], "ctx", "no training prompts"), (PROMPTS, " ", "privileged context")],
)
def test_sdft_refuses_what_it_cannot_learn_from(tiny, prompts, context, message) -> None:
    model, tokenizer = tiny
    with pytest.raises(ValueError, match=message):
        SDFTUpdate(model, tokenizer, SDFTUpdateConfig(**FAST)).train(prompts, context)


@pytest.mark.parametrize(
    ("field", "value"),
    [("learning_rate", 0), ("num_generations", 0), ("teacher_model_kind", "frozen"),
     ("distillation_mode", "mse"), ("distillation_alpha", 1.5), ("temperature", 0)],
)
def test_config_validation_names_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=field):
        SDFTUpdateConfig(**{field: value})


def test_sampled_token_mode_needs_reverse_kl() -> None:
    with pytest.raises(ValueError, match="reverse KL"):
        SDFTUpdateConfig(distillation_mode="sampled_token")
    assert SDFTUpdateConfig(distillation_mode="sampled_token", distillation_alpha=1.0).distillation_alpha == 1.0


def test_config_from_settings_takes_shared_overrides() -> None:
    config = sdft_config(SdftSettings(), seed=7, overrides={"learning_rate": 1e-4, "epochs": 3, "kl_beta": 1.0})
    assert (config.learning_rate, config.epochs, config.seed) == (1e-4, 3, 7)
    assert config.num_generations == SdftSettings().num_generations


def test_privileged_context_carries_passage_and_notes() -> None:
    assert privileged_context("T", "P") == "Title: T\nPassage: P"
    assert privileged_context("T", "P", " - a note \n") == "Title: T\nPassage: P\nNotes:\n- a note"


def test_student_trains_an_sdft_candidate_with_its_kl_drift(tiny_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, model={"path": str(tiny_model_dir)}, update={"rule": "sdft"}, sdft=FAST)
    student = Student(settings)
    try:
        result = student.train_candidate(
            adapter_name="default", title="Velmora", passage=PASSAGE, self_edit="Ilse Marrow founded Velmora.",
            context_id="c" * 64, training_prompts=PROMPTS, seed=3,
        )
        manifest = result.manifest
        assert manifest.hyperparameters["update_rule"] == "sdft"
        assert manifest.hyperparameters["training_prompts"] == 3
        assert manifest.seed == 3
        assert manifest.metrics["retention_kl"] >= 0.0
        # The per-request rule wins over the setting.
        sft = student.train_candidate(
            adapter_name="default", title="Velmora", passage=PASSAGE, self_edit="Ilse Marrow founded Velmora.",
            context_id="c" * 64, overrides={"update_rule": "lora_sft", "epochs": 1}, seed=3,
        )
        assert sft.manifest.hyperparameters["update_rule"] == "lora_sft"
        with pytest.raises(UnusableSelfEdit, match="training_prompts"):
            student.train_candidate(
                adapter_name="default", title="Velmora", passage=PASSAGE, self_edit="x" * 20, context_id="c" * 64,
            )
    finally:
        student.close()


def test_apply_self_edit_over_grpc_trains_with_the_requested_rule(tiny_model_dir: Path, tmp_path: Path) -> None:
    """The per-request rule crosses the wire: UpdateOverrides.update_rule and training_prompts
    reach the student service, which trains an SDFT candidate (the setting says lora_sft)."""
    import grpc

    from seal.stack import local_stack
    from seal.v1 import common_pb2, student_pb2, student_pb2_grpc

    settings = Settings(home=tmp_path, model={"path": str(tiny_model_dir)}, sdft=FAST,
                        lora={"epochs": 1, "batch_size": 4, "max_seq_len": 64})
    with local_stack(settings) as stack, grpc.insecure_channel(stack.student.address) as channel:
        stub = student_pb2_grpc.StudentServiceStub(channel)

        def apply(**extra) -> list:
            return list(stub.ApplySelfEdit(student_pb2.ApplySelfEditRequest(
                context=common_pb2.Context(title="Velmora", passage=PASSAGE), self_edit="Ilse Marrow founded Velmora.",
                seed=1, **extra), timeout=300))

        events = apply(overrides=common_pb2.UpdateOverrides(update_rule="sdft"), training_prompts=PROMPTS)
        manifest = events[-1].candidate
        assert manifest.hyperparameters["update_rule"] == "sdft"
        assert [e.progress.step for e in events[:-1]] == [1, 2]
        assert manifest.metrics["retention_kl"] >= 0.0
        with pytest.raises(grpc.RpcError) as refused:
            apply(overrides=common_pb2.UpdateOverrides(update_rule="sdft"))
        assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "training_prompts" in refused.value.details()
        assert apply()[-1].candidate.hyperparameters["update_rule"] == "lora_sft"
