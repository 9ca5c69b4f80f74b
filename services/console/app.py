"""Composition root of the console service: settings from the environment, the assets, the server, SIGTERM."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from libs.settings import SettingsError, TlsSettings
from services.console.assets import ConsoleAssets
from services.console.server import ConsoleServer
from services.console.tls import ServerTls

REPO = Path(__file__).resolve().parent.parent.parent
log = logging.getLogger("jobmesh.console")


@dataclass(frozen=True)
class ConsoleSettings:
    tls: TlsSettings
    port: int = 50057
    host: str = "127.0.0.1"
    assets_dir: Path = REPO / "console" / "dist"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ConsoleSettings:
        try:
            port = int(env.get("JOBMESH_PORT") or 50057)
        except ValueError as exc:
            raise SettingsError("JOBMESH_PORT must be an integer") from exc
        host = env.get("JOBMESH_CONSOLE_HOST") or "127.0.0.1"
        if host not in ("127.0.0.1", "::1", "localhost"):
            # Only Envoy, on this host, may reach it: the public port is Envoy's.
            raise SettingsError("JOBMESH_CONSOLE_HOST must be a loopback address")
        return cls(
            tls=TlsSettings.required(env, "console"),
            port=port,
            host=host,
            assets_dir=Path(env.get("JOBMESH_CONSOLE_DIR") or cls.assets_dir),
        )


def run(settings: ConsoleSettings) -> None:
    assets = ConsoleAssets(settings.assets_dir)
    server = ConsoleServer((settings.host, settings.port), assets, ServerTls(settings.tls))

    def on_term(signum: int, _frame: object) -> None:
        # shutdown() waits for serve_forever to return, so it must run off the thread that serves.
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    log.info(
        "console serving %s on https://%s:%d%s (mTLS)",
        settings.assets_dir,
        settings.host,
        settings.port,
        "" if assets.built() else " (not built yet: run `make console`)",
    )
    try:
        server.serve_forever(poll_interval=0.5)
    finally:
        server.server_close()


def main() -> None:
    logging.basicConfig(level=os.environ.get("JOBMESH_LOG_LEVEL", "INFO"), format="%(asctime)s %(name)s %(message)s")
    run(ConsoleSettings.from_env(os.environ))
