"""Spawner start benchmark: bench/sandbox_start.py's measure (the same jobs, the same cpuacct group counting the CPU
of everything, the same JSON fields), with each job started through its slot's spawner (services/worker/spawner.py,
driven by the prototype SpawnerExecutor) instead of a bwrap -> setpriv -> sh chain per job. The spawner itself is
started by the warm-up jobs, before the measure, as it would be once per slot. Bounded by --jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import tempfile

from bench.sandbox_start import join_own_cpuacct_group, leave, measure
from services.worker import spawner_executor
from services.worker.sandbox import Sandbox, SandboxSettings
from services.worker.spawner import spawner_class
from services.worker.spawner_executor import SpawnerExecutor


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--network", choices=["none", "host"], default="none")
    parser.add_argument(
        "--spawner",
        choices=["compiled", "python"],
        default="compiled",
        help="services/worker/spawner.c (build/jobmesh-spawner, `make sandbox-tools`) or spawner.py's Python program",
    )
    args = parser.parse_args()
    spawner_executor.Spawner = spawner_class(args.spawner == "compiled")  # type: ignore[misc]
    group = join_own_cpuacct_group()
    try:
        sandbox = Sandbox.for_this_machine(SandboxSettings(network=args.network))
        try:
            with tempfile.TemporaryDirectory(prefix="jobmesh-spawner-start-") as scratch:
                executor = SpawnerExecutor(scratch, sandbox)
                try:
                    figures = asyncio.run(measure(executor, args.jobs, group))
                finally:
                    executor.close()
        finally:
            sandbox.close()
    finally:
        leave(group)
    load = os.getloadavg()[0]
    print(
        json.dumps(
            {
                "jobs": args.jobs,
                "sandbox": f"spawner-{args.spawner}",
                "network": args.network,
                "load": round(load, 2),
                **figures,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
