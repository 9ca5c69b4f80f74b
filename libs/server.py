"""Builds and runs a service's grpc.aio server, mTLS only: health, reflection, interceptors, /metrics, graceful stop."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection
from prometheus_client import CollectorRegistry, start_http_server

from libs.authz import AuthorizationInterceptor
from libs.interceptors import ServerInterceptor
from libs.settings import CommonSettings
from libs.tls import server_credentials

log = logging.getLogger(__name__)

Registrar = Callable[[grpc.aio.Server], None]


@dataclass
class ServiceServer:
    """A started server; `serve_forever` waits for SIGTERM/SIGINT and stops gracefully."""

    name: str
    settings: CommonSettings
    registry: CollectorRegistry
    server: grpc.aio.Server
    health: health.aio.HealthServicer
    port: int
    service_names: tuple[str, ...]
    on_stop: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    # Services served only while this replica leads (libs/leadergate.py opens them): not opened by `set_serving`.
    gated: frozenset[str] = frozenset()

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *self.service_names):
            if not (serving and name in self.gated):
                await self.health.set(name, status)

    async def set_service_serving(self, name: str, serving: bool) -> None:
        """One service's health (what clients' health-checked load balancing routes by); "" is the process's."""
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await self.health.set(name, status)

    async def stop(self) -> None:
        # NOT_SERVING first so balancers and probes move away, then let in-flight RPCs finish.
        await self.set_serving(False)
        for hook in self.on_stop:
            try:
                await hook()
            except Exception:
                log.exception("stop hook failed")
        await self.server.stop(self.settings.server.grace_seconds)

    async def serve_forever(self) -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        waiter = asyncio.create_task(self.server.wait_for_termination())
        stopper = asyncio.create_task(stop.wait())
        await asyncio.wait({waiter, stopper}, return_when=asyncio.FIRST_COMPLETED)
        log.info("stopping %s", self.name)
        await self.stop()
        waiter.cancel()
        stopper.cancel()
        log.info("%s stopped", self.name)


async def start_server(
    name: str,
    settings: CommonSettings,
    registry: CollectorRegistry,
    registrars: Iterable[tuple[Registrar, str]],
    *,
    serving: bool = True,
    extra_interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
    options: Iterable[tuple[str, Any]] = (),
    reject_unknown_fields: bool = False,
    gated: Iterable[str] = (),
    inner_interceptors: Iterable[grpc.aio.ServerInterceptor] = (),
) -> ServiceServer:
    """Registers the given servicers (with their full service names) plus health and reflection, and starts.
    `reject_unknown_fields`: requests with fields their message does not define are refused (the public API).
    `gated`: service names that stay NOT_SERVING until the caller opens them (served by the leader only)."""
    mapping = ServerInterceptor(name, registry, reject_unknown_fields=reject_unknown_fields)
    server = grpc.aio.server(
        # Authorization first: a call the table does not allow runs nothing, not even the others' interceptors.
        # Inner ones (a leader gate) run inside the error mapping, so what they raise becomes a status as usual.
        interceptors=[AuthorizationInterceptor(name, registry), *extra_interceptors, mapping, *inner_interceptors],
        options=[
            ("grpc.max_receive_message_length", 4 * 1024 * 1024),
            ("grpc.keepalive_permit_without_calls", 1),
            ("grpc.http2.min_ping_interval_without_data_ms", 5_000),
            ("grpc.http2.max_ping_strikes", 0),
            *options,
        ],
    )
    names: list[str] = []
    for register, service_name in registrars:
        register(server)
        names.append(service_name)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection(
        [*names, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME], server
    )
    # mTLS only: a caller without a certificate from the mesh CA never gets past the handshake (reflection
    # and health included). gRPC logs each refused handshake ("Handshake failed with error ...").
    port = server.add_secure_port(f"{settings.server.host}:{settings.server.port}", server_credentials(settings.tls))
    if port == 0:
        raise RuntimeError(f"{name}: cannot listen on {settings.server.host}:{settings.server.port}")
    if settings.telemetry.metrics_port:
        start_http_server(settings.telemetry.metrics_port, addr=settings.server.host, registry=registry)
    await server.start()
    svc = ServiceServer(name, settings, registry, server, health_servicer, port, tuple(names), gated=frozenset(gated))
    for gated_name in svc.gated:
        await svc.set_service_serving(gated_name, False)
    await svc.set_serving(serving)
    log.info(
        "%s listening on %s:%d, mTLS (metrics :%d)", name, settings.server.host, port, settings.telemetry.metrics_port
    )
    return svc
