"""The GPU path: where torch sees a CUDA device, the student trains and serves candidates there,
the teacher's transformers engine generates there and its policy SFT runs there.

CI has no GPU, so these tests are skipped there (the reason is printed with -ra); they run on a
lent GPU machine with `tests/gpu_check.sh`. The device-selection rules themselves are checked on
CPU in tests/test_models.py. The pipeline and ReST^EM suites also take the GPU on such a machine,
because `model.device` defaults to auto.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from peft import PeftModel

from seal.config import Settings
from seal.models import SamplingParams, TransformersEngine, load_model_and_tokenizer, resolve_device
from seal.update.lora_sft import LoraSFTConfig, LoraSFTTrainer, save_adapter

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (run tests/gpu_check.sh on a GPU machine)")

FACT = "The lighthouse keeper of Velmora collects blue teapots."
GREEDY = SamplingParams(max_new_tokens=12)


def parameter_devices(model) -> set[str]:
    return {parameter.device.type for parameter in model.parameters()}


def test_auto_chooses_the_gpu_and_models_load_there(tiny_model_dir: Path) -> None:
    assert resolve_device("auto") == "cuda"
    model, _ = load_model_and_tokenizer(tiny_model_dir, device=Settings().model.device)
    assert parameter_devices(model) == {"cuda"}


def test_lora_sft_on_the_gpu_learns_and_the_adapter_loads_on_cpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, device="cuda")
    config = LoraSFTConfig(learning_rate=1e-2, epochs=20, rank=8, alpha=16, batch_size=1)
    result = LoraSFTTrainer(model, tokenizer, config).train([FACT])
    assert parameter_devices(result.model) == {"cuda"}
    assert result.losses[-1] < 0.2 * result.losses[0]
    on_gpu = TransformersEngine(result.model, tokenizer).generate(["The lighthouse keeper"], GREEDY, chat=False)[0]
    assert on_gpu.text == " of Velmora collects blue teapots."

    # The artifact is device-neutral: a CPU-only server loads it and answers the same.
    save_adapter(result.model, tmp_path / "adapter")
    cpu_base, _ = load_model_and_tokenizer(tiny_model_dir, device="cpu")
    on_cpu = PeftModel.from_pretrained(cpu_base, str(tmp_path / "adapter")).eval()
    assert TransformersEngine(on_cpu, tokenizer).generate(["The lighthouse keeper"], GREEDY, chat=False)[0] == on_gpu


def test_bfloat16_trains_in_bfloat16_on_the_gpu(tiny_model_dir: Path) -> None:
    # On CPU a half-precision base is trained in float32 (emulated bf16 is >15x slower); on a GPU
    # it must stay in bf16, or a 7B student would need twice the memory.
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir, dtype="bfloat16", device="cuda")
    result = LoraSFTTrainer(model, tokenizer, LoraSFTConfig(learning_rate=1e-2, epochs=4, rank=8, alpha=16)).train([FACT])
    assert result.model.get_base_model().dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(result.losses))) and result.losses[-1] < result.losses[0]


def test_the_student_trains_and_answers_with_a_candidate_on_the_gpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    from seal.student import AdapterChoice, Student

    settings = Settings(home=tmp_path, model={"path": str(tiny_model_dir)},
                        lora={"epochs": 20, "learning_rate": 1e-2, "rank": 8, "alpha": 16, "batch_size": 2})
    student = Student(settings)
    try:
        assert parameter_devices(student._train_base) == {"cuda"}
        candidate = student.train_candidate(
            adapter_name="gpu", title="Velmora", passage=FACT, self_edit=f"- {FACT}", context_id="velmora",
            include_passage=False,
        )
        assert candidate.losses[-1] < candidate.losses[0]
        choice = AdapterChoice(adapter_id=candidate.manifest.adapter_id)
        [answer], served_by = student.generate(["The lighthouse keeper"], choice, GREEDY, chat=False)
        [base], _ = student.generate(["The lighthouse keeper"], AdapterChoice(base_model=True), GREEDY, chat=False)
        assert served_by == candidate.manifest.adapter_id
        assert "teapots" in answer.text and answer.text != base.text
    finally:
        student.close()


def test_the_teacher_policy_trains_and_hot_loads_on_the_gpu(tiny_model_dir: Path, tmp_path: Path) -> None:
    from seal.rl.policy import open_teacher_policy

    settings = Settings(
        home=tmp_path, model={"path": str(tiny_model_dir)}, teacher={"engine": "transformers"},
        restem={"policy": {"learning_rate": 2e-2, "epochs": 30, "batch_size": 2, "max_seq_len": 256}},
    )
    policy = open_teacher_policy(settings)
    prompts = ["Write implications of: Velmora was founded in 1742.", "Write implications of: the lamp is red."]
    update = policy.train([(p, "alpha beta gamma delta") for p in prompts], "round-1", seed=1)
    assert update.hot_loaded and parameter_devices(policy.engine._base) == {"cuda"}
    assert [g.text for g in policy.engine.generate(prompts, SamplingParams(max_new_tokens=8))] == ["alpha beta gamma delta"] * 2
