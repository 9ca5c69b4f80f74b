"""The scheduler's metrics: phase timings, dispatches, races lost, leadership."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram


class SchedulerMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.phase = Histogram(
            "jobmesh_scheduler_phase_seconds",
            "Time per scheduling phase.",
            ["phase"],
            registry=registry,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1),
        )
        self.dispatched = Counter(
            "jobmesh_scheduler_dispatched_total", "Jobs handed to workers.", ["pool"], registry=registry
        )
        self.conflicts = Counter(
            "jobmesh_scheduler_dispatch_conflicts_total",
            "Dispatches that lost a race (stale job or worker).",
            registry=registry,
        )
        self.unplaced = Gauge(
            "jobmesh_scheduler_unplaced_jobs", "Jobs seen last cycle with no suitable idle worker.", registry=registry
        )
        self.unheard = Gauge(
            "jobmesh_scheduler_unheard_workers",
            "Registered workers offered no job last cycle because they were not heard in etcd's current term "
            "(their stream broke, or etcd elected a leader since their last heartbeat).",
            registry=registry,
        )
        self.leader = Gauge("jobmesh_scheduler_is_leader", "1 while this replica leads.", registry=registry)
        self.allocation = Histogram(
            "jobmesh_scheduler_allocation_seconds",
            "Submit to dispatch.",
            registry=registry,
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
