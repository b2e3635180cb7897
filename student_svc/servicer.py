"""StudentService over gRPC: validate, call ``seal.student.Student``, map errors, record metrics."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Generator, Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from prometheus_client import Gauge

from seal.audit_outbox import AuditOutbox
from seal.cancellation import stop_when
from seal.config import Settings
from seal.domains.fewshot import task_to_dict
from seal.domains.knowledge import context_digest
from seal.executors import CandidateJob, CandidateOutcome
from seal.limits import (
    check_adapter_id,
    check_adapter_ids,
    check_adapter_name,
    check_context,
    check_fewshot_size,
    check_max_new_tokens,
    check_text,
    check_texts,
    check_update_overrides,
    echo,
)
from seal.models import SamplingParams
from seal.registry import Manifest, parse_adapter_id
from seal.rpc import (
    CONFIGURED,
    Configured,
    RpcMetrics,
    RunningService,
    WorkQueue,
    current_principal,
    deadline_checker,
    error_message,
    map_errors,
    remaining_timeout,
    start_configured_service,
    status_code_for,
)
from seal.serving import resolve_backend
from seal.student import AdapterChoice, Student
from seal.tracing import Tracing, build_tracing
from seal.transport import convert
from seal.transport.audit_events import AuditEventSender
from seal.v1 import common_pb2, student_pb2, student_pb2_grpc


def choice_from_proto(selector: student_pb2.AdapterSelector) -> AdapterChoice:
    """The model a request names, its name or id validated first: the student keeps a lock per
    lineage it resolves, so an unchecked name would leave one behind for every distinct typo."""
    target = selector.WhichOneof("target")
    if target == "base_model":
        return AdapterChoice(base_model=True)
    if target == "adapter_id":
        return AdapterChoice(adapter_id=check_adapter_id(selector.adapter_id, "adapter.adapter_id"))
    if target == "promoted_of" and selector.promoted_of:
        return AdapterChoice(promoted_of=check_adapter_name(selector.promoted_of, "adapter.promoted_of"))
    return AdapterChoice()


class StudentServicer(student_pb2_grpc.StudentServiceServicer):
    def __init__(self, student: Student, settings: Settings, metrics: RpcMetrics, audit: AuditOutbox | None = None) -> None:
        self._student = student
        self._settings = settings
        # Every status change is reported to the auditor's audit trail, whoever asked for it.
        self._audit = audit
        self._candidates = metrics.counter("candidates_trained_total", "Candidate adapters trained and saved.")
        self._training_failures = metrics.counter(
            "training_failures_total", "Training runs that ended without a candidate.", ("reason",)
        )
        self._training_seconds = metrics.histogram(
            "training_seconds", "Wall time of one LoRA SFT run.", (5, 15, 30, 60, 120, 300, 600, 1800)
        )
        self._promotions = metrics.counter("promotions_total", "Versions promoted to serving.", ("adapter",))
        self._rollbacks = metrics.counter(
            "rollbacks_total", "Rollbacks of the served version, whoever asked (operator or the auditor's re-check).",
            ("adapter",),
        )
        self._tokens = metrics.counter(
            "generated_tokens_total", "Completion tokens generated.", ("adapter",)
        )
        self._generate_requests = metrics.counter(
            "generate_requests_total", "Generate calls, by the version that served them ('mixed': a GenerateMixed).",
            ("adapter",)
        )
        self._generate_seconds = metrics.histogram(
            "generate_seconds", "Wall time of a Generate call, by the version that served it ('mixed': a GenerateMixed).",
            (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), ("adapter",)
        )
        self._swap_seconds = metrics.histogram(
            "adapter_swap_seconds", "Wall time of a change of the served version (registry and server).",
            (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120), ("operation",)
        )
        # At 0 from the start for the label values known up front (the configured adapter, the base
        # model, both swap operations): Prometheus' increase() and rate() cannot see the first event
        # of a series that appears already at 1, and rare events are what the dashboard must show.
        self._promotions.labels(settings.adapter_name)
        self._rollbacks.labels(settings.adapter_name)
        for operation in ("promote", "rollback"):
            self._swap_seconds.labels(operation)
        for counted in (self._generate_seconds, self._generate_requests, self._tokens):
            counted.labels("base")
        self._served_info = Gauge(
            "seal_student_served_adapter_info", "1 for each version served to requests that name none.",
            ["adapter", "role"], registry=metrics.registry,
        )
        backend = Gauge(
            "seal_student_serving_backend_info", "How Generate is answered; Triton's own metrics URL.",
            ["backend", "triton_metrics_url"], registry=metrics.registry,
        )
        backend.labels(student.backend, student.serving.metrics_url).set(1)
        self._served_lock = threading.Lock()
        # Training and generation are admitted apart, each with a bounded queue whose overflow is
        # refused at once (RESOURCE_EXHAUSTED, retry hint): a flood of ApplySelfEdit can hold at most
        # training_slots + training_queue_depth RPC slots, so Generate always finds one.
        admission = settings.student
        self._training = WorkQueue(
            "the student's training queue", slots=admission.training_slots, depth=admission.training_queue_depth,
            wait_s=admission.training_queue_wait_s, setting="student.training_queue",
        )
        self._generation = WorkQueue(
            "the student's generation queue", slots=admission.generation_slots,
            depth=admission.generation_queue_depth, wait_s=admission.generation_queue_wait_s,
            setting="student.generation_queue",
        )
        self._refresh_served()

    def _refresh_served(self) -> None:
        with self._served_lock:
            self._served_info.clear()
            for role, version in self._student.served_versions().items():
                self._served_info.labels(version, role).set(1)

    def _proto(self, manifest: Manifest) -> common_pb2.AdapterManifest:
        return convert.manifest_to_proto(manifest, str(self._student.registry.path_of(manifest)))

    def _report(self, kind: str, adapter_id: str, cause: str, context: grpc.ServicerContext, **details: Any) -> None:
        if self._audit is None:
            return
        # Who asked: the authenticated principal (auth on), else only the peer's address.
        principal = current_principal()
        if principal is not None:
            details = {"principal": principal, **details}
        self._audit.record(kind, adapter_id, cause, requested_by=context.peer(), **details)
        # Normally delivered within milliseconds, so the record exists when the caller hears back;
        # if the auditor is down the change still stands and the event waits in the outbox.
        self._audit.flush(timeout=2.0)

    def _reason(self, reason: str, default: str) -> str:
        """A status change's reason: kept in the manifest and the audit log for good, so bounded."""
        return check_text("reason", reason, self._settings.limits.max_reason_chars, "max_reason_chars") or default

    def _job(self, request: student_pb2.ApplySelfEditRequest, adapter_name: str) -> CandidateJob:
        """One candidate's request checked against every input limit, as a job: raises ValueError
        (INVALID_ARGUMENT) before anything is created."""
        limits = self._settings.limits
        fewshot = convert.fewshot_field(request)
        arc = convert.fewshot_from_proto(fewshot) if fewshot is not None else None
        if arc is not None:
            check_fewshot_size(arc, limits)
        elif not request.context.passage.strip():
            raise ValueError("context.passage is empty: the student trains on the passage and the self-edit")
        check_context(request.context.title, request.context.passage, limits, require_passage=False)
        check_text("self_edit", request.self_edit, limits.max_self_edit_chars, "max_self_edit_chars")
        # Training prompts are questions about C (an on-policy rule distils on them): τ's bounds.
        check_texts("training_prompts", request.training_prompts, max_count=limits.max_questions,
                    max_chars=limits.max_question_chars, count_setting="max_questions",
                    chars_setting="max_question_chars")
        overrides = dict(check_update_overrides(
            convert.overrides_from_proto(request.overrides), field_names=convert.OVERRIDE_FIELDS
        ))
        include_passage = overrides.pop("include_passage", True)
        return CandidateJob(
            adapter_name=adapter_name,
            title=request.context.title,
            passage=request.context.passage,
            self_edit=request.self_edit,
            context_id=(
                arc.context_id if arc is not None else context_digest(request.context.title, request.context.passage)
            ),
            overrides=overrides,
            include_passage=include_passage,
            seed=request.seed if request.HasField("seed") else None,
            training_prompts=tuple(request.training_prompts),
            fewshot_task=task_to_dict(arc) if arc is not None else None,
        )

    def _start_training(self, work: Callable[[], None], context: grpc.ServicerContext) -> threading.Thread:
        """``work`` on a training thread once a training slot is free; ``work`` must release it.
        Raises Overloaded (RESOURCE_EXHAUSTED, retry hint) when the queue is full or the wait ran out."""
        self._training.acquire(
            remaining_timeout(context, self._settings.student.training_queue_wait_s), deadline_checker(context)
        )
        worker = threading.Thread(target=work, name="student-train", daemon=True)
        try:
            worker.start()
        except BaseException:
            self._training.release()
            raise
        return worker

    def _train_streaming(
        self, jobs: list[CandidateJob], context: grpc.ServicerContext, progress: Callable[[int, int, int, float], Any]
    ) -> Generator[Any, None, list[CandidateOutcome]]:
        """Trains ``jobs`` in a thread that holds the training slot exactly while it runs, yielding
        ``progress(position, step, total, loss)`` as the steps come; returns one outcome per job.
        Raises what kept the executor from running the batch at all."""
        events: queue.Queue[Any] = queue.Queue()
        finished = object()
        outcome: dict[str, Any] = {}

        def train() -> None:
            try:
                outcome["candidates"] = self._student.train_candidates(
                    jobs, on_step=lambda *step: events.put(progress(*step)), should_stop=deadline_checker(context)
                )
            except Exception as exc:  # noqa: BLE001 - re-raised in the RPC thread below
                outcome["error"] = exc
            finally:
                self._training.release()  # held exactly while training runs, even if the caller left
                events.put(finished)

        worker = self._start_training(train, context)
        while (event := events.get()) is not finished:
            yield event
        worker.join()
        if "error" in outcome:
            self._training_failures.labels(type(outcome["error"]).__name__).inc()
            raise outcome["error"]
        return outcome["candidates"]

    @map_errors
    def ApplySelfEdit(self, request: student_pb2.ApplySelfEditRequest, context: grpc.ServicerContext) -> Iterator[student_pb2.ApplySelfEditResponse]:
        # Everything is checked before the training thread starts: a refused request creates
        # nothing (no lineage lock, no staging directory, no registry entry).
        job = self._job(request, check_adapter_name(request.adapter_name or self._settings.adapter_name))
        # A batch of one through the configured executor (student.executor): in process it streams
        # every step; as a Kubernetes Job the steps happen in the pod.
        [candidate] = yield from self._train_streaming([job], context, lambda _position, step, total, loss: (
            student_pb2.ApplySelfEditResponse(progress=common_pb2.TrainingProgress(step=step, total_steps=total, loss=loss))
        ))
        try:
            result = candidate.result_or_raise()
        except Exception as exc:
            self._training_failures.labels(type(exc).__name__).inc()
            raise
        self._candidates.inc()
        self._training_seconds.observe(result.seconds)
        yield student_pb2.ApplySelfEditResponse(candidate=self._proto(result.manifest))

    @map_errors
    def ApplySelfEdits(self, request: student_pb2.ApplySelfEditsRequest, context: grpc.ServicerContext) -> Iterator[student_pb2.ApplySelfEditsResponse]:
        # Every candidate is checked before training starts: a request with one candidate that
        # breaks a limit is refused whole (INVALID_ARGUMENT) and creates nothing. A self-edit the
        # trainer cannot use fails that candidate alone (a Failed event).
        adapter_name = check_adapter_name(request.adapter_name or self._settings.adapter_name)
        max_k = self._settings.teacher.max_k
        if not request.candidates:
            raise ValueError("candidates is empty: send at least one self-edit to train")
        if len(request.candidates) > max_k:
            raise ValueError(
                f"candidates has {len(request.candidates)} entries, above the limit of {max_k}; "
                "send fewer or raise teacher.max_k"
            )
        jobs: list[CandidateJob] = []
        for index, candidate in enumerate(request.candidates):
            try:
                if candidate.adapter_name and candidate.adapter_name != adapter_name:
                    raise ValueError(
                        f"adapter_name {echo(candidate.adapter_name)} differs from the request's "
                        f"{adapter_name!r}: one call trains candidates of one lineage"
                    )
                jobs.append(self._job(candidate, adapter_name))
            except ValueError as exc:
                if type(exc) is not ValueError:
                    raise
                raise ValueError(f"candidates[{index}]: {exc}") from exc
        # One training slot for the whole batch; the configured executor decides how its candidates
        # run (in process: together, student.batch_candidates).
        candidates = yield from self._train_streaming(jobs, context, lambda position, step, total, loss: (
            student_pb2.ApplySelfEditsResponse(progress=student_pb2.ApplySelfEditsResponse.Progress(
                index=position, progress=common_pb2.TrainingProgress(step=step, total_steps=total, loss=loss),
            ))
        ))
        for candidate in candidates:
            if candidate.result is not None:
                self._candidates.inc()
                self._training_seconds.observe(candidate.result.seconds)
                yield student_pb2.ApplySelfEditsResponse(trained=student_pb2.ApplySelfEditsResponse.Trained(
                    index=candidate.position, candidate=self._proto(candidate.result.manifest),
                ))
                continue
            error = candidate.error
            self._training_failures.labels(type(error).__name__ if error is not None else candidate.code).inc()
            yield student_pb2.ApplySelfEditsResponse(failed=student_pb2.ApplySelfEditsResponse.Failed(
                index=candidate.position,
                code=status_code_for(error).name.lower() if error is not None else candidate.code or "internal",
                message=error_message(error) if error is not None else candidate.failure,
            ))

    @map_errors
    def Generate(self, request: student_pb2.GenerateRequest, context: grpc.ServicerContext) -> student_pb2.GenerateResponse:
        params = self._sampling(request)
        choice = choice_from_proto(request.adapter)
        with self._generating(context):
            started = time.perf_counter()
            generations, served = self._student.generate(
                list(request.prompts), choice, params, chat=not request.raw_prompt
            )
        self._generate_seconds.labels(served or "base").observe(time.perf_counter() - started)
        self._generate_requests.labels(served or "base").inc()
        self._tokens.labels(served or "base").inc(sum(g.completion_tokens for g in generations))
        context.set_trailing_metadata((("x-seal-serving-backend", self._student.backend),))
        if self._student.backend == "triton" and request.adapter.WhichOneof("target") == "adapter_id":
            self._refresh_served()  # evaluating a candidate makes it the canary
        return student_pb2.GenerateResponse(
            completions=[
                student_pb2.Completion(
                    text=g.text, prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens
                )
                for g in generations
            ],
            served_adapter_id=served,
        )

    def _sampling(self, request: student_pb2.GenerateRequest | student_pb2.GenerateMixedRequest) -> SamplingParams:
        """The prompts and sampling fields Generate and GenerateMixed share, checked."""
        limits = self._settings.limits
        check_texts("prompts", request.prompts, max_count=limits.max_prompts, max_chars=limits.max_prompt_chars,
                    count_setting="max_prompts", chars_setting="max_prompt_chars")
        check_max_new_tokens(request.max_new_tokens, limits)
        return SamplingParams(
            max_new_tokens=request.max_new_tokens or 64,
            temperature=request.temperature,
            top_p=request.top_p or 1.0,
            seed=request.seed if request.HasField("seed") else None,
            stop_after_first_sentence=request.stop_after_first_sentence,
        )

    @contextmanager
    def _generating(self, context: grpc.ServicerContext) -> Iterator[None]:
        """Admitted apart from training (never starved by it); refused with a retry hint when the
        queue is full; the generation loop stops once the caller's deadline passes or it leaves."""
        should_stop = deadline_checker(context)
        with self._generation.admitted(
            remaining_timeout(context, self._settings.student.generation_queue_wait_s), should_stop
        ), stop_when(should_stop):
            yield

    @map_errors
    def GenerateMixed(self, request: student_pb2.GenerateMixedRequest, context: grpc.ServicerContext) -> student_pb2.GenerateMixedResponse:
        params = self._sampling(request)
        adapter_ids = check_adapter_ids(request.adapter_ids, len(request.prompts))
        with self._generating(context):  # one generation, however many versions
            started = time.perf_counter()
            generations = self._student.generate_mixed(
                list(request.prompts), adapter_ids, params, chat=not request.raw_prompt
            )
        self._generate_seconds.labels("mixed").observe(time.perf_counter() - started)
        self._generate_requests.labels("mixed").inc()
        for adapter_id, generation in zip(adapter_ids, generations, strict=True):
            self._tokens.labels(adapter_id or "base").inc(generation.completion_tokens)
        context.set_trailing_metadata((("x-seal-serving-backend", self._student.backend),))
        if self._student.backend == "triton" and any(adapter_ids):
            self._refresh_served()  # evaluating a candidate makes it the canary
        return student_pb2.GenerateMixedResponse(
            completions=[
                student_pb2.Completion(
                    text=g.text, prompt_tokens=g.prompt_tokens, completion_tokens=g.completion_tokens
                )
                for g in generations
            ],
        )

    @map_errors
    def ListAdapters(self, request: student_pb2.ListAdaptersRequest, context: grpc.ServicerContext) -> student_pb2.ListAdaptersResponse:
        # An unknown status number never gets here: the server refuses it at the wire
        # (seal.rpc._RequestDecoder), so 0 is the only value that is not a filter.
        status = convert.STATUS_FROM_PROTO[request.status] if request.status else None
        name = check_adapter_name(request.adapter_name) if request.adapter_name else None
        manifests = self._student.registry.list(adapter_name=name, status=status)
        return student_pb2.ListAdaptersResponse(adapters=[self._proto(m) for m in manifests])

    @map_errors
    def GetAdapter(self, request: student_pb2.GetAdapterRequest, context: grpc.ServicerContext) -> student_pb2.GetAdapterResponse:
        adapter_id = check_adapter_id(request.adapter_id)
        return student_pb2.GetAdapterResponse(adapter=self._proto(self._student.registry.get(adapter_id)))

    @map_errors
    def Promote(self, request: student_pb2.PromoteRequest, context: grpc.ServicerContext) -> student_pb2.PromoteResponse:
        adapter_id = check_adapter_id(request.adapter_id)
        reason = self._reason(request.reason, "promoted by request")
        previous = self._student.registry.promoted(parse_adapter_id(adapter_id)[0])
        started = time.perf_counter()
        try:
            manifest = self._student.promote(adapter_id, reason)
        finally:
            self._refresh_served()
        self._swap_seconds.labels("promote").observe(time.perf_counter() - started)
        self._promotions.labels(manifest.adapter_name).inc()
        self._report("promote", manifest.adapter_id, reason, context,
                     previous_adapter_id=previous.adapter_id if previous else "")
        return student_pb2.PromoteResponse(adapter=self._proto(manifest))

    @map_errors
    def Reject(self, request: student_pb2.RejectRequest, context: grpc.ServicerContext) -> student_pb2.RejectResponse:
        adapter_id = check_adapter_id(request.adapter_id)
        reason = self._reason(request.reason, "rejected by request")
        try:
            manifest = self._student.reject(adapter_id, reason, discard_weights=request.discard_weights)
        finally:
            self._refresh_served()
        # The audit trail says so when weights are gone: that version can never be re-examined.
        self._report("reject", manifest.adapter_id, f"{reason}; weights discarded" if request.discard_weights else reason,
                     context)
        return student_pb2.RejectResponse(adapter=self._proto(manifest))

    @map_errors
    def Rollback(self, request: student_pb2.RollbackRequest, context: grpc.ServicerContext) -> student_pb2.RollbackResponse:
        name = check_adapter_name(request.adapter_name or self._settings.adapter_name)
        reason = self._reason(request.reason, "rolled back by request")
        started = time.perf_counter()
        try:
            rolled_back, now_serving = self._student.rollback(name, reason, allow_base_model=request.allow_base_model)
        finally:
            self._refresh_served()
        self._swap_seconds.labels("rollback").observe(time.perf_counter() - started)
        self._rollbacks.labels(name).inc()
        self._report("rollback", rolled_back.adapter_id, reason, context,
                     now_serving_adapter_id=now_serving.adapter_id if now_serving is not None else "")
        response = student_pb2.RollbackResponse(rolled_back=self._proto(rolled_back))
        if now_serving is not None:
            response.now_serving.CopyFrom(self._proto(now_serving))
        return response


def serve_student(
    settings: Settings, *, port: int | Configured = CONFIGURED, metrics_port: int | Configured | None = CONFIGURED,
    tracing: Tracing | None = None,
) -> RunningService:
    """Load the model, open the registry and start serving; ``port=0`` picks a free port.
    ``tracing``: this service's spans (tests pass one with an in-memory exporter); None = as
    ``settings.tracing`` says."""
    # The outbox before the student: every status change is journaled in it before the registry
    # makes it, and the start-up recovery reports what it settles (seal.audit_outbox).
    outbox = AuditOutbox(settings.home / "student" / "audit_outbox.jsonl", None, source="student")
    try:
        student = Student(settings, serving=resolve_backend(settings), audit=outbox)  # the backend the settings name
    except BaseException:
        outbox.close(timeout=0)
        raise
    try:
        return _serve(student, outbox, settings, port, metrics_port,
                      tracing if tracing is not None else build_tracing("student", settings.tracing))
    except BaseException:
        student.close()  # a supervised tritonserver must not outlive a failed start
        outbox.close(timeout=0)
        raise


def _serve(
    student: Student, outbox: AuditOutbox, settings: Settings, port: int | Configured, metrics_port: int | Configured | None,
    tracing: Tracing,
) -> RunningService:
    metrics = RpcMetrics("student")
    services = settings.services
    # Only the student reports its adapters' transitions, under its own identity.
    senders = [AuditEventSender(services.address_of("auditor"), settings.auth, identity="student")]
    outbox.set_sender(senders[0])
    servicer = StudentServicer(student, settings, metrics, audit=outbox)

    def register(server: grpc.Server) -> list[str]:
        student_pb2_grpc.add_StudentServiceServicer_to_server(servicer, server)
        return [student_pb2.DESCRIPTOR.services_by_name["StudentService"].full_name]

    # Audit events reach the auditor from the outbox's own thread, later and retried, so they
    # are not part of the request's trace: that channel stays untraced.
    running = start_configured_service(
        "student", register, services, metrics, auth=settings.auth, port=port, metrics_port=metrics_port,
        tracing=tracing,
    )

    def connect_auditor(address: str) -> None:
        senders.append(AuditEventSender(address, settings.auth, identity="student"))
        outbox.set_sender(senders[-1])

    running.connect["auditor"] = connect_auditor
    running.on_stop.append(outbox.close)
    running.on_stop.append(lambda: [sender.close() for sender in senders])
    # After the gRPC server has drained: no Generate can be waiting on Triton any more.
    running.on_stop.append(student.close)
    return running
