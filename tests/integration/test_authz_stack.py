"""The authorization table and the worker binding on a real stack (`make run`'s processes, mTLS, etcd): each
identity the launcher issues may make the calls of its role and no other, and a worker certificate speaks only
for its own worker."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator

import grpc
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from devtools.launcher import Stack
from jobmesh.common.v1 import types_pb2 as t
from jobmesh.cost.v1 import cost_pb2, cost_pb2_grpc
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from jobmesh.queueing.v1 import queueing_pb2, queueing_pb2_grpc
from jobmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from jobmesh.scheduler.v1 import scheduler_pb2, scheduler_pb2_grpc
from libs.meshpki import WorkerIssuer
from libs.tls import sync_channel
from services.poolmanager.join import token_digest
from tests.helpers import Api, job_spec, start_stack, token


@pytest.fixture(scope="module")
def astack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("authz-stack"))
    try:
        yield stack
    finally:
        stack.stop()


def code_and_reason(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        call()  # type: ignore[operator]
    except grpc.RpcError as err:
        status = rpc_status.from_call(err)  # type: ignore[arg-type]
        reason = ""
        for detail in status.details if status else []:
            info = error_details_pb2.ErrorInfo()
            if detail.Unpack(info):
                reason = info.reason
        return err.code(), reason  # type: ignore[attr-defined]
    return grpc.StatusCode.OK, ""


DENIED = (grpc.StatusCode.PERMISSION_DENIED, "CALLER_NOT_ALLOWED")


@pytest.mark.parametrize(
    "identity, service, call, allowed",
    [
        (
            "scheduler",
            "queueing-1",
            lambda ch: queueing_pb2_grpc.QueueingServiceStub(ch).NextJobs(
                queueing_pb2.NextJobsRequest(limit=1), timeout=5
            ),
            True,
        ),
        (
            "gateway",
            "queueing-1",
            lambda ch: queueing_pb2_grpc.QueueingServiceStub(ch).NextJobs(
                queueing_pb2.NextJobsRequest(limit=1), timeout=5
            ),
            False,
        ),
        (
            "launcher",
            "quota-1",
            lambda ch: quota_pb2_grpc.QuotaServiceStub(ch).GetQuota(
                quota_pb2.GetQuotaRequest(tenant_id="acme"), timeout=5
            ),
            False,
        ),
        (
            "scheduler",
            "quota-1",
            lambda ch: quota_pb2_grpc.QuotaServiceStub(ch).UpdateQuota(
                quota_pb2.UpdateQuotaRequest(tenant_id="acme"), timeout=5
            ),
            False,
        ),
        (
            "gateway",
            "quota-1",
            lambda ch: quota_pb2_grpc.QuotaServiceStub(ch).GetQuota(
                quota_pb2.GetQuotaRequest(tenant_id="acme"), timeout=5
            ),
            True,
        ),
        (
            "scheduler",
            "cost-1",
            lambda ch: cost_pb2_grpc.CostServiceStub(ch).GetCostReports(cost_pb2.GetCostReportsRequest(), timeout=5),
            False,
        ),
        (
            "gateway",
            "scheduler-1",
            lambda ch: scheduler_pb2_grpc.SchedulerServiceStub(ch).GetStatus(
                scheduler_pb2.GetStatusRequest(), timeout=5
            ),
            False,
        ),
        (
            "operator",
            "scheduler-1",
            lambda ch: scheduler_pb2_grpc.SchedulerServiceStub(ch).GetStatus(
                scheduler_pb2.GetStatusRequest(), timeout=5
            ),
            True,
        ),
        (
            "gateway",
            "poolmanager-1",
            lambda ch: poolmanager_pb2_grpc.PoolManagerServiceStub(ch).CreateJoinToken(
                pm.CreateJoinTokenRequest(pool_id="static-general"), timeout=5
            ),
            False,
        ),
        (
            "gateway",
            "poolmanager-1",
            lambda ch: poolmanager_pb2_grpc.WorkerRegistryServiceStub(ch).Heartbeat(
                pm.HeartbeatRequest(worker_id="x", lease_id=1), timeout=5
            ),
            False,
        ),
    ],
    ids=[
        "scheduler-takes-jobs",
        "gateway-cannot-take-jobs",
        "launcher-reads-no-quota",
        "scheduler-cannot-change-quotas",
        "gateway-reads-quotas",
        "scheduler-reads-no-costs",
        "gateway-reads-no-scheduler-status",
        "operator-reads-scheduler-status",
        "gateway-mints-no-join-tokens",
        "gateway-cannot-heartbeat-a-worker",
    ],
)
def test_each_identity_makes_the_calls_of_its_role_only(
    astack: Stack, identity: str, service: str, call: object, allowed: bool
) -> None:
    with astack.channel(astack.procs[service].port, identity) as ch:
        outcome = code_and_reason(lambda: call(ch))  # type: ignore[operator]

    if allowed:
        assert outcome[0] != grpc.StatusCode.PERMISSION_DENIED, outcome
    else:
        assert outcome == DENIED


def test_a_worker_certificate_cannot_register_heartbeat_or_report_as_another_worker(astack: Stack) -> None:
    issuer = WorkerIssuer(astack.pki.worker_ca_dir, astack.pki.workers_dir)
    tls = issuer.issue("static-general", "w-intruder")
    port = astack.procs["poolmanager-1"].port
    try:
        with sync_channel(f"127.0.0.1:{port}", tls) as ch:
            registry = poolmanager_pb2_grpc.WorkerRegistryServiceStub(ch)
            victim = t.Worker(worker_id="static-general-victim", pool_id="static-general")
            connect = registry.Connect(pm.ConnectRequest(worker=victim), timeout=5)
            assert code_and_reason(lambda: next(iter(connect))) == (
                grpc.StatusCode.PERMISSION_DENIED,
                "WORKER_IDENTITY_MISMATCH",
            )
            beat = pm.HeartbeatRequest(worker_id="static-general-victim", lease_id=1)
            assert code_and_reason(lambda: registry.Heartbeat(beat, timeout=5))[1] == "WORKER_IDENTITY_MISMATCH"
            report = pm.ReportResultRequest(worker_id="static-general-victim", job_id="j", attempt=1, reason="EXITED")
            assert code_and_reason(lambda: registry.ReportResult(report, timeout=5))[1] == "WORKER_IDENTITY_MISMATCH"
            # And it reaches nothing but the registry on the pool-manager.
            pools = poolmanager_pb2_grpc.PoolManagerServiceStub(ch)
            assert code_and_reason(lambda: pools.ListPools(pm.ListPoolsRequest(), timeout=5)) == DENIED
    finally:
        issuer.forget("w-intruder")

    log = astack.procs["poolmanager-1"].log.read_text(errors="replace")
    assert "refused: caller=spiffe://jobmesh/worker/static-general/w-intruder method=Connect" in log
    assert "denied: caller=spiffe://jobmesh/worker/static-general/w-intruder" in log


def run_module(module: str, *args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_an_operator_mints_join_tokens_and_the_pool_manager_keeps_only_their_hashes(astack: Stack) -> None:
    port = astack.procs["poolmanager-1"].port
    minted = run_module(
        "devtools.cli",
        "--data-dir",
        str(astack.data_dir),
        "join-token",
        "--pool",
        "static-general",
        "--count",
        "2",
        "--addr",
        f"127.0.0.1:{port}",
    )
    assert minted.returncode == 0, minted.stderr
    tokens = minted.stdout.split()
    assert len(tokens) == 2

    async def stored() -> list[str]:
        etcd = astack.etcd_client()
        try:
            kvs, _, _ = await etcd.get_prefix("/jobmesh/join-tokens/")
            return [kv.key.rsplit("/", 1)[-1] for kv in kvs]
        finally:
            await etcd.close()

    assert sorted(asyncio.run(stored())) == sorted(token_digest(t) for t in tokens)
    # Any other identity is refused.
    gateway = astack.identity("gateway").env()
    refused = run_module(
        "devtools.cli", "join-token", "--pool", "static-general", "--addr", f"127.0.0.1:{port}", env=gateway
    )
    assert refused.returncode == 1 and "PERMISSION_DENIED" in refused.stderr


def test_the_kubernetes_probe_checks_health_over_mtls_as_the_pods_identity(astack: Stack) -> None:
    identity = astack.identity("quota").env()
    quota = str(astack.procs["quota-1"].port)

    assert run_module("libs.healthcheck", env={**identity, "JOBMESH_PORT": quota}).returncode == 0
    assert run_module("libs.healthcheck", env={**identity, "JOBMESH_PORT": "1"}).returncode == 1


def test_a_worker_can_write_the_log_only_of_an_attempt_it_holds_and_read_none(astack: Stack) -> None:
    api = Api(astack.url, token(astack, "acme"))
    job = api.submit(job_spec("victim-log", ["sh", "-c", "echo genuine; sleep 3"]))
    running = api.wait_state(job["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)
    issuer = WorkerIssuer(astack.pki.worker_ca_dir, astack.pki.workers_dir)
    tls = issuer.issue("static-general", "w-log-intruder")
    port = astack.procs["poolmanager-1"].port
    try:
        with sync_channel(f"127.0.0.1:{port}", tls) as ch:
            registry = poolmanager_pb2_grpc.WorkerRegistryServiceStub(ch)
            forged = pm.AppendJobLogRequest(
                worker_id="w-log-intruder", job_id=job["job_id"], attempt=1, offset=0, data=b"forged output\n"
            )
            assert code_and_reason(lambda: registry.AppendJobLog(forged, timeout=5)) == (
                grpc.StatusCode.FAILED_PRECONDITION,
                "ATTEMPT_NOT_ASSIGNED",
            )
            as_holder = pm.AppendJobLogRequest(
                worker_id=running["worker_id"], job_id=job["job_id"], attempt=1, offset=0, data=b"forged output\n"
            )
            assert code_and_reason(lambda: registry.AppendJobLog(as_holder, timeout=5))[1] == "WORKER_IDENTITY_MISMATCH"
            pools = poolmanager_pb2_grpc.PoolManagerServiceStub(ch)
            read = pm.ReadJobLogRequest(tenant_id="acme", job_id=job["job_id"], attempt=1)
            assert code_and_reason(lambda: pools.ReadJobLog(read, timeout=5)) == DENIED
    finally:
        issuer.forget("w-log-intruder")
    api.wait_terminal(job["job_id"])
    assert api.call("GET", f"/api/v1/jobs/{job['job_id']}/logs").text == "genuine\n"
