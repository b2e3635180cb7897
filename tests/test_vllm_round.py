"""A whole ReST^EM round over real gRPC with vLLM as the teacher's engine: the production path of
``seal train``, on vLLM's CPU build. Runs with ``make test`` in ``.venv-vllm``; skips elsewhere.

Its own module, so that the engine of tests/test_vllm_engine.py is shut down before this one
starts (one vLLM engine per process at a time keeps the CPU build's memory small)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

pytest.importorskip(
    "vllm", reason="vllm is not installed in this environment; `make test-vllm` runs these tests in .venv-vllm"
)
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import grpc  # noqa: E402

from seal.config import Settings  # noqa: E402
from seal.stack import local_stack  # noqa: E402
from seal.v1 import common_pb2, teacher_pb2, teacher_pb2_grpc  # noqa: E402
from tiny_model import build_tiny_model  # noqa: E402

PASSAGES = [
    ("Velmora", "Velmora is a harbour town on the island of Quessant. It was founded in 1742 by Ilse Marrow.",
     [("Who founded Velmora?", "Ilse Marrow")]),
    ("Grey Lantern", "The Grey Lantern is a lighthouse in Velmora. It is 41 meters tall and was lit in 1790.",
     [("How tall is the Grey Lantern?", "41 meters")]),
]


def context(index: int) -> common_pb2.Context:
    title, passage, _ = PASSAGES[index]
    return common_pb2.Context(title=title, passage=passage)


def test_a_round_trains_the_policy_and_vllm_samples_with_it(
    embedded_tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    model_dir = build_tiny_model(tmp_path_factory.mktemp("tiny-vllm-round"), embedded_tokenizer_dir, seed=0,
                                 hidden_size=128, num_attention_heads=2)
    settings = Settings(
        home=tmp_path_factory.mktemp("vllm-round-home"),
        model={"path": str(model_dir)},
        lora={"epochs": 2, "batch_size": 4, "max_seq_len": 64},
        teacher={"engine": "vllm", "vllm_dtype": "float32", "vllm_max_model_len": 512, "vllm_max_lora_rank": 8,
                 "max_new_tokens": 24, "default_k": 2},
        auditor={"answer_max_new_tokens": 8},
        # A policy update strong enough to memorise each context's kept self-edit (see
        # tests/test_vllm_engine.py for why not a larger learning rate).
        restem={"k": 2, "policy": {"rank": 8, "alpha": 16, "learning_rate": 1e-2, "epochs": 40, "batch_size": 2,
                                   "max_seq_len": 256}},
        # Random weights write random proper nouns, which this guardrail would refuse.
        guardrails={"unknown_entities": {"enabled": False}},
    )
    request = teacher_pb2.TrainRequest(
        contexts=[
            teacher_pb2.TrainingContext(
                context=context(index), questions=[common_pb2.Question(question=q, answer=a) for q, a in questions]
            )
            for index, (_, _, questions) in enumerate(PASSAGES)
        ],
        k=2,
        seed=3,
    )
    with local_stack(settings) as stack, grpc.insecure_channel(stack.teacher.address) as channel:
        teacher = teacher_pb2_grpc.TeacherServiceStub(channel)

        def propose(index: int) -> list[str]:
            reply = teacher.ProposeSelfEdits(
                teacher_pb2.ProposeSelfEditsRequest(context=context(index), k=2, seed=11), timeout=300
            )
            return [edit.text.strip() for edit in reply.self_edits]

        before = [propose(index) for index in range(len(PASSAGES))]
        events = list(teacher.Train(request, timeout=1200))
        report = events[-1].report
        assert (report.policy_adapter_id, report.hot_loaded, report.kept) == ("teacher-policy@v1", True, 2)
        assert report.policy_sft_final_loss < report.policy_sft_first_loss

        sampled = {e.context_sampled.context_index: e.context_sampled for e in events if e.HasField("context_sampled")}
        kept = {
            e.context_done.context_index: sampled[e.context_done.context_index].self_edits[e.context_done.kept_edit_index].text.strip()
            for e in events
            if e.HasField("context_done") and e.context_done.kept
        }
        # vLLM now samples with the new policy: for each training context the teacher writes the
        # self-edit that the round kept, which the base policy did not. Whole, or cut at
        # max_new_tokens: the kept text was sampled as 24 tokens, but decoded and encoded again
        # for the policy's SFT it can take a few more (random weights write odd words), so the
        # policy's answer may stop a few words short of it.
        for index in range(len(PASSAGES)):
            after = propose(index)
            assert any(len(a) >= 20 and kept[index].startswith(a) for a in after), (index, kept[index], after)
            assert after != before[index]

        again = list(teacher.Train(request, timeout=1200))
        assert again[0].round_started.policy_adapter_id == "teacher-policy@v1"
