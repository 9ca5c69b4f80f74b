"""The start-up every service shares: settings read and checked once, logging and tracing, the event loop, and
(for the gRPC services) what a composition root builds on and the server's life until SIGTERM.

A service's `__main__.py` is one call: `run_service("quota", Settings.from_env, build)`, where `build` (its
`app.py`) constructs every dependency from the settings and a `Startup`, starts the server and returns it."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, Protocol, TypeVar

import grpc
from prometheus_client import CollectorRegistry

from libs.clock import SystemClock
from libs.config import MeshConfig, load_config
from libs.etcd.client import Etcd
from libs.etcd.election import LOSSES, TERMS, LeaderElection
from libs.etcd.informer import WATCH_EVENTS, WATCH_MESSAGES
from libs.interceptors import channel
from libs.keys import Keys
from libs.server import Registrar, ServiceServer, start_server
from libs.settings import CommonSettings, LeaderSettings, load_settings
from libs.telemetry import setup_telemetry


class ServiceSettings(Protocol):
    """A service's settings object: its own fields beside the ones every service has."""

    @property
    def common(self) -> CommonSettings: ...


S = TypeVar("S", bound=ServiceSettings)


def run_main(
    name: str,
    from_env: Callable[[Mapping[str, str]], S],
    main: Callable[[S], Coroutine[Any, Any, None]],
    *,
    uvloop: bool = True,
) -> None:
    """Reads the settings, sets up logging and tracing, and runs `main(settings)` on uvloop (when installed)."""
    settings = load_settings(name, from_env)
    provider = setup_telemetry(settings.common.telemetry)
    # Services keep large, long-lived caches (job records, queues); the default collector thresholds rescan
    # them over and over under load. Collect the young generation less often, and leave what was loaded at
    # start-up out of the scans.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        if not uvloop:
            raise ImportError("plain asyncio asked for")
        import uvloop as fast_loop

        fast_loop.run(main(settings))
    except ImportError:
        asyncio.run(main(settings))
    except KeyboardInterrupt:
        pass
    finally:
        provider.shutdown()
        logging.shutdown()


def run_service(
    name: str,
    from_env: Callable[[Mapping[str, str]], S],
    build: Callable[[S, Startup], Awaitable[ServiceServer]],
) -> None:
    """A gRPC service's whole life: `build` starts its server, which then serves until SIGTERM/SIGINT and stops
    gracefully; whatever `build` opened through the `Startup` is closed after it, last opened first."""

    async def serve(settings: S) -> None:
        startup = Startup(name, settings.common)
        try:
            server = await build(settings, startup)
            await server.serve_forever()
        finally:
            await startup.close()

    run_main(name, from_env, serve)


class Startup:
    """What every composition root starts from: the mesh config, a metrics registry, the clock and etcd's key
    layout, with etcd, channels to peers and background tasks opened here and closed when the service stops."""

    def __init__(self, name: str, common: CommonSettings) -> None:
        self.name = name
        self.common = common
        self.config: MeshConfig = load_config(common.config_path)
        self.registry = CollectorRegistry()
        for shared in (WATCH_MESSAGES, WATCH_EVENTS, TERMS, LOSSES):  # the process's informers and elections
            self.registry.register(shared)
        self.clock = SystemClock()
        self.keys = Keys(common.etcd.prefix)
        self._etcd: Etcd | None = None
        self._closers: list[Callable[[], Awaitable[None]]] = []

    async def etcd(self) -> Etcd:
        """The service's etcd client (one per process), ready to use."""
        if self._etcd is None:
            self._etcd = Etcd.from_settings(self.common.etcd)
            self._closers.append(self._etcd.close)
            await self._etcd.wait_ready()
        return self._etcd

    def channel(self, targets: str | tuple[str, ...], *, health_service: str = "") -> grpc.aio.Channel:
        """An mTLS channel to a peer as this service; with `health_service`, calls go to the replica serving it."""
        opened = channel(targets, self.common.tls, health_service=health_service)
        self._closers.append(opened.close)
        return opened

    def election(self, etcd: Etcd, service: str, leader: LeaderSettings) -> LeaderElection:
        """This replica's candidacy for leading `service` (started by the caller once it can serve)."""
        return LeaderElection(etcd, self.keys.leader(service), self.common.server.replica_id, ttl=leader.ttl_seconds)

    def task(self, work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
        """A background task of the service, cancelled when it stops (before what it was opened after is closed)."""
        started = asyncio.create_task(work, name=name)

        async def cancel() -> None:
            started.cancel()

        self._closers.append(cancel)
        return started

    async def serve(self, registrars: Iterable[tuple[Registrar, str]], **options: Any) -> ServiceServer:
        """Starts the service's gRPC server (libs/server.py: mTLS, health, reflection, interceptors, /metrics)."""
        return await start_server(self.name, self.common, self.registry, registrars, **options)

    async def close(self) -> None:
        while self._closers:
            await self._closers.pop()()
