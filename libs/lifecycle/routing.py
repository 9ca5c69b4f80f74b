"""Routing between queues and pools, and the one fit rule: which pools can run a spec, which queue a job waits
in, which queues' jobs a pool may take (for scaling), and which workers may take a job (for placement).

The rule, from the seed's pool selection chart: a job pinned to a pool waits in that pool's queue; one that fits
a static pool waits in `default` (static workers first, dynamic overflow once static ones are busy); one only
elastic pools can run waits in the queue of the first of them (dynamic before burst), which is what makes that
pool scale. Burst capacity takes only jobs admitted against a burst session."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

from jobmesh.common.v1 import types_pb2 as t
from libs.config import PoolConfig

DEFAULT_QUEUE = "default"


def fits(cpu_millis: int, memory_mb: int, labels: Mapping[str, str], spec: t.JobSpec) -> bool:
    """A worker (or a pool's worker size) with this much room and these labels can run the spec."""
    return (
        cpu_millis >= spec.resources.cpu_millis
        and memory_mb >= spec.resources.memory_mb
        and all(labels.get(k) == v for k, v in spec.required_capabilities.items())
    )


def pool_fits(pool: PoolConfig, spec: t.JobSpec) -> bool:
    return fits(pool.worker_cpu_millis, pool.worker_memory_mb, pool.labels, spec)


def fitting_pools(spec: t.JobSpec, pools: Sequence[PoolConfig]) -> list[PoolConfig]:
    """The pools whose workers can run the spec (only the pinned pool, when it names one)."""
    candidates = [p for p in pools if p.pool_id == spec.pool] if spec.pool else list(pools)
    return [p for p in candidates if pool_fits(p, spec)]


def assign_queue(spec: t.JobSpec, pools: Sequence[PoolConfig]) -> str:
    """The queue a new job waits in (see the module's rule)."""
    if spec.pool:
        return spec.pool
    fitting = fitting_pools(spec, pools)
    if not fitting or any(p.kind == "static" for p in fitting):
        return DEFAULT_QUEUE
    # Dynamic before burst: burst capacity is the last resort, and only for some jobs.
    return min(fitting, key=lambda p: p.kind == "burst").pool_id


def queue_of(job: t.Job) -> str:
    """The queue a stored job waits in (records from before queues were stored name none)."""
    return job.queue or job.spec.pool or DEFAULT_QUEUE


def may_place(spec: t.JobSpec, pool_id: str, pool_kind: str, burst_admitted: bool) -> bool:
    """Whether a worker of this pool may take the job at all (room and labels aside)."""
    if spec.pool and pool_id != spec.pool:
        return False
    return burst_admitted or pool_kind != "burst"


def queues_served(
    pool: PoolConfig,
    pools: Sequence[PoolConfig],
    *,
    static_has_room: bool,
    at_max: Callable[[PoolConfig], bool],
) -> tuple[list[str], bool]:
    """The queues whose waiting jobs count toward a pool's backlog (what its metrics show as its queue depth and
    what scales it), and whether only jobs admitted against a burst session count. A static pool takes its own
    queue and `default` (where every job that fits static capacity waits). A dynamic pool takes its own queue,
    and `default` once static workers have no room. Burst
    capacity takes only what static and dynamic capacity cannot: its own queue, a dynamic pool's queue once that
    pool is at its max, and `default` once static pools are full and every dynamic pool is at its max."""
    queues = [pool.pool_id]
    if pool.kind == "static":
        return [*queues, DEFAULT_QUEUE], False
    if pool.kind == "dynamic" and not static_has_room:
        queues.append(DEFAULT_QUEUE)
    if pool.kind != "burst":
        return queues, False
    dynamic = [p for p in pools if p.kind == "dynamic"]
    maxed = [p.pool_id for p in dynamic if at_max(p)]
    queues += maxed
    if len(maxed) == len(dynamic) and not static_has_room:
        queues.append(DEFAULT_QUEUE)
    return queues, True
