"""TeacherService over gRPC. ``Adapt`` drives one SEAL step across the three services:
propose k self-edits → guardrails → train a candidate per edit → score → promote the best that
passes every gate. The decisions themselves are the core's pure functions (``seal.gates``)."""

from __future__ import annotations

import logging
import threading
import uuid
from collections.abc import Iterator

import grpc

from seal.adapt import (
    ON_POLICY_RULES,
    PromotionDecided,
    SelfEditsProposed,
    proposer_fn,
    question_writer,
    run_adapt,
    update_rule,
    validate_overrides,
)
from seal.config import Settings
from seal.grading import build_grader
from seal.registry import validate_adapter_name
from seal.rl.policy import TeacherPolicy, open_teacher_policy
from seal.rl.restem import RoundReport
from seal.rpc import (
    RpcMetrics,
    RunningService,
    deadline_checker,
    map_errors,
    remaining_timeout,
    start_configured_service,
)
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
    student_pb2_grpc,
    teacher_pb2,
    teacher_pb2_grpc,
)
from seal.transport import convert
from seal.transport.ports import GrpcAuditorPort, GrpcStudentPort
from teacher_svc.restem import round_inputs, stream_round

log = logging.getLogger(__name__)


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
    ) -> None:
        self._settings = settings
        self._proposer = proposer
        self._policy = policy
        self._buffer = buffer
        self._student = student_pb2_grpc.StudentServiceStub(student_channel)
        self._auditor = auditor_pb2_grpc.AuditorServiceStub(auditor_channel)
        self._adapt_slots = threading.BoundedSemaphore(1)
        # Grades the base model's open-book answers to questions the teacher wrote (no τ sent).
        self._grader = build_grader(settings.auditor)
        self._self_edits = metrics.counter("self_edits_proposed_total", "Self-edits sampled.", ("style",))
        self._promotions = metrics.counter("promotions_total", "Adapt calls that promoted a candidate.", ("adapter",))
        self._rejections = metrics.counter("no_promotion_total", "Adapt calls that promoted nothing.", ("adapter",))
        self._generation_seconds = metrics.histogram(
            "generation_seconds", "Wall time to sample the k self-edits.", (1, 5, 15, 30, 60, 120, 300, 600)
        )
        self._rounds = metrics.counter("restem_rounds_total", "ReST^EM rounds finished.", ("keep_rule",))
        self._kept = metrics.counter("restem_kept_self_edits_total", "Self-edits kept for the policy's SFT.", ("keep_rule",))

    # --- validation ------------------------------------------------------------------------

    def _validate(self, request: teacher_pb2.AdaptRequest) -> tuple[int, str, str]:
        limits, teacher = self._settings.limits, self._settings.teacher
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
        validate_overrides(convert.overrides_from_proto(request.overrides))
        return k, style, adapter_name

    # --- RPCs --------------------------------------------------------------------------------

    @map_errors
    def ProposeSelfEdits(self, request: teacher_pb2.ProposeSelfEditsRequest, context: grpc.ServicerContext) -> teacher_pb2.ProposeSelfEditsResponse:
        if not request.context.passage.strip():
            raise ValueError("context.passage is empty: send the text to write self-edits about")
        k = validate_k(request.k or self._settings.teacher.default_k, self._settings.teacher.max_k)
        style = validate_prompt_style(request.prompt_style or self._settings.teacher.prompt_style)
        seed = request.seed if request.HasField("seed") else self._settings.seed
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
        if not self._adapt_slots.acquire(timeout=min(5.0, remaining_timeout(context, 5.0))):
            raise TeacherBusy("the teacher is already running an adaptation; retry when it finishes")
        try:
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
        events = run_adapt(
            convert.task_from_proto(request.context, request.questions),
            propose=proposer_fn(self._proposer, style),
            student=student,
            auditor=GrpcAuditorPort(self._auditor, timeout),
            write_questions=question_writer(
                self._proposer, student, self._grader, self._settings.teacher,
                answer_max_new_tokens=self._settings.auditor.answer_max_new_tokens,
            ),
            needs_training_prompts=update_rule(overrides, self._settings.update.rule) in ON_POLICY_RULES,
            k=k,
            seed=request.seed if request.HasField("seed") else self._settings.seed,
            adapter_name=adapter_name,
            overrides=overrides,
            request_id=request_id,
        )
        for event in events:
            if isinstance(event, SelfEditsProposed):
                self._generation_seconds.observe(event.seconds)
                self._self_edits.labels(style).inc(len(event.proposals))
            elif isinstance(event, PromotionDecided):
                (self._promotions if event.promoted else self._rejections).labels(adapter_name).inc()
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


def build_teacher_policy(settings: Settings) -> TeacherPolicy:
    """The teacher's engine with its promoted policy adapter loaded (the base model if none)."""
    policy = open_teacher_policy(settings)
    served = policy.load_serving()
    log.info("teacher policy: %s", served.adapter_id if served else "base model")
    return policy


def serve_teacher(settings: Settings, *, port: int | None = None, metrics_port: int | None = None) -> RunningService:
    services = settings.services
    policy = build_teacher_policy(settings)
    teacher = settings.teacher
    proposer = SelfEditProposer(
        policy.engine,
        max_new_tokens=teacher.max_new_tokens,
        temperature=teacher.temperature,
        top_p=teacher.top_p,
    )
    student_channel = grpc.insecure_channel(services.address_of("student"))
    auditor_channel = grpc.insecure_channel(services.address_of("auditor"))
    metrics = RpcMetrics("teacher")
    buffer = RewardBuffer(settings.home / "teacher" / "restem_buffer.jsonl")
    servicer = TeacherServicer(settings, proposer, student_channel, auditor_channel, metrics, policy=policy, buffer=buffer)
    subscriber = RewardSubscriber(auditor_channel, buffer)

    def register(server: grpc.Server) -> list[str]:
        teacher_pb2_grpc.add_TeacherServiceServicer_to_server(servicer, server)
        return [teacher_pb2.DESCRIPTOR.services_by_name["TeacherService"].full_name]

    running = start_configured_service("teacher", register, services, metrics, port=port, metrics_port=metrics_port)
    subscriber.start()
    running.on_stop.extend([subscriber.stop, student_channel.close, auditor_channel.close, policy.engine.close])
    return running
