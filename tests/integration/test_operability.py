"""Every service is operable: health, reflection, /metrics, JSON logs, and a graceful stop on SIGTERM."""

from __future__ import annotations

import json
import signal
import urllib.request
from collections.abc import Iterator

import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from devtools.launcher import Stack
from tests.helpers import start_stack

SERVICES = {
    "gateway-1": "jobmesh.gateway.v1.JobService",
    "quota": "jobmesh.quota.v1.QuotaService",
    "queueing": "jobmesh.queueing.v1.QueueingService",  # the leader, as quota
    "cost": "jobmesh.cost.v1.CostService",  # the leader, as quota
    "scheduler-1": "jobmesh.scheduler.v1.SchedulerService",
    "poolmanager-1": "jobmesh.poolmanager.v1.WorkerRegistryService",
}


def reflected_services(stack: Stack, port: int) -> set[str]:
    with stack.channel(port, "operator") as ch:  # reflection is for operators only
        stub = reflection_pb2_grpc.ServerReflectionStub(ch)
        responses = stub.ServerReflectionInfo(
            iter([reflection_pb2.ServerReflectionRequest(list_services="")]), timeout=5
        )
        return {s.name for r in responses for s in r.list_services_response.service}


@pytest.fixture(scope="module")
def ostack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("ops-stack"))
    try:
        yield s
    finally:
        s.stop()


@pytest.mark.parametrize("name", list(SERVICES))
def test_each_service_answers_health_reflection_and_metrics(ostack: Stack, name: str) -> None:
    # An active/standby service is SERVING on its leader only (the standby answers NOT_SERVING for it).
    proc = ostack.procs[ostack.wait_leader(name) if name in ostack.LEADER_SERVED else name]
    with ostack.channel(proc.port) as ch:
        health = health_pb2_grpc.HealthStub(ch)
        for service in ("", SERVICES[name]):
            status = health.Check(health_pb2.HealthCheckRequest(service=service), timeout=5).status
            assert status == health_pb2.HealthCheckResponse.SERVING
    assert SERVICES[name] in reflected_services(ostack, proc.port)
    with urllib.request.urlopen(f"http://127.0.0.1:{proc.metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    metric_prefix = "jobmesh_" + name.split("-")[0]
    assert metric_prefix in text
    lines = [line for line in proc.log.read_text().splitlines() if line.startswith("{")]
    entry = json.loads(lines[0])
    assert {"ts", "level", "service", "msg"} <= set(entry)


def test_sigterm_stops_a_service_gracefully(fresh_stack: Stack) -> None:
    leader = fresh_stack.wait_leader("queueing")
    proc = fresh_stack.procs[leader]
    assert proc.popen is not None
    proc.popen.send_signal(signal.SIGTERM)
    assert proc.popen.wait(15) == 0
    log = proc.log.read_text()
    assert "stopping queueing" in log and "queueing stopped" in log
    # Nothing was lost by stopping: the standby took over at once (the leader resigned), and it comes back.
    fresh_stack.wait_leader("queueing", 10)
    fresh_stack.restart(leader)
