"""A discrete-event simulation of N workers draining the fair queue on a fake clock, for tests and benchmarks.

Jobs arrive at their submit times; whenever a worker is free it takes the head of the queue (SLA boost
included) and stays busy for the job's run time. Pure: no sockets, no real time.
"""

from __future__ import annotations

import heapq
import math
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from libs.clock import FakeClock
from services.queueing.fairqueue import DEFAULT_QUEUE, QueueItem, WeightedFairQueue
from services.queueing.sla import MET, SlaPolicy


@dataclass(frozen=True)
class SimJob:
    job_id: str
    tenant_id: str
    submit_at: float = 0.0  # seconds after the start of the run
    run_seconds: float = 1.0
    cost: float = 1.0
    tier: str = ""
    priority: int = 0
    deadline: float | None = None  # seconds after the start of the run


@dataclass(frozen=True)
class Start:
    at: float
    job: SimJob


@dataclass
class SimResult:
    starts: list[Start] = field(default_factory=list)

    def order(self) -> list[str]:
        return [s.job.tenant_id for s in self.starts]

    def start_of(self, job_id: str) -> float:
        return next(s.at for s in self.starts if s.job.job_id == job_id)

    def shares(self, first: int | None = None) -> dict[str, float]:
        """Each tenant's share of the first `first` dispatches, counted in jobs."""
        taken = Counter(self.order()[:first])
        total = taken.total()
        return {tenant: n / total for tenant, n in sorted(taken.items())}

    def service_shares(self, first: int | None = None) -> dict[str, float]:
        """Each tenant's share of the cost dispatched in the first `first` dispatches: what the weights divide."""
        served: dict[str, float] = {}
        for s in self.starts[:first]:
            served[s.job.tenant_id] = served.get(s.job.tenant_id, 0.0) + s.job.cost
        total = sum(served.values())
        return {tenant: c / total for tenant, c in sorted(served.items())}

    def backlogged_prefix(self) -> int:
        """Dispatches before the first tenant's last job left: with all jobs queued at the start, every tenant
        was backlogged throughout them."""
        last = {s.job.tenant_id: n for n, s in enumerate(self.starts)}
        return min(last.values()) if last else 0

    def compliance(self, policy: SlaPolicy) -> dict[str, float]:
        """Per tier: the share of started jobs that met their SLA (started within target and deadline)."""
        met: Counter[str] = Counter()
        known: Counter[str] = Counter()
        for s in self.starts:
            tier = policy.tier(s.job.tier)
            known[tier] += 1
            met[tier] += policy.outcome(tier, s.job.submit_at, s.at, s.job.deadline) == MET
        return {tier: met[tier] / known[tier] for tier in sorted(known)}


def jain_index(shares: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """Jain's fairness index of the weight-normalised shares: 1.0 when every tenant gets exactly its weight."""
    total_weight = sum(weights[t] for t in shares)
    x = [shares[t] / (weights[t] / total_weight) for t in shares]
    return sum(x) ** 2 / (len(x) * sum(v * v for v in x)) if x else 1.0


class Simulation:
    def __init__(self, weights: Mapping[str, float], workers: int = 1, policy: SlaPolicy | None = None):
        self.clock = FakeClock(start=0.0)
        self.queue = WeightedFairQueue(dict(weights))
        self.workers = workers
        self.policy = policy

    def _item(self, job: SimJob, seq: int) -> QueueItem:
        urgent_at, due = math.inf, math.inf
        if self.policy is not None:
            window = self.policy.window(job.tier, job.submit_at, job.deadline)
            urgent_at, due = window.urgent_at, window.due
        return QueueItem(job.job_id, job.tenant_id, DEFAULT_QUEUE, job.cost, job.priority, seq, urgent_at, due)

    def run(self, jobs: Iterable[SimJob], max_starts: int | None = None, until: float = math.inf) -> SimResult:
        arrivals = sorted(jobs, key=lambda j: j.submit_at)
        by_id = {j.job_id: j for j in arrivals}
        busy: list[float] = []  # heap of release times
        result = SimResult()
        next_arrival = 0
        cap = max_starts if max_starts is not None else math.inf
        while len(result.starts) < cap:
            now = self.clock.now()
            while next_arrival < len(arrivals) and arrivals[next_arrival].submit_at <= now:
                self.queue.push(self._item(arrivals[next_arrival], next_arrival + 1))
                next_arrival += 1
            while busy and busy[0] <= now:
                heapq.heappop(busy)
            while len(busy) < self.workers and len(result.starts) < cap:
                item = self.queue.pop(DEFAULT_QUEUE, now)
                if item is None:
                    break
                job = by_id[item.job_id]
                result.starts.append(Start(now, job))
                heapq.heappush(busy, now + job.run_seconds)
            upcoming = [busy[0]] if busy else []
            if next_arrival < len(arrivals):
                upcoming.append(arrivals[next_arrival].submit_at)
            if not upcoming or min(upcoming) > until:
                break
            self.clock.advance(max(min(upcoming) - now, 0.0))
        return result
