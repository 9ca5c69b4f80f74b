"""Composition root of a worker agent: its record, sandbox, health check and executor built from its settings,
then the agent runs until it has drained (SIGTERM/SIGINT start the drain)."""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import signal
import socket
import sys

from jobmesh.common.v1 import types_pb2 as t
from libs.jobs import ts
from services.worker.agent import AgentSettings, WorkerAgent, default_scratch
from services.worker.executor import JobExecutor
from services.worker.health import HealthCheck
from services.worker.join import bind_to_certificate, renew_forever
from services.worker.sandbox import Sandbox, SandboxError, SandboxSettings
from services.worker.settings import Settings, WorkerSettings
from services.worker.spawner import compiled_spawner

log = logging.getLogger("services.worker")
_PR_SET_DUMPABLE = 4


def worker_record(own: WorkerSettings) -> t.Worker:
    """The worker as it registers: its id (or one made up here until the certificate names it), pool, capacity."""
    worker = t.Worker(
        worker_id=own.worker_id or f"local-{socket.gethostname()}-{os.getpid()}",
        pool_id=own.pool_id,
        capacity=t.Resources(cpu_millis=own.cpu_millis, memory_mb=own.memory_mb),
        labels=dict(own.labels),
        pid=os.getpid(),
        host=socket.gethostname(),
    )
    if own.spawn_time:
        worker.spawn_time.CopyFrom(ts(own.spawn_time))
    return worker


def make_non_dumpable() -> None:
    """No core dumps, and no ptrace or /proc/<pid>/mem|environ of the agent by any process that is not root."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not mark the agent non-dumpable: %s", os.strerror(ctypes.get_errno()))


def job_sandbox(pool_id: str, settings: SandboxSettings | None, error: str = "") -> tuple[Sandbox | None, str | None]:
    """The sandbox for this pool's jobs; or none, with the reason every job will be refused."""
    if settings is None:
        return None, f"this worker's sandbox settings are invalid: {error}"
    if settings.mode == "none":
        log.warning(
            'JOB SANDBOX OFF: pool %s says sandbox = "none"; jobs run as uid %d with this host\'s view of every '
            "file, process and secret. For a developer laptop only.",
            pool_id,
            os.getuid(),
        )
        return None, None
    try:
        sandbox = Sandbox.for_this_machine(settings)
    except SandboxError as exc:
        reason = (
            f"this worker cannot sandbox jobs ({exc}); it runs none until it can, or until the pool says "
            'sandbox = "none" (a developer laptop only)'
        )
        log.error("REFUSING TENANT JOBS on pool %s: %s", pool_id, reason)
        return None, reason
    log.info(
        "jobs sandboxed: bwrap and a %s spawner per slot, cgroup v%d, network %s, uids %d-%d, pids.max %d",
        "compiled" if compiled_spawner() else "Python (no build/jobmesh-spawner: make sandbox-tools)",
        sandbox.cgroups.version,
        settings.network,
        settings.uid_first,
        settings.uid_first + settings.uid_count - 1,
        settings.pids_max,
    )
    return sandbox, None


def build(settings: Settings, worker: t.Worker, scratch: str, executor: JobExecutor) -> WorkerAgent:
    common, health = settings.common, settings.health
    checks = HealthCheck(
        scratch,
        health.command,
        health.interval_seconds,
        health.min_free_mb,
        {
            "JOBMESH_WORKER_ID": worker.worker_id,
            "JOBMESH_POOL_ID": worker.pool_id,
            "JOBMESH_DATA_DIR": str(common.data_dir),
        },
    )
    lease = settings.lease.ttl_seconds
    return WorkerAgent(
        AgentSettings(
            worker=worker,
            poolmanagers=common.peers.poolmanager,
            scratch_root=scratch,
            tls=common.tls,
            # Three heartbeats per lease: a missed one (a replica that does not answer) still leaves time
            # to refresh the lease through another replica.
            heartbeat_seconds=lease / 3,
            slots=settings.worker.slots,
            lease_ttl_seconds=lease,
        ),
        executor,
        checks,
    )


async def run(settings: Settings) -> None:
    common = settings.common
    worker = worker_record(settings.worker)
    bind_to_certificate(worker, common.tls.cert, settings.worker.worker_id)
    if not worker.pool_id:
        print("JOBMESH_POOL_ID must be set", file=sys.stderr)
        raise SystemExit(2)
    make_non_dumpable()
    sandbox, refusal = job_sandbox(worker.pool_id, settings.sandbox, settings.sandbox_error)
    scratch = default_scratch(str(common.data_dir))
    agent = build(settings, worker, scratch, JobExecutor(scratch, sandbox=sandbox, refusal=refusal))
    loop = asyncio.get_running_loop()
    # A rollout, a drain or a scale-down: stop taking jobs, let the running ones finish within the pool's drain
    # grace, interrupt the rest (retried elsewhere), then stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_drain)
    renewal = None
    if settings.renew_certificate:  # joined: nobody else renews our certificate
        renewal = asyncio.create_task(renew_forever(common.peers.poolmanager, common.tls, agent.stopping))
    try:
        await agent.run()
    finally:
        if renewal is not None:
            renewal.cancel()
        if sandbox is not None:
            sandbox.close()
