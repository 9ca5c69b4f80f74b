"""Composition root of the console service: the assets, the server, SIGTERM."""

from __future__ import annotations

import logging
import signal
import threading

from libs.settings import load_settings
from services.console.assets import ConsoleAssets
from services.console.server import ConsoleServer
from services.console.settings import Settings
from services.console.tls import ServerTls

log = logging.getLogger("jobmesh.console")


def run(settings: Settings) -> None:
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
    settings = load_settings("console", Settings.from_env)
    logging.basicConfig(level=settings.log_level, format="%(asctime)s %(name)s %(message)s")
    run(settings)
