"""The shared entry point: read settings, set up telemetry, run the service's composition root on uvloop."""

from __future__ import annotations

import asyncio
import gc
import logging
import sys
from collections.abc import Callable, Coroutine
from typing import Any

from libs.settings import CommonSettings, SettingsError
from libs.telemetry import setup_telemetry


def run_service(
    name: str, default_port: int, root: Callable[[CommonSettings], Coroutine[Any, Any, None]], *, uvloop: bool = True
) -> None:
    try:
        settings = CommonSettings.from_env(name, default_port)
    except SettingsError as exc:
        print(f"{name}: bad settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    provider = setup_telemetry(settings.telemetry)
    # Services keep large, long-lived caches (job records, queues); the default collector thresholds rescan
    # them over and over under load. Collect the young generation less often, and leave what was loaded at
    # start-up out of the scans.
    gc.freeze()
    gc.set_threshold(50_000, 20, 20)
    try:
        if not uvloop:
            raise ImportError("plain asyncio asked for")
        import uvloop as fast_loop

        fast_loop.run(root(settings))
    except ImportError:
        asyncio.run(root(settings))
    except KeyboardInterrupt:
        pass
    finally:
        provider.shutdown()
        logging.shutdown()
