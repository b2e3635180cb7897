"""What every seal gRPC service shares: server bootstrap (health, reflection, bounded concurrency
that health checks skip, a size cap per method and a budget for the bytes of in-flight requests,
graceful shutdown), bounded work queues that refuse with a retry hint (``WorkQueue``),
authentication and scopes on every call (the decisions are seal/auth.py's; TLS and token
credentials here, server and client side: ``dial``),
Prometheus metrics for every RPC, and the mapping from core errors to status codes. Algorithms
never import this module; the services do."""

from __future__ import annotations

import contextvars
import enum
import functools
import inspect
import logging
import os
import signal
import threading
import time
import weakref
from collections import namedtuple
from collections.abc import Callable, Iterator
from concurrent import futures
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

from seal import auth as authz

if TYPE_CHECKING:
    from seal.config import AuthSettings, ServiceSettings
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
        retry_after = getattr(exc, "retry_after_s", None)
        if code is grpc.StatusCode.RESOURCE_EXHAUSTED and isinstance(retry_after, (int, float)):
            set_retry_after(context, retry_after)
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


def set_retry_after(context: grpc.ServicerContext, seconds: float) -> None:
    """Tell a refused caller when to come back, in the trailing metadata: ``retry-after-ms`` for
    people and clients of their own, ``grpc-retry-pushback-ms`` for grpc's built-in retry policy
    (which then waits that long instead of its own backoff)."""
    milliseconds = str(max(1, round(seconds * 1000)))
    context.set_trailing_metadata((("retry-after-ms", milliseconds), ("grpc-retry-pushback-ms", milliseconds)))


# --- admission: bounded work queues (the teacher's Adapt, the student's training and generation) --


class Overloaded(RuntimeError):
    """A bounded queue is full, or a call waited its longest for a slot: RESOURCE_EXHAUSTED, with
    ``retry_after_s`` sent back as the retry hint (:func:`set_retry_after`)."""

    code = "resource_exhausted"

    def __init__(self, message: str, retry_after_s: float) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class CallerGone(RuntimeError):
    """The caller's deadline passed or it cancelled while its call waited for a slot."""

    code = "deadline_exceeded"


def retry_after_estimate(mean_hold_s: float, ahead: int, slots: int, *, floor_s: float = 1.0, ceiling_s: float = 3600.0) -> float:
    """Seconds until a call arriving now would likely get a slot: the ``ahead`` calls holding or
    waiting for one drain ``slots`` at a time, each taking about ``mean_hold_s``. Clamped, so that
    a queue with no history yet still says "soon" and a stuck one never says "tomorrow"."""
    rounds = max(1, -(-ahead // max(1, slots)))  # ceil(ahead / slots), at least one
    return min(ceiling_s, max(floor_s, mean_hold_s * rounds))


class WorkQueue:
    """At most ``slots`` callers hold the work at once and ``depth`` more wait for it, first come
    first served, each at most ``wait_s`` (less when its deadline is sooner). A caller that finds
    the queue full, or waits its longest, gets :class:`Overloaded` at once with a retry hint from
    the recent hold times: refused work never occupies a server thread. ``setting`` names the
    settings that size it, so the message tells an operator what to raise."""

    def __init__(self, name: str, *, slots: int, depth: int, wait_s: float, setting: str) -> None:
        if slots < 1 or depth < 0 or wait_s < 0:
            raise ValueError(f"{name}: slots must be >= 1, depth and wait_s >= 0 (got {slots}, {depth}, {wait_s})")
        self.name, self.slots, self.depth, self.wait_s, self.setting = name, slots, depth, wait_s, setting
        self._condition = threading.Condition()
        self._running = 0
        self._waiting: list[object] = []  # tickets, oldest first
        self._started: list[float] = []  # start times of the current holders, oldest first
        self._mean_hold_s = 5.0  # a first guess until a hold has been measured

    @property
    def running(self) -> int:
        with self._condition:
            return self._running

    @property
    def waiting(self) -> int:
        with self._condition:
            return len(self._waiting)

    def _overloaded(self, why: str) -> Overloaded:
        retry = retry_after_estimate(self._mean_hold_s, self._running + len(self._waiting), self.slots)
        return Overloaded(f"{self.name} {why}; retry in about {retry:.0f} s", retry)

    def acquire(self, timeout: float | None = None, should_stop: Callable[[], bool] | None = None) -> bool:
        """Take a slot (True), waiting at most ``min(timeout, wait_s)``; raises :class:`Overloaded`
        when the queue is full or the wait ran out, :class:`CallerGone` once ``should_stop()``."""
        wait = self.wait_s if timeout is None else max(0.0, min(timeout, self.wait_s))
        with self._condition:
            if self._running < self.slots and not self._waiting:
                return self._take()
            if len(self._waiting) >= self.depth:
                raise self._overloaded(
                    f"is full: {self._running} running and {len(self._waiting)} waiting, the most it queues "
                    f"({self.setting}_depth={self.depth})"
                )
            ticket = object()
            self._waiting.append(ticket)
            ends = time.monotonic() + wait
            try:
                while not (self._running < self.slots and self._waiting[0] is ticket):
                    left = ends - time.monotonic()
                    if left <= 0:
                        raise self._overloaded(
                            f"had no free slot within {wait:.1f} s ({self._running} running, "
                            f"{len(self._waiting) - 1} waiting besides this call; {self.setting}_wait_s={self.wait_s:g})"
                        )
                    if should_stop is not None and should_stop():
                        raise CallerGone(f"{self.name}: the caller left while its call waited for a slot")
                    # Woken by release(); the slice bounds how late a departed caller is noticed.
                    self._condition.wait(min(left, 0.25))
                if should_stop is not None and should_stop():  # gone while it waited: no slot for it
                    raise CallerGone(f"{self.name}: the caller left while its call waited for a slot")
                self._waiting.remove(ticket)
                return self._take()
            finally:
                if ticket in self._waiting:
                    self._waiting.remove(ticket)
                    self._condition.notify_all()  # the next in line may now be first

    def _take(self) -> bool:
        self._running += 1
        self._started.append(time.monotonic())
        return True

    def release(self) -> None:
        with self._condition:
            if self._running == 0:
                raise RuntimeError(f"{self.name}: release() without a slot held")
            self._running -= 1
            held = time.monotonic() - self._started.pop(0)  # holders overlap: the oldest is a fair guess
            self._mean_hold_s = 0.7 * self._mean_hold_s + 0.3 * held
            self._condition.notify_all()

    @contextmanager
    def admitted(self, timeout: float | None = None, should_stop: Callable[[], bool] | None = None) -> Iterator[None]:
        self.acquire(timeout, should_stop)
        try:
            yield
        finally:
            self.release()


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

    def expect_methods(self, methods: list[str]) -> None:
        """Create each method's OK and latency series at 0 before its first call: Prometheus'
        rate() and increase() cannot see the first call of a series that appears already at 1,
        and an error ratio needs its denominator from the start."""
        for method in methods:
            self.requests.labels(method, grpc.StatusCode.OK.name)
            self.latency.labels(method)

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


# --- authentication, authorisation and the concurrency limit (seal/auth.py decides) --------------

_STATUS_OF_AUTH = {
    "unauthenticated": grpc.StatusCode.UNAUTHENTICATED,
    "permission_denied": grpc.StatusCode.PERMISSION_DENIED,
}
# Health checks are never limited: a flooded service must still answer its Kubernetes probes.
_UNLIMITED_SERVICES = ("grpc.health.v1.Health",)
# Threads beyond max_concurrent_rpcs, so that health checks and refusals never wait for a worker.
_RESERVED_THREADS = 4
_IGNORED = object()  # what a refused call's request "decodes" to: its bytes are never parsed
_principal: contextvars.ContextVar[authz.Principal | None] = contextvars.ContextVar("seal_principal", default=None)


def current_principal() -> str | None:
    """Name of the principal whose RPC this thread is serving; None with auth off."""
    principal = _principal.get()
    return None if principal is None else principal.name


def current_scopes() -> frozenset[str] | None:
    """Scopes of the principal whose RPC this thread is serving; None with auth off."""
    principal = _principal.get()
    return None if principal is None else principal.scopes


@contextmanager
def _acting_as(principal: authz.Principal) -> Iterator[None]:
    token = _principal.set(principal)
    try:
        yield
    finally:
        try:
            _principal.reset(token)
        except ValueError:  # a stream closed by the garbage collector in another thread
            pass


def _wrap_behaviour(
    handler: grpc.RpcMethodHandler, around: Callable[[grpc.ServicerContext], AbstractContextManager[Any]]
) -> grpc.RpcMethodHandler:
    """``handler`` whose behaviour runs inside ``around(context)``, for all four call shapes."""
    if handler.unary_unary or handler.stream_unary:
        inner = handler.unary_unary or handler.stream_unary

        def unary_response(request, context):  # type: ignore[no-untyped-def]
            with around(context):
                return inner(request, context)

        make = grpc.unary_unary_rpc_method_handler if handler.unary_unary else grpc.stream_unary_rpc_method_handler
        return make(unary_response, handler.request_deserializer, handler.response_serializer)
    inner_stream = handler.unary_stream or handler.stream_stream

    def stream_response(request, context):  # type: ignore[no-untyped-def]
        with around(context):
            yield from inner_stream(request, context)

    make = grpc.unary_stream_rpc_method_handler if handler.unary_stream else grpc.stream_stream_rpc_method_handler
    return make(stream_response, handler.request_deserializer, handler.response_serializer)


def _refusing_handler(handler: grpc.RpcMethodHandler, code: grpc.StatusCode, message: str) -> grpc.RpcMethodHandler:
    """A handler of ``handler``'s shape that answers ``code`` without parsing the request."""

    def refuse(_request, context):  # type: ignore[no-untyped-def]
        context.abort(code, message)

    def ignore(_raw: bytes) -> object:
        return _IGNORED

    if handler.unary_unary:
        return grpc.unary_unary_rpc_method_handler(refuse, ignore, handler.response_serializer)
    if handler.unary_stream:
        return grpc.unary_stream_rpc_method_handler(refuse, ignore, handler.response_serializer)
    if handler.stream_unary:
        return grpc.stream_unary_rpc_method_handler(refuse, ignore, handler.response_serializer)
    return grpc.stream_stream_rpc_method_handler(refuse, ignore, handler.response_serializer)


def _certificate_names(auth_context: dict[str, list[bytes]]) -> list[str]:
    names = [*auth_context.get("x509_common_name", []), *auth_context.get("x509_subject_alternative_name", [])]
    return [n.decode("utf-8", "replace") if isinstance(n, bytes) else str(n) for n in names]


class _AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates every call but health checks (bearer token, else the TLS client certificate)
    and checks its scope against seal.auth.METHOD_SCOPES. A call carrying a token, or no
    credential a certificate could replace, is decided before its request is parsed."""

    def __init__(self, service: str, principals: authz.PrincipalStore, *, certificates: bool) -> None:
        self._service = service
        self._principals = principals
        self._certificates = certificates  # the TLS handshake verified client certificates

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or authz.is_open(method):
            return handler
        if method not in authz.METHOD_SCOPES:  # refused whoever asks (the service also refuses to start)
            return self._refuse(handler, method, authz.AuthError("permission_denied", authz.unlisted_message(method)))
        principals = self._principals.current()
        try:
            token = authz.bearer_token(handler_call_details.invocation_metadata or ())
            if token is not None:
                principal = authz.authenticate_token(principals, token)
                authz.authorize(method, principal)
                return _wrap_behaviour(handler, lambda _context: _acting_as(principal))
        except authz.AuthError as exc:
            return self._refuse(handler, method, exc)
        if self._certificates and principals.uses_certificates:
            return _wrap_behaviour(handler, functools.partial(self._by_certificate, method, principals))
        return self._refuse(handler, method, authz.AuthError(
            "unauthenticated", f"{method} needs credentials and the call carried none: {authz.CREDENTIALS_HINT}"))

    def _refuse(self, handler: grpc.RpcMethodHandler, method: str, exc: authz.AuthError) -> grpc.RpcMethodHandler:
        log.info("%s refused %s: %s", self._service, method, exc)
        return _refusing_handler(handler, _STATUS_OF_AUTH[exc.code], str(exc))

    @contextmanager
    def _by_certificate(self, method: str, principals: authz.Principals, context: grpc.ServicerContext) -> Iterator[None]:
        names = _certificate_names(context.auth_context())
        principal = principals.by_certificate(names)
        if principal is None:
            detail = (f"its client certificate ({', '.join(names[:4])}) is not listed in the principals file"
                      if names else "it presented no client certificate")
            log.info("%s refused %s: no token and %s", self._service, method, detail)
            context.abort(grpc.StatusCode.UNAUTHENTICATED,
                          f"{method} needs credentials: the call carried no bearer token and {detail}; "
                          f"{authz.CREDENTIALS_HINT}")
        try:
            authz.authorize(method, principal)
        except authz.AuthError as exc:
            log.info("%s refused %s: %s", self._service, method, exc)
            context.abort(_STATUS_OF_AUTH[exc.code], str(exc))
        with _acting_as(principal):
            yield


class _ConcurrencyLimiter(grpc.ServerInterceptor):
    """At most ``limit`` RPCs run at once, health checks excepted; the next is refused with
    RESOURCE_EXHAUSTED. (grpc's own maximum_concurrent_rpcs counts health checks too, so a flooded
    service would fail its probes and be restarted.) A slot is taken when the call starts running
    and given back when it ends, streams included."""

    def __init__(self, service: str, limit: int) -> None:
        self._service = service
        self.limit = limit
        self._slots = threading.BoundedSemaphore(limit)

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None or handler_call_details.method.lstrip("/").startswith(_UNLIMITED_SERVICES):
            return handler
        return _wrap_behaviour(handler, self._slot)

    @contextmanager
    def _slot(self, context: grpc.ServicerContext) -> Iterator[None]:
        if not self._slots.acquire(blocking=False):
            set_retry_after(context, 1.0)  # calls here are short or streams: any slot frees soon
            context.abort(
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"{self._service} is running {self.limit} calls, its limit (services.max_concurrent_rpcs): "
                "retry later with backoff",
            )
        try:
            yield
        finally:
            self._slots.release()


class _Counted:
    """A parsed request and the bytes it holds in the budget, given back when its call ends (or,
    should the call never run, when the request is garbage-collected: nothing leaks)."""

    __slots__ = ("message", "release", "__weakref__")

    def __init__(self, message: Any, size: int, budget: _RequestBytesBudget) -> None:
        self.message = message
        self.release = weakref.finalize(self, budget._give_back, size)


@dataclass(frozen=True)
class _Refused:
    message: str
    retry_after_s: float | None  # None: retrying cannot help (the request is over its method's cap)


class _RequestBytesBudget(grpc.ServerInterceptor):
    """Memory held by requests: a size cap per method (``limits``, else ``default_limit``; grpc
    itself refuses anything above the server-wide max before reading it) and a budget for the
    bytes of all requests whose calls are in flight, streams until their last message. Checked on
    the raw bytes before they are parsed: a refused request is never turned into Python objects.
    A lone request within its method's cap always passes, whatever the budget."""

    def __init__(self, service: str, *, budget: int, default_limit: int, limits: dict[str, int]) -> None:
        self._service = service
        self._budget = budget
        self._default_limit = default_limit
        self._limits = limits
        self._lock = threading.Lock()
        self.in_flight = 0

    def _give_back(self, size: int) -> None:
        with self._lock:
            self.in_flight -= size

    def _take(self, method: str, size: int) -> _Refused | None:
        """Reserve ``size`` bytes for a request to ``method``; why not, when refused."""
        limit = self._limits.get(method, self._default_limit)
        if size > limit:
            return _Refused(f"{method} request is {size} bytes, above its limit of {limit} bytes "
                            "(services.method_max_request_bytes, else services.max_request_bytes): send less", None)
        with self._lock:
            if self.in_flight and self.in_flight + size > self._budget:
                return _Refused(f"{self._service} holds {self.in_flight} bytes of requests in flight and this "
                                f"{size}-byte request would pass its budget of {self._budget} "
                                "(services.inflight_request_bytes): retry shortly", 1.0)
            self.in_flight += size
        return None

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming:  # seal has no client-streaming RPC
            return handler
        if handler_call_details.method.lstrip("/").startswith(_UNLIMITED_SERVICES):
            return handler
        method = handler_call_details.method.rsplit("/", 1)[-1]
        parse = handler.request_deserializer

        def deserialize(raw: bytes) -> Any:
            refusal = self._take(method, len(raw))
            if refusal is not None:
                return refusal
            try:
                message = parse(raw) if parse is not None else raw
            except BaseException:
                self._give_back(len(raw))
                raise
            return _Counted(message, len(raw), self)

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary_unary(request, context):  # type: ignore[no-untyped-def]
                with _claimed(request, context) as message:
                    return inner(message, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, handler.response_serializer)
        inner_stream = handler.unary_stream

        def unary_stream(request, context):  # type: ignore[no-untyped-def]
            with _claimed(request, context) as message:
                yield from inner_stream(message, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, handler.response_serializer)


@contextmanager
def _claimed(request: _Counted | _Refused, context: grpc.ServicerContext) -> Iterator[Any]:
    if isinstance(request, _Refused):
        if request.retry_after_s is not None:
            set_retry_after(context, request.retry_after_s)
        context.abort(grpc.StatusCode.RESOURCE_EXHAUSTED, request.message)
    try:
        yield request.message
    finally:
        request.release()


@dataclass(frozen=True)
class _Undecodable:
    reason: str


def unknown_enum_values(message: Any, prefix: str = "") -> list[str]:
    """``field=number`` for every enum field of ``message`` (nested messages included) holding a
    number its enum does not define. proto3 enums are open: such a number parses and reaches the
    servicer as a plain int, where it would be read as "unset" or ignored."""
    found: list[str] = []
    for descriptor, value in message.ListFields():
        name = f"{prefix}{descriptor.name}"
        repeated = descriptor.is_repeated
        if descriptor.message_type is not None and descriptor.message_type.GetOptions().map_entry:
            value_field = descriptor.message_type.fields_by_name["value"]
            items = [(f"{name}[{key!r}]", item) for key, item in value.items()]
            descriptor, repeated = value_field, False
            if value_field.message_type is not None:
                for label, item in items:
                    found.extend(unknown_enum_values(item, f"{label}."))
                continue
        else:
            items = [(f"{name}[{i}]", item) for i, item in enumerate(value)] if repeated else [(name, value)]
        for label, item in items:
            if descriptor.enum_type is not None and item not in descriptor.enum_type.values_by_number:
                known = ", ".join(v.name for v in descriptor.enum_type.values)
                found.append(f"{label}={item} is not a value of {descriptor.enum_type.full_name} ({known})")
            elif descriptor.message_type is not None:
                found.extend(unknown_enum_values(item, f"{label}."))
    return found


class _RequestDecoder(grpc.ServerInterceptor):
    """A request whose bytes do not parse, or that names an enum value its type does not define,
    is the caller's error: INVALID_ARGUMENT saying so. (grpc answers INTERNAL, "Exception
    deserializing request!", for the first, and passes the second through as a bare int.)"""

    def intercept_service(self, continuation, handler_call_details):  # type: ignore[no-untyped-def]
        handler = continuation(handler_call_details)
        if handler is None or handler.request_streaming or handler.request_deserializer is None:
            return handler  # seal has no client-streaming RPC
        parse = handler.request_deserializer
        type_name = getattr(getattr(parse, "__self__", None), "DESCRIPTOR", None)
        type_name = type_name.full_name if type_name is not None else "request"

        def deserialize(raw: bytes) -> Any:
            try:
                message = parse(raw)
            except Exception as exc:  # noqa: BLE001 - DecodeError, or any other parse failure
                return _Undecodable(f"the request's bytes do not decode as a {type_name} ({exc}); "
                                    "send a message serialised from the seal.v1 protos")
            unknown = unknown_enum_values(message) if hasattr(message, "ListFields") else []
            if unknown:
                return _Undecodable(f"{'; '.join(unknown[:5])}: use a value the enum defines")
            return message

        def refused(request: Any, context: grpc.ServicerContext) -> None:
            if isinstance(request, _Undecodable):
                context.abort(grpc.StatusCode.INVALID_ARGUMENT, request.reason)

        if handler.unary_unary:
            inner = handler.unary_unary

            def unary_unary(request, context):  # type: ignore[no-untyped-def]
                refused(request, context)
                return inner(request, context)

            return grpc.unary_unary_rpc_method_handler(unary_unary, deserialize, handler.response_serializer)
        inner_stream = handler.unary_stream

        def unary_stream(request, context):  # type: ignore[no-untyped-def]
            refused(request, context)
            yield from inner_stream(request, context)

        return grpc.unary_stream_rpc_method_handler(unary_stream, deserialize, handler.response_serializer)


def _server_credentials(auth: AuthSettings) -> grpc.ServerCredentials:
    """TLS from auth's files, re-read when they change (cert-manager renews a Secret in place: the
    next handshake uses the new certificate, no restart)."""
    paths = [p for p in (auth.tls_key_file, auth.tls_cert_file, auth.tls_ca_file) if p]

    def stamp() -> tuple[int, ...]:
        return tuple(os.stat(p).st_mtime_ns for p in paths)

    def configuration() -> Any:
        key, chain = Path(auth.tls_key_file).read_bytes(), Path(auth.tls_cert_file).read_bytes()
        ca = Path(auth.tls_ca_file).read_bytes() if auth.tls_ca_file else None
        return grpc.ssl_server_certificate_configuration([(key, chain)], root_certificates=ca)

    loaded = {"stamp": stamp()}
    initial = configuration()

    def fetch() -> Any:
        try:
            now = stamp()
            if now == loaded["stamp"]:
                return None
            renewed = configuration()
        except OSError:  # mid-rotation: keep the current certificate
            return None
        loaded["stamp"] = now
        log.info("TLS certificate files changed: new handshakes use them")
        return renewed

    return grpc.dynamic_ssl_server_credentials(
        initial, fetch, require_client_authentication=auth.require_client_cert
    )


class _BearerPlugin(grpc.AuthMetadataPlugin):
    """Call credentials over TLS: the token, re-read from its file when that changes."""

    def __init__(self, source: authz.TokenSource) -> None:
        self._source = source

    def __call__(self, context: grpc.AuthMetadataContext, callback: grpc.AuthMetadataPluginCallback) -> None:
        try:
            callback((("authorization", f"Bearer {self._source.token()}"),), None)
        except Exception as exc:  # noqa: BLE001 - grpc fails the call with it
            callback((), exc)


_CallDetails = namedtuple("_CallDetails", ("method", "timeout", "metadata", "credentials", "wait_for_ready", "compression"))


class _ClientCallDetails(_CallDetails, grpc.ClientCallDetails):
    pass


class _BearerInterceptor(
    grpc.UnaryUnaryClientInterceptor, grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor, grpc.StreamStreamClientInterceptor,
):
    """The token as metadata on a plaintext channel (auth.plaintext), where grpc refuses call
    credentials. The streaming calls it returns are grpc's own, so cancel() still works."""

    def __init__(self, source: authz.TokenSource) -> None:
        self._source = source

    def _details(self, details: grpc.ClientCallDetails) -> grpc.ClientCallDetails:
        metadata = [*(details.metadata or ()), ("authorization", f"Bearer {self._source.token()}")]
        return _ClientCallDetails(details.method, details.timeout, metadata, details.credentials,
                                  getattr(details, "wait_for_ready", None), getattr(details, "compression", None))

    def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request)

    def intercept_stream_unary(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)

    def intercept_stream_stream(self, continuation, client_call_details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(self._details(client_call_details), request_iterator)


def dial(
    address: str,
    auth: AuthSettings,
    *,
    identity: Literal["teacher", "student", "auditor"] | None = None,
    token_file: str = "",
    with_token: bool = True,
) -> grpc.Channel:
    """A channel to a seal service with this process's credentials: TLS (with its client
    certificate: mutual TLS) when ``auth.tls_ca_file`` is set, plaintext otherwise; and the bearer
    token of ``identity`` (a service calling another) or of the client (``token_file``, else
    ``auth.token_file``, else $SEAL_TOKEN). ``with_token=False`` for health checks. Compose with
    :func:`traced_channel` on top. Raises seal.auth.AuthConfigError when a token would travel in
    clear without ``auth.plaintext`` saying so."""
    token = None
    if with_token and not auth.insecure:
        token = authz.client_token(auth, identity=identity, token_file=token_file)
    options: list[tuple[str, Any]] = []
    if auth.tls_ca_file and not auth.insecure:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=Path(auth.tls_ca_file).read_bytes(),
            private_key=Path(auth.tls_key_file).read_bytes() if auth.tls_key_file else None,
            certificate_chain=Path(auth.tls_cert_file).read_bytes() if auth.tls_cert_file else None,
        )
        if token is not None:
            credentials = grpc.composite_channel_credentials(
                credentials, grpc.metadata_call_credentials(_BearerPlugin(token), name="seal-bearer")
            )
        if auth.tls_server_name:
            options.append(("grpc.ssl_target_name_override", auth.tls_server_name))
        return grpc.secure_channel(address, credentials, options=options)
    if token is not None and not auth.plaintext:
        raise authz.AuthConfigError(
            f"a bearer token is configured ({token.origin}) but auth.tls_ca_file is empty and auth.plaintext is "
            "false: set auth.tls_ca_file to send it over TLS, or auth.plaintext=true to send it in clear on a "
            "network you trust"
        )
    channel = grpc.insecure_channel(address)
    return grpc.intercept_channel(channel, _BearerInterceptor(token)) if token is not None else channel


class Configured(enum.Enum):
    """The port ``settings.services`` gives a service: the default of ``port`` and
    ``metrics_port`` wherever a service is started from settings. A sentinel of its own, so that
    ``metrics_port=None`` means one thing everywhere: no /metrics endpoint."""

    PORT = "the configured port"


CONFIGURED: Final = Configured.PORT


@dataclass
class RunningService:
    name: str
    server: grpc.Server
    port: int
    health: health.HealthServicer
    service_names: list[str]
    metrics_port: int | None = None
    probe_port: int | None = None  # the plaintext health-only port, when there is one
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
    auth: AuthSettings,
    port: int | Configured = CONFIGURED,
    metrics_port: int | Configured | None = CONFIGURED,
    probe_port: int | None = None,
    tracing: Tracing | None = None,
    untraced_methods: tuple[str, ...] = (),
) -> RunningService:
    """:func:`start_service` with the host, ports and limits ``services`` gives ``name``
    (``probe_port`` too: None = the configured one, whose 0 means none).
    ``port`` and ``metrics_port`` replace the configured ports when given: 0 = a free one;
    ``metrics_port=None`` = no /metrics endpoint, as does ``auth.metrics_endpoint`` false."""
    if not auth.metrics_endpoint:
        metrics_port = None
    elif metrics_port is CONFIGURED:
        metrics_port = getattr(services, f"{name}_metrics_port")
    return start_service(
        name,
        register,
        host=services.host,
        port=getattr(services, f"{name}_port") if port is CONFIGURED else port,
        metrics=metrics,
        metrics_port=metrics_port,
        max_workers=services.max_workers,
        max_concurrent_rpcs=services.max_concurrent_rpcs,
        max_request_bytes=services.max_request_bytes,
        method_max_request_bytes=services.method_max_request_bytes,
        inflight_request_bytes=services.inflight_request_bytes,
        auth=auth,
        probe_port=(getattr(services, f"{name}_probe_port") or None) if probe_port is None else probe_port,
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
    auth: AuthSettings,
    probe_port: int | None = None,
    tracing: Tracing | None = None,
    untraced_methods: tuple[str, ...] = (),
    max_request_bytes: int = 4 * 1024 * 1024,
    method_max_request_bytes: dict[str, int] | None = None,
    inflight_request_bytes: int = 64 * 1024 * 1024,
) -> RunningService:
    """Start a gRPC server whose servicers ``register`` adds; returns once it accepts calls.

    ``port=0`` picks a free port; ``metrics_port=None`` disables the /metrics endpoint. With
    ``tracing`` on, every call but health checks, reflection and ``untraced_methods`` gets a
    server span, child of the caller's span when its metadata carries one; the provider is shut
    down (its queued spans exported) after the server stops.

    ``auth`` (seal.config.AuthSettings) is required: every call but health checks is
    authenticated and checked against seal.auth.METHOD_SCOPES, over TLS or plaintext as it says;
    a service with a method the table does not list refuses to start. ``auth.insecure`` turns
    that off, with a WARNING. At most ``max_concurrent_rpcs`` calls run at once, health checks
    excepted; the thread pool has room for all of them plus health checks and refusals.

    ``probe_port`` (0 = a free one): a second, plaintext server with the health service alone, for
    Kubernetes' native gRPC probes, which can neither do TLS nor send credentials. It shares the
    health servicer, so it reports NOT_SERVING on graceful shutdown too.

    Memory held by requests (health checks excepted): grpc refuses a message above
    ``max_request_bytes`` before reading it; ``method_max_request_bytes`` caps methods by their
    short name lower; the raw bytes of the requests of all calls in flight stay within
    ``inflight_request_bytes``. Every refusal is RESOURCE_EXHAUSTED."""
    authz.check_server_settings(auth)  # fails here, naming the setting, before anything binds
    interceptors: list[grpc.ServerInterceptor] = [_MetricsInterceptor(metrics)]
    if tracing is not None and tracing.enabled:
        # First, so that the span covers everything the other interceptors do.
        interceptors.insert(0, _server_tracing_interceptor(tracing, untraced_methods))
    if not auth.insecure:
        # After the metrics (refusals are counted by code), before the limiter (refusals take no slot).
        interceptors.append(_AuthInterceptor(
            name, authz.PrincipalStore(auth.principals_file),
            certificates=bool(auth.tls_cert_file and auth.require_client_cert),
        ))
    interceptors.append(_ConcurrencyLimiter(name, max_concurrent_rpcs))
    # Last: the interceptors above pass its request holder along untouched and it hands the servicer
    # the parsed message; a call auth refuses is never parsed nor counted; the metrics count its refusals.
    interceptors.append(_RequestBytesBudget(
        name, budget=inflight_request_bytes, default_limit=max_request_bytes, limits=dict(method_max_request_bytes or {}),
    ))
    # Innermost: the bytes budget calls its parser, so an undecodable request is still counted
    # and given back; it reaches the servicer only as a valid message.
    interceptors.append(_RequestDecoder())
    threads = max(max_workers, max_concurrent_rpcs + _RESERVED_THREADS)
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=threads, thread_name_prefix=f"{name}-rpc"),
        interceptors=interceptors,
        # Only a backstop against a flood far past the limiter (whose refusals are cheap): it would
        # refuse health checks too.
        maximum_concurrent_rpcs=4 * threads,
        options=[
            ("grpc.max_receive_message_length", max([max_request_bytes, *(method_max_request_bytes or {}).values()])),
            ("grpc.max_send_message_length", 64 * 1024 * 1024),
        ],
    )
    service_names = register(server)
    unlisted = authz.unlisted_methods(_full_method_names(service_names))
    if unlisted and not auth.insecure:
        raise RuntimeError(
            f"{name}: no scope for {unlisted} in seal.auth.METHOD_SCOPES: add each with the scopes that may call "
            "it; a service does not start with a method nobody could be refused"
        )
    metrics.expect_methods(_method_names(service_names))
    health_servicer = health.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for service_name in [*service_names, ""]:
        health_servicer.set(service_name, health_pb2.HealthCheckResponse.SERVING)
    if auth.reflection:
        reflection.enable_server_reflection(
            [*service_names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME],
            server,
        )
    if auth.tls_cert_file and not auth.insecure:
        bound_port = server.add_secure_port(f"{host}:{port}", _server_credentials(auth))
    else:
        bound_port = server.add_insecure_port(f"{host}:{port}")
    if bound_port == 0:
        raise RuntimeError(f"{name}: could not bind {host}:{port}; is another process using it?")
    server.start()
    running = RunningService(name, server, bound_port, health_servicer, service_names)
    if probe_port is not None:
        probes = grpc.server(futures.ThreadPoolExecutor(max_workers=2, thread_name_prefix=f"{name}-probe"))
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, probes)
        running.probe_port = probes.add_insecure_port(f"{host}:{probe_port}")
        probes.start()
        running.on_stop.append(lambda: probes.stop(0))
    if tracing is not None and tracing.enabled:
        running.on_stop.append(tracing.shutdown)
    if metrics_port is not None:
        http_server, _thread = start_http_server(metrics_port, addr=host, registry=metrics.registry)
        running._metrics_http = http_server
        running.metrics_port = http_server.server_port
    log.info("%s listening on %s:%d (metrics %s, health-only probe port %s)", name, host, bound_port,
             running.metrics_port, running.probe_port)
    if auth.insecure:
        log.warning(
            "%s: auth.insecure is on: no TLS, no tokens, no scopes; anyone who reaches %s:%d may call every RPC "
            "(Adapt, Promote, Rollback, Reject with weight deletion, Train). For local demos only: see docs/auth.md",
            name, host, bound_port,
        )
    else:
        log.info("%s: authentication on (%s), principals from %s", name,
                 "mutual TLS" if auth.tls_cert_file and auth.require_client_cert
                 else "TLS" if auth.tls_cert_file else "plaintext with bearer tokens", auth.principals_file)
    return running


def _full_method_names(service_names: list[str]) -> list[str]:
    """``/package.Service/Method`` of every method of registered gRPC services."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    return [f"/{name}/{method.name}" for name in service_names for method in pool.FindServiceByName(name).methods]


def _method_names(service_names: list[str]) -> list[str]:
    """The short method names (as the metrics label them) of registered gRPC services."""
    from google.protobuf import descriptor_pool

    pool = descriptor_pool.Default()
    return [method.name for name in service_names for method in pool.FindServiceByName(name).methods]


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


def wait_until_serving(address: str, service: str, timeout: float, auth: AuthSettings | None = None) -> None:
    """Poll the standard health service until ``service`` reports SERVING; over TLS when ``auth``
    says so (health checks need no token)."""
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    with (dial(address, auth, with_token=False) if auth is not None else grpc.insecure_channel(address)) as channel:
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
