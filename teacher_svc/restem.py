"""The teacher's ``Train`` RPC: a ReST^EM round (``seal.rl.restem``) wired to the other services.

Scoring goes through exactly the calls Adapt makes — the auditor's guardrails, the student's
ApplySelfEdit, the auditor's Score — so a policy is trained on the reward the production loop
would give. Nothing is promoted: each candidate is marked rejected right after it is scored, in
its own lineage (``restem.candidate_adapter_name``), away from the served one.

Self-edits are stored in the round directory as the audit log keeps them: what the secrets and
personal-data guardrails (``settings.guardrails``) find is masked, and such a self-edit is never
kept (``seal.rl.restem``).

A round is in one domain: knowledge passages, or few-shot ARC tasks (the recipe prompt, the
recipe gate, a binary solved-or-not reward); each context becomes the ``seal.adapt.Task`` Adapt
would be given for it, so both domains share the sampler, the scorer and the handler.

The teacher samples the k self-edits of ``restem.contexts_per_sample_batch`` contexts in one
batched generate (``proposer_sample_many_fn``), in either domain.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Mapping
from datetime import UTC, datetime
from typing import Any

from seal.adapt import (
    AuditorPort,
    Proposal,
    StudentPort,
    Task,
    check_fewshot_task,
    drain,
    proposer_fn,
    score_candidate,
)
from seal.config import Settings
from seal.domains.fewshot import FewShotSettings, validate_fewshot_overrides
from seal.domains.fewshot import build_self_edit_prompt as fewshot_prompt
from seal.domains.knowledge import Question
from seal.domains.knowledge import build_self_edit_prompt as knowledge_prompt
from seal.limits import check_update_overrides
from seal.rl import restem
from seal.rl.policy import TeacherPolicy
from seal.streaming import stream_callbacks
from seal.teacher import (
    RewardBuffer,
    SelfEditProposer,
    validate_context,
    validate_k,
    validate_prompt_style,
)
from seal.transport import convert
from seal.transport.ports import GrpcAuditorPort, GrpcStudentPort
from seal.v1 import auditor_pb2_grpc, common_pb2, student_pb2_grpc, teacher_pb2

log = logging.getLogger(__name__)

def training_context(item: teacher_pb2.TrainingContext, settings: Settings) -> restem.TrainingContext:
    """One TrainRequest context in the core's type, validated as Adapt validates its task."""
    if item.HasField("fewshot"):
        if item.context.title or item.context.passage or item.questions:
            raise ValueError("a few-shot context carries its task in fewshot: leave context and questions empty")
        arc = convert.fewshot_from_proto(item.fewshot)
        check_fewshot_task(Task.from_arc(arc), needs_training_prompts=False)
        return restem.TrainingContext.from_arc(arc)
    limits = settings.limits
    validate_context(
        item.context.title,
        item.context.passage,
        item.questions,
        max_passage_chars=limits.max_passage_chars,
        max_questions=limits.max_questions,
        max_question_chars=limits.max_question_chars,
    )
    return restem.TrainingContext(
        item.context.title,
        item.context.passage,
        tuple(Question(q.question, q.answer) for q in item.questions),
    )


def round_inputs(request: teacher_pb2.TrainRequest, settings: Settings) -> tuple[list[restem.TrainingContext], restem.RoundConfig]:
    """Validate a TrainRequest into the core's types; every refusal says what to change."""
    if request.domain and request.domain not in restem.DOMAINS:
        raise ValueError(f"domain {request.domain!r} is unknown; use one of {', '.join(restem.DOMAINS)}")
    if not request.contexts:
        what = "ARC task (fewshot)" if request.domain == restem.FEWSHOT else "context with its questions (τ)"
        raise ValueError(f"no training contexts: send at least one {what}")
    contexts = []
    for index, item in enumerate(request.contexts):
        try:
            contexts.append(training_context(item, settings))
        except ValueError as exc:
            raise ValueError(f"contexts[{index}]: {exc}") from None
    domain = restem.round_domain(contexts)
    if request.domain and request.domain != domain:
        raise ValueError(
            f"the request says domain {request.domain!r} but its contexts are {domain}: "
            + ("set fewshot on each context (an ARC task)" if request.domain == restem.FEWSHOT
               else "send passages with questions, not fewshot tasks")
        )
    # The same bounds Adapt enforces: out of them, every sample would fail alike in the student.
    overrides = check_update_overrides(convert.overrides_from_proto(request.overrides), field_names=convert.OVERRIDE_FIELDS)
    if domain == restem.FEWSHOT:
        validate_fewshot_overrides(overrides)
        if request.prompt_style:
            raise ValueError("prompt_style does not apply to few-shot tasks: their self-edits answer the recipe prompt")
    configured = settings.restem
    k = validate_k(request.k or configured.k, max(settings.teacher.max_k, configured.k))
    if request.keep_rule and request.keep_rule not in convert.KEEP_RULE_FROM_PROTO:
        raise ValueError(f"keep_rule {request.keep_rule} is unknown; use KEEP_RULE_BEST_OF_K or KEEP_RULE_BEST_POSITIVE")
    default_keep = configured.fewshot_keep_rule if domain == restem.FEWSHOT else configured.keep_rule
    config = restem.RoundConfig(
        k=k,
        seeds_per_edit=request.seeds_per_edit or configured.seeds_per_edit,
        keep_rule=convert.KEEP_RULE_FROM_PROTO.get(request.keep_rule, default_keep),
        prompt_style=validate_prompt_style(request.prompt_style or settings.teacher.prompt_style),
        seed=request.seed if request.HasField("seed") else settings.seed,
        overrides=dict(overrides),
    )
    if config.seeds_per_edit > 16:
        raise ValueError(f"seeds_per_edit={config.seeds_per_edit} is above 16; each seed is a full LoRA run")
    return contexts, config


def pipeline_scorer(
    student: StudentPort,
    auditor: AuditorPort,
    *,
    candidate_adapter_name: str,
    overrides: Mapping[str, Any],
    round_label: Callable[[], str],
    keep_candidate_weights: bool = False,
) -> restem.ScoreFn:
    """``restem.ScoreFn`` through the one SEAL pipeline (``seal.adapt.score_candidate``): the
    guardrails, update and score Adapt uses. Nothing is promoted: each candidate is rejected
    right after it is scored, in its own lineage, away from the served one."""

    def score(context: restem.TrainingContext, sample: restem.Sample, seed: int) -> restem.Scored:
        task = task_of(context)
        proposal = Proposal(sample.index, sample.prompt, sample.text, sample.completion_tokens)
        outcome = drain(score_candidate(
            task, proposal, student=student, auditor=auditor, adapter_name=candidate_adapter_name,
            seed=seed, request_id=round_label(), overrides=overrides,
        ))
        if outcome.score is None or outcome.adapter is None:
            return restem.Scored(None, failure=outcome.failure)
        student.reject(
            outcome.adapter.adapter_id,
            f"ReST^EM {round_label()}: scored for the teacher's policy (reward {outcome.score.reward:+.3f}), never served",
            discard_weights=not keep_candidate_weights,
        )
        return restem.Scored(
            outcome.score.reward, outcome.adapter.adapter_id, outcome.score.accuracy, outcome.score.baseline_accuracy
        )

    return score


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


def task_of(context: restem.TrainingContext) -> Task:
    """The pipeline's task for a round's context: what Adapt would be given for it."""
    if context.fewshot is not None:
        return Task.from_arc(context.fewshot)
    return Task(context.title, context.passage, tuple(context.questions))


def proposer_sample_fn(
    proposer: SelfEditProposer, style: str, fewshot: FewShotSettings | None = None
) -> restem.SampleFn:
    """``restem.SampleFn`` through Adapt's proposer: the ``style`` prompt for a passage, the recipe
    prompt (with ``fewshot``'s limits) for an ARC task; the prompt is what the policy's SFT
    learns to answer."""
    propose = proposer_fn(proposer, style, fewshot)

    def sample(context: restem.TrainingContext, k: int, seed: int) -> list[restem.Sample]:
        return [restem.Sample(p.index, p.prompt, p.text, p.completion_tokens) for p in propose(task_of(context), k, seed)]

    return sample


def self_edit_prompt(context: restem.TrainingContext, style: str, fewshot: FewShotSettings | None = None) -> str:
    """The prompt a context's self-edits answer, as ``proposer_sample_fn`` builds it: the
    ``style`` prompt for a passage, the recipe prompt (with ``fewshot``'s limits) for an ARC task."""
    if context.fewshot is not None:
        return fewshot_prompt(context.fewshot, fewshot)
    return knowledge_prompt(context.title, context.passage, validate_prompt_style(style))


def proposer_sample_many_fn(
    proposer: SelfEditProposer, style: str, fewshot: FewShotSettings | None = None
) -> restem.SampleManyFn:
    """``restem.SampleManyFn``: the k self-edits of several contexts in one batched generate
    (``SelfEditProposer.propose_many``), each context's prompt as ``proposer_sample_fn`` writes
    it, in either domain. A group of one draws exactly what ``proposer_sample_fn`` would; in a
    larger group the generate has one seed for all (``seal.teacher.batch_seed`` of the contexts'
    seeds), so the text drawn depends on the group. The round records it once (resume is exact)."""

    def sample_many(requests: list[tuple[restem.TrainingContext, int, int]]) -> list[list[restem.Sample]]:
        proposed = proposer.propose_many([(self_edit_prompt(c, style, fewshot), k, seed) for c, k, seed in requests])
        return [[restem.Sample(p.index, p.prompt, p.text, p.completion_tokens) for p in edits] for edits in proposed]

    return sample_many


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
                seeds_per_edit=event.config.seeds_per_edit, keep_rule=convert.KEEP_RULE_TO_PROTO[event.config.keep_rule],
                policy_adapter_id=event.policy_adapter_id, domain=event.domain,
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
        round=report.round, round_id=report.round_id, keep_rule=convert.KEEP_RULE_TO_PROTO[report.keep_rule],
        contexts=report.contexts, k=report.k, seeds_per_edit=report.seeds_per_edit,
        samples_scored=report.samples_scored, samples_failed=report.samples_failed,
        samples_resumed=report.samples_resumed, edits_scored=report.edits_scored, kept=report.kept,
        positive_kept=report.positive_kept, policy_adapter_id=report.policy_adapter_id,
        policy_version=report.policy_version, policy_sft_steps=report.policy_sft_steps,
        hot_loaded=report.hot_loaded, phase_seconds=report.phase_seconds, wall_seconds=report.wall_seconds,
        domain=report.domain,
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
    label = {"round": "restem"}
    scorer = pipeline_scorer(
        GrpcStudentPort(student, timeout), GrpcAuditorPort(auditor, timeout),
        candidate_adapter_name=settings.restem.candidate_adapter_name,
        overrides=config.overrides, round_label=lambda: label["round"],
        keep_candidate_weights=settings.restem.keep_candidate_weights,
    )

    def work(emit: Callable[[restem.RoundEvent], None]) -> restem.RoundReport:
        def labelled(event: restem.RoundEvent) -> None:
            if isinstance(event, restem.RoundStarted):
                label["round"] = event.round_id
            emit(event)

        report = restem.run_round(
            contexts,
            config,
            restem.RoundStore(settings.home / "teacher" / "restem"),
            sample=proposer_sample_fn(proposer, config.prompt_style, settings.fewshot),
            # Several contexts' k self-edits per generate (restem.contexts_per_sample_batch).
            sample_many=proposer_sample_many_fn(proposer, config.prompt_style, settings.fewshot),
            contexts_per_sample_batch=settings.restem.contexts_per_sample_batch,
            score=scorer,
            train_policy=lambda examples, round_id, on_step: policy.train(
                examples, round_id, on_step, seed=config.seed, should_stop=should_stop
            ),
            policy_adapter_id=policy.adapter_id,
            emit=labelled,
            recall=buffer_recall(buffer, settings.restem.candidate_adapter_name) if buffer is not None else None,
            should_stop=should_stop,
            restart=restart,
            # The round directory keeps what the secrets and personal-data rules find masked.
            redact=restem.redactor(settings.guardrails),
        )
        if on_report is not None:
            on_report(report)
        return report

    for event in stream_callbacks(work, name="teacher-restem", on_finish=release):
        yield event_to_proto(event, label["round"])
