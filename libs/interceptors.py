"""Shared gRPC interceptors: spans with propagated context, RPC metrics, and the one place errors become statuses."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.protobuf.message import Message
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode
from prometheus_client import CollectorRegistry, Counter, Histogram

from libs.errors import InvalidArgument, JobMeshError
from libs.settings import TlsSettings
from libs.telemetry import job_id_var, tenant_id_var
from libs.tls import RenewingChannel
from libs.unknown_fields import first_unknown

log = logging.getLogger(__name__)

DOMAIN = "jobmesh.dev"


# An error whose metadata has this says when a retry may succeed: it becomes a RetryInfo detail and a
# `retry-after` header (Retry-After of the REST answer, which Envoy's transcoder passes on).
RETRY_AFTER_KEY = "retry_after_seconds"


def retry_after(err: JobMeshError) -> int | None:
    value = err.metadata.get(RETRY_AFTER_KEY, "")
    return max(1, int(value)) if value.isdigit() else None


def status_for(err: JobMeshError) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=err.reason, domain=DOMAIN, metadata=err.metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    details = [detail]
    seconds = retry_after(err)
    if seconds is not None:
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=seconds)))
        details.append(retry)
    status = status_pb2.Status(code=err.code.value[0], message=err.message, details=details)
    return rpc_status.to_status(status)


async def abort_with(context: grpc.aio.ServicerContext, err: JobMeshError) -> None:
    """End the call with `err`'s status; with a retry hint, a `retry-after` header first."""
    seconds = retry_after(err)
    if seconds is not None:
        try:
            await context.send_initial_metadata((("retry-after", str(seconds)),))
        except Exception:  # a stream that has sent its headers already: the RetryInfo detail still says it
            log.debug("retry-after not sent: headers already sent")
    await context.abort_with_status(status_for(err))


class _Metadata:
    """Adapts invocation metadata to the OpenTelemetry getter interface."""

    @staticmethod
    def get(carrier: Any, key: str) -> list[str] | None:
        values = [v for k, v in carrier if k == key and isinstance(v, str)]
        return values or None

    @staticmethod
    def keys(carrier: Any) -> list[str]:
        return [k for k, _ in carrier]


class ServerInterceptor(grpc.aio.ServerInterceptor):
    """Wraps every unary handler: extract trace context, time it, map domain errors to statuses. With
    `reject_unknown_fields` (the public API), a request carrying a field its message does not define is refused
    with INVALID_ARGUMENT / UNKNOWN_FIELD naming it, before the handler runs."""

    def __init__(self, service: str, registry: CollectorRegistry, *, reject_unknown_fields: bool = False):
        self.reject_unknown_fields = reject_unknown_fields
        self.tracer = trace.get_tracer(f"jobmesh.{service}")
        metric = service.replace("-", "_")
        self.latency = Histogram(
            f"jobmesh_{metric}_rpc_duration_seconds",
            "Server-side RPC latency.",
            ["method", "code"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
        )
        self.errors = Counter(
            f"jobmesh_{metric}_rpc_errors_total",
            "RPCs that ended in an error, by reason.",
            ["method", "reason"],
            registry=registry,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith("/jobmesh."):
            return handler
        method = details.method.rsplit("/", 1)[-1]
        if handler.unary_unary is not None:
            inner = handler.unary_unary

            async def unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                return await self._run(method, details, lambda: self._checked(inner, request, context), context)

            return grpc.unary_unary_rpc_method_handler(unary, handler.request_deserializer, handler.response_serializer)
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._streaming(method, details, handler.unary_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        if handler.stream_stream is not None:
            return grpc.stream_stream_rpc_method_handler(
                self._streaming(method, details, handler.stream_stream),
                handler.request_deserializer,
                handler.response_serializer,
            )
        return handler

    async def _checked(self, inner: Any, request: Any, context: grpc.aio.ServicerContext) -> Any:
        self._refuse_unknown(request)
        return await inner(request, context)

    def _refuse_unknown(self, request: Any) -> None:
        if self.reject_unknown_fields and isinstance(request, Message):
            path = first_unknown(request)
            if path is not None:
                raise InvalidArgument(path, "unknown field (not part of this API)", reason="UNKNOWN_FIELD")

    def _streaming(self, method: str, details: grpc.HandlerCallDetails, inner: Any) -> Any:
        """A handler with a response stream (its request one message or a stream), written out under `_run`."""

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            async def drain() -> None:
                self._refuse_unknown(request)
                async for item in inner(request, context):
                    await context.write(item)

            await self._run(method, details, drain, context)

        return handle

    async def _run(
        self,
        method: str,
        details: grpc.HandlerCallDetails,
        call: Callable[[], Awaitable[Any]],
        context: grpc.aio.ServicerContext,
    ) -> Any:
        parent = propagate.extract(details.invocation_metadata or (), getter=_Metadata())  # type: ignore[arg-type]
        start = time.perf_counter()
        code = "OK"
        job_token = job_id_var.set("")
        tenant_token = tenant_id_var.set("")
        try:
            with self.tracer.start_as_current_span(details.method, context=parent, kind=SpanKind.SERVER) as span:
                try:
                    return await call()
                except JobMeshError as err:
                    code = err.code.name
                    span.set_status(Status(StatusCode.ERROR, err.reason))
                    span.set_attribute("jobmesh.error.reason", err.reason)
                    self.errors.labels(method, err.reason).inc()
                    await abort_with(context, err)
                except grpc.aio.AbortError:
                    code = "ABORTED_BY_HANDLER"
                    raise
                except grpc.aio.AioRpcError as err:
                    # A dependency failed: say which status it gave, never its stack.
                    code = err.code().name
                    span.set_status(Status(StatusCode.ERROR, code))
                    mapped = error_from_rpc(err)
                    self.errors.labels(method, mapped.reason).inc()
                    await abort_with(context, mapped)
                except Exception:
                    code = "INTERNAL"
                    log.exception("unhandled error in %s", details.method)
                    span.set_status(Status(StatusCode.ERROR, "internal"))
                    self.errors.labels(method, "INTERNAL").inc()
                    await context.abort_with_status(
                        rpc_status.to_status(status_pb2.Status(code=code_pb2.INTERNAL, message="internal error"))
                    )
        finally:
            job_id_var.reset(job_token)
            tenant_id_var.reset(tenant_token)
            self.latency.labels(method, code).observe(time.perf_counter() - start)


def error_from_rpc(err: grpc.aio.AioRpcError) -> JobMeshError:
    """Pass a dependency's domain error through unchanged; turn transport failures into UNAVAILABLE."""
    from libs.errors import Unavailable

    status = rpc_status.from_call(err)  # type: ignore[arg-type]
    if status is not None and err.code() not in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.INTERNAL):
        reason = "UPSTREAM_ERROR"
        metadata: dict[str, str] = {}
        for detail in status.details:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason, metadata = info.reason, dict(info.metadata)
        passed = JobMeshError(status.message, reason=reason, metadata=metadata)
        passed.code = err.code()
        return passed
    if err.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
        passed = JobMeshError("a dependency timed out", reason="DEPENDENCY_TIMEOUT")
        passed.code = grpc.StatusCode.DEADLINE_EXCEEDED
        return passed
    return Unavailable("a dependency is unavailable, retry shortly", reason="DEPENDENCY_UNAVAILABLE")


class _ClientCallDetails(grpc.aio.ClientCallDetails):
    pass


class TracingClientInterceptor(grpc.aio.UnaryUnaryClientInterceptor, grpc.aio.UnaryStreamClientInterceptor):
    """Injects the current trace context into outgoing metadata so spans join across hops."""

    def _with_context(self, details: grpc.aio.ClientCallDetails) -> grpc.aio.ClientCallDetails:
        metadata = list(details.metadata or [])
        carrier: dict[str, str] = {}
        propagate.inject(carrier)
        metadata.extend(carrier.items())
        return _ClientCallDetails(
            details.method, details.timeout, grpc.aio.Metadata(*metadata), details.credentials, details.wait_for_ready
        )

    async def intercept_unary_unary(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with_context(client_call_details), request)

    async def intercept_unary_stream(self, continuation, client_call_details, request):  # type: ignore[no-untyped-def]
        return await continuation(self._with_context(client_call_details), request)


# A call that finds no connection (UNAVAILABLE: nothing was sent) is tried again for about 2.4 s, longer than the
# channel's longest reconnect backoff (2 s): a service that was just restarted is used as soon as it is back,
# while one that is down is still answered UNAVAILABLE (503) soon. Only calls that reached no handler are
# retried by gRPC; and every internal write is idempotent by its job id or key anyway.
_RETRY_UNAVAILABLE = {
    "retryPolicy": {
        "maxAttempts": 5,
        "initialBackoff": "0.2s",
        "maxBackoff": "1s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE"],
    },
}


def service_config(*, retry: bool, health_service: str = "") -> str:
    """The channel's service config: retries of UNAVAILABLE (see above) and, for an active/standby service
    (libs/leadergate.py), gRPC's client-side health checking of `health_service` under round robin: only the
    replica that reports it SERVING (the leader) gets calls, and a flip moves them over without a reconnect."""
    config: dict[str, object] = {}
    method: dict[str, object] = {"name": [{}]}
    if retry:
        method.update(_RETRY_UNAVAILABLE)
    if health_service:
        config["loadBalancingConfig"] = [{"round_robin": {}}]
        config["healthCheckConfig"] = {"serviceName": health_service}
        # Between two leaders (up to the lease after a leader died) no replica serves: a call waits for the next
        # one, within its own deadline, instead of failing at once.
        method["waitForReady"] = True
    if len(method) > 1:
        config["methodConfig"] = [method]
    return json.dumps(config)


def channel(
    target: str | tuple[str, ...],
    tls: TlsSettings,
    *,
    propagate: bool = True,
    fail_fast: bool = False,
    health_service: str = "",
) -> grpc.aio.Channel:
    """A client channel to another service (round-robin over several replicas) over mTLS as the identity in
    `tls` (renewed files are picked up by new calls), with trace propagation unless the caller has no trace to
    carry on (`propagate=False` spares every call the interceptor). A call that finds no connection is tried
    again for a while, unless `fail_fast` (a caller that tries another replica itself, like a worker's heartbeat).
    With `health_service` (an active/standby service), calls go only to the replica serving it."""
    if isinstance(target, tuple):
        target = target[0] if len(target) == 1 else "ipv4:" + ",".join(target)
    return RenewingChannel(
        target,
        tls,
        interceptors=[TracingClientInterceptor()] if propagate else None,
        options=[
            ("grpc.keepalive_time_ms", 10_000),
            ("grpc.keepalive_timeout_ms", 5_000),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.max_pings_without_data", 0),
            ("grpc.max_receive_message_length", 16 * 1024 * 1024),
            ("grpc.lb_policy_name", "round_robin"),
            ("grpc.initial_reconnect_backoff_ms", 200),
            ("grpc.max_reconnect_backoff_ms", 2000),
            ("grpc.service_config", service_config(retry=not fail_fast, health_service=health_service)),
            *([] if fail_fast else [("grpc.enable_retries", 1)]),
        ],
    )
