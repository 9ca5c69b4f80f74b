"""Prometheus metrics of the queueing service (jobmesh_queueing_*): counters as events happen, the queue's
shape (depths, virtual times, shares) computed at scrape time from the live queue."""

from __future__ import annotations

from collections import Counter as Tally
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from services.queueing.sla import MET

WAIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 15, 30, 60, 300, 900, 1800, 3600, 7200)


@dataclass
class ShareWindow:
    """Which tenants the last `size` dispatches went to: the observed share to hold against the weights."""

    size: int = 1000
    recent: deque[str] = field(default_factory=deque)
    counts: Tally[str] = field(default_factory=Tally)

    def add(self, tenant_id: str) -> None:
        self.recent.append(tenant_id)
        self.counts[tenant_id] += 1
        if len(self.recent) > self.size:
            gone = self.recent.popleft()
            self.counts[gone] -= 1
            if not self.counts[gone]:
                del self.counts[gone]


@dataclass(frozen=True)
class QueueShape:
    """What the scrape-time collector reads from the manager."""

    depth_by_queue: dict[str, int]
    depth_by_tenant: dict[str, int]
    virtual_time_by_queue: dict[str, float]
    weights: dict[str, float]  # every tenant that is queued or was dispatched to in the window
    dispatch_counts: dict[str, int]  # within the share window


class QueueShapeCollector(Collector):
    def __init__(self, read: Callable[[], QueueShape | None]):
        self.read = read

    def describe(self) -> Iterator[Metric]:
        return iter(self._families())

    def collect(self) -> Iterator[Metric]:
        return iter(self._families(self.read()))

    @staticmethod
    def _families(shape: QueueShape | None = None) -> list[Metric]:
        depth = GaugeMetricFamily("jobmesh_queueing_depth_jobs", "Pending jobs per queue.", labels=["queue"])
        tenant_depth = GaugeMetricFamily(
            "jobmesh_queueing_tenant_depth_jobs", "Pending jobs per tenant.", labels=["tenant"]
        )
        vtime = GaugeMetricFamily("jobmesh_queueing_virtual_time", "WFQ virtual time per queue.", labels=["queue"])
        weight = GaugeMetricFamily("jobmesh_queueing_tenant_weight", "Fair-share weight in force.", labels=["tenant"])
        dispatch_share = GaugeMetricFamily(
            "jobmesh_queueing_dispatch_share_ratio",
            "Share of the last 1,000 dispatches that went to the tenant.",
            labels=["tenant"],
        )
        weight_share = GaugeMetricFamily(
            "jobmesh_queueing_weight_share_ratio",
            "The tenant's weight over the weights of the tenants queued or dispatched to in the same window: "
            "the share fair queueing aims at while they all stay backlogged.",
            labels=["tenant"],
        )
        families: list[Metric] = [depth, tenant_depth, vtime, weight, dispatch_share, weight_share]
        if shape is None:
            return families
        for name, n in shape.depth_by_queue.items():
            depth.add_metric([name], n)
        for name, n in shape.depth_by_tenant.items():
            tenant_depth.add_metric([name], n)
        for name, v in shape.virtual_time_by_queue.items():
            vtime.add_metric([name], v)
        total_weight = sum(shape.weights.values())
        dispatched = sum(shape.dispatch_counts.values())
        for tenant, w in shape.weights.items():
            weight.add_metric([tenant], w)
            weight_share.add_metric([tenant], w / total_weight if total_weight else 0.0)
            share = shape.dispatch_counts.get(tenant, 0) / dispatched if dispatched else 0.0
            dispatch_share.add_metric([tenant], share)
        return families


class QueueMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.enqueued = Counter(
            "jobmesh_queueing_enqueued_total", "Jobs stored and queued.", ["tenant"], registry=registry
        )
        self.dispatched = Counter(
            "jobmesh_queueing_dispatched_total", "Jobs that left the queue to run.", ["tenant"], registry=registry
        )
        self.wait = Histogram(
            "jobmesh_queueing_wait_seconds",
            "Time from submit (or requeue after a lost worker) to dispatch, per SLA tier.",
            ["sla_tier"],
            registry=registry,
            buckets=WAIT_BUCKETS,
        )
        self.sla_outcomes = Counter(
            "jobmesh_queueing_sla_outcomes_total",
            "Jobs whose SLA outcome is known (first dispatch, or deadline passed while queued), met or missed.",
            ["sla_tier", "outcome"],
            registry=registry,
        )
        self.sla_misses = Counter(
            "jobmesh_queueing_sla_misses_total",
            "SLA misses per tier and cause (target_wait: started after the tier's target; deadline).",
            ["sla_tier", "reason"],
            registry=registry,
        )
        self.sla_compliance = Gauge(
            "jobmesh_queueing_sla_compliance_ratio",
            "Met over known SLA outcomes since this process started, per tier.",
            ["sla_tier"],
            registry=registry,
        )
        self.batch_size = Histogram(
            "jobmesh_queueing_enqueue_batch_jobs",
            "Jobs written per etcd transaction by the enqueue batcher.",
            registry=registry,
            buckets=(1, 2, 4, 8, 16, 32, 64),
        )
        self.tags_saved = Counter(
            "jobmesh_queueing_tag_snapshots_total", "Fair-queue tag snapshots written to etcd.", registry=registry
        )
        self.backing_off = Gauge(
            "jobmesh_queueing_backing_off_jobs",
            "Retried jobs waiting out their backoff (pending, not in the fair queue yet).",
            registry=registry,
        )
        self._outcomes: dict[str, list[int]] = {}  # tier -> [met, known]

    def record_outcome(self, tier: str, outcome: str) -> None:
        met, known = self._outcomes.setdefault(tier, [0, 0])
        met += outcome == MET
        known += 1
        self._outcomes[tier] = [met, known]
        self.sla_outcomes.labels(tier, "met" if outcome == MET else "missed").inc()
        if outcome != MET:
            self.sla_misses.labels(tier, outcome).inc()
        self.sla_compliance.labels(tier).set(met / known)

    def compliance(self, tier: str) -> float | None:
        met, known = self._outcomes.get(tier, [0, 0])
        return met / known if known else None

    def watch_shape(self, read: Callable[[], QueueShape | None]) -> None:
        self.registry.register(QueueShapeCollector(read))
