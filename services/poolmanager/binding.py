"""What a worker may say about itself: bound to its certificate, clamped to its pool, results within physics. Pure.

A worker's mesh identity (`spiffe://jobmesh/worker/<pool>/<worker>`) names the one worker it may speak for. The
registry checks every message against it (worker id and pool), keeps only the capacity and labels its pool's
configuration grants, and accepts a result only when its numbers could be true of the attempt it reports: finite,
non-negative, CPU time within the run time times the worker's cores, memory within the worker's size.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from jobmesh.common.v1 import types_pb2 as t
from libs.config import PoolConfig
from libs.errors import InvalidArgument, PermissionDenied
from libs.identity import Identity

# Measurement noise a genuine report may carry beyond its limits (process-tree sampling, clock granularity).
SLACK = 1.25
# A job shorter than a sampling tick may still show this much CPU time.
_CPU_FLOOR_SECONDS = 1.0
_RUN_FLOOR_SECONDS = 5.0


class WorkerIdentityMismatch(PermissionDenied):
    reason = "WORKER_IDENTITY_MISMATCH"


class ResultOutOfRange(InvalidArgument):
    """A result whose numbers cannot be true; refused and counted (an alert watches the count)."""

    def __init__(self, field: str, message: str):
        super().__init__(field, message, reason="RESULT_OUT_OF_RANGE")


def check_speaks_for(identity: Identity | None, worker_id: str, pool_id: str | None, method: str) -> None:
    """Raises unless `identity` is the worker `worker_id` (of `pool_id`, when the message names one)."""
    if identity is None or not identity.is_worker:
        raise WorkerIdentityMismatch(f"{_name(identity)} is not a worker identity ({method})")
    if identity.name != worker_id or (pool_id is not None and identity.pool != pool_id):
        raise WorkerIdentityMismatch(
            f"{identity.uri} may not speak for worker {worker_id!r} of pool {pool_id or identity.pool!r} ({method})",
        )


def _name(identity: Identity | None) -> str:
    return identity.uri if identity is not None else "a caller without a mesh identity"


def clamp_to_pool(worker: t.Worker, pool: PoolConfig) -> list[str]:
    """Keeps what `worker` declares only as far as its pool grants: capacity no larger than the pool's worker size
    (unset means the pool's size), labels only those the pool has with the same value. Returns what was cut."""
    cut: list[str] = []
    cpu, memory = worker.capacity.cpu_millis, worker.capacity.memory_mb
    if cpu <= 0 or cpu > pool.worker_cpu_millis:
        if cpu > pool.worker_cpu_millis:
            cut.append(f"cpu_millis {cpu} > {pool.worker_cpu_millis}")
        worker.capacity.cpu_millis = pool.worker_cpu_millis
    if memory <= 0 or memory > pool.worker_memory_mb:
        if memory > pool.worker_memory_mb:
            cut.append(f"memory_mb {memory} > {pool.worker_memory_mb}")
        worker.capacity.memory_mb = pool.worker_memory_mb
    granted = {k: v for k, v in worker.labels.items() if pool.labels.get(k) == v}
    if len(granted) != len(worker.labels):
        cut.append(f"labels {sorted(set(worker.labels) - set(granted))}")
        worker.labels.clear()
        worker.labels.update(granted)
    # A worker may only take itself out of scheduling (DRAINING); whether it is idle or busy is the mesh's call.
    if worker.state != t.WORKER_STATE_DRAINING:
        worker.state = t.WORKER_STATE_UNSPECIFIED
    return cut


@dataclass(frozen=True)
class ResultBounds:
    """What an attempt on this worker could have used: its cores and memory, and how long it can have run."""

    cores: float
    memory_mb: int
    elapsed_seconds: float | None  # since the assignment, as the mesh saw it; None when unknown

    @classmethod
    def of(cls, pool: PoolConfig, assign_time: float | None, now: float) -> ResultBounds:
        elapsed = max(now - assign_time, 0.0) if assign_time is not None else None
        return cls(pool.worker_cpu_millis / 1000, pool.worker_memory_mb, elapsed)


def check_result_numbers(
    run_seconds: float,
    cpu_seconds: float,
    max_memory_mb: int,
    bounds: ResultBounds,
    cpu_floor: float = _CPU_FLOOR_SECONDS,
) -> None:
    """Raises ResultOutOfRange unless each number could be a true measurement of an attempt within `bounds`."""
    for field, value in (("run_seconds", run_seconds), ("cpu_seconds", cpu_seconds)):
        if not math.isfinite(value) or value < 0:
            raise ResultOutOfRange(field, f"must be a finite, non-negative number, not {value!r}")
    if max_memory_mb < 0:
        raise ResultOutOfRange("max_memory_mb", f"must not be negative, not {max_memory_mb}")
    if bounds.elapsed_seconds is not None and run_seconds > bounds.elapsed_seconds * SLACK + _RUN_FLOOR_SECONDS:
        raise ResultOutOfRange(
            "run_seconds",
            f"{run_seconds:.3f} s is longer than the attempt has existed ({bounds.elapsed_seconds:.3f} s)",
        )
    cpu_limit = run_seconds * bounds.cores * SLACK + cpu_floor
    if cpu_seconds > cpu_limit:
        raise ResultOutOfRange(
            "cpu_seconds", f"{cpu_seconds:.3f} s exceeds {run_seconds:.3f} s x {bounds.cores:g} cores ({cpu_limit:.3f})"
        )
    if max_memory_mb > bounds.memory_mb * SLACK:
        raise ResultOutOfRange("max_memory_mb", f"{max_memory_mb} MB exceeds the worker's {bounds.memory_mb} MB")


def check_sample_numbers(cpu_seconds: float, max_memory_mb: int, bounds: ResultBounds) -> None:
    """Raises ResultOutOfRange unless a running attempt's usage so far could be true: as a result's numbers, over
    the time since its assignment and without the floor a result gets (the cost service divides by that time, so a
    floor would let an early sample claim many cores)."""
    if bounds.elapsed_seconds is None:
        raise ResultOutOfRange("sample_time", "the attempt's assignment has no time")
    check_result_numbers(bounds.elapsed_seconds, cpu_seconds, max_memory_mb, bounds, cpu_floor=0.0)


def process_is_worker(pid: int, worker_id: str, proc: str = "/proc") -> bool:
    """Whether process `pid` on this host is the agent of `worker_id` (its environment names it). A worker's
    record says which pid to stop, and a worker writes its own record: before the provider signals a pid, it
    checks the process really is that worker, so no worker can have the pool-manager kill another process."""
    if pid <= 1:
        return False
    try:
        with open(f"{proc}/{pid}/environ", "rb") as f:
            environ = f.read(1 << 20).split(b"\0")
    except OSError:  # gone, or not ours to read
        return False
    return f"JOBMESH_WORKER_ID={worker_id}".encode() in environ
