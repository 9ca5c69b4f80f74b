"""The fair queue's value types: a queued job, where it stands, persisted tags, and what a job costs."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

from libs.lifecycle.routing import DEFAULT_QUEUE

__all__ = ["DEFAULT_QUEUE"]  # the fair queue's lanes are named by queue; the name of the default is routing's

COST_SCALE = 1_000_000
NEVER = math.inf

Key = tuple[int, int, str]  # (-priority, seq, job_id): a tenant's own order, and the tie-break between tenants


class QueueItem(NamedTuple):
    """A queued job as the fair queue sees it (a tuple: cheap to build, immutable)."""

    job_id: str
    tenant_id: str
    queue: str
    cost: float  # virtual-time cost: the job's dominant resource share, see `job_cost`
    priority: int = 0  # higher first within a tenant
    seq: int = 0  # submission order; 0 means "in push order"
    urgent_at: float = NEVER  # when the SLA boost starts (clock seconds)
    due: float = NEVER  # when it must start to meet its SLA: the order among urgent jobs


@dataclass(frozen=True, slots=True)
class Placement:
    """Where a queued job stands in its queue: 1-based position and who is ahead of it."""

    position: int
    ahead_same_tenant: int
    ahead_other_tenants: int
    urgent: bool


@dataclass(frozen=True, slots=True)
class TenantTags:
    """A tenant's tags in one lane, as persisted: enough to give the same finish tags after a restart."""

    base: float
    charged: int
    weight: float
    backlogged: bool


@dataclass(frozen=True, slots=True)
class LaneTags:
    virtual_time: float
    tenants: dict[str, TenantTags]


def job_cost(cpu_millis: int, memory_mb: int) -> float:
    """A job's size in virtual time: its dominant resource, in cores or GiB (a 1-core/1-GiB job costs 1)."""
    return max(cpu_millis / 1000.0, memory_mb / 1024.0, 1e-3)


# A memo of the pure conversion below (jobs come in few sizes); bounded, and no state beyond its results.
UNITS_BY_COST: dict[float, int] = {}


def cost_units(cost: float) -> int:
    """A cost in integer units; the few distinct job sizes are remembered (a bounded cache of pure results)."""
    units = UNITS_BY_COST.get(cost)
    if units is None:
        units = max(1, round(cost * COST_SCALE))
        if len(UNITS_BY_COST) < 4096:
            UNITS_BY_COST[cost] = units
    return units
