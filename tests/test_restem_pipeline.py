"""ReST^EM over real gRPC with the tiny model: policy hot-load, a full Train round, an interrupted
round resumed, and the durable reward buffer surviving a killed teacher."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import pytest

from seal.config import Settings
from seal.registry import AdapterRegistry
from seal.stack import LocalStack, local_stack
from seal.v1 import (
    common_pb2,
    student_pb2,
    student_pb2_grpc,
    teacher_pb2,
    teacher_pb2_grpc,
)

REPO_ROOT = Path(__file__).resolve().parent.parent

PASSAGES = [
    ("Velmora", "Velmora is a harbour town on the island of Quessant. It was founded in 1742 by the cartographer Ilse Marrow.",
     [("Who founded Velmora?", "Ilse Marrow"), ("When was Velmora founded?", "1742")]),
    ("Grey Lantern", "The Grey Lantern is a lighthouse in Velmora. It is 41 meters tall and was lit in 1790.",
     [("How tall is the Grey Lantern?", "41 meters")]),
]


def restem_settings(home: Path, model_dir: Path) -> Settings:
    return Settings(
        home=home,
        model={"path": str(model_dir)},
        lora={"epochs": 2, "batch_size": 4, "max_seq_len": 64},
        teacher={"max_new_tokens": 32, "default_k": 2, "engine": "transformers"},
        auditor={"answer_max_new_tokens": 8},
        # A strong, quick policy update: the tests check that it lands, not that it is gentle.
        restem={"k": 2, "policy": {"learning_rate": 5e-3, "epochs": 3, "max_seq_len": 256}},
        guardrails={"unknown_entities": {"enabled": False}},
    )


def train_request(k: int = 2, seeds: int = 1, **fields: object) -> teacher_pb2.TrainRequest:
    return teacher_pb2.TrainRequest(
        contexts=[
            teacher_pb2.TrainingContext(
                context=common_pb2.Context(title=title, passage=passage),
                questions=[common_pb2.Question(question=q, answer=a) for q, a in questions],
            )
            for title, passage, questions in PASSAGES
        ],
        k=k,
        seeds_per_edit=seeds,
        seed=3,
        **fields,
    )


def propose(stack: LocalStack) -> list[str]:
    with grpc.insecure_channel(stack.teacher.address) as channel:
        reply = teacher_pb2_grpc.TeacherServiceStub(channel).ProposeSelfEdits(
            teacher_pb2.ProposeSelfEditsRequest(
                context=common_pb2.Context(title=PASSAGES[0][0], passage=PASSAGES[0][1]), k=2, seed=11
            ),
            timeout=120,
        )
    return [edit.text for edit in reply.self_edits]


def reward_events(home: Path, lineage: str = "restem") -> list[dict]:
    path = home / "auditor" / "rewards.jsonl"
    events = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [e for e in events if e["adapter_id"].startswith(f"{lineage}@v")]


# --- the policy hot-load --------------------------------------------------------------------------


def test_hot_loading_a_policy_changes_the_teachers_outputs(tiny_model_dir: Path, tmp_path: Path) -> None:
    from seal.models import SamplingParams
    from seal.rl.policy import open_teacher_policy

    base = restem_settings(tmp_path, tiny_model_dir)
    policy_lora = base.restem.policy.model_copy(update={"learning_rate": 2e-2, "epochs": 30, "batch_size": 2})
    settings = base.model_copy(update={"restem": base.restem.model_copy(update={"policy": policy_lora})})
    policy = open_teacher_policy(settings)
    assert policy.load_serving() is None and policy.adapter_id == ""
    prompts = ["Write implications of: Velmora was founded in 1742.", "Write implications of: the lamp is red."]
    greedy = SamplingParams(max_new_tokens=8)
    before = [g.text for g in policy.engine.generate(prompts, greedy)]

    targets = {1: "alpha beta gamma delta", 2: "one two three four five"}
    for version, target in targets.items():
        update = policy.train([(p, target) for p in prompts], f"round-{version}", seed=version)
        assert (update.adapter_id, update.version, update.hot_loaded) == (f"teacher-policy@v{version}", version, True)
        assert update.losses[-1] < update.losses[0]
        assert policy.adapter_id == f"teacher-policy@v{version}"
        after = [g.text for g in policy.engine.generate(prompts, greedy)]
        assert after == [target, target], (version, after)
    assert before != [targets[2]] * 2

    registry = AdapterRegistry(tmp_path / "teacher" / "registry")
    statuses = {m.adapter_id: str(m.status) for m in registry.list("teacher-policy")}
    assert statuses == {"teacher-policy@v1": "superseded", "teacher-policy@v2": "promoted"}

    # Evaluating an old version does not change what is promoted; the base model is version 0.
    policy.activate(1)
    assert [g.text for g in policy.engine.generate(prompts, greedy)] == [targets[1]] * 2
    policy.activate(0)
    assert [g.text for g in policy.engine.generate(prompts, greedy)] == before
    assert registry.promoted("teacher-policy").adapter_id == "teacher-policy@v2"

    # A restarted teacher serves the promoted policy again; a round already stored is reused.
    restarted = open_teacher_policy(settings)
    assert restarted.load_serving().adapter_id == "teacher-policy@v2"
    assert [g.text for g in restarted.engine.generate(prompts, greedy)] == [targets[2]] * 2
    again = restarted.train([(prompts[0], "ignored")], "round-2")
    assert again.version == 2 and len(registry.list("teacher-policy")) == 2


def test_engine_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    from seal import engines

    assert engines.resolve_engine_kind("transformers") == "transformers"
    monkeypatch.setattr(engines, "cuda_available", lambda: True)
    monkeypatch.setattr(engines, "vllm_importable", lambda: False)
    assert engines.resolve_engine_kind("auto") == "transformers"
    monkeypatch.setattr(engines, "vllm_importable", lambda: True)
    assert engines.resolve_engine_kind("auto") == "vllm"
    monkeypatch.setattr(engines, "cuda_available", lambda: False)
    assert engines.resolve_engine_kind("auto") == "transformers"  # vLLM's CPU build only on request
    monkeypatch.setattr(engines, "vllm_importable", lambda: False)
    with pytest.raises(RuntimeError, match="make venv-vllm"):
        engines.resolve_engine_kind("vllm")


# --- a round over gRPC ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    with local_stack(restem_settings(tmp_path_factory.mktemp("restem-home"), tiny_model_dir)) as running:
        yield running


def test_a_round_end_to_end_trains_and_hot_loads_the_policy(stack: LocalStack) -> None:
    home = stack.settings.home
    before = propose(stack)
    with grpc.insecure_channel(stack.teacher.address) as channel:
        events = list(teacher_pb2_grpc.TeacherServiceStub(channel).Train(train_request(k=2, seeds=2), timeout=900))
    kinds = [e.WhichOneof("event") for e in events]
    assert kinds[0] == "round_started" and kinds[-1] == "report"
    assert kinds.count("context_sampled") == 2 and kinds.count("sample_scored") == 2 * 2 * 2
    assert kinds.count("context_done") == 2 and "policy_progress" in kinds
    assert len({e.round_id for e in events[1:]}) == 1

    report = events[-1].report
    assert report.round == 1 and report.keep_rule == teacher_pb2.KEEP_RULE_BEST_OF_K  # the configured default
    assert report.samples_scored + report.samples_failed == 8 and report.samples_resumed == 0
    scored = [e.sample_scored for e in events if e.HasField("sample_scored")]
    rewards = [s.reward for s in scored if s.HasField("reward")]
    assert report.samples_scored == len(rewards)
    assert report.kept == 2 and report.HasField("mean_reward")  # best of k keeps one per context
    assert report.policy_adapter_id == "teacher-policy@v1" and report.policy_version == 1 and report.hot_loaded
    assert report.policy_sft_final_loss < report.policy_sft_first_loss
    assert {"generation", "scoring", "policy_sft", "total"} <= set(report.phase_seconds)

    # Every candidate was scored by the auditor and marked rejected: none is promoted or served.
    with grpc.insecure_channel(stack.student.address) as channel:
        student = student_pb2_grpc.StudentServiceStub(channel)
        candidates = student.ListAdapters(student_pb2.ListAdaptersRequest(adapter_name="restem"), timeout=30).adapters
    assert len(candidates) == report.samples_scored
    assert all(c.status == common_pb2.ADAPTER_STATUS_REJECTED for c in candidates)
    assert len(reward_events(home)) == report.samples_scored
    # Scored, never to be served: their weights are gone (restem.keep_candidate_weights is off),
    # their manifests stay as the record of what was trained and how.
    student_registry = AdapterRegistry(stack.settings.registry_dir)
    for manifest in student_registry.list("restem"):
        assert manifest.weights_discarded_at and set(manifest.files) == {"adapter_config.json", "adapter_model.safetensors"}
        assert [p.name for p in student_registry.path_of(manifest).iterdir()] == ["manifest.json"]

    # The new policy is stored, promoted, and already what the teacher samples with.
    registry = AdapterRegistry(home / "teacher" / "registry")
    promoted = registry.promoted("teacher-policy")
    assert promoted.adapter_id == "teacher-policy@v1"
    assert promoted.hyperparameters["restem_round"] == report.round_id
    assert promoted.hyperparameters["examples"] == report.kept
    assert propose(stack) != before
    # The hot-load is in the auditor's chain, reported by the teacher under a kind of its own.
    from seal.audit import AuditLog

    deadline = time.monotonic() + 30
    with AuditLog(home / "auditor" / "audit.db") as audit:
        while not (records := audit.records(kind="policy_promote")) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert [r.adapter_id for r in records] == ["teacher-policy@v1"]
        assert records[0].payload["source"] == "teacher" and records[0].payload["principal"] == "teacher"
        assert report.round_id in records[0].payload["cause"]
        assert not audit.records(kind="promote", adapter_id="teacher-policy@v1")
        assert audit.verify().ok
    assert not (home / "teacher" / "audit_outbox.jsonl").read_bytes().strip()  # delivered

    # The rewards reached the teacher's durable buffer through the auditor's stream.
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        buffered = [json.loads(line) for line in (home / "teacher" / "restem_buffer.jsonl").read_text().splitlines()]
        if sum(e["adapter_id"].startswith("restem@") for e in buffered) >= report.samples_scored:
            break
        time.sleep(0.2)
    assert sum(e["adapter_id"].startswith("restem@") for e in buffered) == report.samples_scored


def test_an_interrupted_round_resumes_over_grpc_without_rescoring(stack: LocalStack) -> None:
    home = stack.settings.home
    scored_before = len(reward_events(home))
    request = train_request(k=2, seeds=2, keep_rule=teacher_pb2.KEEP_RULE_BEST_POSITIVE)
    seen = 0
    with grpc.insecure_channel(stack.teacher.address) as channel:
        call = teacher_pb2_grpc.TeacherServiceStub(channel).Train(request, timeout=900)
        with pytest.raises(grpc.RpcError) as cancelled:
            for response in call:
                if response.HasField("sample_scored"):
                    seen += 1
                    if seen == 3:
                        call.cancel()  # the operator presses Ctrl-C
        assert cancelled.value.code() == grpc.StatusCode.CANCELLED

    with grpc.insecure_channel(stack.teacher.address) as channel:
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        deadline = time.monotonic() + 120
        while True:  # the cancelled round's worker finishes the sample in flight first
            try:
                events = list(stub.Train(request, timeout=900))
                break
            except grpc.RpcError as exc:
                if exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
    started, report = events[0].round_started, events[-1].report
    assert started.resumed and started.round == 2 and started.samples_done >= 3
    assert report.samples_resumed == started.samples_done
    assert report.samples_scored + report.samples_failed == 8
    # Each (self-edit, seed) went through the student and the auditor exactly once.
    new_events = reward_events(home)[scored_before:]
    assert len(new_events) == report.samples_scored
    assert len({(e["context_id"], e["self_edit"], e["seed"]) for e in new_events}) == len(new_events)
    assert report.keep_rule == teacher_pb2.KEEP_RULE_BEST_POSITIVE
    assert report.kept == report.positive_kept


def test_bad_train_requests_get_clear_statuses(stack: LocalStack) -> None:
    with grpc.insecure_channel(stack.teacher.address) as channel:
        stub = teacher_pb2_grpc.TeacherServiceStub(channel)
        for request, fragment in (
            (teacher_pb2.TrainRequest(), "no training contexts"),
            (train_request(k=99), "between 1 and"),
            (train_request(prompt_style="poem"), "prompt_style"),
        ):
            with pytest.raises(grpc.RpcError) as error:
                list(stub.Train(request, timeout=60))
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert fragment in error.value.details()
        broken = train_request()
        broken.contexts[1].ClearField("questions")
        with pytest.raises(grpc.RpcError) as error:
            list(stub.Train(broken, timeout=60))
        assert "contexts[1]" in error.value.details() and "no questions" in error.value.details()


# --- the durable reward buffer --------------------------------------------------------------------

_SUBSCRIBER = """
import sys, time
from pathlib import Path
import grpc
from seal.teacher import RewardBuffer
from teacher_svc.servicer import RewardSubscriber
RewardSubscriber(grpc.insecure_channel(sys.argv[2]), RewardBuffer(Path(sys.argv[1]))).start()
print("subscribed", flush=True)
while True:
    time.sleep(1)
"""


def _start_subscriber(buffer_path: Path, address: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))}
    child = subprocess.Popen(
        [sys.executable, "-c", _SUBSCRIBER, str(buffer_path), address],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env, cwd=REPO_ROOT,
    )
    assert child.stdout is not None
    # Log lines may come first (a buffer left torn by the previous kill is repaired with a warning).
    seen = []
    for line in child.stdout:
        if line.strip() == "subscribed":
            return child
        seen.append(line)
    raise AssertionError(f"the subscriber exited before subscribing: {''.join(seen)}")


def _buffered_lines(path: Path) -> list[str]:
    return path.read_text().splitlines() if path.exists() else []


def test_a_killed_teacher_loses_and_doubles_no_reward(tmp_path: Path) -> None:
    from auditor_svc.servicer import AuditorServicer
    from seal.rpc import RpcMetrics, start_service
    from seal.teacher import RewardBuffer
    from seal.v1 import auditor_pb2, auditor_pb2_grpc

    settings = Settings(home=tmp_path / "home")
    servicer = AuditorServicer(settings, grpc.insecure_channel("127.0.0.1:9"), RpcMetrics("auditor"))

    def register(server: grpc.Server) -> list[str]:
        auditor_pb2_grpc.add_AuditorServiceServicer_to_server(servicer, server)
        return [auditor_pb2.DESCRIPTOR.services_by_name["AuditorService"].full_name]

    auditor = start_service("auditor", register, host="127.0.0.1", port=0, metrics=RpcMetrics("auditor"),
                            metrics_port=None, max_workers=4, max_concurrent_rpcs=8, auth=settings.auth)
    total = 80
    feeding_done = threading.Event()

    def feed() -> None:
        for index in range(total):
            servicer.reward_log.append(
                context_id=f"ctx{index % 5}", adapter_id=f"restem@v{index + 1}", prompt="p", self_edit=f"edit {index}",
                reward=0.0, baseline_accuracy=0.5, adapted_accuracy=0.5, outcomes=[], seed=index,
            )
            time.sleep(0.02)
        feeding_done.set()

    buffer_path = tmp_path / "teacher" / "restem_buffer.jsonl"
    feeder = threading.Thread(target=feed, daemon=True)
    teacher = _start_subscriber(buffer_path, auditor.address)
    try:
        feeder.start()
        deadline = time.monotonic() + 60
        while len(_buffered_lines(buffer_path)) < 20 and time.monotonic() < deadline:
            time.sleep(0.01)
        teacher.send_signal(signal.SIGKILL)  # mid-stream, no chance to clean up
        teacher.wait(timeout=10)
        killed_at = len(_buffered_lines(buffer_path))
        assert 20 <= killed_at < total
        with buffer_path.open("a") as handle:
            handle.write('{"event_id": "torn", "seq')  # what a kill in the middle of a write leaves

        teacher = _start_subscriber(buffer_path, auditor.address)
        assert feeding_done.wait(60)
        deadline = time.monotonic() + 60
        while len(_buffered_lines(buffer_path)) < total and time.monotonic() < deadline:
            time.sleep(0.05)
    finally:
        teacher.kill()
        teacher.wait(timeout=10)
        auditor.stop(grace=0.5)

    lines = _buffered_lines(buffer_path)
    events = [json.loads(line) for line in lines]  # every line whole: the torn fragment is gone
    assert len(events) == total
    assert [e["sequence"] for e in events] == list(range(1, total + 1))
    assert len({e["event_id"] for e in events}) == total
    reopened = RewardBuffer(buffer_path)
    assert len(reopened) == total and reopened.last_sequence == total


def test_a_torn_buffer_line_is_cut_so_the_next_event_lands_whole(tmp_path: Path) -> None:
    from seal.teacher import RewardBuffer

    path = tmp_path / "buffer.jsonl"
    buffer = RewardBuffer(path)
    for sequence in (1, 2):
        buffer.add({"event_id": f"e{sequence}", "sequence": sequence, "reward": 0.0})
    with path.open("a") as handle:
        handle.write('{"event_id": "e3", "sequence": 3, "rew')
    reopened = RewardBuffer(path)
    assert len(reopened) == 2 and reopened.last_sequence == 2  # e3 will be streamed again
    assert reopened.add({"event_id": "e3", "sequence": 3, "reward": 0.5})
    assert not reopened.add({"event_id": "e3", "sequence": 3, "reward": 0.5})
    final = RewardBuffer(path)
    assert [e["event_id"] for e in final.events()] == ["e1", "e2", "e3"]
