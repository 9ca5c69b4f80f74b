"""The authorization table (libs/authz.py): who may call what, as the mesh's call graph says, and nothing else."""

from __future__ import annotations

import pytest
from google.protobuf import descriptor_pool

import jobmesh.cost.v1.cost_pb2
import jobmesh.gateway.v1.gateway_pb2
import jobmesh.poolmanager.v1.poolmanager_pb2
import jobmesh.queueing.v1.queueing_pb2
import jobmesh.quota.v1.quota_pb2
import jobmesh.scheduler.v1.scheduler_pb2  # noqa: F401  (registers the services the table names)
from libs.authz import ANY_IDENTITY, TABLE, UNAUTHENTICATED_METHODS, allowed
from libs.identity import Identity, parse_spiffe


def service(name: str) -> Identity:
    ident = parse_spiffe(f"spiffe://jobmesh/service/{name}")
    assert ident is not None
    return ident


WORKER = parse_spiffe("spiffe://jobmesh/worker/static-general/w-1")
QUOTA = "/jobmesh.quota.v1.QuotaService/"
QUEUEING = "/jobmesh.queueing.v1.QueueingService/"
COST = "/jobmesh.cost.v1.CostService/"
REGISTRY = "/jobmesh.poolmanager.v1.WorkerRegistryService/"
POOLS = "/jobmesh.poolmanager.v1.PoolManagerService/"
HEALTH = "/grpc.health.v1.Health/Check"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"
JOIN = "/jobmesh.poolmanager.v1.WorkerJoinService/Join"


@pytest.mark.parametrize(
    "caller, method, expected",
    [
        # The gateway alone admits, enqueues and changes quotas.
        (service("gateway"), QUOTA + "Reserve", True),
        (service("gateway"), QUOTA + "ReserveMany", True),
        (service("gateway"), QUOTA + "UpdateQuota", True),
        (service("gateway"), QUEUEING + "EnqueueMany", True),
        (service("gateway"), COST + "GetCostReports", True),
        (service("gateway"), POOLS + "ListPools", True),
        (service("scheduler"), QUOTA + "Reserve", False),
        (service("envoy"), QUOTA + "UpdateQuota", False),
        (WORKER, QUEUEING + "Enqueue", False),
        # Only the scheduler takes jobs off the queue.
        (service("scheduler"), QUEUEING + "NextJobs", True),
        (service("gateway"), QUEUEING + "NextJobs", False),
        (service("poolmanager"), QUEUEING + "NextJobs", False),
        (service("poolmanager"), QUEUEING + "GetQueueStats", True),
        # Workers reach the registry and nothing else.
        (WORKER, REGISTRY + "Connect", True),
        (WORKER, REGISTRY + "ReportResult", True),
        (WORKER, POOLS + "ListPools", False),
        (WORKER, COST + "GetJobCost", False),
        (WORKER, REFLECTION, False),
        (service("gateway"), REGISTRY + "ReportResult", False),
        # The edge reaches the public API only.
        (service("envoy"), "/jobmesh.gateway.v1.JobService/SubmitJob", True),
        (service("envoy"), "/jobmesh.gateway.v1.MetricsService/GetPrometheusMetrics", True),
        (service("envoy"), QUEUEING + "GetJob", False),
        (service("gateway"), "/jobmesh.gateway.v1.JobService/SubmitJob", False),
        # Operators: status, reflection and join tokens.
        (service("operator"), "/jobmesh.scheduler.v1.SchedulerService/GetStatus", True),
        (service("operator"), REFLECTION, True),
        (service("operator"), POOLS + "CreateJoinToken", True),
        (service("operator"), QUOTA + "UpdateQuota", False),
        (service("gateway"), POOLS + "CreateJoinToken", False),
        # Health: any mesh identity, nobody without one.
        (WORKER, HEALTH, True),
        (service("quota"), HEALTH, True),
        (None, HEALTH, False),
        # A service the table does not know.
        (service("intruder"), HEALTH, True),
        (service("intruder"), QUOTA + "GetQuota", False),
        # Without a certificate: the join exchange only.
        (None, JOIN, True),
        (None, REGISTRY + "Connect", False),
        (None, QUOTA + "Reserve", False),
    ],
)
def test_the_table_allows_exactly_the_call_graph(caller: Identity | None, method: str, expected: bool) -> None:
    assert allowed(caller, method) is expected


def test_a_method_whose_name_only_starts_like_an_allowed_service_is_not_allowed() -> None:
    assert not allowed(WORKER, "/jobmesh.poolmanager.v1.WorkerRegistryServiceX/Connect")
    assert not allowed(WORKER, REGISTRY)  # no method at all


def test_every_method_the_table_names_exists() -> None:
    pool = descriptor_pool.Default()
    known_outside = {"grpc.health.v1.Health", "grpc.reflection.v1alpha.ServerReflection"}
    patterns = set(ANY_IDENTITY) | set(UNAUTHENTICATED_METHODS)
    for row in TABLE.values():
        patterns |= row
    for pattern in sorted(patterns):
        service_name, method = pattern.lstrip("/").rsplit("/", 1)
        if service_name in known_outside:
            continue
        svc = pool.FindServiceByName(service_name)
        if method != "*":
            assert svc.FindMethodByName(method) is not None, pattern
