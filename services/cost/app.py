"""Composition root of the cost service."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import grpc
from prometheus_client import CollectorRegistry

from jobmesh.cost.v1 import cost_pb2 as c
from jobmesh.cost.v1 import cost_pb2_grpc
from libs.clock import Clock, SystemClock
from libs.config import load_config
from libs.errors import InvalidArgument
from libs.etcd.client import Etcd
from libs.etcd.informer import Informer
from libs.keys import Keys
from libs.server import start_server
from libs.settings import CommonSettings
from services.cost.ledger import CostLedger, CostMetrics

SERVICE = "jobmesh.cost.v1.CostService"


def parse_time(field: str, value: str, default: float) -> float:
    if not value:
        return default
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError as exc:
        raise InvalidArgument(field, "must be an RFC 3339 time, e.g. 2026-11-01T00:00:00Z") from exc


class CostServicer(cost_pb2_grpc.CostServiceServicer):
    def __init__(self, ledger: CostLedger, clock: Clock):
        self.ledger = ledger
        self.clock = clock

    async def GetCostReports(
        self, request: c.GetCostReportsRequest, context: grpc.aio.ServicerContext
    ) -> c.GetCostReportsResponse:
        now = self.clock.now()
        end = parse_time("end", request.end, now + 1)
        start = parse_time("start", request.start, (datetime.fromtimestamp(now, UTC) - timedelta(days=30)).timestamp())
        if start >= end:
            raise InvalidArgument("start", "must be before end")
        return c.GetCostReportsResponse(reports=self.ledger.reports(request.tenant_id, start, end))

    async def GetJobCost(self, request: c.GetJobCostRequest, context: grpc.aio.ServicerContext) -> c.GetJobCostResponse:
        return c.GetJobCostResponse(cost=self.ledger.job_cost(request.job))


async def run(settings: CommonSettings) -> None:
    config = load_config(settings.config_path)
    registry = CollectorRegistry()
    clock = SystemClock()
    etcd = Etcd(settings.etcd.endpoints)
    await etcd.wait_ready()
    keys = Keys(settings.etcd.prefix)
    ledger = CostLedger(etcd, keys, config, clock, CostMetrics(registry))
    # Records first, so that replaying the jobs only charges what was never charged.
    records = Informer(etcd, keys.cost_records, ledger.on_record_event, "cost-records")
    records.start()
    await records.wait_synced()
    jobs = Informer(etcd, keys.jobs, ledger.on_job_event, "jobs")
    jobs.start()
    await jobs.wait_synced()
    servicer = CostServicer(ledger, clock)
    server = await start_server(
        "cost", settings, registry, [(lambda s: cost_pb2_grpc.add_CostServiceServicer_to_server(servicer, s), SERVICE)]
    )
    server.on_stop.append(jobs.stop)
    server.on_stop.append(records.stop)
    try:
        await server.serve_forever()
    finally:
        await etcd.close()
