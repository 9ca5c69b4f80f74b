"""Composition root of the scheduler (run as several replicas; one leads)."""

from __future__ import annotations

import asyncio

import grpc

from jobmesh.queueing.v1 import queueing_pb2_grpc
from jobmesh.scheduler.v1 import scheduler_pb2 as s
from jobmesh.scheduler.v1 import scheduler_pb2_grpc
from libs.etcd.election import LeaderElection
from libs.etcd.informer import Informer
from libs.leadergate import SelfCheck
from libs.main import Startup
from libs.server import ServiceServer
from services.scheduler.scheduler import Scheduler, SchedulerMetrics
from services.scheduler.settings import Settings

SERVICE = "jobmesh.scheduler.v1.SchedulerService"
QUEUEING_SERVICE = "jobmesh.queueing.v1.QueueingService"  # served by its leading replica only


class SchedulerServicer(scheduler_pb2_grpc.SchedulerServiceServicer):
    def __init__(self, scheduler: Scheduler, election: LeaderElection, replica_id: str):
        self.scheduler = scheduler
        self.election = election
        self.replica_id = replica_id

    async def GetStatus(self, request: s.GetStatusRequest, context: grpc.aio.ServicerContext) -> s.GetStatusResponse:
        lead = self.election.leadership
        return s.GetStatusResponse(
            replica_id=self.replica_id,
            leader=lead is not None,
            leader_revision=lead.revision if lead else 0,
            dispatched=self.scheduler.dispatched,
        )


async def build(settings: Settings, startup: Startup) -> ServiceServer:
    etcd = await startup.etcd()
    keys = startup.keys
    queueing = startup.channel(settings.common.peers.queueing, health_service=QUEUEING_SERVICE)
    election = startup.election(etcd, "scheduler", settings.leader)
    workers = Informer(etcd, keys.workers, name="workers")
    assignments = Informer(etcd, keys.assignments, name="assignments")
    scheduler = Scheduler(
        keys,
        startup.config,
        startup.clock,
        election,
        workers,
        assignments,
        queueing_pb2_grpc.QueueingServiceStub(queueing),
        SchedulerMetrics(startup.registry),
        min_interval=settings.min_interval_seconds,
    )
    workers.handler = scheduler.on_change
    assignments.handler = scheduler.on_assignment  # both watched only while this replica leads
    servicer = SchedulerServicer(scheduler, election, settings.common.server.replica_id)
    server = await startup.serve(
        [(lambda srv: scheduler_pb2_grpc.add_SchedulerServiceServicer_to_server(servicer, srv), SERVICE)]
    )
    election.start()
    loop_task = asyncio.create_task(scheduler.run(), name="scheduler-loop")
    # Its informers run only while it leads; the election must never die unnoticed.
    checking = asyncio.create_task(SelfCheck(election, services=server.service_names).run(server), name="self-check")

    async def stop() -> None:
        loop_task.cancel()
        checking.cancel()
        await election.stop()
        for informer in (workers, assignments):
            await informer.stop()

    server.on_stop.append(stop)
    return server
