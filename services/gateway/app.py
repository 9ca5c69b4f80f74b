"""Composition root of the gateway: the public API behind Envoy."""

from __future__ import annotations

from pathlib import Path

from prometheus_client import CollectorRegistry

from jobmesh.cost.v1 import cost_pb2, cost_pb2_grpc
from jobmesh.gateway.v1 import gateway_pb2_grpc as gw
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from jobmesh.queueing.v1 import queueing_pb2, queueing_pb2_grpc
from jobmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from libs.auth import TokenVerifier, key_paths, load_verification_keys
from libs.clock import SystemClock
from libs.config import load_config
from libs.envoy_config import PUBLIC_SERVICES
from libs.interceptors import channel
from libs.server import start_server
from libs.settings import CommonSettings, SettingsError
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
from services.gateway.shedding import SubmitShedder

# Served by the leading quota (queueing, cost) replica only: the gateway's calls follow its health
# (libs/leadergate.py).
QUOTA_SERVICE = quota_pb2.DESCRIPTOR.services_by_name["QuotaService"].full_name
QUEUEING_SERVICE = queueing_pb2.DESCRIPTOR.services_by_name["QueueingService"].full_name
COST_SERVICE = cost_pb2.DESCRIPTOR.services_by_name["CostService"].full_name

# The API's OpenAPI document, served at /api/v1/openapi.yaml (JOBMESH_OPENAPI_PATH to serve another file).
OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"


def openapi_document(settings: CommonSettings) -> bytes | None:
    path = Path(settings.extra.get("JOBMESH_OPENAPI_PATH") or OPENAPI)
    try:
        return path.read_bytes()
    except OSError:
        return None


async def run(settings: CommonSettings) -> None:
    config = load_config(settings.config_path)
    registry = CollectorRegistry()
    key_file = Path(settings.extra.get("JOBMESH_JWT_KEYS") or key_paths(settings.data_dir)[1])
    if not key_file.is_file():
        raise SettingsError(f"JOBMESH_JWT_KEYS: no verification key at {key_file}")
    verifier = TokenVerifier(
        load_verification_keys(key_file),
        issuer=config.issuer,
        audience=config.audience,
        tenants=set(config.tenants),
    )
    auth = Authenticator(verifier)
    peers = settings.peers
    tls = settings.tls
    channels = [
        channel(peers.quota, tls, health_service=QUOTA_SERVICE),
        channel(peers.queueing, tls, health_service=QUEUEING_SERVICE),
        channel(peers.poolmanager, tls),
        channel(peers.cost, tls, health_service=COST_SERVICE),
    ]
    backends = Backends(
        quota=quota_pb2_grpc.QuotaServiceStub(channels[0]),
        queueing=queueing_pb2_grpc.QueueingServiceStub(channels[1]),
        poolmanager=poolmanager_pb2_grpc.PoolManagerServiceStub(channels[2]),
        cost=cost_pb2_grpc.CostServiceStub(channels[3]),
    )
    clock = SystemClock()
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
    own_metrics = f"{settings.server.host}:{settings.telemetry.metrics_port}"
    metrics = MetricsServicer(auth, peers.metrics_targets, registry, own_metrics)
    api = ApiServicer(openapi_document(settings))
    names = dict(zip(("job", "tenant", "pool", "cost", "metrics", "api"), PUBLIC_SERVICES, strict=True))
    server = await start_server(
        "gateway",
        settings,
        registry,
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
    try:
        await server.serve_forever()
    finally:
        for ch in channels:
            await ch.close()
