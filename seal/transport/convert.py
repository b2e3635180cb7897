"""Every conversion between the ``seal.v1`` protos and the core's types, in one place.

Servicers and gRPC ports import from here; each mapping table is written once and its inverse
derived from it, so the two directions cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import datetime
from typing import Any

from google.protobuf import struct_pb2, timestamp_pb2

from seal import adapt
from seal.adapt import guardrail_from_gate, guardrail_to_gate
from seal.auditor import QuestionOutcome
from seal.domains.arc_grids import Grid, as_grid
from seal.domains.fewshot import ArcPair, ArcTask
from seal.domains.knowledge import Question
from seal.gates import GateResult
from seal.guardrails import GuardrailResult
from seal.limits import echo
from seal.registry import Manifest
from seal.v1 import auditor_pb2, common_pb2, teacher_pb2

# --- small values -----------------------------------------------------------------------------

STATUS_TO_PROTO = {
    "candidate": common_pb2.ADAPTER_STATUS_CANDIDATE,
    "promoted": common_pb2.ADAPTER_STATUS_PROMOTED,
    "superseded": common_pb2.ADAPTER_STATUS_SUPERSEDED,
    "rejected": common_pb2.ADAPTER_STATUS_REJECTED,
    "rolled_back": common_pb2.ADAPTER_STATUS_ROLLED_BACK,
}
STATUS_FROM_PROTO = {value: key for key, value in STATUS_TO_PROTO.items()}

KEEP_RULE_TO_PROTO = {
    "best_of_k": teacher_pb2.KEEP_RULE_BEST_OF_K,
    "best_positive": teacher_pb2.KEEP_RULE_BEST_POSITIVE,
}
KEEP_RULE_FROM_PROTO = {value: key for key, value in KEEP_RULE_TO_PROTO.items()}

# Core override key (a LoRA config field, or include_passage) → UpdateOverrides field.
OVERRIDE_FIELDS = {
    "learning_rate": "learning_rate",
    "epochs": "epochs",
    "rank": "lora_rank",
    "alpha": "lora_alpha",
    "batch_size": "batch_size",
    "include_passage": "include_passage",
    "update_rule": "update_rule",
}


def timestamp(iso: str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    stamp.FromDatetime(datetime.fromisoformat(iso))
    return stamp


def struct(values: Mapping[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update({key: value for key, value in values.items() if value is not None})
    return message


def overrides_from_proto(overrides: common_pb2.UpdateOverrides) -> dict[str, Any]:
    """Only the fields the caller set: an unset field means "the configured default"."""
    return {ours: getattr(overrides, theirs) for ours, theirs in OVERRIDE_FIELDS.items() if overrides.HasField(theirs)}


def overrides_to_proto(overrides: Mapping[str, Any]) -> common_pb2.UpdateOverrides:
    unknown = sorted(set(overrides) - set(OVERRIDE_FIELDS))
    if unknown:
        raise ValueError(f"unknown update overrides {unknown}; known: {', '.join(OVERRIDE_FIELDS)}")
    message = common_pb2.UpdateOverrides()
    for ours, value in overrides.items():
        setattr(message, OVERRIDE_FIELDS[ours], value)
    return message


# --- manifests, outcomes, gates ---------------------------------------------------------------


def manifest_to_proto(manifest: Manifest, path: str = "") -> common_pb2.AdapterManifest:
    return common_pb2.AdapterManifest(
        adapter_id=manifest.adapter_id,
        adapter_name=manifest.adapter_name,
        version=manifest.version,
        status=STATUS_TO_PROTO[manifest.status],
        base_model=manifest.base_model,
        base_model_fingerprint=manifest.base_model_fingerprint,
        context_id=manifest.context_id,
        self_edit_sha256=manifest.self_edit_sha256,
        files=dict(manifest.files),
        seed=manifest.seed,
        hyperparameters=struct(dict(manifest.hyperparameters)),
        metrics=struct(dict(manifest.metrics)),
        created_at=timestamp(manifest.created_at),
        history=[
            common_pb2.StatusChange(status=STATUS_TO_PROTO[change.status], at=timestamp(change.at), reason=change.reason)
            for change in manifest.history
        ],
        path=path,
    )


def outcome_to_proto(outcome: QuestionOutcome) -> common_pb2.QuestionOutcome:
    return common_pb2.QuestionOutcome(
        question=outcome.question,
        gold_answer=outcome.gold_answer,
        prediction=outcome.prediction,
        correct=outcome.correct,
        exact_match=outcome.exact_match,
        f1=outcome.f1,
        contains_answer=outcome.contains_answer,
    )


def outcome_from_proto(message: common_pb2.QuestionOutcome) -> QuestionOutcome:
    return QuestionOutcome(
        message.question, message.gold_answer, message.prediction, message.correct,
        message.exact_match, message.f1, message.contains_answer,
    )


def question_to_proto(question: Question) -> common_pb2.Question:
    return common_pb2.Question(question=question.question, answer=question.answer)


def questions_from_proto(messages: Any) -> tuple[Question, ...]:
    return tuple(Question(q.question, q.answer) for q in messages)


def gate_to_proto(gate: GateResult) -> common_pb2.GateResult:
    message = common_pb2.GateResult(gate=gate.gate, passed=gate.passed, reason=gate.reason)
    if gate.value is not None:
        message.value = gate.value
    if gate.threshold is not None:
        message.threshold = gate.threshold
    return message


def gate_from_proto(message: common_pb2.GateResult) -> GateResult:
    return GateResult(
        gate=message.gate,
        passed=message.passed,
        reason=message.reason,
        value=message.value if message.HasField("value") else None,
        threshold=message.threshold if message.HasField("threshold") else None,
    )


def guardrail_to_proto(result: GuardrailResult) -> common_pb2.GateResult:
    return gate_to_proto(guardrail_to_gate(result))


def guardrail_from_proto(message: common_pb2.GateResult) -> GuardrailResult:
    return guardrail_from_gate(gate_from_proto(message))


# --- the Adapt stream ---------------------------------------------------------------------------


def task_from_proto(
    context: common_pb2.Context, questions: Any, fewshot: common_pb2.FewShotTask | None = None
) -> adapt.Task:
    """The request's task: few-shot when ``fewshot`` is given (a set message field), else knowledge."""
    if fewshot is not None:
        return adapt.Task.from_arc(fewshot_from_proto(fewshot))
    return adapt.Task(context.title, context.passage, questions_from_proto(questions))


def grid_to_proto(grid: Grid) -> common_pb2.Grid:
    return common_pb2.Grid(rows=[common_pb2.GridRow(cells=list(row)) for row in grid])


def grid_from_proto(message: common_pb2.Grid) -> Grid:
    """The grid, validated (``seal.domains.arc_grids.as_grid``: ValueError says what is wrong)."""
    return as_grid([list(row.cells) for row in message.rows])


def fewshot_to_proto(task: ArcTask) -> common_pb2.FewShotTask:
    return common_pb2.FewShotTask(
        task_id=task.task_id,
        train=[common_pb2.GridPair(input=grid_to_proto(p.input), output=grid_to_proto(p.output))
               for p in task.demonstrations],
        test_inputs=[grid_to_proto(g) for g in task.test_inputs],
        test_outputs=[grid_to_proto(g) for g in task.test_outputs],
    )


def fewshot_from_proto(message: common_pb2.FewShotTask) -> ArcTask:
    if not message.task_id.strip():
        raise ValueError("fewshot.task_id is empty: name the task")
    if not message.train or not message.test_inputs:
        raise ValueError("a few-shot task needs at least one train pair and one test input")
    try:
        return ArcTask(
            message.task_id,
            tuple(ArcPair(grid_from_proto(p.input), grid_from_proto(p.output)) for p in message.train),
            tuple(grid_from_proto(g) for g in message.test_inputs),
            tuple(grid_from_proto(g) for g in message.test_outputs),
        )
    except ValueError as exc:
        raise ValueError(f"few-shot task {echo(message.task_id)}: {exc}") from exc


def fewshot_field(message: Any) -> common_pb2.FewShotTask | None:
    """A request's ``fewshot`` task when set, else None (the request is in the knowledge domain)."""
    return message.fewshot if message.HasField("fewshot") else None


def proposal_to_proto(proposal: adapt.Proposal) -> teacher_pb2.SelfEdit:
    return teacher_pb2.SelfEdit(
        index=proposal.index, prompt=proposal.prompt, text=proposal.text, completion_tokens=proposal.completion_tokens
    )


def _adapter_manifest_proto(adapter: adapt.TrainedAdapter) -> common_pb2.AdapterManifest:
    manifest = adapter.manifest
    if isinstance(manifest, common_pb2.AdapterManifest):
        return manifest
    if isinstance(manifest, Manifest):
        return manifest_to_proto(manifest)
    return common_pb2.AdapterManifest(adapter_id=adapter.adapter_id)


def candidate_summary(candidate: adapt.CandidateOutcome) -> teacher_pb2.CandidateSummary:
    summary = teacher_pb2.CandidateSummary(
        index=candidate.proposal.index,
        self_edit=candidate.proposal.text,
        failure=candidate.failure,
        train_seconds=candidate.train_seconds,
        gates=[gate_to_proto(g) for g in candidate.gates],
    )
    if candidate.adapter is not None:
        summary.adapter_id = candidate.adapter.adapter_id
        summary.training_sequences = candidate.adapter.training_sequences
    if candidate.score is not None:
        summary.accuracy = candidate.score.accuracy
        summary.reward = candidate.score.reward
        summary.passed_gates = candidate.score.passed_gates
        summary.outcomes.extend(outcome_to_proto(o) for o in candidate.score.outcomes)
    return summary


def adapt_result_to_proto(finished: adapt.AdaptFinished) -> teacher_pb2.AdaptResult:
    baseline = finished.baseline
    shown = finished.shown
    result = teacher_pb2.AdaptResult(
        request_id=finished.request_id,
        context_id=finished.task.context_id,
        promoted=finished.promoted is not None,
        baseline_accuracy=baseline.accuracy,
        adapted_accuracy=shown.score.accuracy if shown and shown.score else baseline.accuracy,
        candidates=[candidate_summary(c) for c in finished.candidates],
        baseline_outcomes=[outcome_to_proto(o) for o in baseline.outcomes],
        decision_reason=finished.reason,
        phase_seconds=finished.phase_seconds,
        questions_written=finished.written is not None,
    )
    if shown is not None and shown.adapter is not None and shown.score is not None:
        result.adapter_id = shown.adapter.adapter_id
        result.version = int(shown.adapter.adapter_id.rsplit("@v", 1)[1])
        result.adapted_outcomes.extend(outcome_to_proto(o) for o in shown.score.outcomes)
    else:
        result.adapted_outcomes.extend(outcome_to_proto(o) for o in baseline.outcomes)
    return result


def adapt_event_to_proto(event: adapt.Event, request_id: str) -> teacher_pb2.AdaptResponse:
    response = teacher_pb2.AdaptResponse(request_id=request_id)
    if isinstance(event, adapt.SelfEditsProposed):
        response.self_edits_proposed.CopyFrom(teacher_pb2.SelfEditsProposed(
            self_edits=[proposal_to_proto(p) for p in event.proposals], seconds=event.seconds))
    elif isinstance(event, adapt.QuestionsWritten):
        written = event.questions
        response.questions_written.CopyFrom(teacher_pb2.QuestionsWritten(
            held_out=[question_to_proto(q) for q in written.held_out],
            training_prompts=[q.question for q in written.training],
            written=written.written, dropped=written.dropped, seconds=event.seconds))
    elif isinstance(event, adapt.BaselineScored):
        response.baseline_scored.CopyFrom(teacher_pb2.BaselineScored(
            accuracy=event.baseline.accuracy, outcomes=[outcome_to_proto(o) for o in event.baseline.outcomes]))
    elif isinstance(event, adapt.CandidateProgress):
        response.candidate_progress.CopyFrom(teacher_pb2.CandidateProgress(
            index=event.index,
            training=common_pb2.TrainingProgress(step=event.step, total_steps=event.total_steps, loss=event.loss)))
    elif isinstance(event, adapt.CandidateTrained):
        response.candidate_trained.CopyFrom(teacher_pb2.CandidateTrained(
            index=event.index, adapter=_adapter_manifest_proto(event.adapter), seconds=event.adapter.seconds))
    elif isinstance(event, adapt.CandidateFailed):
        response.candidate_failed.CopyFrom(teacher_pb2.CandidateFailed(
            index=event.index, reason=event.reason, gates=[gate_to_proto(g) for g in event.gates]))
    elif isinstance(event, adapt.CandidateScored):
        response.candidate_scored.CopyFrom(teacher_pb2.CandidateScored(
            index=event.index, adapter_id=event.adapter_id, accuracy=event.score.accuracy, reward=event.score.reward,
            passed_gates=event.score.passed_gates, gates=[gate_to_proto(g) for g in event.score.gates],
            seconds=event.seconds))
    elif isinstance(event, adapt.PromotionDecided):
        response.promotion_decided.CopyFrom(teacher_pb2.PromotionDecided(
            promoted=event.promoted, adapter_id=event.adapter_id, reason=event.reason))
    elif isinstance(event, adapt.AdaptFinished):
        response.result.CopyFrom(adapt_result_to_proto(event))
    else:  # pragma: no cover - a new event type must be mapped here
        raise TypeError(f"no proto for pipeline event {type(event).__name__}")
    return response


def reward_event_to_dict(event: auditor_pb2.RewardEvent) -> dict[str, object]:
    """A reward event as the teacher's durable buffer stores it (``seal.teacher.RewardBuffer``).
    Written out rather than ``MessageToDict``: that renders the uint64 seed as a string and
    camel-cases the keys, and the buffer's records are read back by the ReST^EM driver."""
    return {
        "sequence": event.sequence,
        "event_id": event.event_id,
        "context_id": event.context_id,
        "adapter_id": event.adapter_id,
        "prompt": event.prompt,
        "self_edit": event.self_edit,
        "reward": event.reward,
        "baseline_accuracy": event.baseline_accuracy,
        "adapted_accuracy": event.adapted_accuracy,
        "seed": event.seed,
        "at": event.at.ToJsonString(),
        "outcomes": [
            {"question": o.question, "gold_answer": o.gold_answer, "prediction": o.prediction, "correct": o.correct}
            for o in event.outcomes
        ],
    }
