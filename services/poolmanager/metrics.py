"""The pool-manager leader's metrics: workers by state, losses, scaling, retirements, phase timings."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric


class PoolBacklogCollector:
    """Waiting jobs per pool by the routing rule (a static pool counts `default`, where jobs that fit static
    capacity wait), as the leader saw them in its last cycle; a standby shows none."""

    def __init__(self, read: Callable[[], Mapping[str, int]]):
        self.read = read

    def collect(self) -> Iterator[Metric]:
        family = GaugeMetricFamily(
            "jobmesh_poolmanager_queue_depth_jobs",
            "Waiting jobs each pool may take (its own queue and the queues routed to it), from the leader.",
            labels=["pool"],
        )
        for pool, waiting in sorted(self.read().items()):
            family.add_metric([pool], waiting)
        yield family


class ControllerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.lost = Counter(
            "jobmesh_poolmanager_workers_lost_total", "Workers declared lost.", ["pool"], registry=registry
        )
        self.scaling = Counter(
            "jobmesh_poolmanager_scaling_actions_total",
            "Scaling decisions.",
            ["pool", "direction", "executed"],
            registry=registry,
        )
        self.workers = Gauge(
            "jobmesh_poolmanager_workers", "Workers by pool and state.", ["pool", "state"], registry=registry
        )
        self.provisioning = Histogram(
            "jobmesh_poolmanager_provisioning_seconds",
            "Spawn to registration.",
            ["pool"],
            registry=registry,
            buckets=(0.25, 0.5, 1, 2, 5, 10, 30, 60),
        )
        self.leader = Gauge("jobmesh_poolmanager_is_leader", "1 while this replica leads.", registry=registry)
        self.events_pruned = Counter(
            "jobmesh_poolmanager_scaling_events_pruned_total",
            "Scaling history entries deleted for age or count ([retention] scaling_events_*).",
            registry=registry,
        )
        self.retired = Counter(
            "jobmesh_poolmanager_workers_retired_total",
            "Workers stopped because they may not be reused.",
            ["pool"],
            registry=registry,
        )
        self.phase = Histogram(
            "jobmesh_poolmanager_phase_seconds",
            "Time per phase of the pool controller's cycle.",
            ["phase"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )


class RegistryMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.connected = Gauge(
            "jobmesh_poolmanager_connected_workers", "Workers streaming from this replica.", registry=registry
        )
        self.cancels = Counter(
            "jobmesh_poolmanager_cancels_sent_total",
            "Running jobs a worker was told to stop (cancelled, or taken back from it).",
            registry=registry,
        )
        self.results = Counter(
            "jobmesh_poolmanager_results_total",
            "Results reported by workers.",
            ["pool", "outcome"],
            registry=registry,
        )
        self.usage_writes = Counter(
            "jobmesh_poolmanager_usage_writes_total",
            "Writes of workers' running-job usage samples to etcd (at most one per worker per interval), by outcome: "
            "written, fenced (the worker's lease had changed) or failed.",
            ["outcome"],
            registry=registry,
        )
        self.refusals = Counter(
            "jobmesh_poolmanager_worker_refusals_total",
            "Worker messages refused: another worker's id or lease, or a result whose numbers cannot be true.",
            ["method", "reason"],
            registry=registry,
        )
