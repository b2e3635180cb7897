"""AuditorService over gRPC: guardrails, scoring through the student's Generate, reward stream."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from datetime import datetime

import grpc
from google.protobuf import empty_pb2, timestamp_pb2

from seal.auditor import Auditor, QuestionOutcome, RewardLog, RewardRecord
from seal.config import Settings
from seal.domains.knowledge import LexicalGrader, Question, context_digest
from seal.gates import GateResult
from seal.guardrails import GuardrailResult, check_self_edit
from seal.rpc import RpcMetrics, RunningService, map_errors, remaining_timeout, start_service
from seal.v1 import auditor_pb2, auditor_pb2_grpc, common_pb2, student_pb2, student_pb2_grpc


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

    def __call__(self, prompts: list[str], adapter_id: str, timeout: float) -> list[str]:
        selector = (
            student_pb2.AdapterSelector(adapter_id=adapter_id)
            if adapter_id
            else student_pb2.AdapterSelector(base_model=empty_pb2.Empty())
        )
        reply = self._stub.Generate(
            student_pb2.GenerateRequest(
                prompts=prompts,
                adapter=selector,
                max_new_tokens=self._settings.auditor.answer_max_new_tokens,
                temperature=0.0,
            ),
            timeout=timeout,
        )
        return [completion.text for completion in reply.completions]


class AuditorServicer(auditor_pb2_grpc.AuditorServiceServicer):
    def __init__(self, settings: Settings, student_channel: grpc.Channel, metrics: RpcMetrics) -> None:
        self._settings = settings
        self._answers = StudentAnswers(student_channel, settings)
        grader = LexicalGrader(mode=settings.auditor.grader, f1_threshold=settings.auditor.f1_threshold)
        self._auditor = Auditor(grader, settings.gates)
        self.reward_log = RewardLog(settings.home / "auditor" / "rewards.jsonl")
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

    @map_errors
    def CheckSelfEdit(self, request: auditor_pb2.CheckSelfEditRequest, context: grpc.ServicerContext) -> auditor_pb2.CheckSelfEditResponse:
        results = self.guardrails(request.context, request.self_edit)
        return auditor_pb2.CheckSelfEditResponse(
            passed=all(r.passed for r in results), results=[guardrail_to_proto(r) for r in results]
        )

    @map_errors
    def Score(self, request: auditor_pb2.ScoreRequest, context: grpc.ServicerContext) -> auditor_pb2.ScoreResponse:
        if not request.questions:
            raise ValueError("no questions: scoring needs τ, at least one question with its gold answer")
        questions: Sequence[Question] = [Question(q.question, q.answer) for q in request.questions]
        guardrails = [guardrail_from_proto(g) for g in request.guardrails]
        ceiling = self._settings.services.rpc_timeout_s

        def answer(prompts: list[str], adapter_id: str) -> list[str]:
            return self._answers(prompts, adapter_id, timeout=remaining_timeout(context, ceiling))

        report = self._auditor.score(answer, request.adapter_id, questions, guardrails)
        response = auditor_pb2.ScoreResponse(
            baseline_accuracy=report.baseline_accuracy,
            adapted_accuracy=report.adapted_accuracy,
            reward=report.reward,
            baseline_outcomes=[outcome_to_proto(o) for o in report.baseline_outcomes],
            adapted_outcomes=[outcome_to_proto(o) for o in report.adapted_outcomes],
            gates=[gate_to_proto(g) for g in report.decision.gates],
            passed_gates=report.decision.promote,
        )
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
        return response

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

    running = start_service(
        "auditor",
        register,
        host=services.host,
        port=services.auditor_port if port is None else port,
        metrics=metrics,
        metrics_port=services.auditor_metrics_port if metrics_port is None else metrics_port,
        max_workers=services.max_workers,
        max_concurrent_rpcs=services.max_concurrent_rpcs,
    )
    running.on_stop.extend([servicer.reward_log.close, student_channel.close])
    return running
