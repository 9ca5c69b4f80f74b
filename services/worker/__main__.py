"""Run a worker agent: `python -m services.worker` (normally started by the pool-manager's provider)."""

from __future__ import annotations

import os

# Set before grpc loads: its fork handlers can crash a job's process forked while RPCs are in flight.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

import asyncio
import ctypes
import json
import logging
import signal
import socket
import sys

from jobmesh.common.v1 import types_pb2 as t
from libs.jobs import ts
from libs.main import run_service
from libs.settings import CommonSettings
from services.worker.agent import AgentSettings, WorkerAgent, default_scratch
from services.worker.executor import JobExecutor
from services.worker.health import HealthCheck
from services.worker.join import bind_to_certificate, renew_forever
from services.worker.sandbox import Sandbox, SandboxError, SandboxSettings

log = logging.getLogger("services.worker")
_PR_SET_DUMPABLE = 4


def worker_from_env() -> t.Worker:
    env = os.environ
    worker = t.Worker(
        worker_id=env.get("JOBMESH_WORKER_ID") or f"local-{socket.gethostname()}-{os.getpid()}",
        pool_id=env.get("JOBMESH_POOL_ID", ""),
        capacity=t.Resources(
            cpu_millis=int(env.get("JOBMESH_WORKER_CPU_MILLIS", "1000")),
            memory_mb=int(env.get("JOBMESH_WORKER_MEMORY_MB", "1024")),
        ),
        labels=json.loads(env.get("JOBMESH_WORKER_LABELS", "{}")),
        pid=os.getpid(),
        host=socket.gethostname(),
    )
    if env.get("JOBMESH_WORKER_SPAWN_TIME"):
        worker.spawn_time.CopyFrom(ts(float(env["JOBMESH_WORKER_SPAWN_TIME"])))
    return worker


def make_non_dumpable() -> None:
    """No core dumps, and no ptrace or /proc/<pid>/mem|environ of the agent by any process that is not root."""
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(_PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        log.warning("could not mark the agent non-dumpable: %s", os.strerror(ctypes.get_errno()))


def job_sandbox(pool_id: str) -> tuple[Sandbox | None, str | None]:
    """The sandbox for this pool's jobs; or none, with the reason every job will be refused."""
    try:
        settings = SandboxSettings.from_env(os.environ)
    except ValueError as exc:
        return None, f"this worker's sandbox settings are invalid: {exc}"
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
        "jobs sandboxed: bwrap, cgroup v%d, network %s, uids %d-%d, pids.max %d",
        sandbox.cgroups.version,
        settings.network,
        settings.uid_first,
        settings.uid_first + settings.uid_count - 1,
        settings.pids_max,
    )
    return sandbox, None


async def run(settings: CommonSettings) -> None:
    worker = worker_from_env()
    bind_to_certificate(worker, settings.tls.cert, settings.extra.get("JOBMESH_WORKER_ID", ""))
    if not worker.pool_id:
        print("JOBMESH_POOL_ID must be set", file=sys.stderr)
        raise SystemExit(2)
    make_non_dumpable()
    sandbox, refusal = job_sandbox(worker.pool_id)
    scratch = default_scratch(str(settings.data_dir))
    health = HealthCheck(
        scratch,
        json.loads(os.environ.get("JOBMESH_WORKER_HEALTH_CHECK", "[]")),
        float(os.environ.get("JOBMESH_WORKER_HEALTH_INTERVAL", "30")),
        settings.get_int("JOBMESH_WORKER_MIN_FREE_MB", 64),
        {
            "JOBMESH_WORKER_ID": worker.worker_id,
            "JOBMESH_POOL_ID": worker.pool_id,
            "JOBMESH_DATA_DIR": str(settings.data_dir),
        },
    )
    agent = WorkerAgent(
        AgentSettings(
            worker=worker,
            poolmanagers=settings.peers.poolmanager,
            scratch_root=scratch,
            tls=settings.tls,
            # Three heartbeats per lease: a missed one (a replica that does not answer) still leaves time
            # to refresh the lease through another replica.
            heartbeat_seconds=settings.get_int("JOBMESH_WORKER_LEASE_TTL", 6) / 3,
            slots=max(1, settings.get_int("JOBMESH_WORKER_SLOTS", 1)),
            lease_ttl_seconds=settings.get_int("JOBMESH_WORKER_LEASE_TTL", 6),
        ),
        JobExecutor(scratch, sandbox=sandbox, refusal=refusal),
        health,
    )
    loop = asyncio.get_running_loop()
    # A rollout, a drain or a scale-down: stop taking jobs, let the running ones finish within the pool's drain
    # grace, interrupt the rest (retried elsewhere), then stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, agent.request_drain)
    renewal = None
    if settings.extra.get("JOBMESH_WORKER_RENEW_CERT") == "1":  # joined: nobody else renews our certificate
        renewal = asyncio.create_task(renew_forever(settings.peers.poolmanager, settings.tls, agent.stopping))
    try:
        await agent.run()
    finally:
        if renewal is not None:
            renewal.cancel()
        if sandbox is not None:
            sandbox.close()


if __name__ == "__main__":
    # uvloop, like the services: bench/worker_agent.py measured ~10% less worker CPU per short job than plain
    # asyncio. The executor uses no pipe transports (uvloop's once closed a descriptor twice here,
    # MagicStack/uvloop#763), only readers on raw descriptors.
    run_service("worker", 0, run)
