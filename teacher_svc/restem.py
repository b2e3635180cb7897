"""The teacher's ``Train`` RPC: a ReST^EM round (``seal.rl.restem``) wired to the other services.

Scoring goes through exactly the calls Adapt makes — the auditor's guardrails, the student's
ApplySelfEdit, the auditor's Score — so a policy is trained on the reward the production loop
would give. Nothing is promoted: each candidate is marked rejected right after it is scored, in
its own lineage (``restem.candidate_adapter_name``), away from the served one.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any

import grpc

from seal.config import Settings
from seal.domains.knowledge import Question
from seal.rl import restem
from seal.rl.policy import TeacherPolicy
from seal.teacher import (
    RewardBuffer,
    SelfEditProposer,
    validate_context,
    validate_k,
    validate_prompt_style,
)
from seal.v1 import (
    auditor_pb2,
    auditor_pb2_grpc,
    common_pb2,
    student_pb2,
    student_pb2_grpc,
    teacher_pb2,
)

log = logging.getLogger(__name__)

KEEP_RULE_TO_PROTO = {
    "best_of_k": teacher_pb2.KEEP_RULE_BEST_OF_K,
    "best_positive": teacher_pb2.KEEP_RULE_BEST_POSITIVE,
}
KEEP_RULE_FROM_PROTO = {value: key for key, value in KEEP_RULE_TO_PROTO.items()}
# RoundConfig.overrides key → UpdateOverrides field; the overrides are part of a round's identity.
_OVERRIDE_FIELDS = {
    "learning_rate": "learning_rate",
    "epochs": "epochs",
    "rank": "lora_rank",
    "alpha": "lora_alpha",
    "batch_size": "batch_size",
    "include_passage": "include_passage",
}


def round_inputs(request: teacher_pb2.TrainRequest, settings: Settings) -> tuple[list[restem.TrainingContext], restem.RoundConfig]:
    """Validate a TrainRequest into the core's types; every refusal says what to change."""
    if not request.contexts:
        raise ValueError("no training contexts: send at least one context with its questions (τ)")
    limits = settings.limits
    contexts = []
    for index, item in enumerate(request.contexts):
        try:
            validate_context(
                item.context.title,
                item.context.passage,
                item.questions,
                max_passage_chars=limits.max_passage_chars,
                max_questions=limits.max_questions,
                max_question_chars=limits.max_question_chars,
            )
        except ValueError as exc:
            raise ValueError(f"contexts[{index}]: {exc}") from None
        contexts.append(
            restem.TrainingContext(
                item.context.title,
                item.context.passage,
                tuple(Question(q.question, q.answer) for q in item.questions),
            )
        )
    # The same bounds Adapt enforces: out of them, every sample would fail alike in the student.
    overrides = request.overrides
    if overrides.HasField("learning_rate") and not 0 < overrides.learning_rate <= 1:
        raise ValueError("overrides.learning_rate must be in (0, 1]")
    if overrides.HasField("epochs") and not 1 <= overrides.epochs <= 100:
        raise ValueError("overrides.epochs must be between 1 and 100")
    configured = settings.restem
    k = validate_k(request.k or configured.k, max(settings.teacher.max_k, configured.k))
    if request.keep_rule and request.keep_rule not in KEEP_RULE_FROM_PROTO:
        raise ValueError(f"keep_rule {request.keep_rule} is unknown; use KEEP_RULE_BEST_OF_K or KEEP_RULE_BEST_POSITIVE")
    config = restem.RoundConfig(
        k=k,
        seeds_per_edit=request.seeds_per_edit or configured.seeds_per_edit,
        keep_rule=KEEP_RULE_FROM_PROTO.get(request.keep_rule, configured.keep_rule),
        prompt_style=validate_prompt_style(request.prompt_style or settings.teacher.prompt_style),
        seed=request.seed if request.HasField("seed") else settings.seed,
        overrides={ours: getattr(request.overrides, theirs) for ours, theirs in _OVERRIDE_FIELDS.items()
                   if request.overrides.HasField(theirs)},
    )
    if config.seeds_per_edit > 16:
        raise ValueError(f"seeds_per_edit={config.seeds_per_edit} is above 16; each seed is a full LoRA run")
    return contexts, config


class GrpcScorer:
    """``restem.ScoreFn`` over the student's and the auditor's RPCs."""

    def __init__(
        self,
        student: student_pb2_grpc.StudentServiceStub,
        auditor: auditor_pb2_grpc.AuditorServiceStub,
        *,
        candidate_adapter_name: str,
        overrides: dict[str, Any],
        timeout: Callable[[], float],
        round_label: Callable[[], str],
        keep_candidate_weights: bool = False,
    ) -> None:
        self._student = student
        self._auditor = auditor
        self._lineage = candidate_adapter_name
        self._overrides = overrides
        self._timeout = timeout
        self._round_label = round_label
        self._keep_candidate_weights = keep_candidate_weights

    def _update_overrides(self) -> common_pb2.UpdateOverrides:
        message = common_pb2.UpdateOverrides()
        for ours, theirs in _OVERRIDE_FIELDS.items():
            if ours in self._overrides:
                setattr(message, theirs, self._overrides[ours])
        return message

    def __call__(self, context: restem.TrainingContext, sample: restem.Sample, seed: int) -> restem.Scored:
        proto_context = common_pb2.Context(title=context.title, passage=context.passage)
        questions = [common_pb2.Question(question=q.question, answer=q.answer) for q in context.questions]
        check = self._auditor.CheckSelfEdit(
            _with_known_fields(
                auditor_pb2.CheckSelfEditRequest,
                context=proto_context,
                self_edit=sample.text,
                prompt=sample.prompt,
                seed=seed,
                request_id=self._round_label(),
            ),
            timeout=self._timeout(),
        )
        if not check.passed:
            failed = ", ".join(g.gate for g in check.results if not g.passed)
            return restem.Scored(None, failure=f"guardrails failed before training: {failed}")
        manifest = None
        try:
            for update in self._student.ApplySelfEdit(
                student_pb2.ApplySelfEditRequest(
                    adapter_name=self._lineage,
                    context=proto_context,
                    self_edit=sample.text,
                    overrides=self._update_overrides(),
                    seed=seed,
                ),
                timeout=self._timeout(),
            ):
                if update.HasField("candidate"):
                    manifest = update.candidate
        except grpc.RpcError as exc:
            # The self-edit itself is unusable (no usable line, diverged): a failed sample,
            # not a failed round. Anything else (student down, deadline) stops the round.
            if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                raise
            return restem.Scored(None, failure=f"training failed ({exc.code().name}): {exc.details()}")
        if manifest is None:
            raise RuntimeError("the student's ApplySelfEdit stream ended without a candidate")
        score = self._auditor.Score(
            _with_known_fields(
                auditor_pb2.ScoreRequest,
                adapter_id=manifest.adapter_id,
                context=proto_context,
                questions=questions,
                self_edit=sample.text,
                prompt=sample.prompt,
                seed=seed,
                guardrails=check.results,
                request_id=self._round_label(),
            ),
            timeout=self._timeout(),
        )
        self._student.Reject(
            student_pb2.RejectRequest(
                adapter_id=manifest.adapter_id,
                reason=f"ReST^EM {self._round_label()}: scored for the teacher's policy (reward {score.reward:+.3f}), never served",
                discard_weights=not self._keep_candidate_weights,
            ),
            timeout=self._timeout(),
        )
        return restem.Scored(score.reward, manifest.adapter_id, score.adapted_accuracy, score.baseline_accuracy)


def _with_known_fields(message_type: Any, **fields: Any) -> Any:
    # Fields the auditor's proto may not have yet in an older deployment are left out, not fatal.
    known = message_type.DESCRIPTOR.fields_by_name
    return message_type(**{name: value for name, value in fields.items() if name in known})


def buffer_recall(buffer: RewardBuffer, candidate_adapter_name: str) -> restem.RecallFn:
    """A reward the auditor streamed into the durable buffer for exactly this (context, self-edit,
    seed) in this round's lineage, since the round began: scored work a teacher that was killed
    before writing it into the round state does not have to redo."""
    prefix = f"{candidate_adapter_name}@v"

    def recall(context_id: str, self_edit: str, seed: int, not_before: datetime) -> restem.Scored | None:
        for event in reversed(buffer.events()):
            if (
                event.get("context_id") == context_id
                and event.get("self_edit") == self_edit
                and int(event.get("seed", -1)) == seed
                and str(event.get("adapter_id", "")).startswith(prefix)
                and _parse_time(event.get("at", "")) >= not_before
            ):
                return restem.Scored(
                    float(event["reward"]),
                    str(event["adapter_id"]),
                    float(event["adapted_accuracy"]),
                    float(event["baseline_accuracy"]),
                )
        return None

    return recall


def _parse_time(value: str) -> datetime:
    try:
        return datetime.fromisoformat(value)
    except (TypeError, ValueError):
        return datetime.min.replace(tzinfo=UTC)  # undated: never counts as this round's


def proposer_sample_fn(proposer: SelfEditProposer, style: str) -> restem.SampleFn:
    def sample(context: restem.TrainingContext, k: int, seed: int) -> list[restem.Sample]:
        return [
            restem.Sample(e.index, e.prompt, e.text, e.completion_tokens)
            for e in proposer.propose(context.title, context.passage, k, style, seed)  # type: ignore[arg-type]
        ]

    return sample


def _optional(message: Any, field: str, value: float | None) -> None:
    if value is not None:
        setattr(message, field, value)


def event_to_proto(event: restem.RoundEvent, round_id: str) -> teacher_pb2.TrainResponse:
    response = teacher_pb2.TrainResponse(round_id=round_id)
    if isinstance(event, restem.RoundStarted):
        response.round_started.CopyFrom(
            teacher_pb2.RoundStarted(
                round=event.round, round_id=event.round_id, contexts=event.contexts, contexts_done=event.contexts_done,
                samples_done=event.samples_done, resumed=event.resumed, k=event.config.k,
                seeds_per_edit=event.config.seeds_per_edit, keep_rule=KEEP_RULE_TO_PROTO[event.config.keep_rule],
                policy_adapter_id=event.policy_adapter_id,
            )
        )
    elif isinstance(event, restem.ContextSampled):
        response.context_sampled.CopyFrom(
            teacher_pb2.ContextSampled(
                context_index=event.context_index, context_id=event.context_id, seconds=event.seconds, reused=event.reused,
                self_edits=[
                    teacher_pb2.SelfEdit(index=s.index, prompt=s.prompt, text=s.text, completion_tokens=s.completion_tokens)
                    for s in event.samples
                ],
            )
        )
    elif isinstance(event, restem.SampleScored):
        message = teacher_pb2.SampleScored(
            context_index=event.context_index, context_id=event.context_id, edit_index=event.edit_index,
            seed_index=event.seed_index, seed=event.seed, adapter_id=event.scored.adapter_id,
            failure=event.scored.failure, source=event.source, seconds=event.seconds,
        )
        if not event.scored.failure:
            _optional(message, "reward", event.scored.reward)
        response.sample_scored.CopyFrom(message)
    elif isinstance(event, restem.ContextDone):
        message = teacher_pb2.ContextDone(
            context_index=event.context_index, context_id=event.context_id, kept=event.kept is not None,
            mean_rewards=[e.mean_reward if e.mean_reward is not None else float("nan") for e in event.edits],
        )
        if event.kept is not None:
            message.kept_edit_index = event.kept.index
            message.kept_reward = event.kept.mean_reward or 0.0
        response.context_done.CopyFrom(message)
    elif isinstance(event, restem.PolicyProgress):
        response.policy_progress.CopyFrom(
            common_pb2.TrainingProgress(step=event.step, total_steps=event.total_steps, loss=event.loss)
        )
    elif isinstance(event, restem.RoundReport):
        response.report.CopyFrom(report_to_proto(event))
    return response


def report_to_proto(report: restem.RoundReport) -> teacher_pb2.RoundReport:
    message = teacher_pb2.RoundReport(
        round=report.round, round_id=report.round_id, keep_rule=KEEP_RULE_TO_PROTO[report.keep_rule],
        contexts=report.contexts, k=report.k, seeds_per_edit=report.seeds_per_edit,
        samples_scored=report.samples_scored, samples_failed=report.samples_failed,
        samples_resumed=report.samples_resumed, edits_scored=report.edits_scored, kept=report.kept,
        positive_kept=report.positive_kept, policy_adapter_id=report.policy_adapter_id,
        policy_version=report.policy_version, policy_sft_steps=report.policy_sft_steps,
        hot_loaded=report.hot_loaded, phase_seconds=report.phase_seconds, wall_seconds=report.wall_seconds,
    )
    for name in ("mean_reward", "max_reward", "mean_kept_reward", "policy_sft_first_loss", "policy_sft_final_loss"):
        _optional(message, name, getattr(report, name))
    return message


def stream_round(
    *,
    settings: Settings,
    contexts: list[restem.TrainingContext],
    config: restem.RoundConfig,
    restart: bool,
    proposer: SelfEditProposer,
    policy: TeacherPolicy,
    buffer: RewardBuffer | None,
    student: student_pb2_grpc.StudentServiceStub,
    auditor: auditor_pb2_grpc.AuditorServiceStub,
    timeout: Callable[[], float],
    should_stop: Callable[[], bool],
    release: Callable[[], None],
    on_report: Callable[[restem.RoundReport], None] | None = None,
) -> Iterator[teacher_pb2.TrainResponse]:
    """Run the round on a worker thread and yield its events as they happen.

    The worker, not this generator, calls ``release`` (the teacher's work slot): a client that
    goes away closes the generator at once, while the worker stops only at its next check, and
    no second round may start before it has."""
    events: queue.Queue[Any] = queue.Queue()
    finished = object()
    outcome: dict[str, Any] = {}
    label = {"round": "restem"}

    def emit(event: restem.RoundEvent) -> None:
        if isinstance(event, restem.RoundStarted):
            label["round"] = event.round_id
        events.put(event)

    scorer = GrpcScorer(
        student, auditor, candidate_adapter_name=settings.restem.candidate_adapter_name,
        overrides=config.overrides, timeout=timeout, round_label=lambda: label["round"],
        keep_candidate_weights=settings.restem.keep_candidate_weights,
    )

    def work() -> None:
        try:
            outcome["report"] = restem.run_round(
                contexts,
                config,
                restem.RoundStore(settings.home / "teacher" / "restem"),
                sample=proposer_sample_fn(proposer, config.prompt_style),
                score=scorer,
                train_policy=lambda examples, round_id, on_step: policy.train(
                    examples, round_id, on_step, seed=config.seed, should_stop=should_stop
                ),
                policy_adapter_id=policy.adapter_id,
                emit=emit,
                recall=buffer_recall(buffer, settings.restem.candidate_adapter_name) if buffer is not None else None,
                should_stop=should_stop,
                restart=restart,
            )
            if on_report is not None:
                on_report(outcome["report"])
        except BaseException as exc:  # noqa: BLE001 - re-raised in the RPC thread
            outcome["error"] = exc
        finally:
            release()
            events.put(finished)

    worker = threading.Thread(target=work, name="teacher-restem", daemon=True)
    try:
        worker.start()
    except BaseException:
        release()
        raise
    while (event := events.get()) is not finished:
        yield event_to_proto(event, label["round"])
    if "error" in outcome:
        raise outcome["error"]
