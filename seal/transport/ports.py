"""The SEAL pipeline's ports (``seal.adapt.StudentPort`` / ``AuditorPort``) over gRPC.

Each method sends one RPC and maps the reply; the one judgement made here is which status codes
mean "this self-edit is unusable" (:class:`seal.adapt.CandidateRefused`): INVALID_ARGUMENT and
FAILED_PRECONDITION from training. Every other error propagates and ends the step.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import grpc
from google.protobuf import empty_pb2

from seal import adapt
from seal.executors import CandidateTrainingFailed
from seal.transport import convert
from seal.v1 import auditor_pb2, auditor_pb2_grpc, common_pb2, student_pb2, student_pb2_grpc

Timeout = Callable[[], float]  # seconds left for the next call (the caller's deadline, capped)
_REFUSALS = (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
# A Score that fails with these blames its candidate alone (ScoreMany's Failed codes, by name).
_SCORING_REFUSALS = (*_REFUSALS, grpc.StatusCode.NOT_FOUND)


def _context(task: adapt.Task) -> common_pb2.Context:
    return common_pb2.Context(title=task.title, passage=task.passage)


def _fewshot(task: adapt.Task) -> common_pb2.FewShotTask | None:
    """The few-shot task a request carries (None leaves the field unset: the knowledge domain)."""
    return convert.fewshot_to_proto(task.fewshot) if task.fewshot is not None else None


def _trained(manifest: common_pb2.AdapterManifest) -> adapt.TrainedAdapter:
    return adapt.TrainedAdapter(
        adapter_id=manifest.adapter_id,
        training_sequences=int(manifest.hyperparameters["training_sequences"])
        if "training_sequences" in manifest.hyperparameters else 0,
        seconds=float(manifest.metrics["train_seconds"]) if "train_seconds" in manifest.metrics else 0.0,
        manifest=manifest,
    )


class GrpcStudentPort:
    def __init__(self, stub: student_pb2_grpc.StudentServiceStub, timeout: Timeout) -> None:
        self._stub = stub
        self._timeout = timeout

    def train(
        self,
        task: adapt.Task,
        proposal: adapt.Proposal,
        *,
        adapter_name: str,
        seed: int,
        overrides: Mapping[str, Any],
        training_prompts: Sequence[str] = (),
    ) -> Iterator[adapt.TrainingStep | adapt.TrainedAdapter]:
        request = student_pb2.ApplySelfEditRequest(
            adapter_name=adapter_name,
            context=_context(task),
            self_edit=proposal.text,
            overrides=convert.overrides_to_proto(overrides),
            seed=seed,
            training_prompts=list(training_prompts),
            fewshot=_fewshot(task),
        )
        try:
            for update in self._stub.ApplySelfEdit(request, timeout=self._timeout()):
                if update.HasField("progress"):
                    p = update.progress
                    yield adapt.TrainingStep(p.step, p.total_steps, p.loss)
                elif update.HasField("candidate"):
                    yield _trained(update.candidate)
        except grpc.RpcError as exc:
            if exc.code() in _REFUSALS:
                raise adapt.CandidateRefused(f"({exc.code().name}) {exc.details()}") from None
            raise

    def train_many(
        self,
        task: adapt.Task,
        proposals: Sequence[adapt.Proposal],
        *,
        adapter_name: str,
        seeds: Sequence[int],
        overrides: Mapping[str, Any],
        training_prompts: Sequence[str] = (),
    ) -> Iterator[tuple[int, adapt.TrainingStep | adapt.TrainedAdapter | adapt.CandidateRefused]]:
        """One ApplySelfEdits call for all of them; a student without that RPC (an older one:
        UNIMPLEMENTED before any event) gets one ApplySelfEdit per candidate instead."""
        if len(seeds) != len(proposals):
            raise ValueError(f"{len(proposals)} self-edits but {len(seeds)} seeds")
        proto_overrides = convert.overrides_to_proto(overrides)
        request = student_pb2.ApplySelfEditsRequest(
            adapter_name=adapter_name,
            candidates=[
                student_pb2.ApplySelfEditRequest(
                    context=_context(task), self_edit=proposal.text, overrides=proto_overrides, seed=seed,
                    training_prompts=list(training_prompts), fewshot=_fewshot(task),
                )
                for proposal, seed in zip(proposals, seeds, strict=True)
            ],
        )
        heard = False
        try:
            for update in self._stub.ApplySelfEdits(request, timeout=self._timeout()):
                heard = True
                event = update.WhichOneof("event")
                if event == "progress":
                    p = update.progress
                    yield p.index, adapt.TrainingStep(p.progress.step, p.progress.total_steps, p.progress.loss)
                elif event == "trained":
                    yield update.trained.index, _trained(update.trained.candidate)
                elif event == "failed":
                    failed = update.failed
                    if failed.code in adapt.REFUSAL_CODES:
                        yield failed.index, adapt.CandidateRefused(f"({failed.code.upper()}) {failed.message}")
                    else:  # not the self-edit's fault: every other candidate would fail alike
                        raise CandidateTrainingFailed(
                            f"training candidate {failed.index} of the batch failed: ({failed.code.upper()}) "
                            f"{failed.message}",
                            failed.code or "internal",
                        )
            return
        except grpc.RpcError as exc:
            if heard or exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                raise
        for position, (proposal, seed) in enumerate(zip(proposals, seeds, strict=True)):
            try:
                for step in self.train(
                    task, proposal, adapter_name=adapter_name, seed=seed, overrides=overrides,
                    training_prompts=training_prompts,
                ):
                    yield position, step
            except adapt.CandidateRefused as refused:
                yield position, refused

    def answer_with_base(self, prompts: Sequence[str], *, max_new_tokens: int) -> list[str]:
        reply = self._stub.Generate(
            student_pb2.GenerateRequest(
                prompts=list(prompts), adapter=student_pb2.AdapterSelector(base_model=empty_pb2.Empty()),
                max_new_tokens=max_new_tokens, temperature=0.0,
            ),
            timeout=self._timeout(),
        )
        return [completion.text for completion in reply.completions]

    def promote(self, adapter_id: str, reason: str) -> None:
        self._stub.Promote(student_pb2.PromoteRequest(adapter_id=adapter_id, reason=reason), timeout=self._timeout())

    def reject(self, adapter_id: str, reason: str, *, discard_weights: bool = False) -> None:
        self._stub.Reject(
            student_pb2.RejectRequest(adapter_id=adapter_id, reason=reason, discard_weights=discard_weights),
            timeout=self._timeout(),
        )


class GrpcAuditorPort:
    def __init__(self, stub: auditor_pb2_grpc.AuditorServiceStub, timeout: Timeout) -> None:
        self._stub = stub
        self._timeout = timeout

    def check(self, task: adapt.Task, proposal: adapt.Proposal, *, seed: int, request_id: str) -> adapt.GuardrailCheck:
        reply = self._stub.CheckSelfEdit(
            auditor_pb2.CheckSelfEditRequest(
                context=_context(task), self_edit=proposal.text, prompt=proposal.prompt, seed=seed, request_id=request_id,
                fewshot=_fewshot(task),
            ),
            timeout=self._timeout(),
        )
        return adapt.GuardrailCheck(reply.passed, tuple(convert.gate_from_proto(g) for g in reply.results))

    def baseline(self, task: adapt.Task) -> adapt.Baseline:
        reply = self._stub.Score(
            auditor_pb2.ScoreRequest(
                context=_context(task), questions=[convert.question_to_proto(q) for q in task.questions],
                fewshot=_fewshot(task),
            ),
            timeout=self._timeout(),
        )
        return adapt.Baseline(reply.baseline_accuracy, tuple(convert.outcome_from_proto(o) for o in reply.baseline_outcomes))

    def score(
        self,
        task: adapt.Task,
        proposal: adapt.Proposal,
        adapter: adapt.TrainedAdapter,
        *,
        seed: int,
        guardrails: adapt.GuardrailCheck,
        request_id: str,
        measure_retention: bool,
    ) -> adapt.Score:
        reply = self._stub.Score(
            auditor_pb2.ScoreRequest(
                adapter_id=adapter.adapter_id,
                context=_context(task),
                questions=[convert.question_to_proto(q) for q in task.questions],
                self_edit=proposal.text,
                prompt=proposal.prompt,
                seed=seed,
                guardrails=[convert.gate_to_proto(g) for g in guardrails.gates],
                request_id=request_id,
                skip_retention=not measure_retention,
                fewshot=_fewshot(task),
            ),
            timeout=self._timeout(),
        )
        return _score(reply)

    def score_many(
        self, task: adapt.Task, jobs: Sequence[adapt.ScoreJob], *, request_id: str, measure_retention: bool
    ) -> list[adapt.Score | adapt.CandidateRefused]:
        """One ScoreMany for all of them; an auditor without that RPC (an older one: UNIMPLEMENTED)
        gets one Score per candidate instead. A candidate the auditor could not score because of
        itself (its version or weights) is refused alone; any other failure raises."""
        request = auditor_pb2.ScoreManyRequest(
            context=_context(task),
            questions=[convert.question_to_proto(q) for q in task.questions],
            fewshot=_fewshot(task),
            request_id=request_id,
            skip_retention=not measure_retention,
            candidates=[
                auditor_pb2.ScoreManyRequest.Candidate(
                    adapter_id=job.adapter.adapter_id, self_edit=job.proposal.text, prompt=job.proposal.prompt,
                    seed=job.seed, guardrails=[convert.gate_to_proto(g) for g in job.guardrails.gates],
                )
                for job in jobs
            ],
        )
        try:
            reply = self._stub.ScoreMany(request, timeout=self._timeout())
        except grpc.RpcError as exc:
            if exc.code() is not grpc.StatusCode.UNIMPLEMENTED:
                raise
            return self._score_each(task, jobs, request_id=request_id, measure_retention=measure_retention)
        if len(reply.results) != len(jobs):
            raise RuntimeError(f"the auditor answered {len(reply.results)} results for {len(jobs)} candidates")
        results: list[adapt.Score | adapt.CandidateRefused] = []
        for result in reply.results:
            if result.WhichOneof("outcome") == "score":
                results.append(_score(result.score))
                continue
            failed = result.failed
            if failed.code not in adapt.SCORING_REFUSAL_CODES:  # every other candidate would fail alike
                raise CandidateScoringFailed(
                    f"scoring candidate {failed.index} of the batch failed: ({failed.code.upper()}) {failed.message}",
                    failed.code or "internal",
                )
            results.append(adapt.CandidateRefused(f"({failed.code.upper()}) {failed.message}"))
        return results

    def _score_each(
        self, task: adapt.Task, jobs: Sequence[adapt.ScoreJob], *, request_id: str, measure_retention: bool
    ) -> list[adapt.Score | adapt.CandidateRefused]:
        results: list[adapt.Score | adapt.CandidateRefused] = []
        for job in jobs:
            try:
                results.append(self.score(
                    task, job.proposal, job.adapter, seed=job.seed, guardrails=job.guardrails,
                    request_id=request_id, measure_retention=measure_retention,
                ))
            except grpc.RpcError as exc:
                if exc.code() not in _SCORING_REFUSALS:
                    raise
                results.append(adapt.CandidateRefused(f"({exc.code().name}) {exc.details()}"))
        return results


class CandidateScoringFailed(RuntimeError):
    """A candidate of a ScoreMany failed for a reason that is not its own (the auditor's status
    code, lower-case, in ``code``): the step ends, as a failed Score would end it."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


def _score(reply: auditor_pb2.ScoreResponse) -> adapt.Score:
    return adapt.Score(
        accuracy=reply.adapted_accuracy,
        baseline_accuracy=reply.baseline_accuracy,
        reward=reply.reward,
        passed_gates=reply.passed_gates,
        gates=tuple(convert.gate_from_proto(g) for g in reply.gates),
        outcomes=tuple(convert.outcome_from_proto(o) for o in reply.adapted_outcomes),
        retention_accuracy=reply.retention_accuracy if reply.HasField("retention_accuracy") else None,
        baseline_retention_accuracy=(
            reply.baseline_retention_accuracy if reply.HasField("baseline_retention_accuracy") else None
        ),
    )
