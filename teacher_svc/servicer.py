"""TeacherService over gRPC. ``Adapt`` drives one SEAL step across the three services:
propose k self-edits → guardrails → train a candidate per edit → score → promote the best that
passes every gate. The decisions themselves are the core's pure functions (``seal.gates``)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field

import grpc

from seal.config import Settings
from seal.domains.knowledge import context_digest
from seal.gates import choose_best
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
    common_pb2,
    student_pb2,
    student_pb2_grpc,
    teacher_pb2,
    teacher_pb2_grpc,
)
from teacher_svc.restem import round_inputs, stream_round

log = logging.getLogger(__name__)
_ADAPTER_NAME_RULE = "lower-case letters, digits, '-' or '_', at most 63 characters"


class TeacherBusy(RuntimeError):
    code = "resource_exhausted"


class NoPolicyStore(RuntimeError):
    code = "failed_precondition"


@dataclass
class _Candidate:
    summary: teacher_pb2.CandidateSummary
    score: auditor_pb2.ScoreResponse | None = None
    train_seconds: float = 0.0


@dataclass
class _PhaseClock:
    seconds: dict[str, float] = field(default_factory=lambda: {"generation": 0.0, "training": 0.0, "scoring": 0.0})

    def add(self, phase: str, started: float) -> float:
        elapsed = time.perf_counter() - started
        self.seconds[phase] += elapsed
        return elapsed


def _gate_passed(gates: list[common_pb2.GateResult]) -> bool:
    return all(gate.passed for gate in gates)


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
        )
        k = validate_k(request.k or teacher.default_k, teacher.max_k)
        style = validate_prompt_style(request.prompt_style or teacher.prompt_style)
        adapter_name = request.adapter_name or self._settings.adapter_name
        if not _valid_adapter_name(adapter_name):
            raise ValueError(f"adapter_name {adapter_name!r} is invalid: use {_ADAPTER_NAME_RULE}")
        overrides = request.overrides
        if overrides.HasField("learning_rate") and not 0 < overrides.learning_rate <= 1:
            raise ValueError("overrides.learning_rate must be in (0, 1]")
        if overrides.HasField("epochs") and not 1 <= overrides.epochs <= 100:
            raise ValueError("overrides.epochs must be between 1 and 100")
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
        clock, started_total = _PhaseClock(), time.perf_counter()
        seed = request.seed if request.HasField("seed") else self._settings.seed
        ceiling = self._settings.services.rpc_timeout_s

        def event(**kwargs: object) -> teacher_pb2.AdaptResponse:
            return teacher_pb2.AdaptResponse(request_id=request_id, **kwargs)

        def timeout() -> float:
            return remaining_timeout(context, ceiling)

        started = time.perf_counter()
        edits = self._proposer.propose(request.context.title, request.context.passage, k, style, seed)  # type: ignore[arg-type]
        self._generation_seconds.observe(clock.add("generation", started))
        self._self_edits.labels(style).inc(len(edits))
        yield event(
            self_edits_proposed=teacher_pb2.SelfEditsProposed(
                self_edits=[
                    teacher_pb2.SelfEdit(index=e.index, prompt=e.prompt, text=e.text, completion_tokens=e.completion_tokens)
                    for e in edits
                ],
                seconds=clock.seconds["generation"],
            )
        )

        started = time.perf_counter()
        baseline = self._auditor.Score(
            auditor_pb2.ScoreRequest(context=request.context, questions=request.questions), timeout=timeout()
        )
        clock.add("scoring", started)
        yield event(baseline_scored=teacher_pb2.BaselineScored(accuracy=baseline.baseline_accuracy, outcomes=baseline.baseline_outcomes))

        candidates: list[_Candidate] = []
        for edit in edits:
            candidate = _Candidate(teacher_pb2.CandidateSummary(index=edit.index, self_edit=edit.text))
            candidates.append(candidate)
            check = self._auditor.CheckSelfEdit(
                auditor_pb2.CheckSelfEditRequest(
                    context=request.context, self_edit=edit.text, prompt=edit.prompt, seed=seed + edit.index, request_id=request_id
                ),
                timeout=timeout(),
            )
            candidate.summary.gates.extend(check.results)
            if not check.passed:
                failed = ", ".join(g.gate for g in check.results if not g.passed)
                candidate.summary.failure = f"guardrails failed before training: {failed}"
                yield event(candidate_failed=teacher_pb2.CandidateFailed(index=edit.index, reason=candidate.summary.failure, gates=check.results))
                continue
            try:
                started = time.perf_counter()
                for update in self._student.ApplySelfEdit(
                    student_pb2.ApplySelfEditRequest(
                        adapter_name=adapter_name,
                        context=request.context,
                        self_edit=edit.text,
                        overrides=request.overrides,
                        seed=seed + edit.index,
                    ),
                    timeout=timeout(),
                ):
                    if update.HasField("progress"):
                        yield event(candidate_progress=teacher_pb2.CandidateProgress(index=edit.index, training=update.progress))
                    else:
                        manifest = update.candidate
                candidate.train_seconds = clock.add("training", started)
            except grpc.RpcError as exc:
                if exc.code() not in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION):
                    raise
                candidate.summary.failure = f"training failed ({exc.code().name}): {exc.details()}"
                yield event(candidate_failed=teacher_pb2.CandidateFailed(index=edit.index, reason=candidate.summary.failure))
                continue
            candidate.summary.adapter_id = manifest.adapter_id
            candidate.summary.training_sequences = int(manifest.hyperparameters["training_sequences"])
            candidate.summary.train_seconds = candidate.train_seconds
            yield event(candidate_trained=teacher_pb2.CandidateTrained(index=edit.index, adapter=manifest, seconds=candidate.train_seconds))

            started = time.perf_counter()
            score = self._auditor.Score(
                auditor_pb2.ScoreRequest(
                    adapter_id=manifest.adapter_id,
                    context=request.context,
                    questions=request.questions,
                    self_edit=edit.text,
                    prompt=edit.prompt,
                    seed=seed + edit.index,
                    guardrails=check.results,
                    request_id=request_id,
                ),
                timeout=timeout(),
            )
            seconds = clock.add("scoring", started)
            candidate.score = score
            del candidate.summary.gates[:]
            candidate.summary.gates.extend(score.gates)
            candidate.summary.accuracy = score.adapted_accuracy
            candidate.summary.reward = score.reward
            candidate.summary.passed_gates = score.passed_gates
            candidate.summary.outcomes.extend(score.adapted_outcomes)
            yield event(
                candidate_scored=teacher_pb2.CandidateScored(
                    index=edit.index,
                    adapter_id=manifest.adapter_id,
                    accuracy=score.adapted_accuracy,
                    reward=score.reward,
                    passed_gates=score.passed_gates,
                    gates=score.gates,
                    seconds=seconds,
                )
            )

        scored = [c for c in candidates if c.score is not None]
        best_index = choose_best_candidate(scored)
        best = next((c for c in scored if c.summary.index == best_index), None)
        if best is not None:
            self._student.Promote(
                student_pb2.PromoteRequest(
                    adapter_id=best.summary.adapter_id,
                    reason=f"Adapt {request_id}: best of {k}, reward {best.summary.reward:+.3f}, all gates passed",
                ),
                timeout=timeout(),
            )
            reason = f"promoted {best.summary.adapter_id}: reward {best.summary.reward:+.3f}, every gate passed"
            self._promotions.labels(adapter_name).inc()
        else:
            reason = no_promotion_reason(candidates)
            self._rejections.labels(adapter_name).inc()
        for candidate in scored:
            if candidate is not best:
                self._student.Reject(
                    student_pb2.RejectRequest(adapter_id=candidate.summary.adapter_id, reason=f"Adapt {request_id}: {reason}"),
                    timeout=timeout(),
                )
        shown = best or max(scored, key=lambda c: c.summary.reward, default=None)
        yield event(promotion_decided=teacher_pb2.PromotionDecided(promoted=best is not None, adapter_id=best.summary.adapter_id if best else "", reason=reason))

        phase_seconds = dict(clock.seconds, total=time.perf_counter() - started_total)
        result = teacher_pb2.AdaptResult(
            request_id=request_id,
            context_id=context_digest(request.context.title, request.context.passage),
            promoted=best is not None,
            baseline_accuracy=baseline.baseline_accuracy,
            adapted_accuracy=shown.summary.accuracy if shown else baseline.baseline_accuracy,
            candidates=[c.summary for c in candidates],
            baseline_outcomes=baseline.baseline_outcomes,
            decision_reason=reason,
            phase_seconds=phase_seconds,
        )
        if shown is not None:
            result.adapter_id = shown.summary.adapter_id
            result.version = int(shown.summary.adapter_id.rsplit("@v", 1)[1])
            result.adapted_outcomes.extend(shown.summary.outcomes)
        else:
            result.adapted_outcomes.extend(baseline.baseline_outcomes)
        yield event(result=result)


def _valid_adapter_name(name: str) -> bool:
    import re

    return re.fullmatch(r"[a-z0-9][a-z0-9_-]{0,62}", name) is not None


def choose_best_candidate(scored: list[_Candidate]) -> int | None:
    """Best passing candidate by reward (``seal.gates.choose_best`` holds the rule)."""
    return choose_best([(c.summary.index, c.summary.reward, c.summary.passed_gates) for c in scored])


def no_promotion_reason(candidates: list[_Candidate]) -> str:
    if not candidates:
        return "no candidate self-edits"
    reasons = []
    for candidate in candidates:
        summary = candidate.summary
        if summary.failure:
            reasons.append(f"#{summary.index}: {summary.failure}")
        else:
            failed = "; ".join(g.reason for g in summary.gates if not g.passed) or "no gate failed"
            reasons.append(f"#{summary.index}: {failed}")
    return "nothing promoted — " + " | ".join(reasons)


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
                    self._buffer.add(_event_dict(reply.event))
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


def _event_dict(event: auditor_pb2.RewardEvent) -> dict[str, object]:
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
