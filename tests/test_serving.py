"""The LoRA adapter cache shared by the student's in-process backend and the teacher's engine, and
the in-process backend behind ``Student``: real PEFT adapters on the tiny model, compared with a
model that loads the same adapter on its own."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from seal.models import SamplingParams, TransformersEngine, load_model_and_tokenizer
from seal.serving.adapters import PeftAdapterCache, adapter_key

PROMPT = "The lighthouse of Velmora is"


def _random_lora(base: Path, out: Path, seed: int) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base)
        # init_lora_weights=False: lora_B random too, so each adapter changes the outputs.
        config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(str(out))
    return out


@pytest.fixture(scope="module")
def adapters(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serving-adapters")
    return {name: _random_lora(tiny_model_dir, root / name, seed) for name, seed in (("a1", 1), ("a2", 2), ("a3", 3))}


def _logits(model, tokenizer) -> torch.Tensor:
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def expected(tiny_model_dir: Path, adapters: dict[str, Path]) -> dict[str | None, torch.Tensor]:
    """Logits of the base model (None) and of each adapter loaded alone into a fresh model."""
    from peft import PeftModel

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    out: dict[str | None, torch.Tensor] = {None: _logits(model, tokenizer)}
    for name, path in adapters.items():
        fresh, _ = load_model_and_tokenizer(tiny_model_dir)
        out[name] = _logits(PeftModel.from_pretrained(fresh, str(path)).eval(), tokenizer)
    assert len({round(float(t.sum()), 3) for t in out.values()}) == len(out)  # each one differs
    return out


def test_adapter_keys_are_peft_names_and_stay_distinct() -> None:
    assert adapter_key("default@v3") == "default_v3"
    assert adapter_key("teacher-policy@v12") == "teacher-policy_v12"
    assert adapter_key("a.b@v1") == "a_b_v1"
    assert len({adapter_key(f"x@v{n}") for n in range(1, 30)}) == 29


def test_cache_answers_with_each_adapter_evicts_the_least_recent_and_restores_the_base(
    tiny_model_dir: Path, adapters: dict[str, Path], expected
) -> None:
    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    cache = PeftAdapterCache(model, capacity=2)
    for name in ("a1", "a2"):
        with cache.use(name, adapters[name]) as served:
            assert torch.allclose(_logits(served, tokenizer), expected[name], atol=1e-5)
    with cache.use(None) as served:  # adapters resident, none applied
        assert torch.allclose(_logits(served, tokenizer), expected[None], atol=1e-5)
    with cache.use("a1") as served:  # resident: no directory needed; a1 is now the most recent
        assert torch.allclose(_logits(served, tokenizer), expected["a1"], atol=1e-5)
    with cache.use("a3", adapters["a3"]) as served:
        assert torch.allclose(_logits(served, tokenizer), expected["a3"], atol=1e-5)
    assert cache.loaded == ("a1", "a3")  # a2 was the least recently used
    with pytest.raises(KeyError), cache.use("a2"):
        pass
    assert cache.forget("a1") and cache.forget("a3") and not cache.forget("a3")
    # The last adapter gone, the LoRA layers are taken out: the plain base model answers again.
    with cache.use(None) as served:
        assert served is model
        assert not any("lora" in name for name, _ in served.named_modules())
        assert torch.allclose(_logits(served, tokenizer), expected[None], atol=1e-5)
    with cache.use("a2", adapters["a2"]) as served:  # and a PEFT wrapper is built again on demand
        assert torch.allclose(_logits(served, tokenizer), expected["a2"], atol=1e-5)


def test_cache_checks_weights_before_a_load_only(tiny_model_dir: Path, adapters: dict[str, Path]) -> None:
    model, _ = load_model_and_tokenizer(tiny_model_dir)
    cache = PeftAdapterCache(model, capacity=1)

    def refuse() -> None:
        raise ValueError("checksum mismatch")

    with pytest.raises(ValueError, match="checksum"), cache.use("a1", adapters["a1"], check=refuse):
        pass
    assert cache.loaded == ()
    checks: list[str] = []
    for _ in range(2):
        with cache.use("a1", adapters["a1"], check=lambda: checks.append("a1")):
            pass
    assert checks == ["a1"]  # a resident adapter is not checked (hashed) again
    with pytest.raises(ValueError):
        PeftAdapterCache(model, capacity=0)


def test_teacher_engine_uses_the_same_cache_one_policy_at_a_time(
    tiny_model_dir: Path, adapters: dict[str, Path], expected
) -> None:
    from seal.engines import PolicyRef
    from seal.engines.transformers_engine import PeftPolicyEngine

    model, tokenizer = load_model_and_tokenizer(tiny_model_dir)
    engine = PeftPolicyEngine(model, tokenizer)
    greedy = SamplingParams(max_new_tokens=6)

    def alone(name: str | None) -> str:
        from peft import PeftModel

        fresh, _ = load_model_and_tokenizer(tiny_model_dir)
        if name is not None:
            fresh = PeftModel.from_pretrained(fresh, str(adapters[name])).eval()
        return TransformersEngine(fresh, tokenizer).generate([PROMPT], greedy, chat=False)[0].text

    engine.load_policy(PolicyRef("teacher-policy", 1, adapters["a1"]))
    assert engine.generate([PROMPT], greedy, chat=False)[0].text == alone("a1")
    engine.load_policy(PolicyRef("teacher-policy", 2, adapters["a2"]))
    assert engine.generate([PROMPT], greedy, chat=False)[0].text == alone("a2")
    assert engine._adapters.loaded == (adapter_key("teacher-policy@v2"),)  # capacity 1
    # The same version stored again elsewhere (repaired) is loaded from its new directory.
    engine.load_policy(PolicyRef("teacher-policy", 2, adapters["a3"]))
    assert engine.generate([PROMPT], greedy, chat=False)[0].text == alone("a3")
    engine.unload_policy()
    assert engine.policy is None
    assert engine.generate([PROMPT], greedy, chat=False)[0].text == alone(None)


def test_student_in_process_unnamed_requests_follow_the_registry_and_rejected_versions_leave(
    tiny_model_dir: Path, adapters: dict[str, Path], tmp_path: Path
) -> None:
    from seal.config import Settings
    from seal.models import model_fingerprint
    from seal.registry import WeightsDiscarded
    from seal.student import AdapterChoice, Student

    student = Student(Settings(home=tmp_path, model={"path": str(tiny_model_dir)}))
    assert student.backend == "in_process" and student.served_versions() == {"promoted": "base"}
    greedy = SamplingParams(max_new_tokens=6)

    def store(lineage: str, name: str) -> str:
        return student.registry.create_version(
            lineage, adapters[name], base_model=tiny_model_dir.name,
            base_model_fingerprint=model_fingerprint(tiny_model_dir), context_id=name, self_edit_sha256="0" * 64,
            seed=0, hyperparameters={},
        ).adapter_id

    def answer(choice: AdapterChoice) -> tuple[str, str]:
        generations, served = student.generate([PROMPT], choice, greedy, chat=False)
        return generations[0].text, served

    base_text, served = answer(AdapterChoice())
    assert served == "" and answer(AdapterChoice(base_model=True)) == (base_text, "")
    v1, v2 = store("default", "a1"), store("default", "a2")
    student.promote(v1, "test")
    v1_text, served = answer(AdapterChoice())
    assert served == v1 and v1_text != base_text
    assert answer(AdapterChoice(adapter_id=v1)) == (v1_text, v1)
    assert answer(AdapterChoice(adapter_id=v2))[1] == v2
    cache = student.serving.adapters
    assert adapter_key(v2) in cache
    # Another lineage's promotion is named, never served to requests that name nothing.
    other = store("other", "a3")
    student.promote(other, "test")
    assert answer(AdapterChoice()) == (v1_text, v1) and student.served_versions() == {"promoted": v1}
    assert answer(AdapterChoice(promoted_of="other"))[1] == other
    # Rejected and discarded: out of the cache at once, so it cannot answer from memory.
    student.reject(v2, "test", discard_weights=True)
    assert adapter_key(v2) not in cache
    with pytest.raises(WeightsDiscarded):
        answer(AdapterChoice(adapter_id=v2))
    assert student.rollback("default", "test", allow_base_model=True)[1] is None
    assert answer(AdapterChoice()) == (base_text, "")
    student.close()
