"""Structured JSON logs carrying job and tenant ids, and the OpenTelemetry tracer set-up."""

from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import trace
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter, SpanExporter
from opentelemetry.sdk.trace.sampling import ALWAYS_OFF, ALWAYS_ON, ParentBased
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from libs.settings import TelemetrySettings

_TRACEPARENT = re.compile(r"[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}")
_PROPAGATOR = TraceContextTextMapPropagator()

job_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("job_id", default="")
tenant_id_var: contextvars.ContextVar[str] = contextvars.ContextVar("tenant_id", default="")


class JsonFormatter(logging.Formatter):
    """One JSON object per line, with the service, trace, job and tenant of the current context."""

    def __init__(self, service: str):
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, object] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        job_id = getattr(record, "job_id", None) or job_id_var.get()
        tenant_id = getattr(record, "tenant_id", None) or tenant_id_var.get()
        if job_id:
            entry["job_id"] = job_id
        if tenant_id:
            entry["tenant_id"] = tenant_id
        span = trace.get_current_span().get_span_context()
        if span.is_valid:
            entry["trace_id"] = format(span.trace_id, "032x")
        for key in ("worker_id", "pool_id", "attempt", "replica"):
            if hasattr(record, key):
                entry[key] = getattr(record, key)
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def setup_logging(service: str, level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(service))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # grpc and etcd clients are chatty at INFO about reconnects we already log ourselves.
    logging.getLogger("grpc").setLevel("WARNING")
    logging.getLogger("etcd3aio").setLevel("WARNING")


def setup_tracing(settings: TelemetrySettings) -> TracerProvider:
    exporter: SpanExporter | None = None
    if settings.exporter == "console":
        exporter = ConsoleSpanExporter(out=sys.stderr)
    elif settings.exporter == "otlp":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

        exporter = OTLPSpanExporter(endpoint=settings.otlp_endpoint, insecure=True)
    # With nowhere to send spans, record none: trace ids are still made and propagated (logs carry them),
    # but no span objects are filled in on every call.
    provider = TracerProvider(
        resource=Resource.create({"service.name": settings.service_name}),
        sampler=ParentBased(ALWAYS_ON) if exporter is not None else ALWAYS_OFF,
    )
    if exporter is not None:
        provider.add_span_processor(BatchSpanProcessor(exporter))
    trace.set_tracer_provider(provider)
    return provider


def setup_telemetry(settings: TelemetrySettings) -> TracerProvider:
    setup_logging(settings.service_name, settings.log_level)
    return setup_tracing(settings)


# One trace per job -------------------------------------------------------------------------------------------------


def current_traceparent() -> str:
    """The W3C traceparent of the current span ("" without one): what a job record keeps of its submit's trace."""
    carrier: dict[str, str] = {}
    _PROPAGATOR.inject(carrier)
    return carrier.get("traceparent", "")


def checked_traceparent(value: str) -> str:
    """`value` if it is a well-formed traceparent, else "" (a record keeps nothing else in that field)."""
    return value if _TRACEPARENT.fullmatch(value) else ""


@contextmanager
def job_span(tracer: trace.Tracer, name: str, traceparent: str, **attributes: str | int) -> Iterator[trace.Span]:
    """A span in the trace of the job whose record carries `traceparent` (a root span without one): the hops of a
    job that no request carries (dispatch, run, result, cost) join the trace its submit started."""
    parent = _PROPAGATOR.extract({"traceparent": traceparent}) if traceparent else None
    with tracer.start_as_current_span(name, context=parent, attributes=attributes) as span:
        yield span
