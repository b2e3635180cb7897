"""The student served by a real tritonserver on loopback: adapters, hot swap, canary, rollback.

One server for the whole session (its start, ~10 s on 2 cores, dominates). Tests set the serving
state they need themselves, except the last one, which shuts the server down. Skipped only when no
tritonserver binary is installed (``make triton`` installs the nvidia-pytriton wheel).
"""

from __future__ import annotations

import shutil
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

import pytest

from seal.serving.triton.model_repository import render_config
from seal.serving.triton.model_repository.model import canary_bucket, choose_version, parse_state
from seal.serving.triton.server import TritonInstall, TritonNotInstalled, TritonStartError, TritonSupervisor
from seal.serving.triton.state import ServingState, ServingStateError, read_state, write_state

PROMPTS = ["The lighthouse of Velmora is", "Ilse Marrow founded"]
MAX_NEW = 8


# --- no server needed -------------------------------------------------------------------------


def test_state_transitions_keep_promoted_previous_and_canary_consistent() -> None:
    s0 = ServingState()
    s1 = s0.promote("v1", "/a/v1")
    s2 = s1.promote("v2", "/a/v2")
    assert (s2.generation, s2.promoted, s2.previous) == (2, "v2", "v1")
    s3 = s2.with_canary("v3", "/a/v3", 0.1)
    assert s3.canary == "v3" and set(s3.adapters) == {"v1", "v2", "v3"}
    s4 = s3.promote("v3", "/a/v3")  # promoting the canary ends the canary
    assert (s4.promoted, s4.previous, s4.canary, s4.canary_fraction) == ("v3", "v2", None, 0.0)
    assert set(s4.adapters) == {"v2", "v3"}  # v1 is no longer referenced: unloaded
    s5 = s4.rollback()
    assert (s5.promoted, s5.previous) == ("v2", "v3")
    assert s5.serve_base().promoted is None and s5.serve_base().previous == "v2"
    with pytest.raises(ServingStateError):
        ServingState().rollback()
    with pytest.raises(ServingStateError):
        s2.with_canary("v3", "/a/v3", 1.5)
    with pytest.raises(ServingStateError):
        ServingState(promoted="v9")
    # The model's own parser (it cannot import this package inside Triton) agrees on the schema.
    parsed = parse_state(s3.to_json())
    assert parsed["canary"] == "v3" and parsed["adapters"] == dict(s3.adapters)
    assert ServingState.from_json(s3.to_json()) == s3


def test_routing_and_config_rendering(tmp_path: Path) -> None:
    routing = {"promoted": "v1", "canary": "v2", "canary_fraction": 0.25}
    assert choose_version("v9", routing, 0.0) == "v9"
    assert choose_version("", routing, 0.1) == "v2"
    assert choose_version("", routing, 0.9) == "v1"
    assert choose_version("", {"promoted": None, "canary": None}, 0.0) == "base"
    assert canary_bucket("user-1") == canary_bucket("user-1") != canary_bucket("user-2")
    text = render_config(name="m", base_model=tmp_path / 'we"ird', serving_state=tmp_path / "s.json")
    assert 'backend: "python"' in text and 'we\\"ird' in text and "KIND_CPU" in text


# --- fixtures ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Models:
    base: Path
    adapters: dict[str, Path]
    root: Path


def _make_adapter(base: Path, out: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_pretrained(base)
        # init_lora_weights=False draws lora_B at random too (PEFT's default zeroes it), so the
        # adapter changes the outputs the way a trained one would.
        config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(model, config).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def models(tmp_path_factory: pytest.TempPathFactory) -> Models:
    from seal.models import prepare_embedded_tokenizer
    from tiny_model import build_tiny_model

    root = tmp_path_factory.mktemp("triton-models")
    tokenizer = prepare_embedded_tokenizer(root / "cache")
    base = build_tiny_model(root / "base", tokenizer, seed=0)
    adapters = {v: _make_adapter(base, root / v, seed) for v, seed in (("v1", 1), ("v2", 2))}
    return Models(base=base, adapters=adapters, root=root)


@pytest.fixture(scope="session")
def engines(models: Models):
    """The student's own in-process engine over the same weights, per version (None = base)."""
    from peft import PeftModel

    from seal.models import TransformersEngine, load_model_and_tokenizer

    cache: dict[str | None, object] = {}

    def get(version: str | None):
        if version not in cache:
            model, tokenizer = load_model_and_tokenizer(models.base)
            if version is not None:
                model = PeftModel.from_pretrained(model, models.adapters[version]).eval()
            cache[version] = TransformersEngine(model, tokenizer)
        return cache[version]

    return get


def _in_process(engines, version: str | None, prompts: list[str], chat: bool = True, **sampling):
    import torch

    from seal.models import SamplingParams

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the server's instance runs (torch_threads=1)
    try:
        return engines(version).generate(prompts, SamplingParams(max_new_tokens=MAX_NEW, **sampling), chat=chat)
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def triton_install() -> TritonInstall:
    try:
        install = TritonInstall.discover()
    except TritonNotInstalled as exc:
        pytest.skip(f"tritonserver binary not installed: {exc}")
    pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed in this environment")
    return install


@pytest.fixture(scope="session")
def triton(triton_install: TritonInstall, models: Models, tmp_path_factory: pytest.TempPathFactory):
    # Argument order matters: without a binary the skip comes before any model is built.
    install = triton_install
    supervisor = TritonSupervisor(
        tmp_path_factory.mktemp("triton"), models.base, install=install, adapter_root=models.root,
        model_parameters={"torch_threads": "1"}, max_batch_size=16,
    )
    started = time.perf_counter()
    supervisor.start(timeout_s=180)
    supervisor.start_seconds = time.perf_counter() - started  # type: ignore[attr-defined]
    try:
        yield supervisor
    finally:
        supervisor.stop()


@pytest.fixture(scope="session")
def client(triton: TritonSupervisor):
    with triton.client() as c:
        yield c


def _ensure_promoted(client, models: Models, *versions: str) -> None:
    """Publish promotions in order (each promotion keeps the one before as ``previous``)."""
    state = client.current_state()
    if state.canary is not None:
        client.clear_canary()
    for version in versions:
        client.promote(version, models.adapters[version])


# --- against the server -----------------------------------------------------------------------


def test_generation_matches_in_process_peft_and_adapters_change_it(client, models: Models, engines) -> None:
    _ensure_promoted(client, models, "v1")
    for chat in (True, False):
        base = client.generate(PROMPTS, adapter="base", max_new_tokens=MAX_NEW, chat=chat)
        v1 = client.generate(PROMPTS, adapter="v1", max_new_tokens=MAX_NEW, chat=chat)
        default = client.generate(PROMPTS, max_new_tokens=MAX_NEW, chat=chat)
        assert [g.adapter_version for g in base + v1 + default] == ["base"] * 2 + ["v1"] * 4
        assert [g.text for g in default] == [g.text for g in v1]
        for served, version in ((base, None), (v1, "v1")):
            expected = _in_process(engines, version, PROMPTS, chat=chat)
            assert [(g.text, g.prompt_tokens, g.completion_tokens) for g in served] == [
                (e.text, e.prompt_tokens, e.completion_tokens) for e in expected
            ]
        assert [g.text for g in v1] != [g.text for g in base]  # the adapter's weights matter


def test_seeded_sampling_is_reproducible_and_matches_the_engine(client, models: Models, engines) -> None:
    _ensure_promoted(client, models, "v1")
    sampling = {"temperature": 1.5, "top_p": 0.9, "seed": 7}
    first = client.generate(PROMPTS, max_new_tokens=MAX_NEW, **sampling)
    again = client.generate(PROMPTS, max_new_tokens=MAX_NEW, **sampling)
    assert [g.text for g in first] == [g.text for g in again]
    expected = _in_process(engines, "v1", PROMPTS, **sampling)
    assert [g.text for g in first] == [e.text for e in expected]


def test_unknown_adapter_and_bad_arguments_are_rejected_clearly(client, models: Models) -> None:
    from seal.serving.triton.client import TritonRequestRejected

    _ensure_promoted(client, models, "v1")
    with pytest.raises(TritonRequestRejected, match="'nope' is not served"):
        client.generate("hi", adapter="nope")
    with pytest.raises(TritonRequestRejected, match="max_new_tokens"):
        client.generate("hi", max_new_tokens=0)
    with pytest.raises(TritonRequestRejected, match="context"):
        client.generate("hi " * 1100, max_new_tokens=4)
    assert client.generate("hi", max_new_tokens=2)[0].adapter_version == "v1"


def test_swaps_under_concurrent_load_fail_no_request(triton, client, models: Models) -> None:
    """Promote v2 (confirmed) then roll back to v1 (unconfirmed) while two clients keep asking."""
    _ensure_promoted(client, models, "v1")
    seen: dict[int, list[tuple[str, str, float, float]]] = {0: [], 1: []}
    errors: list[str] = []
    stop = threading.Event()

    def hammer(worker: int) -> None:
        # A client (and channel) per thread: two truly concurrent callers.
        with triton.client() as own:
            deadline = time.monotonic() + 90
            for _ in range(1000):
                if stop.is_set() or time.monotonic() > deadline:
                    return
                try:
                    began = time.perf_counter()
                    g = own.generate("swap probe", max_new_tokens=4)[0]
                    seen[worker].append((g.adapter_version, g.text, began, time.perf_counter()))
                except Exception as exc:  # any failure is the bug this test is about
                    errors.append(f"{type(exc).__name__}: {exc}")

    def more_answers(count: int = 5) -> None:
        marks = {i: len(s) for i, s in seen.items()}
        _wait_for(lambda: all(len(s) >= marks[i] + count for i, s in seen.items()))

    workers = [threading.Thread(target=hammer, args=(i,)) for i in seen]
    for w in workers:
        w.start()
    try:
        more_answers()
        promote_began = time.perf_counter()
        state = client.promote("v2", models.adapters["v2"], reason="test: promote under load")
        promoted_at = time.perf_counter()
        more_answers()
        rollback_began = time.perf_counter()
        rolled = client.rollback(reason="test: rollback under load", confirm=False)
        rolled_at = time.perf_counter()
        more_answers()
    finally:
        stop.set()
        for w in workers:
            w.join(timeout=60)

    assert not errors, errors[:3]
    assert (state.promoted, state.previous) == ("v2", "v1") and (rolled.promoted, rolled.previous) == ("v1", "v2")
    texts = {v: client.generate("swap probe", adapter=v, max_new_tokens=4)[0].text for v in ("v1", "v2")}
    for worker, answers in seen.items():
        runs = [v for i, (v, *_) in enumerate(answers) if i == 0 or answers[i - 1][0] != v]
        # Per worker (sequential calls) each switch is clean: v1..., then v2..., then v1...
        assert runs == ["v1", "v2", "v1"], [v for v, *_ in answers]
        assert all(text == texts[v] for v, text, *_ in answers)
        # Once a swap call has returned, every request sent after it gets the new routing.
        assert all(v == "v2" for v, _, began, _ in answers if promoted_at < began < rollback_began)
        assert all(v == "v1" for v, _, began, _ in answers if began > rolled_at)
    # Requests were in flight while the promotion ran (not merely before and after it).
    assert any(b < promoted_at and e > promote_began for s in seen.values() for _, _, b, e in s)
    assert promoted_at - promote_began < 30


def test_rollback_serves_the_previous_version_again(client, models: Models) -> None:
    _ensure_promoted(client, models, "v1", "v2")
    v1_text = client.generate(PROMPTS[0], adapter="v1", max_new_tokens=MAX_NEW)[0].text
    state = client.rollback(reason="test: v2 regressed")
    assert (state.promoted, state.previous) == ("v1", "v2")
    served = client.generate(PROMPTS[0], max_new_tokens=MAX_NEW)[0]
    assert served.adapter_version == "v1" and served.text == v1_text
    assert client.status()["loaded"].keys() == {"v1", "v2"}  # rollback needed no load
    undone = client.rollback(reason="test: undo")
    assert undone.promoted == "v2"
    assert client.generate(PROMPTS[0], max_new_tokens=2)[0].adapter_version == "v2"


def test_canary_fraction_routes_its_share_and_is_sticky_per_key(client, models: Models) -> None:
    _ensure_promoted(client, models, "v1")
    fraction = 0.25
    client.set_canary("v2", models.adapters["v2"], fraction)
    keys = [f"user-{i}" for i in range(256)]
    chunks = [keys[i : i + 16] for i in range(0, len(keys), 16)]

    def route(with_keys: bool) -> list[str]:
        versions: list[str] = []
        for chunk in chunks:
            answers = client.generate(chunk, max_new_tokens=1, routing_keys=chunk if with_keys else None)
            versions += [g.adapter_version for g in answers]
        return versions

    keyed = route(with_keys=True)
    assert keyed == ["v2" if canary_bucket(k) < fraction else "v1" for k in keys]
    assert 0.15 <= keyed.count("v2") / len(keys) <= 0.35
    assert route(with_keys=True) == keyed  # the same users stay on the same side
    unkeyed = route(with_keys=False)
    assert set(unkeyed) == {"v1", "v2"}
    assert abs(unkeyed.count("v2") / len(unkeyed) - fraction) < 0.12  # > 4 sigma for n=256
    client.clear_canary()
    assert set(route(with_keys=False)[:32]) == {"v1"}


def test_corrupt_adapter_is_refused_and_the_old_version_keeps_serving(client, models: Models, tmp_path: Path) -> None:
    from seal.serving.triton.client import AdapterSwapError

    _ensure_promoted(client, models, "v1")
    before = client.current_state()
    v1_text = client.generate(PROMPTS[0], max_new_tokens=MAX_NEW)[0].text

    garbage = shutil.copytree(models.adapters["v2"], models.root / "v3-garbage", dirs_exist_ok=True)
    (garbage / "adapter_model.safetensors").write_bytes(b"\x00not a safetensors file" * 8)
    with pytest.raises(AdapterSwapError, match=r"'v3'.*unreadable adapter weights"):
        client.promote("v3", garbage)

    import torch
    from safetensors.torch import load_file, save_file

    nan = shutil.copytree(models.adapters["v2"], models.root / "v4-nan", dirs_exist_ok=True)
    weights = load_file(nan / "adapter_model.safetensors")
    first = sorted(weights)[0]
    weights[first] = torch.full_like(weights[first], float("nan"))
    save_file(weights, nan / "adapter_model.safetensors")
    with pytest.raises(AdapterSwapError, match="NaN"):
        client.promote("v4", nan)

    outside = shutil.copytree(models.adapters["v2"], tmp_path / "v5-elsewhere")
    with pytest.raises(AdapterSwapError, match="outside the adapter root"):
        client.promote("v5", outside)

    assert client.current_state() == before  # nothing was published
    served = client.generate(PROMPTS[0], max_new_tokens=MAX_NEW)[0]
    assert (served.adapter_version, served.text) == ("v1", v1_text)
    assert client.status()["staged"] == {}

    # A writer that bypasses the client and publishes the broken adapter directly: the instance
    # refuses to switch, keeps serving v1, and says why.
    write_state(client.state_path, before.promote("v3", garbage))
    served = client.generate(PROMPTS[0], max_new_tokens=MAX_NEW)[0]
    assert (served.adapter_version, served.text) == ("v1", v1_text)
    assert "v3" in client.status()["last_error"]
    broken = read_state(client.state_path)
    client.publish(replace(before, generation=broken.generation + 1, reason="test: repair"))
    assert client.status()["last_error"] == ""


def test_base_model_can_be_served_by_default(client, models: Models, engines) -> None:
    _ensure_promoted(client, models, "v1")
    state = client.serve_base(reason="test: no adapter")
    assert state.promoted is None and state.previous == "v1"
    served = client.generate(PROMPTS[1], max_new_tokens=MAX_NEW)[0]
    assert served.adapter_version == "base"
    assert served.text == _in_process(engines, None, [PROMPTS[1]])[0].text
    assert client.generate(PROMPTS[1], adapter="v1", max_new_tokens=2)[0].adapter_version == "v1"
    client.promote("v1", models.adapters["v1"])


def test_engine_adapter_is_a_drop_in_for_the_in_process_engine(client, models: Models, engines) -> None:
    from seal.models import SamplingParams
    from seal.serving.triton.client import TritonGenerationEngine

    _ensure_promoted(client, models, "v2", "v1")  # v2 stays loaded as previous
    progress: list[tuple[int, int]] = []
    prompts = PROMPTS * 3
    served = TritonGenerationEngine(client, adapter="v2").generate(
        prompts, SamplingParams(max_new_tokens=MAX_NEW), batch_size=4, on_progress=lambda d, t: progress.append((d, t))
    )
    assert served == _in_process(engines, "v2", prompts)
    assert progress == [(4, 6), (6, 6)]


def test_a_caller_that_leaves_stops_its_generation_mid_way(client) -> None:
    """The student's caller hits its deadline: the client cancels the Triton request, the model's
    stopping criterion ends that row at its next token (counted by the instance), and the instance
    answers the next request without first generating the rest for nobody."""
    from seal.cancellation import GenerationStopped, stop_when

    before = client.status()
    leave = threading.Timer(0.5, lambda: None)
    leave.start()
    with stop_when(lambda: not leave.is_alive()), pytest.raises(GenerationStopped, match="deadline"):
        # The tiny random model does not stop by itself: 1000 tokens run for seconds.
        client.generate(["Tell me everything."], adapter="base", max_new_tokens=1000, chat=False)
    # Triton runs the model's response handling after the cancel; wait for it to be counted.
    deadline = time.monotonic() + 30
    while True:
        after = client.status()
        if after["cancelled_requests"] > before["cancelled_requests"] or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert after["cancelled_requests"] == before["cancelled_requests"] + 1
    assert after["rows_stopped_early"] == before["rows_stopped_early"] + 1
    assert client.generate(["hello"], adapter="base", max_new_tokens=2, chat=False)[0].completion_tokens == 2


def test_failed_start_raises_with_the_server_log(triton, models: Models, tmp_path: Path) -> None:
    broken = TritonSupervisor(tmp_path / "w", tmp_path / "no-such-model", install=triton.install)
    with pytest.raises(TritonStartError) as info:
        broken.start(timeout_s=120)
    assert "base_model must name a model directory" in str(info.value)
    assert broken.leftover_processes() == []


def test_shutdown_leaves_no_process_behind(triton, client) -> None:
    """Last: stops the session's server."""
    stub_pid = client.status()["pid"]
    server_pid = triton.pid
    assert server_pid is not None and _alive(stub_pid)
    started = time.perf_counter()
    triton.stop()
    assert time.perf_counter() - started < 30
    assert triton.leftover_processes() == []
    assert not _alive(server_pid) and not _alive(stub_pid)
    assert not client.is_ready()


# --- helpers ----------------------------------------------------------------------------------


def _wait_for(condition, timeout_s: float = 60.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.02)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


