"""Model preparation, loading, fingerprints and the transformers generation engine."""

from __future__ import annotations

import json
import shutil
import threading
import time
from pathlib import Path

import pytest
import torch

from seal.config import ModelSettings
from seal.models import (
    EMBEDDED_MODEL_NAME,
    FINGERPRINT_CACHE,
    READY_MARKER,
    Generation,
    SamplingParams,
    TransformersEngine,
    embedded_gguf_path,
    is_prepared,
    load_model_and_tokenizer,
    model_fingerprint,
    prepare_atomically,
    prepare_embedded_tokenizer,
    read_gguf_metadata,
    resolve_device,
    resolve_model_path,
)

PROMPTS = [
    "What is the capital of France?",
    "hi",
    "Write one sentence about a lighthouse keeper who collects teapots and maps of the sea.",
    "Name a colour.",
    "2 + 2 =",
]


# One torch thread and the tiny model: fixtures in tests/conftest.py.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def engine(tiny) -> TransformersEngine:
    model, tokenizer = tiny
    return TransformersEngine(model, tokenizer)


# --- the embedded GGUF and its tokenizer -------------------------------------------------------


def test_gguf_header_describes_smollm2() -> None:
    metadata = read_gguf_metadata(embedded_gguf_path())
    assert metadata["general.architecture"] == "llama"
    assert metadata["llama.block_count"] == 30
    assert len(metadata["tokenizer.ggml.tokens"]) == 49152
    assert metadata["tokenizer.ggml.tokens"][metadata["tokenizer.ggml.eos_token_id"]] == "<|im_end|>"
    assert "<|im_start|>" in metadata["tokenizer.chat_template"]


def test_gguf_reader_rejects_other_files(tmp_path: Path) -> None:
    bogus = tmp_path / "model.gguf"
    bogus.write_bytes(b"PK\x03\x04 this is a zip file, not a gguf at all")
    with pytest.raises(ValueError, match="not a GGUF file"):
        read_gguf_metadata(bogus)
    truncated = tmp_path / "truncated.gguf"
    with open(embedded_gguf_path(), "rb") as source:
        truncated.write_bytes(source.read(4096))
    with pytest.raises(ValueError, match="truncated"):
        read_gguf_metadata(truncated)


def test_embedded_tokenizer_round_trips_and_keeps_chat_template(embedded_tokenizer_dir: Path) -> None:
    from transformers import AutoTokenizer

    assert is_prepared(embedded_tokenizer_dir)
    assert not list(embedded_tokenizer_dir.glob("*.safetensors")), "the tokenizer cache must hold no weights"
    tokenizer = AutoTokenizer.from_pretrained(embedded_tokenizer_dir)
    text = "In 1887, Velmora's 12 bakers sold “rye” bread. 😀"
    ids = tokenizer(text)["input_ids"]
    assert tokenizer.decode(ids) == text
    # SmolLM2 splits numbers into single digits.
    assert [tokenizer.decode([i]) for i in tokenizer("1887")["input_ids"]] == ["1", "8", "8", "7"]
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.pad_token is not None
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hello"}], add_generation_prompt=True, tokenize=False
    )
    assert rendered.endswith("<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n")


# --- atomic preparation ------------------------------------------------------------------------


def write_files(files: dict[str, str]):
    def build(staging: Path) -> None:
        for name, content in files.items():
            (staging / name).write_text(content)

    return build


def test_prepare_publishes_complete_directory_once(tmp_path: Path) -> None:
    target = tmp_path / "model"
    calls = []

    def build(staging: Path) -> None:
        calls.append(staging)
        (staging / "weights.bin").write_text("w")

    assert prepare_atomically(target, build, {"format": 1}, force=False) == target
    assert (target / "weights.bin").read_text() == "w"
    assert is_prepared(target, {"format": 1})
    prepare_atomically(target, build, {"format": 1}, force=False)
    assert len(calls) == 1, "a ready directory must not be rebuilt"
    prepare_atomically(target, build, {"format": 1}, force=True)
    assert len(calls) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == [".model.lock", "model"]


def test_directory_without_marker_is_rebuilt(tmp_path: Path) -> None:
    target = tmp_path / "model"
    target.mkdir()
    (target / "weights.bin").write_text("half-written")
    assert not is_prepared(target)
    prepare_atomically(target, write_files({"weights.bin": "complete"}), {"format": 1}, force=False)
    assert (target / "weights.bin").read_text() == "complete"


def test_marker_from_other_source_is_rebuilt(tmp_path: Path) -> None:
    target = tmp_path / "model"
    prepare_atomically(target, write_files({"weights.bin": "old"}), {"format": 1}, force=False)
    prepare_atomically(target, write_files({"weights.bin": "new"}), {"format": 2}, force=False)
    assert (target / "weights.bin").read_text() == "new"
    assert json.loads((target / READY_MARKER).read_text())["format"] == 2


def test_leftover_temporary_directory_is_never_used_and_is_cleaned(tmp_path: Path) -> None:
    leftover = tmp_path / ".model.tmp-crashed"
    leftover.mkdir()
    (leftover / "weights.bin").write_text("from a killed conversion")
    (leftover / READY_MARKER).write_text(json.dumps({"format": 1}))
    target = tmp_path / "model"
    prepare_atomically(target, write_files({"weights.bin": "fresh"}), {"format": 1}, force=False)
    assert (target / "weights.bin").read_text() == "fresh"
    assert not leftover.exists()


def test_failed_build_leaves_nothing_behind(tmp_path: Path) -> None:
    def broken(staging: Path) -> None:
        (staging / "weights.bin").write_text("partial")
        raise OSError("disk full")

    target = tmp_path / "model"
    with pytest.raises(OSError, match="disk full"):
        prepare_atomically(target, broken, {"format": 1}, force=False)
    assert not target.exists()
    assert [p.name for p in tmp_path.iterdir()] == [".model.lock"]


def test_concurrent_preparers_build_once(tmp_path: Path) -> None:
    target = tmp_path / "model"
    builds = []

    def slow_build(staging: Path) -> None:
        builds.append(staging)
        time.sleep(0.3)
        (staging / "weights.bin").write_text("w")

    results: list[Path] = []
    threads = [
        threading.Thread(target=lambda: results.append(prepare_atomically(target, slow_build, {"f": 1}, force=False)))
        for _ in range(3)
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [target] * 3
    assert len(builds) == 1
    assert is_prepared(target, {"f": 1})


def test_prepare_embedded_tokenizer_repairs_an_incomplete_cache(tmp_path: Path) -> None:
    broken = tmp_path / f"{EMBEDDED_MODEL_NAME}-tokenizer"
    broken.mkdir()
    (broken / "tokenizer.json").write_text("{truncated")
    prepared = prepare_embedded_tokenizer(tmp_path)
    assert prepared == broken and is_prepared(prepared)
    assert json.loads((prepared / "tokenizer.json").read_text())["model"]["type"] == "BPE"


# --- resolving and loading -----------------------------------------------------------------------


def test_resolve_model_path_uses_explicit_directory(tiny_model_dir: Path) -> None:
    assert resolve_model_path(ModelSettings(path=str(tiny_model_dir))) == tiny_model_dir


@pytest.mark.parametrize("kind", ["missing", "not-a-model"])
def test_resolve_model_path_names_a_bad_path(tmp_path: Path, kind: str) -> None:
    path = tmp_path / kind
    if kind == "not-a-model":
        path.mkdir()
    with pytest.raises(ValueError, match=str(path)):
        resolve_model_path(ModelSettings(path=str(path)))


def test_loading_gives_eval_model_and_a_pad_token(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "no-pad"))
    config_path = copy / "tokenizer_config.json"
    tokenizer_config = json.loads(config_path.read_text())
    tokenizer_config.pop("pad_token", None)
    config_path.write_text(json.dumps(tokenizer_config))
    model, tokenizer = load_model_and_tokenizer(copy)
    assert not model.training
    assert tokenizer.pad_token == tokenizer.eos_token
    assert model.dtype == torch.float32


def test_loading_rejects_unknown_dtype(tiny_model_dir: Path) -> None:
    with pytest.raises(ValueError, match="float64"):
        load_model_and_tokenizer(tiny_model_dir, dtype="float64")


def test_device_auto_follows_what_torch_sees() -> None:
    assert resolve_device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert resolve_device("cpu") == "cpu"


def test_a_missing_gpu_is_an_error_not_a_silent_cpu_run(tiny_model_dir: Path) -> None:
    missing = f"cuda:{torch.cuda.device_count()}"  # one past the last device, on any machine
    with pytest.raises(ValueError, match="SEAL_MODEL__DEVICE=cpu"):
        load_model_and_tokenizer(tiny_model_dir, device=missing)
    with pytest.raises(ValueError, match="auto, cpu, cuda or cuda:N"):
        resolve_device("gpu")


@pytest.mark.parametrize("device", ["gpu", "cuda:", "CPU", "cuda:x"])
def test_device_setting_is_validated(device: str) -> None:
    with pytest.raises(ValueError, match="device"):
        ModelSettings(device=device)


# --- fingerprints ----------------------------------------------------------------------------


def test_fingerprint_is_stable_cached_and_tracks_weights(tiny_model_dir: Path, tmp_path: Path) -> None:
    copy = Path(shutil.copytree(tiny_model_dir, tmp_path / "model"))
    first = model_fingerprint(copy)
    assert len(first) == 64 and first == model_fingerprint(copy)
    assert json.loads((copy / FINGERPRINT_CACHE).read_text())["sha256"] == first
    assert model_fingerprint(Path(shutil.copytree(copy, tmp_path / "model-2"))) == first

    model, _ = load_model_and_tokenizer(copy)
    with torch.no_grad():
        model.model.norm.weight[0] += 1.0
    model.save_pretrained(copy)
    changed = model_fingerprint(copy)
    assert changed != first

    config = json.loads((copy / "config.json").read_text())
    config["rms_norm_eps"] = 1e-3
    (copy / "config.json").write_text(json.dumps(config))
    assert model_fingerprint(copy) not in (first, changed)


def test_fingerprint_needs_weights(tmp_path: Path) -> None:
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ValueError, match="no weight files"):
        model_fingerprint(tmp_path)


# --- generation -----------------------------------------------------------------------------


def test_engine_generates_in_prompt_order(engine: TransformersEngine) -> None:
    progress: list[tuple[int, int]] = []
    generations = engine.generate(
        PROMPTS, SamplingParams(max_new_tokens=6), batch_size=2, on_progress=lambda d, t: progress.append((d, t))
    )
    assert len(generations) == len(PROMPTS)
    assert all(isinstance(g, Generation) and 1 <= g.completion_tokens <= 6 for g in generations)
    assert all(g.text for g in generations)
    prompt_lengths = [len(ids) for ids in engine.encode(PROMPTS, chat=True)]
    assert [g.prompt_tokens for g in generations] == prompt_lengths
    assert progress == [(2, 5), (4, 5), (5, 5)]


def test_batched_greedy_equals_one_at_a_time(engine: TransformersEngine) -> None:
    params = SamplingParams(max_new_tokens=8)
    batched = engine.generate(PROMPTS, params, batch_size=len(PROMPTS))
    alone = [engine.generate([prompt], params, batch_size=1)[0] for prompt in PROMPTS]
    assert batched == alone
    assert len({g.text for g in batched}) > 1, "different prompts should give different continuations"


def test_seeded_sampling_is_reproducible(engine: TransformersEngine) -> None:
    def sample(seed: int) -> list[str]:
        params = SamplingParams(max_new_tokens=10, temperature=1.0, top_p=0.95, seed=seed)
        return [g.text for g in engine.generate(PROMPTS, params, batch_size=2)]

    first = sample(7)
    assert first == sample(7)
    assert first != sample(8)


def test_a_vanishing_temperature_decodes_greedily_instead_of_failing(engine: TransformersEngine) -> None:
    # 1e-210 came from the wire fuzzer: logits / temperature overflowed to inf and sampling raised.
    greedy = [g.text for g in engine.generate(PROMPTS, SamplingParams(max_new_tokens=8), batch_size=2)]
    tiny = SamplingParams(max_new_tokens=8, temperature=1e-210, top_p=0.5, seed=3)
    assert tiny.greedy
    assert [g.text for g in engine.generate(PROMPTS, tiny, batch_size=2)] == greedy


def test_identical_prompts_in_one_batch_sample_differently(engine: TransformersEngine) -> None:
    params = SamplingParams(max_new_tokens=10, temperature=1.0, seed=1)
    texts = [g.text for g in engine.generate(["Tell me a fact."] * 4, params, batch_size=4)]
    assert len(set(texts)) > 1


def test_sampling_does_not_disturb_global_rng(engine: TransformersEngine) -> None:
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    engine.generate(["hi"], SamplingParams(max_new_tokens=3, temperature=1.0, seed=5))
    assert torch.equal(torch.rand(3), expected)


def test_chat_mode_applies_the_template(engine: TransformersEngine) -> None:
    tokenizer = engine.tokenizer
    chat_ids = engine.encode(["Name a colour."], chat=True)[0]
    raw_ids = engine.encode(["Name a colour."], chat=False)[0]
    assert tokenizer.decode(chat_ids).endswith("<|im_start|>user\nName a colour.<|im_end|>\n<|im_start|>assistant\n")
    assert tokenizer.decode(raw_ids) == "Name a colour."
    params = SamplingParams(max_new_tokens=4)
    assert engine.generate(["Name a colour."], params, chat=True)[0].prompt_tokens == len(chat_ids)
    assert engine.generate(["Name a colour."], params, chat=False)[0].prompt_tokens == len(raw_ids)


def test_engine_refuses_prompts_beyond_the_context(engine: TransformersEngine) -> None:
    with pytest.raises(ValueError, match="context"):
        engine.generate(["word " * 2000], SamplingParams(max_new_tokens=4), chat=False)


def test_empty_prompt_list_gives_empty_result(engine: TransformersEngine) -> None:
    assert engine.generate([], SamplingParams()) == []


@pytest.mark.parametrize(
    "kwargs, field",
    [({"max_new_tokens": 0}, "max_new_tokens"), ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"seed": -2}, "seed")],
)
def test_sampling_params_validation(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        SamplingParams(**kwargs)


# --- the real embedded model ------------------------------------------------------------------


@pytest.mark.slow
def test_embedded_model_converts_reloads_and_answers(embedded_model_dir: Path) -> None:
    assert embedded_model_dir.name == EMBEDDED_MODEL_NAME and is_prepared(embedded_model_dir)
    config = json.loads((embedded_model_dir / "config.json").read_text())
    assert "quantization_config" not in config and config["num_hidden_layers"] == 30
    started = time.perf_counter()
    model, tokenizer = load_model_and_tokenizer(embedded_model_dir)
    assert time.perf_counter() - started < 60
    generations = TransformersEngine(model, tokenizer).generate(
        ["What is the capital of France?", "What is the largest ocean on Earth?"], SamplingParams(max_new_tokens=16)
    )
    assert "paris" in generations[0].text.lower()
    assert "pacific" in generations[1].text.lower()
    assert "<|im_end|>" not in generations[0].text


# --- stopping after the first sentence ----------------------------------------------------------


def test_the_first_sentence_stop_flags_each_row_once_its_sentence_is_complete(tiny) -> None:
    from seal.models import _first_sentence_stop

    _, tokenizer = tiny
    texts = ["Paris. It is", "Paris", "Dr. Smith", "Lyon\nand more"]
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
    width = max(len(r) for r in rows)
    pad = tokenizer.pad_token_id
    # Two prompt tokens, then each text right-padded (pads are special: decoded as nothing).
    ids = torch.tensor([[pad, pad, *r, *[pad] * (width - len(r))] for r in rows])
    stop = _first_sentence_stop(tokenizer, 2, len(rows))
    assert stop(ids, None).tolist() == [True, False, False, True]
    assert stop.done_at == [width, None, None, width]
    # A row that was done stays done, at the length it was done at.
    assert stop(torch.cat([ids, ids[:, -1:]], dim=1), None).tolist() == [True, False, False, True]
    assert stop.done_at == [width, None, None, width]


def test_answers_stopped_after_the_first_sentence_keep_it(tiny) -> None:
    from seal.domains.knowledge import extract_answer
    from seal.grading import first_sentence

    model, tokenizer = tiny
    engine = TransformersEngine(model, tokenizer)
    prompts = [f"Answer with a short phrase.\nQuestion: what is item {i}?" for i in range(8)]
    full = engine.generate(prompts, SamplingParams(max_new_tokens=24), batch_size=4)
    short = engine.generate(prompts, SamplingParams(max_new_tokens=24, stop_after_first_sentence=True), batch_size=4)
    for whole, cut in zip(full, short, strict=True):
        assert whole.text.startswith(cut.text) and cut.completion_tokens <= whole.completion_tokens
        assert first_sentence(extract_answer(cut.text)) == first_sentence(extract_answer(whole.text))
