"""Sandbox start benchmark: the CPU of starting short jobs in the job sandbox, without the rest of the worker.

Runs --jobs `true` jobs (100 millicores, 64 MB) one after another through the real JobExecutor of one slot, in
the real sandbox (--network none|host) or unsandboxed (--sandbox none), and prints per job: this process's own
CPU (the agent's part: cgroup set-up, spawning, reaping, reading usage), the CPU of the processes it reaped, the
CPU of everything (this process, every process of every job, the kernel's work for them: it runs in a cpuacct
group of its own, cgroup v1, as root), and the wall time. The reaped processes' CPU misses what runs in a job's
pid namespace (a job's init is the slot's spawner's child, not this process's); the cpuacct group does not. The
slot's spawner (--spawner compiled|python) is started by the warm-up jobs, before the measure, as it is once per
slot.

No gRPC, no stand-in: less to disturb the figures than bench/worker_agent.py, so several short runs, alternated
with another checkout's (`cd <checkout> && PYTHONPATH=$PWD:$PWD/gen <this venv>/bin/python <this script>`),
compare two versions of the sandbox on a busy machine. Bounded by --jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import tempfile
import time

from bench.cpuacct import CpuacctGroup
from services.worker.executor import ExecSpec, JobExecutor
from services.worker.sandbox import Sandbox, SandboxSettings


def spec(n: int) -> ExecSpec:
    return ExecSpec(f"start-{n}", 1, ["true"], {}, None, 20.0, cpu_millis=100, memory_mb=64)


async def measure(executor: JobExecutor, jobs: int, group: CpuacctGroup) -> dict[str, float]:
    for n in range(5):  # the slot's cgroup, network namespace and spare scratch dir exist from here on
        await executor.run(spec(-1 - n))
    own0, kids0 = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    tree0, wall0 = group.seconds(), time.perf_counter()
    failed = 0
    for n in range(jobs):
        result = await executor.run(spec(n))
        failed += result.exit_code != 0
    own1, kids1 = time.process_time(), resource.getrusage(resource.RUSAGE_CHILDREN)
    tree1, wall1 = group.seconds(), time.perf_counter()
    reaped = kids1.ru_utime + kids1.ru_stime - kids0.ru_utime - kids0.ru_stime
    return {
        "failed": failed,
        "agent_cpu_ms_per_job": round((own1 - own0) * 1000 / jobs, 3),
        "reaped_processes_cpu_ms_per_job": round(reaped * 1000 / jobs, 3),
        "everything_cpu_ms_per_job": round((tree1 - tree0) * 1000 / jobs, 3),
        "wall_ms_per_job": round((wall1 - wall0) * 1000 / jobs, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=200)
    parser.add_argument("--sandbox", choices=["bwrap", "none"], default="bwrap")
    parser.add_argument("--network", choices=["none", "host"], default="none")
    parser.add_argument(
        "--spawner",
        choices=["compiled", "python"],
        default="compiled",
        help="the slot's spawner: services/worker/spawner.c (build/jobmesh-spawner, `make sandbox-tools`) or the "
        "Python program of spawner.py",
    )
    args = parser.parse_args()
    group = CpuacctGroup.make("jobmesh-sandbox-start")
    if group is None:
        raise SystemExit("needs root and cgroup v1's cpuacct controller mounted at /sys/fs/cgroup/cpuacct")
    group.join()  # everything this process starts, job groups included, counts in it
    sandbox = None
    try:
        if args.sandbox == "bwrap":
            sandbox = Sandbox.for_this_machine(SandboxSettings(network=args.network))
            sandbox.compiled = args.spawner == "compiled"
        with tempfile.TemporaryDirectory(prefix="jobmesh-sandbox-start-") as scratch:
            executor = JobExecutor(scratch, sandbox=sandbox)
            try:
                figures = asyncio.run(measure(executor, args.jobs, group))
            finally:
                executor.close()
    finally:
        if sandbox is not None:
            sandbox.close()
        group.leave()
        group.remove()
    load = os.getloadavg()[0]
    print(
        json.dumps(
            {
                "jobs": args.jobs,
                "sandbox": args.sandbox,
                "spawner": args.spawner if sandbox is not None else None,
                "network": args.network,
                "load": round(load, 2),
                **figures,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
