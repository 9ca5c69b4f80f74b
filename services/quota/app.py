"""Composition root of the quota service."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable

from jobmesh.quota.v1 import quota_pb2_grpc
from libs.config import QuotaLimits
from libs.etcd.client import Etcd, WatchEvent
from libs.etcd.election import Leadership
from libs.etcd.informer import Informer
from libs.keys import Keys
from libs.leadergate import LeaderGate
from libs.lifecycle.codec import decode_job
from libs.lifecycle.transitions import ACTIVE
from libs.main import Startup
from libs.pruning import Entry, HistoryPruner, list_keys, time_from_key
from libs.server import ServiceServer
from services.quota.manager import BurstPolicy, BurstSession, Holding, QuotaManager
from services.quota.servicer import QuotaMetrics, QuotaServicer
from services.quota.settings import Settings

SERVICE = "jobmesh.quota.v1.QuotaService"


def job_handler(manager: QuotaManager):  # type: ignore[no-untyped-def]
    def handle(event: WatchEvent) -> None:
        parts = event.kv.key.rsplit("/", 2)
        tenant_id, job_id = parts[-2], parts[-1]
        if event.kind == "delete":
            manager.observe(tenant_id, job_id, False, None)
            return
        job = decode_job(event.kv.value)
        res = job.spec.resources
        holding = Holding(tenant_id, res.cpu_millis, res.memory_mb, job.burst_session_id)
        manager.observe(tenant_id, job_id, job.state in ACTIVE, holding)

    return handle


def overrides_handler(manager: QuotaManager):  # type: ignore[no-untyped-def]
    def handle(event: WatchEvent) -> None:
        tenant_id = event.kv.key.rsplit("/", 1)[-1]
        if event.kind == "delete":
            manager.overrides.pop(tenant_id, None)
        else:
            raw = json.loads(event.kv.value)
            manager.overrides[tenant_id] = QuotaLimits(raw["cpu_millis"], raw["memory_mb"], raw["concurrent_jobs"])

    return handle


def burst_handler(manager: QuotaManager):  # type: ignore[no-untyped-def]
    def handle(event: WatchEvent) -> None:
        session_id = event.kv.key.rsplit("/", 1)[-1]
        if event.kind == "delete":
            manager.sessions.pop(session_id, None)
        else:
            manager.sessions[session_id] = BurstSession(**json.loads(event.kv.value))

    return handle


def audit_handler(manager: QuotaManager):  # type: ignore[no-untyped-def]
    def handle(event: WatchEvent) -> None:
        if event.kind == "delete":  # pruned (libs/pruning.py): gone from the history as well
            session_id = event.kv.key.rsplit("/", 1)[-1].split("-", 1)[-1]
            manager.audit = [s for s in manager.audit if s.session_id != session_id]
        elif event.kind == "put":
            session = BurstSession(**json.loads(event.kv.value))
            if all(s.session_id != session.session_id for s in manager.audit):
                manager.audit.append(session)
                manager.audit.sort(key=lambda s: s.start)

    return handle


async def publish_gauges(manager: QuotaManager, metrics: QuotaMetrics, leading: Callable[[], bool]) -> None:
    """The leader's usage, limits and burst figures every 2 s; a standby shows none (its state is the same, and
    dashboards add the gauges over instances)."""
    labelled = (metrics.usage, metrics.limit, metrics.utilization, metrics.burst_left)
    while True:
        if not leading():
            for gauge in labelled:
                gauge.clear()
            metrics.burst_active.set(0)
            await asyncio.sleep(2)
            continue
        for tenant_id in manager.config.tenants:
            limits = manager.limits(tenant_id)
            usage = manager.usage(tenant_id)
            for name in ("cpu_millis", "memory_mb", "concurrent_jobs"):
                metrics.usage.labels(tenant_id, name).set(getattr(usage, name))
                metrics.limit.labels(tenant_id, name).set(getattr(limits, name))
                metrics.utilization.labels(tenant_id, name).set(getattr(usage, name) / max(getattr(limits, name), 1))
        now = manager.clock.now()
        metrics.burst_active.set(sum(1 for s in manager.sessions.values() if s.start <= now < s.expire))
        left = manager.burst_left()
        for name in ("cpu_millis", "memory_mb", "concurrent_jobs"):
            metrics.burst_left.labels(name).set(getattr(left, name))
        await asyncio.sleep(2)


async def audit_entries(etcd: Etcd, keys: Keys) -> list[list[Entry]]:
    """The burst audit, one history for the whole mesh; its keys start with the session's start in ms."""
    return [[Entry(kv.key, time_from_key(kv.key), kv.mod_revision) for kv in await list_keys(etcd, keys.burst_audits)]]


async def build(settings: Settings, startup: Startup) -> ServiceServer:
    config = startup.config
    etcd = await startup.etcd()
    keys = startup.keys
    pool = config.burst_pool
    policy = BurstPolicy(
        pool.cpu_millis if pool else 0,
        pool.memory_mb if pool else 0,
        pool.concurrent_jobs if pool else 0,
        config.burst_max_duration_seconds,
        config.burst_max_tenant_share,
        config.burst_session_at_submit_seconds,
    )
    manager = QuotaManager(config, startup.clock, policy)
    metrics = QuotaMetrics(startup.registry)
    informers = [
        Informer(etcd, keys.quota_overrides, overrides_handler(manager), "quota-limits"),
        Informer(etcd, keys.burst_sessions, burst_handler(manager), "burst-sessions"),
        Informer(etcd, keys.burst_audits, audit_handler(manager), "burst-audit"),
        # Usage is rebuilt from the stored jobs before we admit anything: no drift after a crash.
        Informer(etcd, keys.jobs, job_handler(manager), "jobs"),
    ]
    for informer in informers:
        informer.start()
    for informer in informers:
        await informer.wait_synced()
    # Active/standby: both replicas keep their state warm from etcd; the leader alone serves (docs/architecture.md).
    election = startup.election(etcd, "quota", settings.leader)

    def on_term(term: Leadership | None) -> None:
        manager.drop_reservations()  # a term's reservations are enqueued only while it lasts

    gate = LeaderGate(election, informers, SERVICE, on_term)
    servicer = QuotaServicer(manager, etcd, keys, metrics, election, gate)
    server = await startup.serve(
        [(lambda s: quota_pb2_grpc.add_QuotaServiceServicer_to_server(servicer, s), SERVICE)], gated=[SERVICE]
    )
    election.start()
    gating = asyncio.create_task(gate.run(server), name="quota-leader-gate")
    startup.task(publish_gauges(manager, metrics, gate.serves), "quota-gauges")
    pruner = HistoryPruner(
        "burst-audit",
        lambda: audit_entries(etcd, keys),
        election.fenced_txn,
        config.burst_audit,
        manager.clock,
        metrics.audit_pruned,
        may_run=gate.serves,
    )
    startup.task(pruner.run_forever(), "burst-audit-pruning")

    async def stop() -> None:
        gating.cancel()
        await election.stop()  # resign: the standby takes over at once
        for informer in informers:
            await informer.stop()

    server.on_stop.append(stop)
    return server
