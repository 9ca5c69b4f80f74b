"""Worker providers: how a pool gets and loses worker processes. The local provider spawns agents here."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from typing import Protocol

from jobmesh.common.v1 import types_pb2 as t
from libs.config import PoolConfig
from libs.meshpki import WorkerIssuer
from services.poolmanager.binding import process_is_worker

log = logging.getLogger(__name__)


@dataclass
class Provisioning:
    worker_id: str
    pool_id: str
    started: float
    pid: int


class WorkerProvider(Protocol):
    """What the pool controller needs from a place that runs workers (local processes, Kubernetes pods...)."""

    def provision(self, pool: PoolConfig) -> Provisioning: ...

    def terminate(self, worker: t.Worker) -> bool: ...

    def pending(self, pool_id: str, registered: set[str], max_age: float) -> list[Provisioning]: ...


# The pool-manager's own identities and issuing key: never handed to a worker.
_NOT_FOR_WORKERS = ("JOBMESH_TLS_", "JOBMESH_ETCD_TLS_", "JOBMESH_WORKER_CA_DIR", "JOBMESH_WORKER_CERTS_DIR")


class LocalProcessProvider:
    """Starts `python -m services.worker` processes on this machine, in the caller's process group, each with a
    worker certificate of its own (paths in its environment, never the key itself)."""

    def __init__(self, base_env: dict[str, str], issuer: WorkerIssuer):
        self.base_env = {k: v for k, v in base_env.items() if not k.startswith(_NOT_FOR_WORKERS)}
        self.issuer = issuer
        self.host = socket.gethostname()
        self._pending: dict[str, Provisioning] = {}
        self._children: dict[int, str] = {}  # pid -> worker id, to drop its certificate once it exited

    def provision(self, pool: PoolConfig) -> Provisioning:
        worker_id = f"{pool.pool_id}-{uuid.uuid4().hex[:8]}"
        env = dict(self.base_env)
        env.update(
            JOBMESH_WORKER_ID=worker_id,
            JOBMESH_POOL_ID=pool.pool_id,
            JOBMESH_WORKER_CPU_MILLIS=str(pool.worker_cpu_millis),
            JOBMESH_WORKER_MEMORY_MB=str(pool.worker_memory_mb),
            JOBMESH_WORKER_LABELS=json.dumps(pool.labels),
            JOBMESH_WORKER_SLOTS=str(pool.worker_slots),
            JOBMESH_WORKER_SPAWN_TIME=str(time.time()),
            JOBMESH_WORKER_HEALTH_CHECK=json.dumps(list(pool.health_check_command)),
            JOBMESH_WORKER_HEALTH_INTERVAL=str(pool.health_check_interval_seconds),
            JOBMESH_WORKER_SANDBOX=pool.sandbox,
            JOBMESH_WORKER_NETWORK=pool.network,
            JOBMESH_WORKER_JOB_UIDS=f"{pool.job_uids[0]}-{pool.job_uids[1]}",
            JOBMESH_WORKER_PIDS_MAX=str(pool.pids_max),
            JOBMESH_WORKER_MAX_FILE_MB=str(pool.max_file_mb),
            JOBMESH_WORKER_MAX_OPEN_FILES=str(pool.max_open_files),
            JOBMESH_PORT="0",
            JOBMESH_METRICS_PORT="0",
            GRPC_ENABLE_FORK_SUPPORT="0",
        )
        env.update(self.issuer.issue(pool.pool_id, worker_id).env())
        proc = subprocess.Popen([sys.executable, "-m", "services.worker"], env=env, stdin=subprocess.DEVNULL)
        self._children[proc.pid] = worker_id
        item = Provisioning(worker_id, pool.pool_id, time.monotonic(), proc.pid)
        self._pending[worker_id] = item
        log.info("provisioned worker %s (pid %d)", worker_id, proc.pid, extra={"pool_id": pool.pool_id})
        return item

    def pending(self, pool_id: str, registered: set[str], max_age: float) -> list[Provisioning]:
        now = time.monotonic()
        for worker_id in [w for w, p in self._pending.items() if w in registered or now - p.started > max_age]:
            del self._pending[worker_id]
        self._reap()
        return [p for p in self._pending.values() if p.pool_id == pool_id]

    def terminate(self, worker: t.Worker) -> bool:
        if worker.host != self.host or worker.pid <= 0:
            return False
        if not process_is_worker(worker.pid, worker.worker_id):
            # The pid is the worker's own word: never signal a process that is not that worker's agent.
            log.warning("worker %s names pid %d, which is not its agent: not signalled", worker.worker_id, worker.pid)
            return False
        try:
            os.kill(worker.pid, signal.SIGTERM)
        except ProcessLookupError:
            return False
        self._reap()
        return True

    def _reap(self) -> None:
        # Collect exited children so they do not linger as zombies; their certificates go with them.
        for _ in range(10_000):
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            worker_id = self._children.pop(pid, None)
            if worker_id is not None:
                self.issuer.forget(worker_id)
