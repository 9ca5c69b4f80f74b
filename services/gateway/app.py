"""Composition root of the gateway: the public API behind Envoy."""

from __future__ import annotations

from pathlib import Path

from jobmesh.cost.v1 import cost_pb2, cost_pb2_grpc
from jobmesh.gateway.v1 import gateway_pb2_grpc as gw
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from jobmesh.queueing.v1 import queueing_pb2, queueing_pb2_grpc
from jobmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from libs.auth import TokenVerifier, load_verification_keys
from libs.envoy_config import PUBLIC_SERVICES
from libs.main import Startup
from libs.server import ServiceServer
from services.gateway.servicer import (
    ApiServicer,
    Authenticator,
    Backends,
    CostReportsServicer,
    JobsServicer,
    MetricsServicer,
    PoolsServicer,
    TenantsServicer,
)
from services.gateway.settings import Settings
from services.gateway.shedding import SubmitShedder

# Served by the leading quota (queueing, cost) replica only: the gateway's calls follow its health
# (libs/leadergate.py).
QUOTA_SERVICE = quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name
QUEUEING_SERVICE = queueing_pb2.DESCRIPTOR.services_by_name["QueueingService"].full_name
COST_SERVICE = cost_pb2.DESCRIPTOR.services_by_name["CostService"].full_name


def openapi_document(path: Path) -> bytes | None:
    try:
        return path.read_bytes()
    except OSError:
        return None


async def build(settings: Settings, startup: Startup) -> ServiceServer:
    config = startup.config
    verifier = TokenVerifier(
        load_verification_keys(settings.jwt_keys),
        issuer=config.issuer,
        audience=config.audience,
        tenants=set(config.tenants),
    )
    auth = Authenticator(verifier)
    peers = settings.common.peers
    channels = [
        startup.channel(peers.quota, health_service=QUOTA_SERVICE),
        startup.channel(peers.queueing, health_service=QUEUEING_SERVICE),
        startup.channel(peers.poolmanager),
        startup.channel(peers.cost, health_service=COST_SERVICE),
    ]
    backends = Backends(
        quota=quota_pb2_grpc.QuotaServiceStub(channels[0]),
        queueing=queueing_pb2_grpc.QueueingServiceStub(channels[1]),
        poolmanager=poolmanager_pb2_grpc.PoolManagerServiceStub(channels[2]),
        cost=cost_pb2_grpc.CostServiceStub(channels[3]),
    )
    clock = startup.clock
    edge = config.edge
    shedder = SubmitShedder(
        max_inflight=edge.max_inflight_submits,
        min_inflight=edge.min_inflight_submits,
        max_latency=edge.max_submit_latency_ms / 1000,
        retry_after=edge.overloaded_retry_after_seconds,
    )
    jobs = JobsServicer(auth, backends, config, clock, shedder)
    tenants = TenantsServicer(auth, backends)
    pools = PoolsServicer(auth, backends)
    costs = CostReportsServicer(auth, backends)
    common = settings.common
    own_metrics = f"{common.server.host}:{common.telemetry.metrics_port}"
    metrics = MetricsServicer(auth, peers.metrics_targets, startup.registry, own_metrics)
    api = ApiServicer(openapi_document(settings.openapi_path))
    names = dict(zip(("job", "tenant", "pool", "cost", "metrics", "api"), PUBLIC_SERVICES, strict=True))
    return await startup.serve(
        [
            (lambda s: gw.add_JobServiceServicer_to_server(jobs, s), names["job"]),
            (lambda s: gw.add_TenantServiceServicer_to_server(tenants, s), names["tenant"]),
            (lambda s: gw.add_PoolServiceServicer_to_server(pools, s), names["pool"]),
            (lambda s: gw.add_CostServiceServicer_to_server(costs, s), names["cost"]),
            (lambda s: gw.add_MetricsServiceServicer_to_server(metrics, s), names["metrics"]),
            (lambda s: gw.add_ApiServiceServicer_to_server(api, s), names["api"]),
        ],
        reject_unknown_fields=True,
    )
