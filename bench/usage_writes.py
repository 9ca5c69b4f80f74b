"""Usage-sample write benchmark: how many etcd writes running jobs' usage samples cost per job, next to the job
record writes every job costs anyway.

Starts a private stack on tests/fixtures/mesh.toml (three static workers, one job each at a time) with the usage
interval --interval seconds (JOBMESH_USAGE_SAMPLE_SECONDS; 15 as in `make run`), submits --jobs `sleep --seconds`
jobs of tenant acme, waits until they all ended (bounded by --timeout-seconds), and counts the watch events under
`{prefix}/usage/` (a put per write; deletes are workers' leases ending) and under `{prefix}/jobs/` over the run.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import threading
import time
from pathlib import Path

from devtools.launcher import Stack
from libs.keys import Keys
from tests.helpers import FAST_FAILOVER, TERMINAL, Api, job_spec, start_stack, token

KEYS = Keys("/jobmesh")


def count_events(stack: Stack, prefix: str, counts: dict[str, int], stop: threading.Event) -> None:
    """Counts watch events under `prefix` by kind until `stop` is set."""

    async def watch() -> None:
        etcd = stack.etcd_client()

        async def follow(revision: int) -> None:
            async for batch in etcd.watch(prefix, revision + 1):
                for event in batch:
                    counts[event.kind] = counts.get(event.kind, 0) + 1

        try:
            _, revision, _ = await etcd.get_prefix(prefix, keys_only=True, limit=1)
            follower = asyncio.create_task(follow(revision))
            while not stop.is_set() and not follower.done():
                await asyncio.sleep(0.2)
            follower.cancel()
        finally:
            await etcd.close()

    asyncio.run(watch())


def run(args: argparse.Namespace) -> dict[str, object]:
    with tempfile.TemporaryDirectory() as tmp:
        env = dict(FAST_FAILOVER, JOBMESH_USAGE_SAMPLE_SECONDS=str(args.interval))
        stack = start_stack(Path(tmp) / "stack", env=env)
        try:
            api = Api(stack.url, token(stack))
            stop = threading.Event()
            usage: dict[str, int] = {}
            jobs: dict[str, int] = {}
            watchers = [
                threading.Thread(target=count_events, args=(stack, prefix, counts, stop), daemon=True)
                for prefix, counts in ((KEYS.usage, usage), (KEYS.jobs, jobs))
            ]
            for watcher in watchers:
                watcher.start()
            time.sleep(1.0)  # the watches are open
            started = time.monotonic()
            ids = [api.submit(job_spec(f"sleep-{n}", ["sleep", str(args.seconds)]))["job_id"] for n in range(args.jobs)]
            end = started + args.timeout_seconds
            for job_id in ids:
                api.wait_state(job_id, TERMINAL, timeout=max(end - time.monotonic(), 1.0))
            elapsed = time.monotonic() - started
            time.sleep(args.interval + 3.0)  # the idle workers' deletes
            stop.set()
            for watcher in watchers:
                watcher.join(5.0)
        finally:
            stack.stop()
    return {
        "jobs": args.jobs,
        "job_seconds": args.seconds,
        "interval_s": args.interval,
        "run_s": round(elapsed, 1),
        # Puts are the pool-manager's writes; deletes come with workers' leases (a retired dynamic worker).
        "usage_puts_per_job": round(usage.get("put", 0) / args.jobs, 2),
        "usage_deletes": usage.get("delete", 0),
        "job_record_writes_per_job": round(sum(jobs.values()) / args.jobs, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=9)
    parser.add_argument("--seconds", type=float, default=30.0)
    parser.add_argument("--interval", type=float, default=15.0)
    parser.add_argument("--timeout-seconds", type=float, default=300.0)
    print(json.dumps(run(parser.parse_args())))


if __name__ == "__main__":
    main()
