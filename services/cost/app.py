"""Composition root of the cost service."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterator

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.cost.v1 import cost_pb2_grpc
from libs.clock import SystemClock
from libs.config import MeshConfig
from libs.etcd.election import Leadership
from libs.etcd.informer import Informer
from libs.keys import Keys
from libs.leadergate import FencedStore, LeaderGate
from libs.lifecycle.codec import decode_job, decode_worker
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


def attempted_jobs(informer: Informer, attempted: set[str]) -> Iterator[tuple[str, t.Job]]:
    """The stored jobs that have had an attempt (`CostLedger.attempted`), decoded: what a rescan reads, without
    decoding the pending backlog, which has nothing to charge."""
    for key in list(attempted):
        kv = informer.cache.get(key)
        if kv is not None:
            yield kv.key, decode_job(kv.value)


def stored_job_ids(informer: Informer) -> Iterator[str]:
    """ "tenant/job" of every stored job (job keys are `.../jobs/<tenant>/<job>`)."""
    for key in list(informer.cache):
        yield "/".join(key.rsplit("/", 2)[-2:])


def live_workers(informer: Informer) -> Iterator[t.Worker]:
    for kv in list(informer.cache.values()):
        yield decode_worker(kv.value)


async def follow(informers: list[Informer], more: list[Informer]) -> None:
    """Starts each informer of `more` and waits for it to sync, in order (each handler may rely on the ones before)."""
    for informer in more:
        informers.append(informer)
        informer.start()
        await informer.wait_synced()


def _accounts(
    settings: Settings,
    config: MeshConfig,
    store: FencedStore,
    keys: Keys,
    cost_keys: CostKeys,
    metrics: CostMetrics,
    usage: RunningUsage,
    leading: Callable[[], bool],
) -> CostAccounts:
    """The ledgers and budgets the API answers from; they write (through `store`) only while `leading`."""
    clock = SystemClock()
    ledger = CostLedger(
        store,
        keys,
        config,
        clock,
        metrics,
        record_delay=settings.record_delay_seconds,
        usage=usage,
        may_write=leading,
    )
    workers = WorkerLedger(store, cost_keys, config, clock, metrics, may_write=leading)
    return CostAccounts(ledger, workers, BudgetStore(store, cost_keys, config), config, clock, Thresholds())


def _cycle(
    settings: Settings,
    accounts: CostAccounts,
    store: FencedStore,
    keys: Keys,
    cost_keys: CostKeys,
    metrics: CostMetrics,
    jobs: Informer,
    leading: Callable[[], bool],
) -> CostCycle:
    """The leader's periodic cycle, with the roll-up of old records it runs."""
    config, ledger = accounts.config, accounts.ledger
    rollup = CostRollup(
        store,
        keys,
        cost_keys,
        ledger,
        config,
        accounts.clock,
        metrics,
        accounts.thresholds,
        stored_jobs=lambda: stored_job_ids(jobs),
        age_seconds=config.cost_rollup_seconds,
    )
    return CostCycle(
        accounts,
        lambda: attempted_jobs(jobs, ledger.attempted),
        metrics,
        interval=settings.cycle_seconds,
        rescan_every=settings.rescan_every,
        rollup=rollup,
        lifetimes=config.worker_lifetimes,
        leading=leading,
    )


async def build(settings: Settings, startup: Startup) -> ServiceServer:
    config, keys = startup.config, startup.keys
    metrics = CostMetrics(startup.registry)
    etcd = await startup.etcd()
    cost_keys = CostKeys(settings.common.etcd.prefix)

    # Active/standby (docs/architecture.md): both replicas follow the records, jobs and workers; the leader alone
    # serves, charges, writes lifetimes and publishes the spend gauges, every write fenced by its term.
    election = startup.election(etcd, "cost", settings.leader)
    informers: list[Informer] = []
    gate = LeaderGate(election, informers, SERVICE)
    store = FencedStore(etcd, gate)
    usage = RunningUsage()
    accounts = _accounts(settings, config, store, keys, cost_keys, metrics, usage, gate.serves)
    ledger, workers, budgets = accounts.ledger, accounts.workers, accounts.budgets

    worker_informer = Informer(etcd, keys.workers, workers.on_worker_event, "workers")
    job_informer = Informer(etcd, keys.jobs, name="jobs", batch_handler=ledger.on_job_events)
    await follow(
        informers,
        [
            Informer(etcd, cost_keys.budgets, budgets.on_budget_event, "cost-budgets"),
            # Records before jobs, so that replaying the jobs only charges what was never charged.
            Informer(etcd, keys.cost_records, ledger.on_record_event, "cost-records"),
            Informer(etcd, cost_keys.daily, ledger.on_daily_event, "cost-daily"),
            # What running attempts used so far (the pool-manager writes it from workers' heartbeats).
            Informer(etcd, keys.usage, usage.on_usage_event, "running-usage"),
            worker_informer,
            job_informer,
        ],
    )

    cycle = _cycle(settings, accounts, store, keys, cost_keys, metrics, job_informer, gate.serves)

    async def on_term(term: Leadership | None) -> None:
        if term is None:
            metrics.forget_published()
            return
        # Stored lifetimes before the live workers, so a worker keeps its first start across leaders.
        await workers.take_over(lambda: live_workers(worker_informer))
        cycle.new_term()

    gate.on_term = on_term
    servicer = CostServicer(accounts)
    server = await startup.serve(
        [(lambda s: cost_pb2_grpc.add_CostServiceServicer_to_server(servicer, s), SERVICE)],
        gated=[SERVICE],
        inner_interceptors=[gate.interceptor()],
    )
    election.start()
    gating = asyncio.create_task(gate.run(server), name="cost-leader-gate")
    cycle_task = asyncio.create_task(cycle.run_forever(), name="cost-cycle")

    async def stop() -> None:
        cycle_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cycle_task
        # Off the gate's list first: the gate's self-check would take a stopped informer for a dead one.
        following = informers[:]
        informers.clear()
        for informer in reversed(following):
            await informer.stop()
        await ledger.close()  # while it leads: what it charged last is written before it resigns
        gating.cancel()
        await election.stop()  # resign: the standby takes over at once

    server.on_stop.append(stop)
    return server
