"""Run a worker agent: `python -m services.worker` (normally started by the pool-manager's provider)."""

from __future__ import annotations

import os

# Set before grpc loads: its fork handlers can crash a job's process forked while RPCs are in flight.
os.environ.setdefault("GRPC_ENABLE_FORK_SUPPORT", "0")

from libs.main import run_main
from services.worker.app import run
from services.worker.settings import Settings

if __name__ == "__main__":
    # uvloop, like the services: bench/worker_agent.py measured ~10% less worker CPU per short job than plain
    # asyncio. The executor uses no pipe transports (uvloop's once closed a descriptor twice here,
    # MagicStack/uvloop#763), only readers on raw descriptors.
    run_main("worker", Settings.from_env, run)
