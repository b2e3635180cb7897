"""The student *service* with backend=triton: Generate, Promote under load, Rollback, a corrupted
adapter refused, metrics, clean shutdown, over real gRPC against a real tritonserver.

One stack (one tritonserver, ~15 s to start on 2 cores) for the module. Each test creates the
versions it uses and sets the served state it needs itself (``fresh``), so every test passes alone
and in any order; the restart test runs a student of its own rather than stopping the shared one.
Ports are all chosen at start (0). Skipped only when no tritonserver binary is installed.
"""

from __future__ import annotations

import threading
import time
import urllib.request
from pathlib import Path

import grpc
import pytest
from google.protobuf import empty_pb2

from seal.v1 import student_pb2, student_pb2_grpc

PROMPTS = ["The lighthouse of Velmora is", "Ilse Marrow founded"]
MAX_NEW = 8
NAME = "default"


def _settings(home: Path, base: Path):
    from seal.config import Settings

    return Settings(home=home, model={"path": str(base), "torch_threads": 1},
                    student_serving={"backend": "triton", "startup_timeout_s": 240})


def _create_versions(registry, base: Path, seeds) -> dict[int, str]:
    """New candidate versions of NAME, one per seed (random LoRA weights of that seed)."""
    from seal.models import model_fingerprint

    versions = {}
    for seed in seeds:
        manifest = registry.create_version(
            NAME, _write_random_lora(base, seed), base_model=base.name,
            base_model_fingerprint=model_fingerprint(base), context_id=f"ctx{seed}",
            self_edit_sha256="0" * 64, seed=seed, hyperparameters={},
        )
        versions[seed] = manifest.adapter_id
    return versions


def _write_random_lora(base: Path, seed: int):
    def write(directory: Path) -> None:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_pretrained(base)
            # init_lora_weights=False: lora_B random too, so the adapter changes the answers.
            config = LoraConfig(r=4, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
            get_peft_model(model, config).save_pretrained(str(directory))

    return write


def _pids_serving(repository: Path) -> list[int]:
    """tritonserver processes (and their stubs, which name the repository too) of this test."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(repository) in cmdline:
                found.append(int(entry.name))
    return found


@pytest.fixture(scope="module")
def triton_available() -> None:
    from seal.serving.triton.server import TritonInstall, TritonNotInstalled

    try:
        TritonInstall.discover()
    except TritonNotInstalled as exc:
        pytest.skip(f"tritonserver binary not installed: {exc}")
    pytest.importorskip("tritonclient.grpc", reason="tritonclient is not installed in this environment")


@pytest.fixture(scope="module")
def world(triton_available, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    from seal.registry import AdapterRegistry
    from seal.stack import local_stack

    home = tmp_path_factory.mktemp("seal-triton-home")
    settings = _settings(home, tiny_model_dir)
    with local_stack(settings, student_backend="triton") as stack:
        yield {"stack": stack, "registry": AdapterRegistry(settings.registry_dir), "home": home,
               "base": tiny_model_dir}


@pytest.fixture(scope="module")
def stub(world):
    with grpc.insecure_channel(world["stack"].student.address) as channel:
        yield student_pb2_grpc.StudentServiceStub(channel)


@pytest.fixture
def fresh(world, stub) -> dict[int, str]:
    """Three new candidate versions (seeds 1, 2, 3), with the base model served again: whatever
    an earlier test promoted is rolled back through the student, so Triton follows."""
    registry = world["registry"]
    for _ in range(50):  # each rollback retires one promoted version; far fewer exist
        if registry.promoted(NAME) is None:
            break
        stub.Rollback(student_pb2.RollbackRequest(adapter_name=NAME, reason="test set-up", allow_base_model=True),
                      timeout=120)
    assert registry.promoted(NAME) is None
    return _create_versions(registry, world["base"], (1, 2, 3))


def _promote(stub, adapter_id: str) -> None:
    stub.Promote(student_pb2.PromoteRequest(adapter_id=adapter_id, reason="test set-up"), timeout=120)


def _generate(stub, selector=None, prompts=PROMPTS):
    request = student_pb2.GenerateRequest(prompts=prompts, max_new_tokens=MAX_NEW,
                                          adapter=selector or student_pb2.AdapterSelector())
    reply, call = stub.Generate.with_call(request, timeout=120)
    assert dict(call.trailing_metadata())["x-seal-serving-backend"] == "triton"
    return reply


def _in_process(base: Path, adapter_dir: Path | None) -> list[str]:
    import torch
    from peft import PeftModel

    from seal.models import SamplingParams, TransformersEngine, load_model_and_tokenizer

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the served instance (torch_threads=1)
    try:
        model, tokenizer = load_model_and_tokenizer(base)
        if adapter_dir is not None:
            model = PeftModel.from_pretrained(model, str(adapter_dir)).eval()
        return [g.text for g in TransformersEngine(model, tokenizer).generate(PROMPTS, SamplingParams(max_new_tokens=MAX_NEW))]
    finally:
        torch.set_num_threads(threads)


def test_generate_with_and_without_adapter_follows_the_weights(world, stub, fresh) -> None:
    v1, v2 = fresh[1], fresh[2]
    registry = world["registry"]
    base = _generate(stub, student_pb2.AdapterSelector(base_model=empty_pb2.Empty()))
    unpromoted = _generate(stub)  # nothing promoted yet: the base model
    assert base.served_adapter_id == unpromoted.served_adapter_id == ""
    stub.Promote(student_pb2.PromoteRequest(adapter_id=v1, reason="test"), timeout=120)
    promoted = _generate(stub)
    named = _generate(stub, student_pb2.AdapterSelector(adapter_id=v1))
    candidate = _generate(stub, student_pb2.AdapterSelector(adapter_id=v2))  # loaded by version
    assert (promoted.served_adapter_id, named.served_adapter_id, candidate.served_adapter_id) == (v1, v1, v2)
    texts = lambda reply: [c.text for c in reply.completions]  # noqa: E731
    assert texts(base) == texts(unpromoted) == _in_process(world["base"], None)
    assert texts(promoted) == texts(named) == _in_process(world["base"], registry.path_of(registry.get(v1)))
    assert texts(candidate) == _in_process(world["base"], registry.path_of(registry.get(v2)))
    assert len({tuple(texts(base)), tuple(texts(promoted)), tuple(texts(candidate))}) == 3


def test_promote_under_load_fails_no_request_and_switches(world, stub, fresh) -> None:
    v1, v2 = fresh[1], fresh[2]
    _promote(stub, v1)
    served: list[tuple[float, str]] = []
    errors: list[BaseException] = []
    stop = threading.Event()

    def client_loop() -> None:
        with grpc.insecure_channel(world["stack"].student.address) as channel:
            own = student_pb2_grpc.StudentServiceStub(channel)
            while not stop.is_set():
                try:
                    reply = own.Generate(student_pb2.GenerateRequest(prompts=PROMPTS[:1], max_new_tokens=4), timeout=120)
                    served.append((time.monotonic(), reply.served_adapter_id))
                except BaseException as exc:  # noqa: BLE001 - counted, asserted below
                    errors.append(exc)

    workers = [threading.Thread(target=client_loop) for _ in range(3)]
    for w in workers:
        w.start()
    time.sleep(1.5)
    stub.Promote(student_pb2.PromoteRequest(adapter_id=v2, reason="under load"), timeout=300)
    promoted_at = time.monotonic()
    time.sleep(1.5)
    stop.set()
    for w in workers:
        w.join(timeout=120)
    assert errors == []
    before = [v for t, v in served if t < promoted_at - 0.5]
    after = [v for t, v in served if t > promoted_at + 0.5]
    assert before and set(before) == {v1}
    assert after and set(after) == {v2}
    assert _generate(stub).served_adapter_id == v2


def test_rollback_serves_the_previous_version(world, stub, fresh) -> None:
    v1, v2 = fresh[1], fresh[2]
    _promote(stub, v1)
    _promote(stub, v2)
    assert _generate(stub).served_adapter_id == v2
    reply = stub.Rollback(student_pb2.RollbackRequest(adapter_name=NAME, reason="test"), timeout=120)
    assert (reply.rolled_back.adapter_id, reply.now_serving.adapter_id) == (v2, v1)
    assert _generate(stub).served_adapter_id == v1


def test_corrupted_adapter_is_refused_and_the_served_version_stays(world, stub, fresh) -> None:
    v1, v3 = fresh[1], fresh[3]
    registry = world["registry"]
    _promote(stub, v1)
    weights = registry.path_of(registry.get(v3)) / "adapter_model.safetensors"
    with weights.open("r+b") as fh:  # flip bytes well inside the tensor data
        fh.seek(-16, 2)
        fh.write(b"\x00" * 8 + b"\xff" * 8)
    with pytest.raises(grpc.RpcError) as refused:
        stub.Promote(student_pb2.PromoteRequest(adapter_id=v3, reason="corrupt"), timeout=120)
    assert refused.value.code() == grpc.StatusCode.DATA_LOSS
    assert registry.get(v3).status == "candidate" and registry.promoted(NAME).adapter_id == v1
    assert _generate(stub).served_adapter_id == v1
    # A corrupted version is not loaded by name either.
    with pytest.raises(grpc.RpcError) as named:
        _generate(stub, student_pb2.AdapterSelector(adapter_id=v3))
    assert named.value.code() == grpc.StatusCode.DATA_LOSS


def test_metrics_name_the_served_version_and_triton(world, stub, fresh) -> None:
    v1 = fresh[1]
    _promote(stub, v1)
    assert _generate(stub).served_adapter_id == v1
    port = world["stack"].student.metrics_port
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    assert f'seal_student_served_adapter_info{{adapter="{v1}",role="promoted"}} 1.0' in text
    assert f'seal_student_generate_requests_total{{adapter="{v1}"}}' in text
    # The series exists from start-up at 0 (so dashboards have it); the promote made it count.
    swaps = next(line for line in text.splitlines() if line.startswith('seal_student_adapter_swap_seconds_count{operation="promote"}'))
    assert float(swaps.rsplit(" ", 1)[1]) >= 1
    assert f'seal_student_generated_tokens_total{{adapter="{v1}"}}' in text
    url = next(line for line in text.splitlines() if line.startswith("seal_student_serving_backend_info"))
    triton_url = url.split('triton_metrics_url="')[1].split('"')[0]
    assert 'backend="triton"' in url
    assert "nv_inference_request_success" in urllib.request.urlopen(triton_url, timeout=10).read().decode()


def test_restart_serves_the_registry_promoted_version_and_stops_cleanly(
    triton_available, tiny_model_dir: Path, tmp_path: Path
) -> None:
    """A student of its own (the shared one keeps serving the other tests): an earlier process
    left a serving state that names another version; the new one serves the registry's."""
    from seal.registry import AdapterRegistry
    from seal.serving.triton.state import ServingState, write_state
    from student_svc.servicer import serve_student

    settings = _settings(tmp_path, tiny_model_dir)
    registry = AdapterRegistry(settings.registry_dir)
    versions = _create_versions(registry, tiny_model_dir, (1, 2))
    v1, v2 = versions[1], versions[2]
    registry.promote(v1, "promoted before the restart")
    triton_dir = tmp_path / "student" / "triton"
    stale = ServingState(generation=7, promoted=v2, adapters={v2: str(registry.path_of(registry.get(v2)))},
                         reason="left by an earlier process")
    write_state(triton_dir / "serving_state.json", stale)
    repository = triton_dir / "model_repository"
    # metrics_port=0: a free port, never the configured one another student on this host may hold.
    restarted = serve_student(settings, port=0, metrics_port=0)
    try:
        assert _pids_serving(repository)
        with grpc.insecure_channel(restarted.address) as channel:
            assert _generate(student_pb2_grpc.StudentServiceStub(channel)).served_adapter_id == v1
    finally:
        restarted.stop(grace=1.0)
    deadline = time.monotonic() + 30
    while _pids_serving(repository) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _pids_serving(repository) == []
