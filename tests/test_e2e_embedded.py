"""End to end with the embedded SmolLM2 on invented facts, which the base model cannot know:
after Adapt, the promoted adapter answers more questions closed-book than the base model."""

from __future__ import annotations

from pathlib import Path

import grpc
import pytest

from seal.config import Settings
from seal.stack import local_stack
from seal.v1 import common_pb2, student_pb2, student_pb2_grpc, teacher_pb2, teacher_pb2_grpc

PASSAGE = (
    "Quillbrook is a small mountain village in the country of Dravenia. The village was founded in "
    "1873 by a clockmaker named Oskar Thelwyn. Quillbrook is famous for its annual Lantern Frost "
    "festival, held every February. The village's only bridge, the Amberline Bridge, is painted "
    "bright orange. Most people in Quillbrook work at the Vesk Salt Mine. The mayor of Quillbrook "
    "is Marta Ilvane."
)
QUESTIONS = [
    ("Who founded Quillbrook?", "Oskar Thelwyn"),
    ("In which country is Quillbrook?", "Dravenia"),
    ("What festival is Quillbrook famous for?", "Lantern Frost"),
    ("What colour is the Amberline Bridge?", "orange"),
    ("Where do most people in Quillbrook work?", "Vesk Salt Mine"),
    ("Who is the mayor of Quillbrook?", "Marta Ilvane"),
]


@pytest.mark.slow
def test_adapt_teaches_the_embedded_model_invented_facts(embedded_model_dir: Path, tmp_path: Path) -> None:
    settings = Settings(home=tmp_path, model={"path": str(embedded_model_dir)}, teacher={"default_k": 2})
    request = teacher_pb2.AdaptRequest(
        context=common_pb2.Context(title="Quillbrook", passage=PASSAGE),
        questions=[common_pb2.Question(question=q, answer=a) for q, a in QUESTIONS],
        k=2,
        seed=0,
    )
    with local_stack(settings) as stack:
        with grpc.insecure_channel(stack.teacher.address) as channel:
            events = list(teacher_pb2_grpc.TeacherServiceStub(channel).Adapt(request, timeout=1800))
        result = events[-1].result
        print(f"baseline {result.baseline_accuracy:.2f} adapted {result.adapted_accuracy:.2f} phases {dict(result.phase_seconds)}")
        for outcome in result.adapted_outcomes:
            print(f"  {outcome.question} -> {outcome.prediction!r} ({'ok' if outcome.correct else 'wrong'})")
        assert result.adapted_accuracy > result.baseline_accuracy
        best = next(c for c in result.candidates if c.adapter_id == result.adapter_id)
        # The τ gain is real; whether it may be kept is the retention gate's call (default LoRA
        # on a 135M model measurably forgets general knowledge), and the reason must be given.
        tau_gate = next(g for g in best.gates if g.gate == "tau_gain")
        assert tau_gate.passed
        if result.promoted:
            assert all(g.passed for g in best.gates)
        else:
            failed = [g for g in best.gates if not g.passed]
            assert failed and all(g.reason for g in failed), best.gates
            assert any(g.gate in result.decision_reason or g.reason in result.decision_reason for g in failed)
        with grpc.insecure_channel(stack.student.address) as channel:
            reply = student_pb2_grpc.StudentServiceStub(channel).Generate(
                student_pb2.GenerateRequest(
                    prompts=["Answer with a short phrase.\nQuestion: Who founded Quillbrook?"],
                    adapter=student_pb2.AdapterSelector(adapter_id=result.adapter_id),
                    max_new_tokens=16,
                ),
                timeout=300,
            )
        assert reply.served_adapter_id == result.adapter_id
