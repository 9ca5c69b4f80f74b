"""A dry run's answer, from what the services report: validation, the start estimate and the cost range. Pure.

The admission part is quota's own decision (CheckAdmission, the same code as Reserve) and the budget's
(CheckBudget); what this module adds is arithmetic over their numbers, the queue's and the pools' prices.
"""

from __future__ import annotations

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.gateway.v1 import gateway_pb2 as g
from libs.config import MeshConfig, PoolConfig
from libs.errors import JobMeshError
from libs.jobs import ts
from services.cost.pricing import AttemptUsage, format_micros, price_attempt


def violation(err: JobMeshError) -> g.FieldViolation:
    return g.FieldViolation(field=err.metadata.get("field", ""), description=err.message, reason=err.reason)


def start_estimate(queue: str, pending: int, rate: float, window: float, now: float) -> g.StartEstimate:
    """Position: every job pending in the queue now is taken as ahead (fair queueing may put the job before some
    of them, so this is the late end). Wait: position / recent starts per second of that queue."""
    position = pending + 1
    out = g.StartEstimate(queue=queue, position=position, dispatch_rate_per_second=rate)
    if rate <= 0:
        out.basis = (
            f"{pending} job(s) pending in queue {queue!r}; no job started from it in the last {window:.0f}s, "
            "so no start time can be estimated (a dynamic pool may first have to start a worker)"
        )
        return out
    wait = max(position - 1, 0) / rate
    out.estimated_wait_seconds = wait
    out.estimated_start_time.CopyFrom(ts(now + wait))
    out.basis = f"{pending} job(s) ahead in queue {queue!r}, {rate * 60:.1f} starts/min over the last {window:.0f}s"
    return out


def candidate_pools(spec: t.JobSpec, queue: str, config: MeshConfig) -> list[PoolConfig]:
    """The pools the job could run on: its pinned pool, else every pool its resources and capabilities fit
    (burst pools only for a burst job)."""
    if spec.pool:
        pool = config.pool(spec.pool)
        return [pool] if pool is not None else []
    return [
        p
        for p in config.pools
        if p.worker_cpu_millis >= spec.resources.cpu_millis
        and p.worker_memory_mb >= spec.resources.memory_mb
        and all(p.labels.get(k) == v for k, v in spec.required_capabilities.items())
        and (p.kind != "burst" or spec.burst)
    ]


def cost_estimate(
    spec: t.JobSpec, pools: list[PoolConfig], config: MeshConfig, median_runtime: float, samples: int
) -> g.CostEstimate:
    """Low and high over the candidate pools' prices (a burst pool at the burst premium) for the runtime: the
    spec's max_runtime_seconds (the most it can run), else the tenant's recent median, else one hour (said so)."""
    if spec.max_runtime_seconds > 0:
        runtime = float(spec.max_runtime_seconds)
        basis = f"max_runtime_seconds ({spec.max_runtime_seconds}s): the most it can cost"
    elif samples > 0:
        runtime = median_runtime
        basis = f"the tenant's median runtime over its last {samples} job(s): {median_runtime:.1f}s"
    else:
        runtime = 3600.0
        basis = "no max_runtime_seconds and no recent job of the tenant: the price of one hour"
    out = g.CostEstimate(runtime_seconds=runtime, pool_ids=[p.pool_id for p in pools], basis=basis)
    if not pools:
        out.basis = "no pool fits the job's resources and capabilities"
        return out
    prices = [
        price_attempt(
            AttemptUsage(runtime, spec.resources.cpu_millis, spec.resources.memory_mb, burst=p.kind == "burst"),
            p.pricing,
            config.burst_premium,
        )
        for p in pools
    ]
    out.low.CopyFrom(_money(min(prices), config.currency))
    out.high.CopyFrom(_money(max(prices), config.currency))
    return out


def _money(micros: int, currency: str) -> t.Money:
    return t.Money(currency=currency, micros=micros, amount=format_micros(micros))
