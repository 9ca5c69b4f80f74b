"""Composition root of the queueing service."""

from __future__ import annotations

import asyncio
import logging

from prometheus_client import CollectorRegistry

from jobmesh.queueing.v1 import queueing_pb2_grpc
from libs.clock import SystemClock
from libs.config import load_config
from libs.errors import JobMeshError
from libs.etcd.client import Etcd, WatchEvent
from libs.etcd.informer import Informer
from libs.keys import Keys
from libs.lifecycle.store import JobStore
from libs.logstore import log_store_from_settings
from libs.server import start_server
from libs.settings import CommonSettings
from services.queueing.manager import QueueManager
from services.queueing.metrics import QueueMetrics
from services.queueing.retention import FinishedJobs, RetentionSweeper
from services.queueing.servicer import QueueingServicer
from services.queueing.settings import QueueingSettings
from services.queueing.store import BatchingJobWriter, QueueStateStore
from services.queueing.watch import JobWatchers, RecentActivity

SERVICE = "jobmesh.queueing.v1.QueueingService"

log = logging.getLogger(__name__)


async def run(settings: CommonSettings) -> None:
    config = load_config(settings.config_path)
    own = QueueingSettings.from_common(settings)
    registry = CollectorRegistry()
    clock = SystemClock()
    etcd = Etcd.from_settings(settings.etcd)
    await etcd.wait_ready()
    keys = Keys(settings.etcd.prefix)
    store = JobStore(etcd, keys)
    metrics = QueueMetrics(registry)
    manager = QueueManager(
        writer=BatchingJobWriter(store, own.max_batch, metrics.batch_size),
        reader=store,
        state=QueueStateStore(etcd, keys),
        config=config,
        clock=clock,
        metrics=metrics,
        settings=own,
    )
    metrics.watch_shape(manager.shape)
    manager.finished = FinishedJobs(keys, config.finished_job_retention_seconds)
    logs = log_store_from_settings(str(settings.data_dir), settings.extra)
    sweeper = RetentionSweeper(etcd, manager.finished, clock, own.retention_sweep_seconds, logs)
    # The queue is rebuilt before we serve: weights and tags from their snapshot, then every pending job.
    await manager.restore()
    watchers = JobWatchers()
    activity = RecentActivity(clock.now())

    async def on_job_event(event: WatchEvent) -> None:
        await manager.on_job_event(event)
        watchers.on_event(event)
        activity.on_event(event)

    informer = Informer(etcd, keys.jobs, on_job_event, "jobs")
    informer.start()
    await informer.wait_synced()
    manager.finish_rebuild()
    timers = asyncio.create_task(manager.run_timers(), name="queueing-timers")
    snapshots = asyncio.create_task(manager.run_snapshots(own.snapshot_interval_seconds), name="queueing-tags")
    retention = asyncio.create_task(sweeper.run_forever(), name="queueing-retention")
    servicer = QueueingServicer(manager, store, clock, watchers, activity)
    server = await start_server(
        "queueing",
        settings,
        registry,
        [(lambda s: queueing_pb2_grpc.add_QueueingServiceServicer_to_server(servicer, s), SERVICE)],
    )

    async def stop() -> None:
        for task in (timers, snapshots, retention):
            task.cancel()
        await informer.stop()
        try:
            await manager.save_tags()  # a graceful stop loses no tag: the restart gives the same order
        except JobMeshError as exc:
            log.warning("could not save the fair-queue tags on the way out: %s", exc)

    server.on_stop.append(stop)
    try:
        await server.serve_forever()
    finally:
        await etcd.close()
