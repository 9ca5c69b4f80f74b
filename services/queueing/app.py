"""Composition root of the queueing service."""

from __future__ import annotations

from prometheus_client import CollectorRegistry

from jobmesh.queueing.v1 import queueing_pb2_grpc
from libs.clock import SystemClock
from libs.config import load_config
from libs.etcd.client import Etcd
from libs.etcd.informer import Informer
from libs.jobstore import JobStore
from libs.keys import Keys
from libs.server import start_server
from libs.settings import CommonSettings
from services.queueing.manager import QueueManager, QueueMetrics
from services.queueing.servicer import QueueingServicer

SERVICE = "jobmesh.queueing.v1.QueueingService"


async def run(settings: CommonSettings) -> None:
    config = load_config(settings.config_path)
    registry = CollectorRegistry()
    clock = SystemClock()
    etcd = Etcd(settings.etcd.endpoints)
    await etcd.wait_ready()
    keys = Keys(settings.etcd.prefix)
    store = JobStore(etcd, keys)
    manager = QueueManager(store, config, clock, QueueMetrics(registry))
    # The queue is rebuilt from etcd before we serve: pending jobs come back in submission order.
    informer = Informer(etcd, keys.jobs, manager.on_job_event, "jobs")
    informer.start()
    await informer.wait_synced()
    servicer = QueueingServicer(manager, store, clock)
    server = await start_server(
        "queueing",
        settings,
        registry,
        [(lambda s: queueing_pb2_grpc.add_QueueingServiceServicer_to_server(servicer, s), SERVICE)],
    )
    server.on_stop.append(informer.stop)
    try:
        await server.serve_forever()
    finally:
        await etcd.close()
