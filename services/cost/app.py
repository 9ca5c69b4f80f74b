"""Composition root of the cost service."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.cost.v1 import cost_pb2_grpc
from libs.etcd.informer import Informer
from libs.keys import Keys
from libs.lifecycle.codec import decode_job
from libs.main import Startup
from libs.server import ServiceServer
from services.cost.accounts import CostAccounts
from services.cost.budget_store import BudgetStore
from services.cost.cycle import CostCycle
from services.cost.keys import CostKeys
from services.cost.ledger import CostLedger
from services.cost.metrics import CostMetrics
from services.cost.recommendations import Thresholds
from services.cost.rollup import CostRollup
from services.cost.servicer import CostServicer
from services.cost.settings import Settings
from services.cost.usage import RunningUsage
from services.cost.workers import WorkerLedger

SERVICE = "jobmesh.cost.v1.CostService"


def decoded_jobs(informer: Informer) -> Iterator[tuple[str, t.Job]]:
    for kv in list(informer.cache.values()):
        yield kv.key, decode_job(kv.value)


def stored_job_ids(informer: Informer) -> Iterator[str]:
    """ "tenant/job" of every stored job (job keys are `.../jobs/<tenant>/<job>`)."""
    for key in list(informer.cache):
        yield "/".join(key.rsplit("/", 2)[-2:])


async def build(settings: Settings, startup: Startup) -> ServiceServer:
    config, clock, keys = startup.config, startup.clock, startup.keys
    metrics = CostMetrics(startup.registry)
    etcd = await startup.etcd()
    cost_keys = CostKeys(settings.common.etcd.prefix)

    usage = RunningUsage()
    ledger = CostLedger(etcd, keys, config, clock, metrics, record_delay=settings.record_delay_seconds, usage=usage)
    workers = WorkerLedger(etcd, cost_keys, config, clock, metrics)
    budgets = BudgetStore(etcd, cost_keys, config)
    accounts = CostAccounts(ledger, workers, budgets, config, clock, Thresholds())

    informers = [
        Informer(etcd, cost_keys.budgets, budgets.on_budget_event, "cost-budgets"),
        # Records before jobs, so that replaying the jobs only charges what was never charged.
        Informer(etcd, keys.cost_records, ledger.on_record_event, "cost-records"),
        Informer(etcd, cost_keys.daily, ledger.on_daily_event, "cost-daily"),
        # What running attempts used so far (the pool-manager writes it from workers' heartbeats).
        Informer(etcd, keys.usage, usage.on_usage_event, "running-usage"),
    ]
    for informer in informers:
        informer.start()
        await informer.wait_synced()
    # Stored lifetimes before the live workers, so a worker keeps its first start across restarts.
    await workers.load()
    worker_informer = Informer(etcd, keys.workers, workers.on_worker_event, "workers")
    job_informer = Informer(etcd, keys.jobs, name="jobs", batch_handler=ledger.on_job_events)
    for informer in (worker_informer, job_informer):
        informers.append(informer)
        informer.start()
        await informer.wait_synced()
    await workers.close_missing({Keys.last_segment(k) for k in worker_informer.cache})

    rollup = CostRollup(
        etcd,
        keys,
        cost_keys,
        ledger,
        config,
        clock,
        metrics,
        accounts.thresholds,
        stored_jobs=lambda: stored_job_ids(job_informer),
        age_seconds=config.cost_rollup_seconds,
    )
    cycle = CostCycle(
        accounts,
        lambda: decoded_jobs(job_informer),
        metrics,
        interval=settings.cycle_seconds,
        rescan_every=settings.rescan_every,
        rollup=rollup,
        lifetimes=config.worker_lifetimes,
    )
    cycle_task = asyncio.create_task(cycle.run_forever(), name="cost-cycle")
    servicer = CostServicer(accounts)
    server = await startup.serve([(lambda s: cost_pb2_grpc.add_CostServiceServicer_to_server(servicer, s), SERVICE)])

    async def stop_cycle() -> None:
        cycle_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cycle_task

    server.on_stop.append(stop_cycle)
    for informer in reversed(informers):
        server.on_stop.append(informer.stop)
    server.on_stop.append(ledger.close)  # after the job informer: what it charged last is written before we exit
    return server
