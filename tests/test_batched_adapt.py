"""Adapt with its candidates trained in one student call (ApplySelfEdits, student.batch_candidates)
against one call per candidate, over real gRPC on loopback with the tiny random model."""

from __future__ import annotations

import re
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import pytest
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from seal import adapt
from seal.config import Settings, TracingSettings
from seal.stack import LocalStack, local_stack
from seal.tracing import build_tracing
from seal.v1 import common_pb2, student_pb2, student_pb2_grpc, teacher_pb2, teacher_pb2_grpc
from test_adapt import TASK, ScriptedAuditor, ScriptedStudent

PASSAGE = (
    "Velmora is a harbour town on the island of Quessant. It was founded in 1742 by the "
    "cartographer Ilse Marrow. The town's lighthouse, the Grey Lantern, is 41 meters tall."
)
QUESTIONS = [("Who founded Velmora?", "Ilse Marrow"), ("How tall is the Grey Lantern?", "41 meters")]
GOOD_EDITS = (
    "Velmora was founded in 1742 by Ilse Marrow.\nThe Grey Lantern is the lighthouse of Velmora.",
    "The Grey Lantern is 41 meters tall.\nVelmora lies on the island of Quessant.",
)
WEIGHTS = "adapter_model.safetensors"
# Within float rounding, as tests/test_multi_lora.py explains: the two paths group rows of other
# candidates into their forward passes, so sums can run in another order.
ATOL, RTOL = 2e-5, 1e-4


def assert_same_weights(stacks: dict[bool, LocalStack], batched, sequential, label: str) -> None:
    """``batched`` (a manifest of stacks[True]) and ``sequential`` (of stacks[False]) hold the same
    LoRA tensors, read from each student's registry."""
    import torch
    from safetensors.torch import load_file

    def tensors(stack: LocalStack, manifest) -> dict:
        folder = stack.settings.home / "registry" / manifest.adapter_name / f"v{manifest.version:06d}"
        return load_file(str(folder / WEIGHTS))

    left, right = tensors(stacks[True], batched), tensors(stacks[False], sequential)
    assert left.keys() == right.keys() and left, label
    for name, tensor in right.items():
        torch.testing.assert_close(left[name], tensor, atol=ATOL, rtol=RTOL, msg=f"{label}: {name}")


def settings_for(home: Path, model_dir: Path, *, batch: bool) -> Settings:
    return Settings(
        home=home,
        model={"path": str(model_dir)},
        lora={"epochs": 2, "batch_size": 4, "max_seq_len": 64},
        teacher={"max_new_tokens": 40, "default_k": 3, "max_k": 4},
        auditor={"answer_max_new_tokens": 8},
        gates={"min_gain": -1.0},
        guardrails={"unknown_entities": {"enabled": False}},
        student={"batch_candidates": batch},
    )


@pytest.fixture(scope="module")
def stacks(one_torch_thread, tiny_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[bool, LocalStack]]:
    """The same model and settings twice, batched and one candidate at a time."""
    with local_stack(settings_for(tmp_path_factory.mktemp("batched"), tiny_model_dir, batch=True)) as batched, \
            local_stack(settings_for(tmp_path_factory.mktemp("sequential"), tiny_model_dir, batch=False)) as sequential:
        yield {True: batched, False: sequential}


def adapt_over_grpc(stack: LocalStack, adapter_name: str) -> list[teacher_pb2.AdaptResponse]:
    request = teacher_pb2.AdaptRequest(
        context=common_pb2.Context(title="Velmora", passage=PASSAGE),
        questions=[common_pb2.Question(question=q, answer=a) for q, a in QUESTIONS],
        k=3, seed=7, adapter_name=adapter_name,
    )
    with grpc.insecure_channel(stack.teacher.address) as channel:
        return list(teacher_pb2_grpc.TeacherServiceStub(channel).Adapt(request, timeout=600))


def student_stub(stack: LocalStack) -> tuple[grpc.Channel, student_pb2_grpc.StudentServiceStub]:
    channel = grpc.insecure_channel(stack.student.address)
    return channel, student_pb2_grpc.StudentServiceStub(channel)


def candidate(self_edit: str, seed: int, **fields: object) -> student_pb2.ApplySelfEditRequest:
    fields.setdefault("context", common_pb2.Context(title="Velmora", passage=PASSAGE))
    return student_pb2.ApplySelfEditRequest(self_edit=self_edit, seed=seed, **fields)


def test_batched_adapt_gives_the_candidates_and_decision_of_the_sequential_one(stacks) -> None:
    runs = {batch: adapt_over_grpc(stack, "velmora") for batch, stack in stacks.items()}
    results = {batch: events[-1].result for batch, events in runs.items()}
    trained = {
        batch: {e.candidate_trained.index: e.candidate_trained.adapter for e in events
                if e.WhichOneof("event") == "candidate_trained"}
        for batch, events in runs.items()
    }
    # Same proposals (same seed), so the same candidates: same weights, rewards and decision.
    proposed = {
        batch: [[s.text for s in e.self_edits_proposed.self_edits] for e in events
                if e.WhichOneof("event") == "self_edits_proposed"]
        for batch, events in runs.items()
    }
    assert proposed[True] == proposed[False] and len(proposed[True][0]) == 3
    assert len(trained[True]) >= 2, results[True]  # the batched path really trained several together
    assert trained[True].keys() == trained[False].keys()
    for index, manifest in trained[True].items():
        other = trained[False][index]
        assert_same_weights(stacks, manifest, other, f"candidate {index}")
        assert manifest.seed == other.seed
    batched, sequential = results[True], results[False]
    assert [(c.index, c.failure) for c in batched.candidates] == [(c.index, c.failure) for c in sequential.candidates]
    assert [c.reward for c in batched.candidates] == pytest.approx([c.reward for c in sequential.candidates])
    assert [c.accuracy for c in batched.candidates] == pytest.approx([c.accuracy for c in sequential.candidates])
    assert batched.promoted == sequential.promoted
    assert batched.version == sequential.version
    assert batched.baseline_accuracy == pytest.approx(sequential.baseline_accuracy)
    # Batched: one ApplySelfEdits for the step; one at a time: ApplySelfEdit per candidate.
    metrics = {
        batch: urllib.request.urlopen(f"http://127.0.0.1:{stack.student.metrics_port}/metrics", timeout=5).read().decode()
        for batch, stack in stacks.items()
    }
    calls = 'seal_student_rpc_requests_total{code="OK",method="%s"} %s'
    assert calls % ("ApplySelfEdits", "1.0") in metrics[True] and calls % ("ApplySelfEdit", "0.0") in metrics[True]
    assert calls % ("ApplySelfEdits", "0.0") in metrics[False]
    assert calls % ("ApplySelfEdit", f"{len(trained[False])}.0") in metrics[False]
    # Scored alike: one ScoreMany, its answers in one GenerateMixed per question set (τ; the probe);
    # one at a time: a Score and Generates per candidate.
    scores = {
        batch: urllib.request.urlopen(f"http://127.0.0.1:{stack.auditor.metrics_port}/metrics", timeout=5).read().decode()
        for batch, stack in stacks.items()
    }
    audits = 'seal_auditor_rpc_requests_total{code="OK",method="%s"} %s'
    assert audits % ("ScoreMany", "1.0") in scores[True] and audits % ("Score", "1.0") in scores[True]  # + baseline
    assert audits % ("ScoreMany", "0.0") in scores[False]
    assert audits % ("Score", f"{len(trained[False]) + 1}.0") in scores[False]
    assert calls % ("GenerateMixed", "0.0") in metrics[False]
    mixed = re.search(r'seal_student_rpc_requests_total\{code="OK",method="GenerateMixed"\} (\d+)\.0', metrics[True])
    assert mixed is not None and 1 <= int(mixed.group(1)) <= 2, mixed
    # The caller sees the same kinds of events in the same shape.
    kinds = {batch: {e.WhichOneof("event") for e in events} for batch, events in runs.items()}
    assert kinds[True] == kinds[False]
    assert {"candidate_progress", "candidate_trained", "candidate_scored", "result"} <= kinds[True]


def test_one_bad_candidate_fails_alone_and_the_others_train(stacks) -> None:
    channel, stub = student_stub(stacks[True])
    with channel:
        request = student_pb2.ApplySelfEditsRequest(
            adapter_name="apply-many",
            candidates=[candidate(GOOD_EDITS[0], 11), candidate("x", 12), candidate(GOOD_EDITS[1], 13)],
        )
        events = list(stub.ApplySelfEdits(request, timeout=300))
    progress = {e.progress.index for e in events if e.WhichOneof("event") == "progress"}
    trained = {e.trained.index: e.trained.candidate for e in events if e.WhichOneof("event") == "trained"}
    failed = {e.failed.index: e.failed for e in events if e.WhichOneof("event") == "failed"}
    assert progress == {0, 2}
    assert trained.keys() == {0, 2} and failed.keys() == {1}
    assert failed[1].code == "invalid_argument" and "no usable lines" in failed[1].message
    assert {m.adapter_name for m in trained.values()} == {"apply-many"}
    assert [trained[i].seed for i in (0, 2)] == [11, 13]
    assert all(m.status == common_pb2.ADAPTER_STATUS_CANDIDATE for m in trained.values())

    # The same two self-edits one call each on the sequential student: the same adapters.
    channel, stub = student_stub(stacks[False])
    with channel:
        for index, (edit, seed) in {0: (GOOD_EDITS[0], 11), 2: (GOOD_EDITS[1], 13)}.items():
            updates = list(stub.ApplySelfEdit(candidate(edit, seed, adapter_name="apply-one"), timeout=300))
            alone = [u.candidate for u in updates if u.HasField("candidate")][0]
            assert_same_weights(stacks, trained[index], alone, f"candidate {index}")


@pytest.mark.parametrize(
    ("candidates", "adapter_name", "expected"),
    [
        ([], "", "candidates is empty"),
        ([candidate(GOOD_EDITS[0], seed) for seed in range(5)], "", "teacher.max_k"),
        ([candidate(GOOD_EDITS[0], 1), candidate("y" * 100_000, 2)], "", "candidates[1]: self_edit"),
        ([candidate(GOOD_EDITS[0], 1, adapter_name="other")], "refused", "candidates[0]: adapter_name"),
        ([candidate(GOOD_EDITS[0], 1), candidate(GOOD_EDITS[1], 2, context=common_pb2.Context(title="t"))],
         "", "candidates[1]: context.passage is empty"),
        ([candidate(GOOD_EDITS[0], 1)], "Not A Name!", "adapter_name"),
    ],
)
def test_a_bad_request_is_refused_whole_and_creates_nothing(stacks, candidates, adapter_name, expected) -> None:
    channel, stub = student_stub(stacks[True])
    with channel:
        before = len(stub.ListAdapters(student_pb2.ListAdaptersRequest(), timeout=30).adapters)
        request = student_pb2.ApplySelfEditsRequest(adapter_name=adapter_name, candidates=candidates)
        with pytest.raises(grpc.RpcError) as refused:
            list(stub.ApplySelfEdits(request, timeout=60))
        assert refused.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert expected in refused.value.details()
        assert len(stub.ListAdapters(student_pb2.ListAdaptersRequest(), timeout=30).adapters) == before


# --- the step itself, with scripted ports ---------------------------------------------------------


@dataclass
class BatchingStudent(ScriptedStudent):
    """The scripted student with ``train_many``: each batch recorded, its candidates trained in order."""

    batches: list[list[int]] = field(default_factory=list)

    def train_many(self, task, proposals, *, adapter_name, seeds, overrides, training_prompts=()) -> Iterator:
        self.batches.append([p.index for p in proposals])
        for position, (proposal, seed) in enumerate(zip(proposals, seeds, strict=True)):
            try:
                for update in self.train(task, proposal, adapter_name=adapter_name, seed=seed, overrides=overrides,
                                         training_prompts=training_prompts):
                    yield position, update
            except adapt.CandidateRefused as refused:
                yield position, refused


@dataclass
class BatchingAuditor(ScriptedAuditor):
    """The scripted auditor with ``score_many``: each batch recorded, its candidates scored in order."""

    batches: list[list[int]] = field(default_factory=list)

    def score_many(self, task, jobs, *, request_id, measure_retention) -> list:
        self.batches.append([job.proposal.index for job in jobs])
        return adapt.score_each(self, task, jobs, request_id=request_id, measure_retention=measure_retention)


def scripted_adapt(
    batch: bool, script: dict[int, str], tracer=None
) -> tuple[list[adapt.Event], BatchingStudent, BatchingAuditor]:
    student = BatchingStudent(script)
    auditor = BatchingAuditor({"default@v1": 0.5, "default@v2": 0.25}, guardrail_failures={2})
    events = list(adapt.run_adapt(
        TASK, propose=lambda task, k, seed: [adapt.Proposal(i, f"p{i}", f"edit {i}") for i in range(k)],
        student=student, auditor=auditor, k=len(script), seed=7, adapter_name="default", request_id="r1",
        tracer=tracer, batch_candidates=batch,
    ))
    return events, student, auditor


def test_the_batched_step_ends_as_the_one_at_a_time_step() -> None:
    script = {0: "refuse", 1: "ok", 2: "ok", 3: "ok"}  # #2 fails its guardrails, never trained
    (batched, many, many_auditor), (sequential, one, one_auditor) = scripted_adapt(True, script), scripted_adapt(False, script)
    assert many.batches == [[0, 1, 3]] and one.batches == []
    # The two trained candidates are scored in one score_many call; one at a time, by score.
    assert many_auditor.batches == [[1, 3]] and one_auditor.batches == []
    assert many_auditor.scored == one_auditor.scored == ["default@v1", "default@v2"]
    b, s = batched[-1], sequential[-1]
    assert isinstance(b, adapt.AdaptFinished) and isinstance(s, adapt.AdaptFinished)
    summary = [(c.proposal.index, c.seed, c.failure, c.adapter and c.adapter.adapter_id, c.score) for c in b.candidates]
    assert summary == [
        (c.proposal.index, c.seed, c.failure, c.adapter and c.adapter.adapter_id, c.score) for c in s.candidates
    ]
    assert b.promoted is not None and b.promoted.adapter.adapter_id == s.promoted.adapter.adapter_id == "default@v1"
    assert b.reason == s.reason and many.promoted == one.promoted and many.rejected == one.rejected
    # The same events, in another order (checks first, then training, then scoring).
    def kinds(events):
        return sorted((type(e).__name__, getattr(e, "index", -1)) for e in events)
    assert kinds(batched) == kinds(sequential)
    assert [type(e).__name__ for e in batched if getattr(e, "index", None) == 1] == [
        "CandidateProgress", "CandidateProgress", "CandidateTrained", "CandidateScored",
    ]


def test_one_candidate_or_batching_off_keeps_one_call_per_candidate() -> None:
    _, alone, _ = scripted_adapt(True, {0: "ok"})
    assert alone.batches == [] and alone.trained == 1


def test_a_batch_stream_without_an_adapter_ends_the_step_loudly() -> None:
    with pytest.raises(RuntimeError, match="self-edit #1 ended without an adapter"):
        scripted_adapt(True, {0: "ok", 1: "empty"})


def test_the_batched_step_traces_a_check_and_a_score_per_candidate_and_one_training() -> None:
    exporter = InMemorySpanExporter()
    tracer = build_tracing("teacher", TracingSettings(), exporter=exporter).tracer("seal.adapt")
    scripted_adapt(True, {0: "refuse", 1: "ok", 2: "ok", 3: "ok"}, tracer)
    spans = list(exporter.get_finished_spans())
    [root] = [s for s in spans if s.name == "seal.adapt"]
    children = [s for s in spans if s.parent is not None and s.parent.span_id == root.context.span_id]
    names = [s.name for s in sorted(children, key=lambda s: s.end_time)]
    assert names == ["seal.propose", "seal.baseline", *["seal.check"] * 4, "seal.train", "seal.score", "seal.decide"]
    [train] = [s for s in children if s.name == "seal.train"]
    assert train.attributes["seal.candidates"] == 3 and train.attributes["seal.candidates.trained"] == 2
    [score] = [s for s in children if s.name == "seal.score"]
    assert score.attributes["seal.candidates"] == 2 and score.attributes["seal.candidates.scored"] == 2
