"""What every seal gRPC service shares: server bootstrap (health, reflection, bounded concurrency,
graceful shutdown), Prometheus metrics for every RPC, and the mapping from core errors to status
codes. Algorithms never import this module; the services do."""

from __future__ import annotations

import functools
import inspect
import logging
import signal
import threading
import time
from collections.abc import Callable, Iterator
from concurrent import futures
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

if TYPE_CHECKING:
    from seal.config import ServiceSettings
    from seal.tracing import Tracing

log = logging.getLogger(__name__)

_CODE_BY_NAME = {
    "invalid_argument": grpc.StatusCode.INVALID_ARGUMENT,
    "not_found": grpc.StatusCode.NOT_FOUND,
    "failed_precondition": grpc.StatusCode.FAILED_PRECONDITION,
    "data_loss": grpc.StatusCode.DATA_LOSS,
    "resource_exhausted": grpc.StatusCode.RESOURCE_EXHAUSTED,
    "aborted": grpc.StatusCode.ABORTED,
    "deadline_exceeded": grpc.StatusCode.DEADLINE_EXCEEDED,
    "cancelled": grpc.StatusCode.CANCELLED,
    "unavailable": grpc.StatusCode.UNAVAILABLE,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
}


def status_code_for(exc: BaseException) -> grpc.StatusCode:
    """Core errors carry a transport-free ``code`` name; plain ValueErrors are bad input."""
    code_name = getattr(exc, "code", None)
    if isinstance(code_name, str) and code_name in _CODE_BY_NAME:
        return _CODE_BY_NAME[code_name]
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "code"):
        return exc.code()
    if isinstance(exc, ValueError):
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


def error_message(exc: BaseException) -> str:
    if isinstance(exc, grpc.RpcError) and hasattr(exc, "details"):
        return exc.details() or str(exc)
    return str(exc) or type(exc).__name__


def map_errors(method: Callable) -> Callable:
    """Turn core exceptions raised by a servicer method into gRPC statuses with their message.

    Works for unary methods and for server-streaming generators alike."""

    def abort(context: grpc.ServicerContext, exc: Exception) -> None:
        code = status_code_for(exc)
        if code is grpc.StatusCode.INTERNAL:
            log.exception("unexpected error in %s", method.__qualname__)
        context.abort(code, error_message(exc))

    if inspect.isgeneratorfunction(method):

        @functools.wraps(method)
        def stream_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Iterator[Any]:
            try:
                yield from method(self, request, context)
            except Exception as exc:  # noqa: BLE001 - every error must become a status
                if _is_abort(exc):
                    raise
                abort(context, exc)

        return stream_wrapper

    @functools.wraps(method)
    def unary_wrapper(self: Any, request: Any, context: grpc.ServicerContext) -> Any:
        try:
            return method(self, request, context)
        except Exception as exc:  # noqa: BLE001
            if _is_abort(exc):
                raise
            abort(context, exc)

    return unary_wrapper


def _is_abort(exc: BaseException) -> bool:
    # grpc raises a bare Exception from context.abort(); its status is already set.
    return type(exc) is Exception and not exc.args


def deadline_checker(context: grpc.ServicerContext) -> Callable[[], bool]:
    """A ``should_stop`` callback for long work: true once the client left or its deadline passed."""

    def should_stop() -> bool:
        remaining = context.time_remaining()
        return not context.is_active() or (remaining is not None and remaining <= 0)

    return should_stop


def remaining_timeout(context: grpc.ServicerContext, ceiling: float) -> float:
    """Deadline to pass downstream so a nested call never outlives its caller."""
    remaining = context.time_remaining()
    return ceiling if remaining is None else max(0.001, min(ceiling, remaining))


def seal_version() -> str:
    """The installed seal distribution's version ("unknown" when run from a bare source tree)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("seal")
    except PackageNotFoundError:
        return "unknown"


class RpcMetrics:
    """Per-service Prometheus metrics; each service instance owns its registry, so several
    services (or several test instances) can live in one process."""

    def __init__(self, service: str) -> None:
        self.service = service
        self.registry = CollectorRegistry()
        self.requests = Counter(
            f"seal_{service}_rpc_requests_total",
            "RPCs handled, by method and final status code.",
            ["method", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            f"seal_{service}_rpc_duration_seconds",
            "Wall time of an RPC, streams included until their last message.",
            ["method"],
            buckets=(0.005, 0.025, 0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800),
            registry=self.registry,
        )
        # Always 1 while the process serves: the registry has no process metrics, so this is the
        # series whose absence (``absent(seal_<service>_build_info)``) says the service vanished.
        self.build_info = Gauge(
            f"seal_{service}_build_info", "1 while this service runs; its seal version.", ["version"],
            registry=self.registry,
        )
        self.build_info.labels(seal_version()).set(1)

    def counter(self, name: str, documentation: str, labels: tuple[str, ...] = ()) -> Counter:
        return Counter(f"seal_{self.service}_{name}", documentation, list(labels), registry=self.registry)

    def histogram(
        self, name: str, documentation: str, buckets: tuple[float, ...], labels: tuple[str, ...] = ()
    ) -> Histogram:
        return Histogram(
            f"seal_{self.service}_{name}", documentation, list(labels), buckets=buckets, registry=self.registry
        )


class _MetricsInterceptor(grpc.ServerInterceptor):
    def __init__(self, metrics: RpcMetrics) -> None:
        self._metrics = metrics

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None:
            return None
        method = handler_call_details.method.rsplit("/", 1)[-1]
        metrics = self._metrics

        def record(context: grpc.ServicerContext, started: float, failed: bool) -> None:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.UNKNOWN if failed else grpc.StatusCode.OK
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            metrics.requests.labels(method, name).inc()
            metrics.latency.labels(method).observe(time.perf_counter() - started)

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary_unary(request, context):  # type: ignore[no-untyped-def]
                started, failed = time.perf_counter(), True
                try:
                    response = inner(request, context)
                    failed = False
                    return response
                finally:
                    record(context, started, failed)

            return grpc.unary_unary_rpc_method_handler(
                unary_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream:
            inner_stream = handler.unary_stream

            def unary_stream(request, context):  # type: ignore[no-untyped-def]
                started, failed = time.perf_counter(), True
                try:
                    yield from inner_stream(request, context)
                    failed = False
                finally:
                    record(context, started, failed)

            return grpc.unary_stream_rpc_method_handler(
                unary_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler


@dataclass
class RunningService:
    name: str
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: list[str]
    metrics_port: int | None = None
    _metrics_http: Any = None
    _stopped: threading.Event = field(default_factory=threading.Event)
    on_stop: list[Callable[[], None]] = field(default_factory=list)
    # Peer name → callback taking that peer's address, for peers that start after this service
    # on a port chosen at start (seal.stack); a production process reads addresses from settings.
    connect: dict[str, Callable[[str], None]] = field(default_factory=dict)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def stop(self, grace: float = 5.0) -> None:
        """Graceful: report NOT_SERVING first so balancers drain, then let in-flight RPCs finish."""
        if self._stopped.is_set():
            return
        self._stopped.set()
        self.health.enter_graceful_shutdown()
        self.server.stop(grace).wait(grace + 1)
        for callback in self.on_stop:
            callback()
        if self._metrics_http is not None:
            self._metrics_http.shutdown()
            self._metrics_http.server_close()

    def wait(self) -> None:
        self.server.wait_for_termination()


def start_configured_service(
    name: Literal["teacher", "student", "auditor"],
    register: Callable[[grpc.Server], list[str]],
    services: ServiceSettings,
    metrics: RpcMetrics,
    *,
    port: int | None = None,
    metrics_port: int | None = None,
    tracing: Tracing | None = None,
    untraced_methods: tuple[str, ...] = (),
) -> RunningService:
    """:func:`start_service` with the host, ports and limits ``services`` gives ``name``;
    ``port`` and ``metrics_port`` replace the configured ports when given (0 = a free one)."""
    return start_service(
        name,
        register,
        host=services.host,
        port=getattr(services, f"{name}_port") if port is None else port,
        metrics=metrics,
        metrics_port=getattr(services, f"{name}_metrics_port") if metrics_port is None else metrics_port,
        max_workers=services.max_workers,
        max_concurrent_rpcs=services.max_concurrent_rpcs,
        tracing=tracing,
        untraced_methods=untraced_methods,
    )


def start_service(
    name: str,
    register: Callable[[grpc.Server], list[str]],
    *,
    host: str,
    port: int,
    metrics: RpcMetrics,
    metrics_port: int | None,
    max_workers: int,
    max_concurrent_rpcs: int,
    tracing: Tracing | None = None,
    untraced_methods: tuple[str, ...] = (),
) -> RunningService:
    """Start a gRPC server whose servicers ``register`` adds; returns once it accepts calls.

    ``port=0`` picks a free port; ``metrics_port=None`` disables the /metrics endpoint. With
    ``tracing`` on, every call but health checks, reflection and ``untraced_methods`` gets a
    server span, child of the caller's span when its metadata carries one; the provider is shut
    down (its queued spans exported) after the server stops."""
    interceptors: list[grpc.ServerInterceptor] = [_MetricsInterceptor(metrics)]
    if tracing is not None and tracing.enabled:
        # First, so that the span covers everything the other interceptors do.
        interceptors.insert(0, _server_tracing_interceptor(tracing, untraced_methods))
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=max_workers, thread_name_prefix=f"{name}-rpc"),
        interceptors=interceptors,
        maximum_concurrent_rpcs=max_concurrent_rpcs,
        options=[
            ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
    )
    service_names = register(server)
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service_name in [*service_names, ""]:
        health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    reflection.enable_server_reflection(
        [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
        server,
    )
    bound_port = server.add_insecure_port(f"{host}:{port}")
    if bound_port == 0:
        raise RuntimeError(f"{name}: could not bind {host}:{port}; is another process using it?")
    server.start()
    running = RunningService(name, server, bound_port, health_servicer, service_names)
    if tracing is not None and tracing.enabled:
        running.on_stop.append(tracing.shutdown)
    if metrics_port is not None:
        http_server, _thread = start_http_server(metrics_port, addr=host, registry=metrics.registry)
        running._metrics_http = http_server
        running.metrics_port = http_server.server_port
    log.info("%s listening on %s:%d (metrics %s)", name, host, bound_port, running.metrics_port)
    return running


# The instrumentation is imported only when tracing is on: an untraced process never loads it.


def _server_tracing_interceptor(tracing: Tracing, untraced_methods: tuple[str, ...]) -> grpc.ServerInterceptor:
    from opentelemetry.instrumentation.grpc import server_interceptor

    def traced(details: grpc.HandlerCallDetails) -> bool:
        # Probes call Check every few seconds and reflection serves grpcurl: neither belongs in
        # a trace. ``untraced_methods`` are the subscriptions that outlive any request.
        service, _, method = details.method.lstrip("/").rpartition("/")
        return not service.startswith(("grpc.health.", "grpc.reflection.")) and method not in untraced_methods

    return server_interceptor(tracer_provider=tracing.provider, filter_=traced)


def traced_channel(channel: grpc.Channel, tracing: Tracing | None) -> grpc.Channel:
    """``channel`` with a client span per call whose context travels in the request metadata (W3C
    ``traceparent``), so the callee's server span joins the caller's trace; ``channel`` itself
    when tracing is off.

    The traced channel returns plain generators for server-streaming calls, not ``grpc.Call``
    objects: a caller that needs ``cancel()`` or ``code()`` on a stream keeps the plain channel."""
    if tracing is None or not tracing.enabled:
        return channel
    from opentelemetry.instrumentation.grpc import client_interceptor
    from opentelemetry.instrumentation.grpc.grpcext import intercept_channel

    return intercept_channel(channel, client_interceptor(tracer_provider=tracing.provider))


def serve_until_signalled(running: RunningService, grace: float) -> None:
    """Block until SIGTERM/SIGINT, then shut down gracefully (what Kubernetes expects)."""
    stop_requested = threading.Event()

    def request_stop(signum: int, _frame: Any) -> None:
        log.info("%s: signal %d, shutting down (grace %.1fs)", running.name, signum, grace)
        stop_requested.set()

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    stop_requested.wait()
    running.stop(grace)


def wait_until_serving(address: str, service: str, timeout: float) -> None:
    """Poll the standard health service until ``service`` reports SERVING."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    with grpc.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError as exc:
                last_error = exc
            time.sleep(0.5)
    raise TimeoutError(f"{service} at {address} not serving after {timeout:.0f}s ({last_error})")
