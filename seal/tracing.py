"""OpenTelemetry tracing of the seal services: one tracer provider per service, exporting over
OTLP/gRPC when ``settings.tracing.otlp_endpoint`` is set, nothing at all otherwise.

Why a provider per service instead of OpenTelemetry's global one: a span's ``service.name`` is
a property of the provider that made it, and several services can share a process
(``seal.stack.local_stack`` runs all three in tests and notebooks). With one global provider
every span would claim to come from one service. So each service builds its own
:class:`Tracing` and hands it explicitly to its gRPC server, its client channels and the
pipeline; the global provider is never set, and nothing here depends on it.

This module is transport-free: the gRPC interceptors that carry the trace context in request
metadata are wired in ``seal.rpc``. The OTLP exporter is imported only when an endpoint is
configured, so a process with tracing off never loads the SDK's exporters.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from importlib import metadata
from typing import TYPE_CHECKING, Literal

from opentelemetry import trace

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import SpanExporter

    from seal.config import TracingSettings

log = logging.getLogger(__name__)

ServiceRole = Literal["teacher", "student", "auditor"]


@dataclass(frozen=True)
class Tracing:
    """One service's tracing. ``provider`` is None when tracing is off."""

    service_name: str
    provider: TracerProvider | None = None

    @property
    def enabled(self) -> bool:
        return self.provider is not None

    def tracer(self, instrumenting_module: str) -> trace.Tracer | None:
        """A tracer for ``instrumenting_module``'s spans, or None when tracing is off: callers then
        open no span at all (not even a no-op one), so an untraced process pays nothing."""
        if self.provider is None:
            return None
        return self.provider.get_tracer(instrumenting_module)

    def shutdown(self) -> None:
        """Export what is still queued (bounded by the exporter's timeout) and stop exporting."""
        if self.provider is not None:
            self.provider.shutdown()


def build_tracing(role: ServiceRole, settings: TracingSettings, *, exporter: SpanExporter | None = None) -> Tracing:
    """The tracing ``settings`` ask of the service ``role``.

    ``exporter`` replaces the OTLP exporter and turns tracing on whatever the endpoint says; it
    is exported to synchronously as each span ends (tests pass an ``InMemorySpanExporter`` and
    read spans as soon as a call returns). Otherwise spans are batched to the OTLP endpoint, or,
    with no endpoint, tracing is off."""
    service_name = f"{settings.service_name_prefix}{role}"
    if exporter is None and not settings.otlp_endpoint:
        return Tracing(service_name)
    from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

    provider = _provider(service_name, settings)
    if exporter is not None:
        provider.add_span_processor(SimpleSpanProcessor(exporter))
    else:
        provider.add_span_processor(
            BatchSpanProcessor(_otlp_exporter(settings), export_timeout_millis=settings.export_timeout_s * 1000)
        )
        log.info("%s: exporting traces to %s", service_name, settings.otlp_endpoint)
    return Tracing(service_name, provider)


def _provider(service_name: str, settings: TracingSettings) -> TracerProvider:
    from opentelemetry.sdk.resources import SERVICE_NAME, SERVICE_NAMESPACE, SERVICE_VERSION, Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased

    # Ours last: Resource.create merges OTEL_RESOURCE_ATTRIBUTES first, and later keys win.
    attributes = {
        **settings.resource_attributes,
        SERVICE_NAMESPACE: "seal",
        SERVICE_VERSION: _seal_version(),
        SERVICE_NAME: service_name,
    }
    # Parent-based: only a trace's first span rolls the dice; every service downstream follows
    # the decision that travelled in the traceparent header.
    sampler = ParentBased(TraceIdRatioBased(settings.sample_ratio))
    return TracerProvider(resource=Resource.create(attributes), sampler=sampler)


def _otlp_exporter(settings: TracingSettings) -> SpanExporter:
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

    # The scheme decides TLS, so that one setting cannot contradict another.
    insecure = settings.otlp_endpoint.startswith("http://")
    return OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=insecure, timeout=settings.export_timeout_s)


def _seal_version() -> str:
    try:
        return metadata.version("seal")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"
