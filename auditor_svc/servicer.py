"""AuditorService over gRPC: guardrails, scoring through the student's Generate (τ and the
retention probe), the promotion decision, the reward stream, the audit trail, and the scheduled
retention re-check that rolls back a promoted version which forgot too much."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from pathlib import Path

import grpc
from google.protobuf import empty_pb2, json_format, timestamp_pb2
from prometheus_client import Gauge

from seal.audit import (
    KIND_CANDIDATE,
    KIND_PROMOTE,
    KIND_REJECT,
    KIND_ROLLBACK,
    PAYLOAD_VERSION,
    AuditLog,
    candidate_payload,
    cause_payload,
)
from seal.auditor import Auditor, QuestionOutcome, RewardLog, RewardRecord
from seal.config import Settings
from seal.domains.knowledge import LexicalGrader, Question, context_digest
from seal.gates import GateResult
from seal.guardrails import GuardrailResult, check_self_edit
from seal.retention import (
    CanarySignal,
    ProbeStore,
    RetentionProbe,
    candidate_questions,
    check_fingerprint,
    load_explicit_probe,
    recheck_verdict,
)
from seal.rpc import RpcMetrics, RunningService, map_errors, remaining_timeout, start_configured_service
from seal.student import self_edit_digest
from seal.v1 import auditor_pb2, auditor_pb2_grpc, common_pb2, student_pb2, student_pb2_grpc

log = logging.getLogger(__name__)
KIND_RECHECK = "recheck"
KIND_PROBE = "retention_probe"
_REPORTED_KINDS = (KIND_PROMOTE, KIND_REJECT, KIND_ROLLBACK)


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


def gate_to_proto(gate: GateResult) -> common_pb2.GateResult:
    message = common_pb2.GateResult(gate=gate.gate, passed=gate.passed, reason=gate.reason)
    if gate.value is not None:
        message.value = gate.value
    if gate.threshold is not None:
        message.threshold = gate.threshold
    return message


def guardrail_to_proto(result: GuardrailResult) -> common_pb2.GateResult:
    return common_pb2.GateResult(gate=f"guardrail:{result.rule}", passed=result.passed, reason=result.detail)


def guardrail_from_proto(message: common_pb2.GateResult) -> GuardrailResult:
    return GuardrailResult(rule=message.gate.removeprefix("guardrail:"), passed=message.passed, detail=message.reason)


def record_to_proto(record: RewardRecord) -> auditor_pb2.RewardEvent:
    at = timestamp_pb2.Timestamp()
    at.FromDatetime(datetime.fromisoformat(record.at))
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
        outcomes=[outcome_to_proto(o) for o in record.outcomes],
        seed=record.seed,
        at=at,
    )


class StudentAnswers:
    """Ask the student, closed book, through its Generate RPC."""

    def __init__(self, channel: grpc.Channel, settings: Settings) -> None:
        self._stub = student_pb2_grpc.StudentServiceStub(channel)
        self._settings = settings

    def __call__(self, prompts: list[str], adapter_id: str, timeout: float, max_new_tokens: int | None = None) -> list[str]:
        selector = (
            student_pb2.AdapterSelector(adapter_id=adapter_id)
            if adapter_id
            else student_pb2.AdapterSelector(base_model=empty_pb2.Empty())
        )
        reply = self._stub.Generate(
            student_pb2.GenerateRequest(
                prompts=prompts,
                adapter=selector,
                max_new_tokens=max_new_tokens or self._settings.auditor.answer_max_new_tokens,
                temperature=0.0,
            ),
            timeout=timeout,
        )
        return [completion.text for completion in reply.completions]


def _optional(value: float | None) -> dict[str, float]:
    return {} if value is None else {"value": value}


class AuditorServicer(auditor_pb2_grpc.AuditorServiceServicer):
    def __init__(self, settings: Settings, student_channel: grpc.Channel, metrics: RpcMetrics) -> None:
        self._settings = settings
        self._answers = StudentAnswers(student_channel, settings)
        self._student = student_pb2_grpc.StudentServiceStub(student_channel)
        grader = LexicalGrader(mode=settings.auditor.grader, f1_threshold=settings.auditor.f1_threshold)
        self._auditor = Auditor(grader, settings.gates)
        self.reward_log = RewardLog(settings.home / "auditor" / "rewards.jsonl")
        self.audit = AuditLog(settings.audit_log_path)
        self._probe_store = ProbeStore(settings.home / "auditor" / "retention")
        self._probes: dict[str, RetentionProbe] = {}
        self._probe_lock = threading.Lock()
        self._record_lock = threading.Lock()
        # Hook for live serving signals (the Triton canary): adapter_id → signals with minimums.
        # They join the retention probe in every re-check's rollback verdict.
        self.canary_signals: Callable[[str], Sequence[CanarySignal]] = lambda adapter_id: ()
        self._gate_failures = metrics.counter(
            "gate_failures_total",
            "Failed gates at any decision point: guardrails before training, τ/retention/guardrails after.",
            ("gate",),
        )
        self._audit_records = metrics.counter("audit_records_total", "Records appended to the audit trail.", ("kind",))
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

    def guardrails(self, context: common_pb2.Context, self_edit: str) -> list[GuardrailResult]:
        results = check_self_edit(self_edit, f"{context.title}\n{context.passage}", self._settings.guardrails)
        for result in results:
            if not result.passed:
                self._guardrail_failures.labels(result.rule).inc()
        return results

    def _append(self, kind: str, adapter_id: str | None, payload: dict) -> int:
        record = self.audit.append(kind, adapter_id, payload)
        self._audit_records.labels(kind).inc()
        return record.seq

    @map_errors
    def CheckSelfEdit(self, request: auditor_pb2.CheckSelfEditRequest, context: grpc.ServicerContext) -> auditor_pb2.CheckSelfEditResponse:
        results = self.guardrails(request.context, request.self_edit)
        response = auditor_pb2.CheckSelfEditResponse(
            passed=all(r.passed for r in results), results=[guardrail_to_proto(r) for r in results]
        )
        if not response.passed:
            failed = [r.rule for r in results if not r.passed]
            for rule in failed:
                self._gate_failures.labels(f"guardrail:{rule}").inc()
            # A refused self-edit never becomes an adapter, so this is its only trace.
            response.audit_sequence = self._append(
                KIND_REJECT,
                None,
                cause_payload(
                    f"guardrails failed before training: {', '.join(failed)}",
                    stage="guardrails",
                    failed_rules=failed,
                    context_digest=context_digest(request.context.title, request.context.passage),
                    prompt=request.prompt,
                    self_edit=request.self_edit,
                    seed=request.seed,
                    request_id=request.request_id,
                    gates=[r.to_dict() for r in results],
                ),
            )
        return response

    # --- retention probe -----------------------------------------------------------------------

    def _probe_answers(self, ceiling: Callable[[], float]) -> Callable[[list[str], str], list[str]]:
        tokens = self._settings.retention.max_new_tokens

        def answer(prompts: list[str], adapter_id: str) -> list[str]:
            return self._answers(prompts, adapter_id, timeout=ceiling(), max_new_tokens=tokens)

        return answer

    def probe_for(self, fingerprint: str, answer: Callable[[list[str], str], list[str]]) -> RetentionProbe | None:
        """The retention probe of this base model: cached, else loaded from disk, else built now
        (once per fingerprint; the build asks the base model up to max_candidates questions)."""
        settings = self._settings.retention
        if not settings.enabled:
            return None
        try:
            check_fingerprint(fingerprint)
        except ValueError:
            log.warning("no retention probe: the adapter's base model fingerprint %r is unusable", fingerprint)
            return None
        with self._probe_lock:
            probe = self._probes.get(fingerprint)
            if probe is not None:
                return probe
            if settings.probe_file:
                probe = load_explicit_probe(settings.probe_file, fingerprint)
            else:
                probe = self._probe_store.load(fingerprint)
            if probe is None:
                candidates, notes = candidate_questions(settings, base_dir=Path.cwd())
                probe = self._auditor.build_probe(answer, fingerprint, candidates, size=settings.probe_size, notes=notes)
                path = self._probe_store.save(probe)
                log.info("retention probe for %s: %d of %d screened questions kept (%s) → %s",
                         fingerprint[:12], len(probe), probe.screened, notes, path)
                self._append(KIND_PROBE, None, {
                    "payload_version": PAYLOAD_VERSION, "fingerprint": fingerprint, "probe_id": probe.probe_id,
                    "size": len(probe), "screened": probe.screened, "notes": notes, "path": str(path),
                })
            if not probe.questions:
                log.warning("the retention probe of %s is empty: retention will be reported as not measured", fingerprint[:12])
            self._probes[fingerprint] = probe
            return probe

    @map_errors
    def Score(self, request: auditor_pb2.ScoreRequest, context: grpc.ServicerContext) -> auditor_pb2.ScoreResponse:
        if not request.questions:
            raise ValueError("no questions: scoring needs τ, at least one question with its gold answer")
        questions: Sequence[Question] = [Question(q.question, q.answer) for q in request.questions]
        guardrails = [guardrail_from_proto(g) for g in request.guardrails]
        ceiling = self._settings.services.rpc_timeout_s

        def answer(prompts: list[str], adapter_id: str) -> list[str]:
            return self._answers(prompts, adapter_id, timeout=remaining_timeout(context, ceiling))

        manifest = None
        probe = None
        probe_answer = self._probe_answers(lambda: remaining_timeout(context, ceiling))
        if request.adapter_id:
            manifest = self._student.GetAdapter(
                student_pb2.GetAdapterRequest(adapter_id=request.adapter_id), timeout=remaining_timeout(context, ceiling)
            ).adapter
            if not request.skip_retention:
                probe = self.probe_for(manifest.base_model_fingerprint, probe_answer)
        report = self._auditor.score(
            answer, request.adapter_id, questions, guardrails, probe=probe, probe_answer=probe_answer
        )
        response = auditor_pb2.ScoreResponse(
            baseline_accuracy=report.baseline_accuracy,
            adapted_accuracy=report.adapted_accuracy,
            reward=report.reward,
            baseline_outcomes=[outcome_to_proto(o) for o in report.baseline_outcomes],
            adapted_outcomes=[outcome_to_proto(o) for o in report.adapted_outcomes],
            gates=[gate_to_proto(g) for g in report.decision.gates],
            passed_gates=report.decision.promote,
            retention_probe_size=len(probe) if probe is not None else 0,
            retention_outcomes=[outcome_to_proto(o) for o in report.retention_outcomes],
        )
        if report.retention_accuracy is not None:
            response.retention_accuracy = report.retention_accuracy
        if report.baseline_retention_accuracy is not None:
            response.baseline_retention_accuracy = report.baseline_retention_accuracy
        if request.adapter_id:
            record = self.reward_log.append(
                context_id=context_digest(request.context.title, request.context.passage),
                adapter_id=request.adapter_id,
                prompt=request.prompt,
                self_edit=request.self_edit,
                reward=report.reward,
                baseline_accuracy=report.baseline_accuracy,
                adapted_accuracy=report.adapted_accuracy,
                outcomes=report.adapted_outcomes,
                seed=request.seed,
            )
            response.reward_sequence = record.sequence
            self._rewards.observe(report.reward)
            self._scored.labels("pass" if report.decision.promote else "fail").inc()
            for gate in report.decision.failed:
                self._gate_failures.labels(gate.gate).inc()
            assert manifest is not None and report.scores is not None
            payload = candidate_payload(
                context_digest=context_digest(request.context.title, request.context.passage),
                prompt=request.prompt,
                self_edit=request.self_edit,
                hyperparameters=json_format.MessageToDict(manifest.hyperparameters),
                seed=request.seed,
                scores=report.scores,
                decision=report.decision,
            )
            payload.update(
                request_id=request.request_id,
                reward=report.reward,
                reward_sequence=record.sequence,
                base_model_fingerprint=manifest.base_model_fingerprint,
                retention_probe_id=report.probe_id,
                retention_probe_size=len(probe) if probe is not None else 0,
                self_edit_sha256=self_edit_digest(request.self_edit),
                # The adapter must have been trained on the text being scored; a mismatch is
                # kept on record rather than refused, since scoring itself is still valid.
                self_edit_matches_manifest=manifest.self_edit_sha256 == self_edit_digest(request.self_edit),
            )
            response.audit_sequence = self._append(KIND_CANDIDATE, request.adapter_id, payload)
        return response

    @map_errors
    def RecordEvent(self, request: auditor_pb2.RecordEventRequest, context: grpc.ServicerContext) -> auditor_pb2.RecordEventResponse:
        if request.kind not in _REPORTED_KINDS:
            raise ValueError(f"kind {request.kind!r} cannot be reported; use one of {', '.join(_REPORTED_KINDS)}")
        if not request.event_id or len(request.event_id) > 128:
            raise ValueError("event_id is required (at most 128 characters): it makes retried deliveries idempotent")
        if not request.adapter_id:
            raise ValueError("adapter_id is required: say which version changed status")
        if not request.cause.strip():
            raise ValueError("cause is required: every promote/reject/rollback is recorded with why it happened")
        details = json_format.MessageToDict(request.details)
        with self._record_lock:
            for existing in self.audit.records(kind=request.kind, adapter_id=request.adapter_id):
                if existing.payload.get("event_id") == request.event_id:
                    return auditor_pb2.RecordEventResponse(sequence=existing.seq, duplicate=True)
            sequence = self._append(
                request.kind,
                request.adapter_id,
                cause_payload(
                    request.cause,
                    event_id=request.event_id,
                    source=request.source or "unknown",
                    reported_at=request.at.ToJsonString() if request.HasField("at") else "",
                    **{k: v for k, v in details.items() if k not in ("cause", "payload_version", "event_id", "source", "reported_at")},
                ),
            )
        return auditor_pb2.RecordEventResponse(sequence=sequence)

    # --- re-check ------------------------------------------------------------------------------

    def recheck(self, adapter_name: str, *, dry_run: bool, timeout: Callable[[], float]) -> auditor_pb2.RecheckResponse:
        """Measure the promoted version on the retention probe and roll it back on a failed verdict."""
        floor = self._settings.retention.recheck_floor
        promoted = self._student.ListAdapters(
            student_pb2.ListAdaptersRequest(adapter_name=adapter_name, status=common_pb2.ADAPTER_STATUS_PROMOTED),
            timeout=timeout(),
        ).adapters
        if not promoted:
            self._rechecks.labels("nothing_promoted").inc()
            return auditor_pb2.RecheckResponse(floor=floor, reason=f"nothing is promoted in lineage {adapter_name!r}")
        manifest = promoted[0]
        answer = self._probe_answers(timeout)
        probe = self.probe_for(manifest.base_model_fingerprint, answer)
        accuracy = baseline = None
        if probe is not None:
            accuracy, baseline, _ = self._auditor.retention(answer, probe, manifest.adapter_id)
        signals = list(self.canary_signals(manifest.adapter_id))
        verdict = recheck_verdict(accuracy, baseline, floor, signals)
        if accuracy is not None:
            self._retention_gauge.labels(adapter_name).set(accuracy)
        response = auditor_pb2.RecheckResponse(
            adapter_id=manifest.adapter_id,
            floor=floor,
            retention_probe_size=len(probe) if probe is not None else 0,
            rollback_needed=verdict.rollback,
            reason=verdict.reason,
            now_serving_adapter_id=manifest.adapter_id,
            signals=[
                common_pb2.GateResult(gate=f"canary:{s.name}", passed=s.passed, value=s.value, threshold=s.minimum,
                                      reason=f"{s.name} {s.value:.3f} (minimum {s.minimum:.3f})")
                for s in signals
            ],
            **({"retention_accuracy": accuracy} if accuracy is not None else {}),
            **({"baseline_retention_accuracy": baseline} if baseline is not None else {}),
        )
        # Recorded before acting, so the rollback record that follows can point at it.
        response.audit_sequence = self._append(KIND_RECHECK, manifest.adapter_id, {
            "payload_version": PAYLOAD_VERSION,
            "retention_accuracy": accuracy,
            "baseline_retention_accuracy": baseline,
            "floor": floor,
            "retention_probe_id": probe.probe_id if probe is not None else "",
            "retention_probe_size": len(probe) if probe is not None else 0,
            "signals": [{"name": s.name, "value": s.value, "minimum": s.minimum} for s in signals],
            "rollback_needed": verdict.rollback,
            "dry_run": dry_run,
            "reason": verdict.reason,
        })
        if not verdict.rollback:
            self._rechecks.labels("ok" if accuracy is not None else "not_measured").inc()
            return response
        if dry_run:
            self._rechecks.labels("rollback_needed_dry_run").inc()
            return response
        # Narrows (does not close) the window in which a newer promotion could be rolled back
        # instead of the version just measured; the student's Rollback takes no expected version.
        current = self._student.ListAdapters(
            student_pb2.ListAdaptersRequest(adapter_name=adapter_name, status=common_pb2.ADAPTER_STATUS_PROMOTED),
            timeout=timeout(),
        ).adapters
        if not current or current[0].adapter_id != manifest.adapter_id:
            self._rechecks.labels("superseded").inc()
            response.reason += "; not rolled back: the promoted version changed during the check"
            return response
        reply = self._student.Rollback(
            student_pb2.RollbackRequest(
                adapter_name=adapter_name,
                reason=f"automatic rollback by the auditor's retention re-check (audit #{response.audit_sequence}): {verdict.reason}",
                allow_base_model=True,
            ),
            timeout=timeout(),
        )
        response.rolled_back = True
        response.now_serving_adapter_id = reply.now_serving.adapter_id if reply.HasField("now_serving") else ""
        self._rechecks.labels("rolled_back").inc()
        self._auto_rollbacks.labels(adapter_name).inc()
        log.warning("rolled back %s: %s", manifest.adapter_id, verdict.reason)
        return response

    @map_errors
    def Recheck(self, request: auditor_pb2.RecheckRequest, context: grpc.ServicerContext) -> auditor_pb2.RecheckResponse:
        ceiling = self._settings.services.rpc_timeout_s
        return self.recheck(
            request.adapter_name or self._settings.adapter_name,
            dry_run=request.dry_run,
            timeout=lambda: remaining_timeout(context, ceiling),
        )

    def SubscribeRewards(self, request: auditor_pb2.SubscribeRewardsRequest, context: grpc.ServicerContext) -> Iterator[auditor_pb2.SubscribeRewardsResponse]:
        for record in self.reward_log.follow(request.after_sequence, context.is_active):
            yield auditor_pb2.SubscribeRewardsResponse(event=record_to_proto(record))


def serve_auditor(settings: Settings, *, port: int | None = None, metrics_port: int | None = None) -> RunningService:
    services = settings.services
    student_channel = grpc.insecure_channel(services.address_of("student"))
    metrics = RpcMetrics("auditor")
    servicer = AuditorServicer(settings, student_channel, metrics)

    def register(server: grpc.Server) -> list[str]:
        auditor_pb2_grpc.add_AuditorServiceServicer_to_server(servicer, server)
        return [auditor_pb2.DESCRIPTOR.services_by_name["AuditorService"].full_name]

    running = start_configured_service("auditor", register, services, metrics, port=port, metrics_port=metrics_port)
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
    running.on_stop.extend([stop_rechecks.set, servicer.reward_log.close, servicer.audit.close, student_channel.close])
    return running
