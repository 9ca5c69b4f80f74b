"""Composition root of the queueing service."""

from __future__ import annotations

import asyncio
import logging

from jobmesh.queueing.v1 import queueing_pb2_grpc
from libs.clock import Clock
from libs.config import MeshConfig
from libs.errors import JobMeshError
from libs.etcd.client import Etcd, WatchEvent
from libs.etcd.election import Leadership
from libs.etcd.informer import Informer
from libs.keys import Keys
from libs.leadergate import LeaderGate
from libs.lifecycle.store import JobStore
from libs.logstore import log_store_from_settings
from libs.main import Startup
from libs.server import ServiceServer
from services.queueing.manager import QueueManager
from services.queueing.metrics import QueueMetrics
from services.queueing.retention import FinishedJobs, RetentionSweeper
from services.queueing.servicer import QueueingServicer
from services.queueing.settings import Settings
from services.queueing.store import BatchingJobWriter, QueueStateStore
from services.queueing.watch import JobWatchers, RecentActivity

SERVICE = "jobmesh.queueing.v1.QueueingService"

log = logging.getLogger(__name__)


def _queue(
    settings: Settings,
    config: MeshConfig,
    etcd: Etcd,
    keys: Keys,
    store: JobStore,
    gate: LeaderGate,
    metrics: QueueMetrics,
    clock: Clock,
) -> tuple[QueueManager, RetentionSweeper]:
    """The queue and its retention sweeper, every write committed through the leader gate."""
    own = settings.queue
    manager = QueueManager(
        writer=BatchingJobWriter(store, own.max_batch, metrics.batch_size),
        reader=store,
        state=QueueStateStore(etcd, keys, commit=gate.fenced_txn),
        config=config,
        clock=clock,
        metrics=metrics,
        settings=own,
    )
    manager.leading = gate.serves
    metrics.watch_shape(manager.shape)
    manager.finished = FinishedJobs(keys, config.finished_job_retention_seconds)
    logs = log_store_from_settings(settings.logs)
    sweeper = RetentionSweeper(
        etcd,
        manager.finished,
        clock,
        own.retention_sweep_seconds,
        logs,
        commit=gate.fenced_txn,
        may_run=manager.leading,
    )
    return manager, sweeper


async def build(settings: Settings, startup: Startup) -> ServiceServer:
    config, clock, keys = startup.config, startup.clock, startup.keys
    etcd = await startup.etcd()
    # Active/standby (docs/architecture.md): both replicas keep the queue warm from the job records; the leader
    # alone serves, and every write it makes (creates, cancels, deadlines, tags, weights, deletions) is fenced.
    election = startup.election(etcd, "queueing", settings.leader)
    gate_informers: list[Informer] = []
    gate = LeaderGate(election, gate_informers, SERVICE)
    store = JobStore(etcd, keys, commit=gate.fenced_txn)
    manager, sweeper = _queue(settings, config, etcd, keys, store, gate, QueueMetrics(startup.registry), clock)
    # The queue is rebuilt before we serve: weights and tags from their snapshot, then every pending job.
    await manager.restore()
    watchers = JobWatchers()
    activity = RecentActivity(clock.now())

    async def on_job_event(event: WatchEvent) -> None:
        await manager.on_job_event(event)
        watchers.on_event(event)
        activity.on_event(event)

    informer = Informer(etcd, keys.jobs, on_job_event, "jobs")
    gate_informers.append(informer)
    informer.start()
    await informer.wait_synced()
    manager.finish_rebuild()

    async def on_term(term: Leadership | None) -> None:
        if term is not None:
            await manager.load_weights()  # the previous leader may have changed some

    gate.on_term = on_term
    timers = asyncio.create_task(manager.run_timers(), name="queueing-timers")
    snapshots = asyncio.create_task(
        manager.run_snapshots(settings.queue.snapshot_interval_seconds), name="queueing-tags"
    )
    retention = asyncio.create_task(sweeper.run_forever(), name="queueing-retention")
    servicer = QueueingServicer(manager, store, clock, watchers, activity)
    server = await startup.serve(
        [(lambda s: queueing_pb2_grpc.add_QueueingServiceServicer_to_server(servicer, s), SERVICE)],
        gated=[SERVICE],
        inner_interceptors=[gate.interceptor()],
    )
    election.start()
    gating = asyncio.create_task(gate.run(server), name="queueing-leader-gate")

    async def stop() -> None:
        for task in (timers, snapshots, retention):
            task.cancel()
        if gate.serves():
            try:
                await manager.save_tags()  # a graceful stop loses no tag: the next leader gives the same order
            except JobMeshError as exc:
                log.warning("could not save the fair-queue tags on the way out: %s", exc)
        gating.cancel()
        await election.stop()  # resign: the standby takes over at once
        await informer.stop()

    server.on_stop.append(stop)
    return server
