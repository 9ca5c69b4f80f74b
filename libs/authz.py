"""Per-RPC authorization: which mesh identity may call which method, as one table and one interceptor.

The table is the call graph of the mesh, written down (every internal Stub use, grep `Stub(`): a caller not in it,
or calling a method its row does not name, is refused with PERMISSION_DENIED before any handler runs. A row
names full gRPC methods (`/pkg.Service/Method`) or a whole service (`/pkg.Service/*`). Health checks are open to
every mesh identity (probes, the launcher, load balancers with a mesh certificate); nothing is open to a peer
without one, except the methods listed in `UNAUTHENTICATED_METHODS` (the worker join exchange, which is how a
worker without a certificate gets one).

What a worker may do within the registry (only for its own worker id, pool and lease) is checked by the registry
against the same identity (services/poolmanager/binding.py): this table only says a worker may call it at all.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import grpc
from prometheus_client import CollectorRegistry, Counter

from libs.errors import PermissionDenied
from libs.identity import Identity, peer_identity
from libs.interceptors import status_for

log = logging.getLogger(__name__)

REASON = "CALLER_NOT_ALLOWED"

_QUOTA = "/jobmesh.quota.v1.QuotaService/"
_QUEUEING = "/jobmesh.queueing.v1.QueueingService/"
_COST = "/jobmesh.cost.v1.CostService/"
_POOLS = "/jobmesh.poolmanager.v1.PoolManagerService/"
_REGISTRY = "/jobmesh.poolmanager.v1.WorkerRegistryService/"
_JOIN = "/jobmesh.poolmanager.v1.WorkerJoinService/"
_WORKER_CERTS = "/jobmesh.poolmanager.v1.WorkerCertificateService/"
_SCHEDULER = "/jobmesh.scheduler.v1.SchedulerService/"
_HEALTH = "/grpc.health.v1.Health/"
_REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/"
_PUBLIC = (
    "/jobmesh.gateway.v1.JobService/*",
    "/jobmesh.gateway.v1.TenantService/*",
    "/jobmesh.gateway.v1.PoolService/*",
    "/jobmesh.gateway.v1.CostService/*",
    "/jobmesh.gateway.v1.MetricsService/*",
    "/jobmesh.gateway.v1.ApiService/*",
)

# The methods a caller may reach with server-only TLS: the join exchange authenticates with its token instead.
UNAUTHENTICATED_METHODS = frozenset({_JOIN + "Join"})

# Any identity the mesh issued may ask whether a server is up.
ANY_IDENTITY = frozenset({_HEALTH + "*"})

# (kind, name) -> what that caller may call. A worker's row is keyed by kind alone ("worker", "*"): its name is
# its worker id, and which worker it may speak for is the registry's check.
TABLE: Mapping[tuple[str, str], frozenset[str]] = {
    # The edge: the public API only, where each call is authenticated again by its JWT.
    ("service", "envoy"): frozenset(_PUBLIC),
    # The gateway is the only caller of admission, the job records' public operations and the cost service.
    ("service", "gateway"): frozenset(
        {
            _QUOTA + "*",
            _QUEUEING + "Enqueue",
            _QUEUEING + "EnqueueMany",
            _QUEUEING + "GetJob",
            _QUEUEING + "ListJobs",
            _QUEUEING + "CancelJob",
            _QUEUEING + "SetTenantWeight",
            _QUEUEING + "WatchJob",
            _QUEUEING + "EstimateStart",
            _POOLS + "ListPools",
            _POOLS + "GetPoolMetrics",
            _POOLS + "GetScalingHistory",
            _POOLS + "ReadJobLog",
            _COST + "*",
        }
    ),
    # The scheduler takes the next jobs to dispatch; nobody else may.
    ("service", "scheduler"): frozenset({_QUEUEING + "NextJobs"}),
    # The pool-manager's autoscaler reads queue depth.
    ("service", "poolmanager"): frozenset({_QUEUEING + "GetQueueStats"}),
    # Workers speak to the registry only, each for itself (results and output only of attempts they hold), and
    # renew their own certificate.
    ("worker", "*"): frozenset({_REGISTRY + "*", _WORKER_CERTS + "RenewCertificate"}),
    # People and tools (`jobmesh` admin commands, grpcurl, tests acting as an operator): scheduler status,
    # reflection, minting join tokens, queue stats. The launcher's own identity only checks health.
    ("service", "operator"): frozenset(
        {
            _SCHEDULER + "GetStatus",
            _REFLECTION + "*",
            _POOLS + "CreateJoinToken",
            _QUEUEING + "GetQueueStats",
        }
    ),
}


def _matches(patterns: frozenset[str], method: str) -> bool:
    if method in patterns:
        return True
    service, _, name = method.rpartition("/")
    return bool(name) and f"{service}/*" in patterns


def allowed(identity: Identity | None, method: str, table: Mapping[tuple[str, str], frozenset[str]] = TABLE) -> bool:
    """May `identity` (None: a peer without a mesh certificate) call the full method name `method`?"""
    if method in UNAUTHENTICATED_METHODS:
        return True
    if identity is None:
        return False
    if _matches(ANY_IDENTITY, method):
        return True
    row = table.get((identity.kind, "*" if identity.is_worker else identity.name))
    return row is not None and _matches(row, method)


def caller_name(identity: Identity | None) -> str:
    return identity.uri if identity is not None else "none"


class AuthorizationInterceptor(grpc.aio.ServerInterceptor):
    """Refuses every call the table does not allow, before its handler runs: PERMISSION_DENIED with the ErrorInfo
    reason CALLER_NOT_ALLOWED, one log line naming the caller and the method, and a counter."""

    def __init__(
        self,
        service: str,
        registry: CollectorRegistry,
        table: Mapping[tuple[str, str], frozenset[str]] = TABLE,
        identify: Callable[[Any], Identity | None] = peer_identity,
    ):
        self.service = service
        self.table = table
        self.identify = identify
        self.denied = Counter(
            "jobmesh_authz_denied_total",
            "Calls refused by the authorization table, by method and caller kind (service, worker, none).",
            ["method", "caller_kind"],
            registry=registry,
        )

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None:
            return handler
        method: str = details.method
        if handler.unary_unary is not None:
            return grpc.unary_unary_rpc_method_handler(
                self._guarded(method, handler.unary_unary), handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            return grpc.unary_stream_rpc_method_handler(
                self._guarded(method, handler.unary_stream), handler.request_deserializer, handler.response_serializer
            )
        if handler.stream_unary is not None:
            return grpc.stream_unary_rpc_method_handler(
                self._guarded(method, handler.stream_unary), handler.request_deserializer, handler.response_serializer
            )
        return grpc.stream_stream_rpc_method_handler(
            self._guarded(method, handler.stream_stream), handler.request_deserializer, handler.response_serializer
        )

    def _guarded(self, method: str, inner: Any) -> Callable[[Any, grpc.aio.ServicerContext], Awaitable[Any]]:
        """The handler behind a check of its caller. Handlers that stream responses as async generators are
        drained into `context.write`, so one wrapper serves every kind of handler."""

        async def handle(request: Any, context: grpc.aio.ServicerContext) -> Any:
            identity = self.identify(context)
            if not allowed(identity, method, self.table):
                await self._deny(identity, method, context)
            result = inner(request, context)
            if inspect.isasyncgen(result):
                async for item in result:
                    await context.write(item)
                return None
            return await result

        return handle

    async def _deny(self, identity: Identity | None, method: str, context: grpc.aio.ServicerContext) -> None:
        caller = caller_name(identity)
        log.warning("denied: caller=%s method=%s", caller, method, extra={"caller": caller, "method": method})
        self.denied.labels(method, identity.kind if identity else "none").inc()
        err = PermissionDenied(f"{caller} may not call {method}", reason=REASON, metadata={"method": method})
        await context.abort_with_status(status_for(err))
