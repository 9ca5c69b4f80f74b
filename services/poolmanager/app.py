"""Composition root of the pool-manager (run as several replicas; one leads)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import grpc
from prometheus_client import CollectorRegistry

from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from jobmesh.queueing.v1 import queueing_pb2_grpc
from libs.authz import AuthorizationInterceptor
from libs.clock import SystemClock
from libs.config import MeshConfig
from libs.etcd.client import Etcd, WatchEvent
from libs.etcd.election import LeaderElection
from libs.etcd.informer import Informer
from libs.interceptors import ServerInterceptor
from libs.keys import Keys
from libs.leadergate import SelfCheck
from libs.lifecycle.store import JobStore
from libs.logstore import LogStore, log_store_from_settings
from libs.main import Startup
from libs.meshpki import WorkerIssuer
from libs.pruning import Entry, HistoryPruner, list_keys, time_from_key
from libs.server import ServiceServer
from services.poolmanager.controller import PoolController, QueueDepthSource
from services.poolmanager.join import (
    JoinTokens,
    WorkerCertificateServicer,
    WorkerJoinServicer,
    server_only_credentials,
    start_join_server,
)
from services.poolmanager.metrics import ControllerMetrics
from services.poolmanager.outcomes import JobOutcomes
from services.poolmanager.pools import PoolsServicer
from services.poolmanager.provider import LocalProcessProvider
from services.poolmanager.registry import RegistryMetrics, WorkerRegistry
from services.poolmanager.settings import Settings

REGISTRY_SERVICE = "jobmesh.poolmanager.v1.WorkerRegistryService"
QUEUEING_SERVICE = "jobmesh.queueing.v1.QueueingService"  # served by its leading replica only
POOLS_SERVICE = "jobmesh.poolmanager.v1.PoolManagerService"
CERTIFICATES_SERVICE = "jobmesh.poolmanager.v1.WorkerCertificateService"

log = logging.getLogger(__name__)


async def renew_worker_certificates(issuer: WorkerIssuer, election: LeaderElection, every: float = 300.0) -> None:
    """The leader renews long-lived workers' certificates (hours) well before they expire; the agents pick the
    new files up at their next connection. One writer, so two replicas never interleave a key and a cert."""
    while True:
        await asyncio.sleep(every)
        if election.leadership is None:
            continue
        try:
            renewed = await asyncio.to_thread(issuer.renew_due)
        except OSError:
            log.exception("renewing worker certificates failed")
            continue
        if renewed:
            log.info("renewed the certificates of %d workers", len(renewed))


async def maybe_start_join_server(
    settings: Settings, registry: CollectorRegistry, servicer: WorkerJoinServicer
) -> grpc.aio.Server | None:
    """The join port (JOBMESH_JOIN_PORT; unset: none), for static workers started elsewhere: server-only TLS
    and WorkerJoinService alone (docs/security.md, "Authorization")."""
    if settings.join_port is None:
        return None
    interceptors = [
        # Its own registry for the table's counter: the main server's interceptor already owns that name.
        AuthorizationInterceptor("poolmanager", CollectorRegistry()),
        ServerInterceptor("poolmanager_join", registry),
    ]
    common = settings.common
    server, _ = await start_join_server(
        common.server.host, settings.join_port, server_only_credentials(common.tls), servicer, interceptors
    )
    return server


async def scaling_entries(etcd: Etcd, keys: Keys, config: MeshConfig) -> list[list[Entry]]:
    """Each pool's scaling history (keys end in the decision's time in ms); each pool keeps its own newest."""
    out = []
    for pool in config.pools:
        kvs = await list_keys(etcd, keys.scaling_events(pool.pool_id))
        out.append([Entry(kv.key, time_from_key(kv.key), kv.mod_revision) for kv in kvs])
    return out


@dataclass
class _Shared:
    """What the registry, the controller and the pools servicer share."""

    config: MeshConfig
    clock: SystemClock
    etcd: Etcd
    keys: Keys
    queueing: grpc.aio.Channel
    depth: QueueDepthSource
    assignments: Informer
    workers: Informer
    outcomes: JobOutcomes
    store: JobStore
    election: LeaderElection
    logs: LogStore | None


async def _shared(settings: Settings, startup: Startup) -> _Shared:
    config, keys = startup.config, startup.keys
    etcd = await startup.etcd()
    queueing = startup.channel(settings.common.peers.queueing, health_service=QUEUEING_SERVICE)
    outcomes = JobOutcomes(etcd, keys, settings.common.server.replica_id)
    await outcomes.load()
    return _Shared(
        config=config,
        clock=startup.clock,
        etcd=etcd,
        keys=keys,
        queueing=queueing,
        depth=QueueDepthSource(queueing_pb2_grpc.QueueingServiceStub(queueing)),
        assignments=Informer(etcd, keys.assignments, name="assignments"),
        workers=Informer(etcd, keys.workers, name="workers"),
        outcomes=outcomes,
        store=JobStore(
            etcd,
            keys,
            counted_pools=[p.pool_id for p in config.pools if p.max_jobs_per_worker],
            backoff=config.retries,
        ),
        election=startup.election(etcd, "pool-manager", settings.leader),
        logs=log_store_from_settings(settings.logs),
    )


def _registry(settings: Settings, shared: _Shared, registry: CollectorRegistry) -> WorkerRegistry:
    return WorkerRegistry(
        shared.etcd,
        shared.keys,
        shared.store,
        shared.config,
        shared.clock,
        settings.lease.ttl_seconds,
        shared.assignments,
        shared.workers,
        RegistryMetrics(registry),
        shared.outcomes,
        result_linger=settings.result_linger_seconds,
        logs=shared.logs,
        usage_interval=settings.usage_sample_seconds,
    )


def _controller(shared: _Shared, provider: LocalProcessProvider, registry: CollectorRegistry) -> PoolController:
    return PoolController(
        shared.keys,
        shared.config,
        shared.clock,
        shared.election,
        shared.workers,
        shared.assignments,
        provider,
        ControllerMetrics(registry),
        shared.depth,
        shared.outcomes,
        shared.store,
    )


def _history_pruner(shared: _Shared, controller: PoolController) -> HistoryPruner:
    """The leader prunes the scaling history (each pool keeps its own newest), every delete fenced by leadership."""
    election = shared.election
    return HistoryPruner(
        "scaling-event",
        lambda: scaling_entries(shared.etcd, shared.keys, shared.config),
        election.fenced_txn,
        shared.config.scaling_events,
        shared.clock,
        controller.metrics.events_pruned,
        may_run=lambda: election.is_leader,
    )


async def build(settings: Settings, startup: Startup) -> ServiceServer:
    registry = startup.registry
    shared = await _shared(settings, startup)
    registry_servicer = _registry(settings, shared, registry)
    # Workers we start inherit our settings (etcd is not theirs to use; they only talk to us) but not our
    # identities: each gets a worker certificate we issue.
    issuer = WorkerIssuer(settings.worker_ca_dir, settings.worker_certs_dir)
    provider = LocalProcessProvider(dict(settings.worker_env), issuer)
    controller = _controller(shared, provider, registry)
    assignments, workers, election = shared.assignments, shared.workers, shared.election

    def on_assignment(event: WatchEvent) -> None:
        registry_servicer.on_assignment(event)
        controller.on_assignment_event(event)

    assignments.handler = on_assignment
    workers.handler = controller.on_worker_event
    for informer in (assignments, workers):
        informer.start()
    for informer in (assignments, workers):
        await informer.wait_synced()
    join_tokens = JoinTokens(shared.etcd, shared.keys, shared.config, shared.clock)
    pools = PoolsServicer(
        shared.etcd,
        shared.keys,
        shared.config,
        workers,
        assignments,
        shared.outcomes,
        shared.depth,
        join_tokens,
        shared.logs,
    )
    certificates = WorkerCertificateServicer(issuer.ca, shared.config)
    server = await startup.serve(
        [
            (
                lambda s: poolmanager_pb2_grpc.add_WorkerRegistryServiceServicer_to_server(registry_servicer, s),
                REGISTRY_SERVICE,
            ),
            (lambda s: poolmanager_pb2_grpc.add_PoolManagerServiceServicer_to_server(pools, s), POOLS_SERVICE),
            (
                lambda s: poolmanager_pb2_grpc.add_WorkerCertificateServiceServicer_to_server(certificates, s),
                CERTIFICATES_SERVICE,
            ),
        ],
    )
    join_server = await maybe_start_join_server(settings, registry, WorkerJoinServicer(join_tokens, issuer.ca))
    election.start()
    tasks = [
        asyncio.create_task(controller.run(), name="pool-controller"),
        asyncio.create_task(renew_worker_certificates(issuer, election), name="worker-certificates"),
        asyncio.create_task(shared.outcomes.flush_forever(), name="outcomes-flush"),
        asyncio.create_task(_history_pruner(shared, controller).run_forever(), name="scaling-history-pruning"),
        # A dead election or informer is not a healthy standby: NOT_SERVING and exit, to be restarted.
        asyncio.create_task(
            SelfCheck(election, [assignments, workers], server.service_names).run(server), name="self-check"
        ),
    ]

    async def stop() -> None:
        if join_server is not None:
            await join_server.stop(settings.common.server.grace_seconds)
        for task in tasks:
            task.cancel()
        await election.stop()
        await registry_servicer.usage.close()
        for informer in (assignments, workers):
            await informer.stop()
        await shared.outcomes.flush()

    server.on_stop.append(stop)
    return server
