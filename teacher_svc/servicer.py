"""TeacherService over gRPC. ``Adapt`` drives one SEAL step across the three services:
propose k self-edits → guardrails → train a candidate per edit → score → promote the best that
passes every gate. The decisions themselves are the core's pure functions (``seal.gates``)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING

import grpc

from seal.adapt import (
    GUARDRAIL_PREFIX,
    KNOWLEDGE,
    ON_POLICY_RULES,
    AdaptFinished,
    CandidateFailed,
    CandidateScored,
    PromotionDecided,
    SelfEditsProposed,
    check_fewshot_task,
    proposer_fn,
    question_writer,
    run_adapt,
    update_rule,
)
from seal.audit import policy_kind
from seal.audit_outbox import AuditOutbox
from seal.cancellation import stop_when
from seal.config import Settings
from seal.domains.fewshot import validate_fewshot_overrides
from seal.domains.knowledge import PROMPT_STYLES
from seal.grading import build_grader
from seal.limits import check_update_overrides
from seal.registry import validate_adapter_name
from seal.rl.policy import TeacherPolicy, open_teacher_policy
from seal.rl.restem import KEEP_RULES, RoundReport
from seal.rpc import (
    CONFIGURED,
    Configured,
    RpcMetrics,
    RunningService,
    WorkQueue,
    deadline_checker,
    dial,
    map_errors,
    remaining_timeout,
    start_configured_service,
    traced_channel,
)
from seal.teacher import (
    RewardBuffer,
    SelfEditProposer,
    validate_context,
    validate_k,
    validate_prompt_style,
)
from seal.tracing import Tracing, build_tracing
from seal.transport import convert
from seal.transport.audit_events import AuditEventSender
from seal.transport.ports import GrpcAuditorPort, GrpcStudentPort
from seal.v1 import (
    auditor_pb2,
    auditor_pb2_grpc,
    student_pb2_grpc,
    teacher_pb2,
    teacher_pb2_grpc,
)
from teacher_svc.restem import round_inputs, stream_round

if TYPE_CHECKING:
    from opentelemetry.trace import Tracer

log = logging.getLogger(__name__)


# Values of the ``reason`` label of seal_teacher_no_promotion_total. A label must be a small fixed
# set (the full sentence is in the Adapt result and the audit trail): the first failed gate of the
# candidate closest to promotion, or why no candidate was ever scored.
NO_PROMOTION_REASONS = (
    "no_candidates", "guardrails", "training_failed", "scoring_failed", "tau_gain", "retention", "retention_kl", "other",
)
# The phases seal.adapt times (AdaptFinished.phase_seconds), ``total`` being the whole call.
ADAPT_PHASES = ("generation", "training", "scoring", "total")


def no_promotion_reason_label(failed: list[CandidateFailed], scored: list[CandidateScored]) -> str:
    """Why an Adapt promoted nothing, as one of :data:`NO_PROMOTION_REASONS`: the first failed
    gate of the best-rewarded scored candidate; with none scored, why the first candidate never
    was (a guardrail refused it, its training failed, or the auditor could not score it)."""
    if scored:
        best = max(scored, key=lambda candidate: candidate.score.reward)
        gate = next((g.gate for g in best.score.gates if not g.passed), "")
        if gate == "guardrails" or gate.startswith(GUARDRAIL_PREFIX):
            return "guardrails"
        return gate if gate in NO_PROMOTION_REASONS else "other"
    if failed:
        first = min(failed, key=lambda candidate: candidate.index)
        if first.stage == "guardrails" or any(not g.passed for g in first.gates):
            return "guardrails"
        return "scoring_failed" if first.stage == "scoring" else "training_failed"
    return "no_candidates"


class TeacherBusy(RuntimeError):
    code = "resource_exhausted"


class NoPolicyStore(RuntimeError):
    code = "failed_precondition"


class TeacherServicer(teacher_pb2_grpc.TeacherServiceServicer):
    def __init__(
        self,
        settings: Settings,
        proposer: SelfEditProposer,
        student_channel: grpc.Channel,
        auditor_channel: grpc.Channel,
        metrics: RpcMetrics,
        *,
        policy: TeacherPolicy | None = None,
        buffer: RewardBuffer | None = None,
        tracer: Tracer | None = None,
    ) -> None:
        self._settings = settings
        # Adapt's pipeline spans (seal.adapt and its children); None = tracing off.
        self._tracer = tracer
        self._proposer = proposer
        self._policy = policy
        self._buffer = buffer
        self._student = student_pb2_grpc.StudentServiceStub(student_channel)
        self._auditor = auditor_pb2_grpc.AuditorServiceStub(auditor_channel)
        # One adaptation (or ReST^EM round) at a time, a bounded queue behind it: a call beyond the
        # queue, or one that waited its longest, is refused with a retry hint (seal.rpc.WorkQueue).
        self._adapt_slots = WorkQueue(
            "the teacher's Adapt queue", slots=1, depth=settings.teacher.adapt_queue_depth,
            wait_s=settings.teacher.adapt_queue_wait_s, setting="teacher.adapt_queue",
        )
        # Grades the base model's open-book answers to questions the teacher wrote (no τ sent).
        self._grader = build_grader(settings.auditor)
        self._self_edits = metrics.counter("self_edits_proposed_total", "Self-edits sampled.", ("style",))
        self._promotions = metrics.counter("promotions_total", "Adapt calls that promoted a candidate.", ("adapter",))
        self._rejections = metrics.counter(
            "no_promotion_total", "Adapt calls that promoted nothing, by why (NO_PROMOTION_REASONS).",
            ("adapter", "reason"),
        )
        self._phase_seconds = metrics.histogram(
            "adapt_phase_seconds", "Wall time of each phase of an Adapt call (total: the whole call).",
            (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600), ("phase",),
        )
        self._generation_seconds = metrics.histogram(
            "generation_seconds", "Wall time to sample the k self-edits.", (1, 5, 15, 30, 60, 120, 300, 600)
        )
        self._rounds = metrics.counter("restem_rounds_total", "ReST^EM rounds finished.", ("keep_rule",))
        self._kept = metrics.counter("restem_kept_self_edits_total", "Self-edits kept for the policy's SFT.", ("keep_rule",))
        # Series of the label values known up front exist at 0 from the start: Prometheus'
        # increase() cannot see a counter's first event when its series appears already at 1, and
        # the alerts (no promotion, reward collapse after a round) rely on seeing it.
        self._promotions.labels(settings.adapter_name)
        for reason in NO_PROMOTION_REASONS:
            self._rejections.labels(settings.adapter_name, reason)
        for phase in ADAPT_PHASES:
            self._phase_seconds.labels(phase)
        for style in PROMPT_STYLES:
            self._self_edits.labels(style)
        for keep_rule in KEEP_RULES:
            self._rounds.labels(keep_rule)
            self._kept.labels(keep_rule)

    # --- validation ------------------------------------------------------------------------

    def _validate(self, request: teacher_pb2.AdaptRequest) -> tuple[int, str, str]:
        limits, teacher = self._settings.limits, self._settings.teacher
        if request.HasField("fewshot"):
            if request.context.title or request.context.passage or request.questions:
                raise ValueError("a few-shot Adapt carries its task in fewshot: leave context and questions empty")
            task = convert.task_from_proto(request.context, request.questions, request.fewshot)
            check_fewshot_task(task, needs_training_prompts=False)
            validate_fewshot_overrides(convert.overrides_from_proto(request.overrides))
        else:
            validate_context(
                request.context.title,
                request.context.passage,
                request.questions,
                max_passage_chars=limits.max_passage_chars,
                max_questions=limits.max_questions,
                max_question_chars=limits.max_question_chars,
                require_questions=False,  # without τ the teacher writes it (seal.domains.self_qa)
            )
        k = validate_k(request.k or teacher.default_k, teacher.max_k)
        style = validate_prompt_style(request.prompt_style or teacher.prompt_style)
        adapter_name = validate_adapter_name(request.adapter_name or self._settings.adapter_name)
        check_update_overrides(convert.overrides_from_proto(request.overrides), field_names=convert.OVERRIDE_FIELDS)
        return k, style, adapter_name

    # --- RPCs --------------------------------------------------------------------------------

    @map_errors
    def ProposeSelfEdits(self, request: teacher_pb2.ProposeSelfEditsRequest, context: grpc.ServicerContext) -> teacher_pb2.ProposeSelfEditsResponse:
        if not request.context.passage.strip():
            raise ValueError("context.passage is empty: send the text to write self-edits about")
        k = validate_k(request.k or self._settings.teacher.default_k, self._settings.teacher.max_k)
        style = validate_prompt_style(request.prompt_style or self._settings.teacher.prompt_style)
        seed = request.seed if request.HasField("seed") else self._settings.seed
        with stop_when(deadline_checker(context)):  # sampling ends once the caller has gone
            edits = self._proposer.propose(request.context.title, request.context.passage, k, style, seed)
        self._self_edits.labels(style).inc(len(edits))
        return teacher_pb2.ProposeSelfEditsResponse(
            self_edits=[
                teacher_pb2.SelfEdit(index=e.index, prompt=e.prompt, text=e.text, completion_tokens=e.completion_tokens)
                for e in edits
            ]
        )

    @map_errors
    def Adapt(self, request: teacher_pb2.AdaptRequest, context: grpc.ServicerContext) -> Iterator[teacher_pb2.AdaptResponse]:
        k, style, adapter_name = self._validate(request)
        should_stop = deadline_checker(context)
        # Raises Overloaded (RESOURCE_EXHAUSTED, retry hint) when the queue is full or the wait ran out.
        self._adapt_slots.acquire(remaining_timeout(context, self._settings.teacher.adapt_queue_wait_s), should_stop)
        try:
            # The teacher's own sampling stops once the caller has gone; calls to the student and
            # the auditor carry the remaining deadline, so their work stops too.
            with stop_when(should_stop):
                yield from self._adapt(request, context, k, style, adapter_name)
        finally:
            self._adapt_slots.release()

    @map_errors
    def Train(self, request: teacher_pb2.TrainRequest, context: grpc.ServicerContext) -> Iterator[teacher_pb2.TrainResponse]:
        if self._policy is None:
            raise NoPolicyStore("this teacher was started without a policy store, so it cannot train its policy")
        contexts, config = round_inputs(request, self._settings)
        # The one work slot Adapt also takes: a round samples with the policy it is about to
        # replace and trains on the same student, so the two must not interleave.
        if not self._adapt_slots.acquire(timeout=min(5.0, remaining_timeout(context, 5.0))):
            raise TeacherBusy("the teacher is running an adaptation or a training round; retry when it finishes")

        def on_report(report: RoundReport) -> None:
            self._rounds.labels(report.keep_rule).inc()
            self._kept.labels(report.keep_rule).inc(report.kept)

        ceiling = self._settings.services.rpc_timeout_s
        yield from stream_round(
            settings=self._settings,
            contexts=contexts,
            config=config,
            restart=request.restart,
            proposer=self._proposer,
            policy=self._policy,
            buffer=self._buffer,
            student=self._student,
            auditor=self._auditor,
            timeout=lambda: remaining_timeout(context, ceiling),
            should_stop=deadline_checker(context),
            release=self._adapt_slots.release,
            on_report=on_report,
        )

    def _adapt(self, request: teacher_pb2.AdaptRequest, context: grpc.ServicerContext, k: int, style: str, adapter_name: str) -> Iterator[teacher_pb2.AdaptResponse]:
        request_id = uuid.uuid4().hex[:12]
        ceiling = self._settings.services.rpc_timeout_s

        def timeout() -> float:
            return remaining_timeout(context, ceiling)

        student = GrpcStudentPort(self._student, timeout)
        overrides = convert.overrides_from_proto(request.overrides)
        rule = update_rule(overrides, self._settings.update.rule)
        task = convert.task_from_proto(request.context, request.questions, convert.fewshot_field(request))
        events = run_adapt(
            task,
            propose=proposer_fn(self._proposer, style, self._settings.fewshot),
            student=student,
            auditor=GrpcAuditorPort(self._auditor, timeout),
            write_questions=question_writer(
                self._proposer, student, self._grader, self._settings.teacher,
                answer_max_new_tokens=self._settings.auditor.answer_max_new_tokens,
            ),
            needs_training_prompts=rule in ON_POLICY_RULES and task.domain == KNOWLEDGE,
            k=k,
            seed=request.seed if request.HasField("seed") else self._settings.seed,
            adapter_name=adapter_name,
            overrides=overrides,
            request_id=request_id,
            tracer=self._tracer,
            trace_attributes={"seal.update_rule": rule, "seal.prompt_style": style, "seal.domain": task.domain},
            batch_candidates=self._settings.student.batch_candidates,
        )
        failed: list[CandidateFailed] = []
        scored: list[CandidateScored] = []
        for event in events:
            if isinstance(event, SelfEditsProposed):
                self._generation_seconds.observe(event.seconds)
                self._self_edits.labels(style).inc(len(event.proposals))
            elif isinstance(event, CandidateFailed):
                failed.append(event)
            elif isinstance(event, CandidateScored):
                scored.append(event)
            elif isinstance(event, PromotionDecided):
                if event.promoted:
                    self._promotions.labels(adapter_name).inc()
                else:
                    self._rejections.labels(adapter_name, no_promotion_reason_label(failed, scored)).inc()
            elif isinstance(event, AdaptFinished):
                for phase, seconds in event.phase_seconds.items():
                    self._phase_seconds.labels(phase).observe(seconds)
            yield convert.adapt_event_to_proto(event, request_id)


class RewardSubscriber:
    """Keeps the teacher's durable ReST^EM buffer in step with the auditor's reward stream,
    reconnecting from the last sequence it holds so nothing is lost or doubled."""

    def __init__(self, channel: grpc.Channel, buffer: RewardBuffer) -> None:
        self._stub = auditor_pb2_grpc.AuditorServiceStub(channel)
        self._buffer = buffer
        self._stop = threading.Event()
        self._call: grpc.Future | None = None
        self._thread = threading.Thread(target=self._run, name="teacher-rewards", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        backoff = 0.5
        while not self._stop.is_set():
            try:
                self._call = self._stub.SubscribeRewards(
                    auditor_pb2.SubscribeRewardsRequest(after_sequence=self._buffer.last_sequence)
                )
                for reply in self._call:
                    self._buffer.add(convert.reward_event_to_dict(reply.event))
                    backoff = 0.5
            except grpc.RpcError as exc:
                if self._stop.is_set():
                    return
                log.debug("reward stream interrupted (%s); reconnecting", exc.code())
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 10.0)

    def stop(self) -> None:
        self._stop.set()
        if self._call is not None:
            self._call.cancel()
        self._thread.join(timeout=5)


def build_teacher_policy(settings: Settings, audit: AuditOutbox | None = None) -> TeacherPolicy:
    """The teacher's engine with its promoted policy adapter loaded (the base model if none);
    ``audit`` journals and reports the policy registry's transitions."""
    policy = open_teacher_policy(settings, audit)
    served = policy.load_serving()
    log.info("teacher policy: %s", served.adapter_id if served else "base model")
    return policy


def serve_teacher(
    settings: Settings, *, port: int | Configured = CONFIGURED, metrics_port: int | Configured | None = CONFIGURED,
    tracing: Tracing | None = None,
) -> RunningService:
    """``tracing``: this service's spans (tests pass one with an in-memory exporter); None = as
    ``settings.tracing`` says."""
    services = settings.services
    tracing = tracing if tracing is not None else build_tracing("teacher", settings.tracing)
    # The policy registry's transitions (a ReST^EM round's hot-load) reach the audit chain as the
    # student's do: journaled first, delivered later and retried, as policy_* kinds.
    audit = AuditOutbox(settings.home / "teacher" / "audit_outbox.jsonl", None, source="teacher")
    audit_sender = AuditEventSender(services.address_of("auditor"), settings.auth, identity="teacher",
                                    kind_of=policy_kind)
    audit.set_sender(audit_sender)
    try:
        policy = build_teacher_policy(settings, audit)
    except BaseException:
        audit.close(timeout=0)
        audit_sender.close()
        raise
    teacher = settings.teacher
    proposer = SelfEditProposer(
        policy.engine,
        max_new_tokens=teacher.max_new_tokens,
        temperature=teacher.temperature,
        top_p=teacher.top_p,
    )
    # The teacher's own identity (auth.teacher_token_file and/or its client certificate).
    student_channel = dial(services.address_of("student"), settings.auth, identity="teacher")
    auditor_channel = dial(services.address_of("auditor"), settings.auth, identity="teacher")
    metrics = RpcMetrics("teacher")
    buffer = RewardBuffer(settings.home / "teacher" / "restem_buffer.jsonl")
    servicer = TeacherServicer(
        settings, proposer, traced_channel(student_channel, tracing), traced_channel(auditor_channel, tracing),
        metrics, policy=policy, buffer=buffer, tracer=tracing.tracer("seal.adapt"),
    )
    # The plain channel: the reward subscription outlives any request, and stop() cancels its call.
    subscriber = RewardSubscriber(auditor_channel, buffer)

    def register(server: grpc.Server) -> list[str]:
        teacher_pb2_grpc.add_TeacherServiceServicer_to_server(servicer, server)
        return [teacher_pb2.DESCRIPTOR.services_by_name["TeacherService"].full_name]

    running = start_configured_service(
        "teacher", register, services, metrics, auth=settings.auth, port=port, metrics_port=metrics_port,
        tracing=tracing,
    )
    subscriber.start()
    running.on_stop.extend([
        subscriber.stop, audit.close, audit_sender.close, student_channel.close, auditor_channel.close,
        policy.engine.close,
    ])
    return running
