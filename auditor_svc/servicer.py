"""AuditorService over gRPC: guardrails, scoring through the student's Generate (τ and the
retention probe), the promotion decision, the reward stream, the audit trail, and the scheduled
retention re-check that rolls back a promoted version which forgot too much."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence

import grpc
from google.protobuf import empty_pb2, json_format
from prometheus_client import Gauge

from seal.audit import KIND_PROMOTE, KIND_REJECT, KIND_ROLLBACK, policy_kind
from seal.auditor import (
    KIND_PROBE,  # noqa: F401 - re-exported: the kinds this service writes
    KIND_RECHECK,  # noqa: F401
    AdapterFacts,
    Auditing,
    Auditor,
    CandidateToScore,
    RecheckResult,
    RewardRecord,
    ScoredCandidate,
)
from seal.auth import SERVICE_STUDENT, SERVICE_TEACHER
from seal.config import Settings
from seal.domains.knowledge import Question
from seal.grading import build_grader
from seal.limits import (
    MAX_GATE_NAME_CHARS,
    MAX_GUARDRAIL_RESULTS,
    check_adapter_id,
    check_adapter_name,
    check_context,
    check_count,
    check_fewshot_size,
    check_id,
    check_json_size,
    check_questions,
    check_text,
    echo,
)
from seal.registry import KIND_REPAIR
from seal.rpc import (
    CONFIGURED,
    Configured,
    RpcMetrics,
    RunningService,
    current_scopes,
    dial,
    error_message,
    map_errors,
    remaining_timeout,
    start_configured_service,
    status_code_for,
    traced_channel,
)
from seal.tracing import Tracing, build_tracing
from seal.transport import convert
from seal.v1 import auditor_pb2, auditor_pb2_grpc, common_pb2, student_pb2, student_pb2_grpc

log = logging.getLogger(__name__)
# repair: a status change the student's start-up recovery made (seal.registry.KIND_REPAIR).
_STUDENT_KINDS = (KIND_PROMOTE, KIND_REJECT, KIND_ROLLBACK, KIND_REPAIR)
# The same transitions of the teacher's policy registry (seal.audit.policy_kind).
_POLICY_KINDS = tuple(policy_kind(kind) for kind in _STUDENT_KINDS)
_REPORTED_KINDS = _STUDENT_KINDS + _POLICY_KINDS


class KindNotYours(PermissionError):
    code = "permission_denied"


def reportable_kinds(scopes: frozenset[str] | None) -> tuple[str, ...]:
    """What a caller may report: the student its adapters' transitions, the teacher its policy's.
    With auth off (``scopes`` None) nobody is told apart, so every kind is accepted."""
    if scopes is None:
        return _REPORTED_KINDS
    return (_STUDENT_KINDS if SERVICE_STUDENT in scopes else ()) + (_POLICY_KINDS if SERVICE_TEACHER in scopes else ())


def record_to_proto(record: RewardRecord) -> auditor_pb2.RewardEvent:
    return auditor_pb2.RewardEvent(
        sequence=record.sequence,
        event_id=record.event_id,
        context_id=record.context_id,
        adapter_id=record.adapter_id,
        prompt=record.prompt,
        self_edit=record.self_edit,
        reward=record.reward,
        baseline_accuracy=record.baseline_accuracy,
        adapted_accuracy=record.adapted_accuracy,
        outcomes=[convert.outcome_to_proto(o) for o in record.outcomes],
        seed=record.seed,
        at=convert.timestamp(record.at),
    )


def _facts(manifest: common_pb2.AdapterManifest) -> AdapterFacts:
    metrics = json_format.MessageToDict(manifest.metrics)
    kl = metrics.get("retention_kl")
    return AdapterFacts(
        adapter_id=manifest.adapter_id,
        base_model_fingerprint=manifest.base_model_fingerprint,
        self_edit_sha256=manifest.self_edit_sha256,
        hyperparameters=json_format.MessageToDict(manifest.hyperparameters),
        retention_kl=float(kl) if isinstance(kl, (int, float)) else None,
    )


class GrpcAuditedStudent:
    """The student the auditing core asks (``seal.auditor.AuditedStudent``), over its stub.
    ``timeout`` gives the seconds left for each call: the request's deadline, capped."""

    def __init__(self, stub: student_pb2_grpc.StudentServiceStub, timeout: Callable[[], float]) -> None:
        self._stub = stub
        self._timeout = timeout

    def answer(
        self, prompts: list[str], adapter_id: str, *, max_new_tokens: int, stop_after_first_sentence: bool = False
    ) -> list[str]:
        selector = (
            student_pb2.AdapterSelector(adapter_id=adapter_id)
            if adapter_id
            else student_pb2.AdapterSelector(base_model=empty_pb2.Empty())
        )
        reply = self._stub.Generate(
            student_pb2.GenerateRequest(
                prompts=prompts, adapter=selector, max_new_tokens=max_new_tokens, temperature=0.0,
                stop_after_first_sentence=stop_after_first_sentence,
            ),
            timeout=self._timeout(),
        )
        return [completion.text for completion in reply.completions]

    def answer_mixed(
        self, prompts: list[str], adapter_ids: list[str], *, max_new_tokens: int, stop_after_first_sentence: bool = False
    ) -> list[str]:
        """One GenerateMixed; a student without it (UNIMPLEMENTED: an older one) is asked one
        Generate per version instead, with the same answers."""
        try:
            reply = self._stub.GenerateMixed(
                student_pb2.GenerateMixedRequest(
                    prompts=prompts, adapter_ids=adapter_ids, max_new_tokens=max_new_tokens, temperature=0.0,
                    stop_after_first_sentence=stop_after_first_sentence,
                ),
                timeout=self._timeout(),
            )
            return [completion.text for completion in reply.completions]
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                raise
        answers: dict[int, str] = {}
        for adapter_id in dict.fromkeys(adapter_ids):
            rows = [i for i, a in enumerate(adapter_ids) if a == adapter_id]
            answers.update(zip(rows, self.answer([prompts[i] for i in rows], adapter_id, max_new_tokens=max_new_tokens,
                                                 stop_after_first_sentence=stop_after_first_sentence), strict=True))
        return [answers[i] for i in range(len(prompts))]

    def adapter(self, adapter_id: str) -> AdapterFacts:
        reply = self._stub.GetAdapter(student_pb2.GetAdapterRequest(adapter_id=adapter_id), timeout=self._timeout())
        return _facts(reply.adapter)

    def promoted(self, adapter_name: str) -> AdapterFacts | None:
        adapters = self._stub.ListAdapters(
            student_pb2.ListAdaptersRequest(adapter_name=adapter_name, status=common_pb2.ADAPTER_STATUS_PROMOTED),
            timeout=self._timeout(),
        ).adapters
        return _facts(adapters[0]) if adapters else None

    def rollback(self, adapter_name: str, reason: str) -> str:
        reply = self._stub.Rollback(
            student_pb2.RollbackRequest(adapter_name=adapter_name, reason=reason, allow_base_model=True),
            timeout=self._timeout(),
        )
        return reply.now_serving.adapter_id if reply.HasField("now_serving") else ""


def recheck_to_proto(result: RecheckResult) -> auditor_pb2.RecheckResponse:
    response = auditor_pb2.RecheckResponse(
        adapter_id=result.adapter_id,
        floor=result.floor,
        retention_probe_size=result.probe_size,
        rollback_needed=result.rollback_needed,
        rolled_back=result.rolled_back,
        reason=result.reason,
        now_serving_adapter_id=result.now_serving_adapter_id,
        audit_sequence=result.audit_sequence,
        signals=[
            common_pb2.GateResult(gate=f"canary:{s.name}", passed=s.passed, value=s.value, threshold=s.minimum,
                                  reason=f"{s.name} {s.value:.3f} (minimum {s.minimum:.3f})")
            for s in result.signals
        ],
    )
    if result.retention_accuracy is not None:
        response.retention_accuracy = result.retention_accuracy
    if result.baseline_retention_accuracy is not None:
        response.baseline_retention_accuracy = result.baseline_retention_accuracy
    return response


class AuditorServicer(auditor_pb2_grpc.AuditorServiceServicer):
    def __init__(self, settings: Settings, student_channel: grpc.Channel, metrics: RpcMetrics) -> None:
        self._settings = settings
        self._student = student_pb2_grpc.StudentServiceStub(student_channel)
        grader = build_grader(settings.auditor)
        self._auditor = Auditor(grader, settings.gates)
        self._audit_records = metrics.counter("audit_records_total", "Records appended to the audit trail.", ("kind",))
        # The algorithm (probe, reward and audit bookkeeping, re-check) lives in the core; this
        # servicer validates, asks it, counts and translates.
        self.core = Auditing.from_settings(
            settings, self._auditor, on_append=lambda kind: self._audit_records.labels(kind).inc()
        )
        self.reward_log = self.core.reward_log
        self.audit = self.core.audit
        self._gate_failures = metrics.counter(
            "gate_failures_total",
            "Failed gates at any decision point: guardrails before training, τ/retention/guardrails after.",
            ("gate",),
        )
        self._rechecks = metrics.counter("rechecks_total", "Retention re-checks of a promoted version.", ("outcome",))
        self._auto_rollbacks = metrics.counter(
            "auto_rollbacks_total", "Promoted versions rolled back by a failed re-check.", ("adapter",)
        )
        self._retention_gauge = Gauge(
            "seal_auditor_promoted_retention_accuracy",
            "Retention probe accuracy of the promoted version at its last re-check.",
            ["adapter"],
            registry=metrics.registry,
        )
        self._rewards = metrics.histogram(
            "reward", "SEAL reward of scored candidates (adapted − baseline accuracy).",
            (-1, -0.5, -0.25, -0.1, -0.001, 0.001, 0.1, 0.25, 0.5, 1),
        )
        self._scored = metrics.counter("candidates_scored_total", "Candidates scored.", ("decision",))
        self._guardrail_failures = metrics.counter(
            "guardrail_failures_total", "Self-edits failing a guardrail rule.", ("rule",)
        )
        # Series of the label values known up front exist at 0 from the start: Prometheus'
        # increase() cannot see a counter's first event when its series appears already at 1, and
        # the alerts (automatic rollback, retention gate failures) rely on seeing it.
        self._auto_rollbacks.labels(settings.adapter_name)
        for gate in ("tau_gain", "retention", "retention_kl"):
            self._gate_failures.labels(gate)
        for decision in ("pass", "fail"):
            self._scored.labels(decision)

    def _check_candidate_text(self, request: auditor_pb2.CheckSelfEditRequest | auditor_pb2.ScoreRequest) -> None:
        """What CheckSelfEdit and Score both carry and the audit trail keeps: the self-edit, the
        prompt that produced it, the request id, and the task (a few-shot task or the context C)."""
        limits = self._settings.limits
        check_text("self_edit", request.self_edit, limits.max_self_edit_chars, "max_self_edit_chars")
        check_text("prompt", request.prompt, limits.max_prompt_chars, "max_prompt_chars")
        check_id("request_id", request.request_id)
        if not request.HasField("fewshot"):
            check_context(request.context.title, request.context.passage, limits, require_passage=False)

    def _check_guardrails(self, guardrails: Sequence[common_pb2.GateResult], field: str = "guardrails") -> None:
        limits = self._settings.limits
        check_count(field, len(guardrails), MAX_GUARDRAIL_RESULTS)
        for index, gate in enumerate(guardrails):
            check_text(f"{field}[{index}].gate", gate.gate, MAX_GATE_NAME_CHARS)
            check_text(f"{field}[{index}].reason", gate.reason, limits.max_reason_chars, "max_reason_chars")

    def _candidates_to_score(self, request: auditor_pb2.ScoreManyRequest) -> list[CandidateToScore]:
        """ScoreMany's candidates, each bounded as a Score request is; one that breaks a limit
        refuses the whole call (INVALID_ARGUMENT), before anything is asked or recorded."""
        limits = self._settings.limits
        max_k = self._settings.teacher.max_k
        if not request.candidates:
            raise ValueError("candidates is empty: send at least one trained candidate to score")
        if len(request.candidates) > max_k:
            raise ValueError(
                f"candidates has {len(request.candidates)} entries, above the limit of {max_k}; "
                "send fewer or raise teacher.max_k"
            )
        seen: set[str] = set()
        candidates = []
        for index, candidate in enumerate(request.candidates):
            field = f"candidates[{index}]"
            if not candidate.adapter_id:
                raise ValueError(f"{field}.adapter_id is empty: ScoreMany scores candidates (Score scores the base model)")
            check_adapter_id(candidate.adapter_id, f"{field}.adapter_id")
            if candidate.adapter_id in seen:
                raise ValueError(f"{field}.adapter_id {candidate.adapter_id!r} is named twice: score each candidate once")
            seen.add(candidate.adapter_id)
            check_text(f"{field}.self_edit", candidate.self_edit, limits.max_self_edit_chars, "max_self_edit_chars")
            check_text(f"{field}.prompt", candidate.prompt, limits.max_prompt_chars, "max_prompt_chars")
            self._check_guardrails(candidate.guardrails, f"{field}.guardrails")
            candidates.append(CandidateToScore(
                adapter_id=candidate.adapter_id,
                guardrails=[convert.guardrail_from_proto(g) for g in candidate.guardrails],
                prompt=candidate.prompt,
                self_edit=candidate.self_edit,
                seed=candidate.seed,
            ))
        return candidates

    def _student_for(self, context: grpc.ServicerContext) -> GrpcAuditedStudent:
        ceiling = self._settings.services.rpc_timeout_s
        return GrpcAuditedStudent(self._student, lambda: remaining_timeout(context, ceiling))

    @map_errors
    def CheckSelfEdit(self, request: auditor_pb2.CheckSelfEditRequest, context: grpc.ServicerContext) -> auditor_pb2.CheckSelfEditResponse:
        self._check_candidate_text(request)
        fewshot = convert.fewshot_field(request)
        if fewshot is not None:
            task = convert.fewshot_from_proto(fewshot)
            check_fewshot_size(task, self._settings.limits)
            verdict = self.core.check_recipe(
                task, request.self_edit,
                prompt=request.prompt, seed=request.seed, request_id=request.request_id,
            )
        else:
            verdict = self.core.check_self_edit(
                request.context.title, request.context.passage, request.self_edit,
                prompt=request.prompt, seed=request.seed, request_id=request.request_id,
            )
        for rule in verdict.failed_rules:
            self._guardrail_failures.labels(rule).inc()
            self._gate_failures.labels(f"guardrail:{rule}").inc()
        return auditor_pb2.CheckSelfEditResponse(
            passed=verdict.passed,
            results=[convert.guardrail_to_proto(r) for r in verdict.results],
            audit_sequence=verdict.audit_sequence,
        )

    @map_errors
    def Score(self, request: auditor_pb2.ScoreRequest, context: grpc.ServicerContext) -> auditor_pb2.ScoreResponse:
        limits = self._settings.limits
        self._check_candidate_text(request)
        if request.adapter_id:
            check_adapter_id(request.adapter_id)
        self._check_guardrails(request.guardrails)
        fewshot = convert.fewshot_field(request)
        if fewshot is not None:
            task = convert.fewshot_from_proto(fewshot)
            check_fewshot_size(task, limits)
            scored = self.core.score_fewshot(
                self._student_for(context),
                adapter_id=request.adapter_id,
                task=task,
                guardrails=[convert.guardrail_from_proto(g) for g in request.guardrails],
                prompt=request.prompt,
                self_edit=request.self_edit,
                seed=request.seed,
                request_id=request.request_id,
            )
            return self._score_response(scored, request)
        questions = [Question(q.question, q.answer) for q in request.questions]
        check_questions(questions, limits)
        scored = self.core.score(
            self._student_for(context),
            adapter_id=request.adapter_id,
            questions=questions,
            title=request.context.title,
            passage=request.context.passage,
            guardrails=[convert.guardrail_from_proto(g) for g in request.guardrails],
            prompt=request.prompt,
            self_edit=request.self_edit,
            seed=request.seed,
            request_id=request.request_id,
            measure_retention=not request.skip_retention,
        )
        return self._score_response(scored, request)

    @map_errors
    def ScoreMany(self, request: auditor_pb2.ScoreManyRequest, context: grpc.ServicerContext) -> auditor_pb2.ScoreManyResponse:
        limits = self._settings.limits
        check_id("request_id", request.request_id)
        candidates = self._candidates_to_score(request)
        fewshot = convert.fewshot_field(request)
        if fewshot is not None:
            task = convert.fewshot_from_proto(fewshot)
            check_fewshot_size(task, limits)
            results = self.core.score_many_fewshot(
                self._student_for(context), candidates=candidates, task=task, request_id=request.request_id
            )
        else:
            check_context(request.context.title, request.context.passage, limits, require_passage=False)
            questions = [Question(q.question, q.answer) for q in request.questions]
            check_questions(questions, limits)
            results = self.core.score_many(
                self._student_for(context),
                candidates=candidates,
                questions=questions,
                title=request.context.title,
                passage=request.context.passage,
                request_id=request.request_id,
                measure_retention=not request.skip_retention,
            )
        response = auditor_pb2.ScoreManyResponse()
        for index, result in enumerate(results):
            if isinstance(result, ScoredCandidate):
                response.results.add(score=self._score_response(result, scored_adapter=True))
                continue
            code = status_code_for(result)
            if code is grpc.StatusCode.INTERNAL:
                log.error("scoring candidate %d (%s) failed", index, candidates[index].adapter_id, exc_info=result)
            response.results.add(failed=auditor_pb2.ScoreManyResponse.Failed(
                index=index, code=code.name.lower(), message=error_message(result),
            ))
        return response

    def _score_response(self, scored: ScoredCandidate, request: auditor_pb2.ScoreRequest | None = None, *,
                        scored_adapter: bool = False) -> auditor_pb2.ScoreResponse:
        report = scored.report
        response = auditor_pb2.ScoreResponse(
            baseline_accuracy=report.baseline_accuracy,
            adapted_accuracy=report.adapted_accuracy,
            reward=report.reward,
            baseline_outcomes=[convert.outcome_to_proto(o) for o in report.baseline_outcomes],
            adapted_outcomes=[convert.outcome_to_proto(o) for o in report.adapted_outcomes],
            gates=[convert.gate_to_proto(g) for g in report.decision.gates],
            passed_gates=report.decision.promote,
            retention_probe_size=scored.probe_size,
            retention_outcomes=[convert.outcome_to_proto(o) for o in report.retention_outcomes],
            reward_sequence=scored.reward_sequence,
            audit_sequence=scored.audit_sequence,
        )
        if report.retention_accuracy is not None:
            response.retention_accuracy = report.retention_accuracy
        if report.baseline_retention_accuracy is not None:
            response.baseline_retention_accuracy = report.baseline_retention_accuracy
        if scored_adapter or (request is not None and request.adapter_id):  # a baseline alone is no candidate
            self._rewards.observe(report.reward)
            self._scored.labels("pass" if report.decision.promote else "fail").inc()
            for gate in report.decision.failed:
                self._gate_failures.labels(gate.gate).inc()
        return response

    @map_errors
    def RecordEvent(self, request: auditor_pb2.RecordEventRequest, context: grpc.ServicerContext) -> auditor_pb2.RecordEventResponse:
        # Everything here is written to the append-only audit log for good: each field is bounded.
        limits = self._settings.limits
        if request.kind not in _REPORTED_KINDS:
            raise ValueError(f"kind {echo(request.kind)} cannot be reported; use one of {', '.join(_REPORTED_KINDS)}")
        if request.kind not in (allowed := reportable_kinds(current_scopes())):
            raise KindNotYours(
                f"kind {request.kind!r} is not this caller's to report: it may report {', '.join(allowed)} "
                "(the student reports its adapters' transitions, the teacher its policy's)"
            )
        if not request.event_id:
            raise ValueError("event_id is required: it makes retried deliveries idempotent")
        check_id("event_id", request.event_id)
        check_id("source", request.source)
        if not request.adapter_id:
            raise ValueError("adapter_id is required: say which version changed status")
        check_adapter_id(request.adapter_id)
        if not request.cause.strip():
            raise ValueError("cause is required: every promote/reject/rollback is recorded with why it happened")
        check_text("cause", request.cause, limits.max_reason_chars, "max_reason_chars")
        details = check_json_size(
            "details", json_format.MessageToDict(request.details), limits.max_event_details_bytes,
            "max_event_details_bytes",
        )
        sequence, duplicate = self.core.record_event(
            event_id=request.event_id,
            kind=request.kind,
            adapter_id=request.adapter_id,
            cause=request.cause,
            details=details,
            source=request.source,
            reported_at=request.at.ToJsonString() if request.HasField("at") else "",
        )
        return auditor_pb2.RecordEventResponse(sequence=sequence, duplicate=duplicate)

    def recheck(self, adapter_name: str, *, dry_run: bool, timeout: Callable[[], float]) -> auditor_pb2.RecheckResponse:
        """Run the core's re-check against the student over gRPC and count its outcome."""
        result = self.core.recheck(GrpcAuditedStudent(self._student, timeout), adapter_name, dry_run=dry_run)
        self._rechecks.labels(result.outcome).inc()
        if result.retention_accuracy is not None:
            self._retention_gauge.labels(adapter_name).set(result.retention_accuracy)
        if result.rolled_back:
            self._auto_rollbacks.labels(adapter_name).inc()
        return recheck_to_proto(result)

    @map_errors
    def Recheck(self, request: auditor_pb2.RecheckRequest, context: grpc.ServicerContext) -> auditor_pb2.RecheckResponse:
        ceiling = self._settings.services.rpc_timeout_s
        return self.recheck(
            check_adapter_name(request.adapter_name or self._settings.adapter_name),
            dry_run=request.dry_run,
            timeout=lambda: remaining_timeout(context, ceiling),
        )

    def SubscribeRewards(self, request: auditor_pb2.SubscribeRewardsRequest, context: grpc.ServicerContext) -> Iterator[auditor_pb2.SubscribeRewardsResponse]:
        for record in self.reward_log.follow(request.after_sequence, context.is_active):
            yield auditor_pb2.SubscribeRewardsResponse(event=record_to_proto(record))


def serve_auditor(
    settings: Settings, *, port: int | Configured = CONFIGURED, metrics_port: int | Configured | None = CONFIGURED,
    tracing: Tracing | None = None,
) -> RunningService:
    """``tracing``: this service's spans (tests pass one with an in-memory exporter); None = as
    ``settings.tracing`` says."""
    services = settings.services
    tracing = tracing if tracing is not None else build_tracing("auditor", settings.tracing)
    # The auditor's own identity (auth.auditor_token_file and/or its client certificate).
    student_channel = dial(services.address_of("student"), settings.auth, identity="auditor")
    metrics = RpcMetrics("auditor")
    # Traced: scoring's Generate calls to the student join the trace of the Score that made them.
    servicer = AuditorServicer(settings, traced_channel(student_channel, tracing), metrics)

    def register(server: grpc.Server) -> list[str]:
        auditor_pb2_grpc.add_AuditorServiceServicer_to_server(servicer, server)
        return [auditor_pb2.DESCRIPTOR.services_by_name["AuditorService"].full_name]

    # SubscribeRewards is the teacher's standing subscription, not part of any request's trace.
    running = start_configured_service(
        "auditor", register, services, metrics, auth=settings.auth, port=port, metrics_port=metrics_port,
        tracing=tracing, untraced_methods=("SubscribeRewards",),
    )
    stop_rechecks = threading.Event()
    interval = settings.retention.recheck_interval_s
    if interval > 0:

        def recheck_loop() -> None:
            while not stop_rechecks.wait(interval):
                try:
                    servicer.recheck(settings.adapter_name, dry_run=False, timeout=lambda: services.rpc_timeout_s)
                except Exception:  # noqa: BLE001 - a failed check is retried at the next interval
                    log.exception("scheduled retention re-check failed")

        threading.Thread(target=recheck_loop, name="auditor-recheck", daemon=True).start()
    running.on_stop.extend([stop_rechecks.set, servicer.core.close, student_channel.close])
    return running
