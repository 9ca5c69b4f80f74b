#!/usr/bin/env python3
"""Queue operations: the pure fair queue's speed and memory, and durable enqueues through the queueing service.

engine   With --jobs queued across --tenants tenants (weights 1, 2, 3), time --pairs enqueue+dispatch pairs
         (push one job, pop the head), best of --repeat runs; then the memory the queue holds per queued job
         (tracemalloc; the job id strings are made beforehand: they belong to the job record); then the cost of
         the reads the service does per call: peek(64) (NextJobs) and position() (GetJob).
service  Start a private etcd and the queueing service on free ports, have --callers concurrent grpc.aio
         callers send Enqueue for --seconds, and print enqueues/s and latency percentiles; every answer is
         durable (written to etcd before it is sent). --max-batch 1 turns the write batching off to compare.

Examples:
    .venv/bin/python bench/queue_ops.py engine
    .venv/bin/python bench/queue_ops.py service --callers 64 --seconds 10
    .venv/bin/python bench/queue_ops.py service --max-batch 1
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import tempfile
import time
import tracemalloc
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # normally on the venv's path already (jobmesh-dev.pth)
    sys.path.insert(0, str(REPO))

from services.queueing.fairqueue import QueueItem, WeightedFairQueue  # noqa: E402

if TYPE_CHECKING:
    from libs.settings import TlsSettings


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    return sorted_values[min(len(sorted_values) - 1, round(pct / 100 * (len(sorted_values) - 1)))]


# The pure engine --------------------------------------------------------------------------------------------------


def filled(jobs: int, tenants: int, sla: bool, ids: list[str]) -> WeightedFairQueue:
    queue = WeightedFairQueue({f"t{i}": float(1 + i % 3) for i in range(tenants)})
    for n in range(jobs):
        boost = 1e9 + n if sla else float("inf")
        queue.push(QueueItem(ids[n], f"t{n % tenants}", "default", 0.1, 0, n + 1, boost, boost + 10))
    return queue


def engine(args: argparse.Namespace) -> dict[str, object]:
    rng = random.Random(1)
    ids = [f"{n:012x}{rng.getrandbits(40):010x}" for n in range(args.jobs + args.pairs)]
    tenant_of = [f"t{rng.randrange(args.tenants)}" for _ in range(args.pairs)]

    rates = []
    for _ in range(args.repeat):
        queue = filled(args.jobs, args.tenants, args.sla, ids)
        push, pop = queue.push, queue.pop
        base = args.jobs
        gc.disable()
        started = time.perf_counter()
        for n in range(args.pairs):
            boost = 1e9 + n if args.sla else float("inf")
            push(QueueItem(ids[base + n], tenant_of[n], "default", 0.1, 0, base + n + 1, boost, boost + 10))
            pop()
        elapsed = time.perf_counter() - started
        gc.enable()
        assert len(queue) == args.jobs
        rates.append(args.pairs / elapsed)

    queue = filled(args.jobs, args.tenants, args.sla, ids)
    gc.collect()
    gc.disable()  # as for the pairs: the reads' own cost, not a collector pass over 100k objects
    peek_started = time.perf_counter()
    for _ in range(100):
        queue.peek(64)
    peek_us = (time.perf_counter() - peek_started) / 100 * 1e6
    sample = rng.sample(ids[: args.jobs], 200)
    position_started = time.perf_counter()
    for job_id in sample:
        queue.position(job_id)
    position_us = (time.perf_counter() - position_started) / len(sample) * 1e6
    gc.enable()
    del queue

    # Last: objects built under tracemalloc are slower to read afterwards, so nothing timed uses them.
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    measured = filled(args.jobs, args.tenants, args.sla, ids)
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert len(measured) == args.jobs

    return {
        "mode": "engine",
        "jobs": args.jobs,
        "tenants": args.tenants,
        "sla_fields": args.sla,
        "pairs": args.pairs,
        "pairs_per_second_best": round(max(rates)),
        "pairs_per_second_all": [round(r) for r in rates],
        "bytes_per_queued_job": round(held / args.jobs),
        "peek_64_us": round(peek_us, 1),
        "position_us": round(position_us, 1),
    }


# The service through gRPC and etcd -----------------------------------------------------------------------------------


async def enqueue_load(target: str, tls: TlsSettings, callers: int, seconds: float, fence: int) -> dict[str, object]:
    """Enqueues as the gateway does, each with `fence` as its quota admission (a stand-in quota term)."""
    import grpc

    from jobmesh.common.v1 import types_pb2 as t
    from jobmesh.queueing.v1 import queueing_pb2 as q
    from jobmesh.queueing.v1 import queueing_pb2_grpc
    from libs.jobs import new_job_id, ts
    from libs.tls import RenewingChannel

    latencies: list[float] = []
    errors = 0
    tenants = ("acme", "globex", "initech")
    async with RenewingChannel(target, tls) as channel:  # mTLS, as the gateway
        stub = queueing_pb2_grpc.QueueingServiceStub(channel)
        end = time.perf_counter() + seconds

        async def caller(n: int) -> None:
            nonlocal errors
            while time.perf_counter() < end:
                now = time.time()
                job = t.Job(
                    job_id=new_job_id(now),
                    tenant_id=tenants[n % 3],
                    state=t.JOB_STATE_PENDING,
                    create_time=ts(now),
                    update_time=ts(now),
                    queue="default",
                    spec=t.JobSpec(name="bench", command=["true"], resources=t.Resources(cpu_millis=100, memory_mb=64)),
                )
                sent = time.perf_counter()
                try:
                    await stub.Enqueue(q.EnqueueRequest(job=job, quota_fence=fence), timeout=10)
                    latencies.append(time.perf_counter() - sent)
                except grpc.aio.AioRpcError:
                    errors += 1

        started = time.perf_counter()
        await asyncio.gather(*(caller(n) for n in range(callers)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "enqueues": len(latencies),
        "errors": errors,
        "seconds": round(elapsed, 2),
        "enqueues_per_second": round(len(latencies) / elapsed),
        "p50_ms": round(percentile(latencies, 50) * 1000, 2),
        "p99_ms": round(percentile(latencies, 99) * 1000, 2),
    }


def batch_stats(metrics_port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    values = {}
    for line in text.splitlines():
        for name in ("jobmesh_queueing_enqueue_batch_jobs_count", "jobmesh_queueing_enqueue_batch_jobs_sum"):
            if line.startswith(name + " "):
                values[name.rsplit("_", 1)[1]] = float(line.split()[1])
    return values


async def quota_term(stack: Any) -> int:
    from tests.helpers import stand_in_quota_term

    etcd = stack.etcd_client()
    try:
        return await stand_in_quota_term(etcd)
    finally:
        await etcd.close()


def service(args: argparse.Namespace) -> dict[str, object]:
    from devtools.launcher import Ports, Stack
    from tests.helpers import FIXTURE_CONFIG

    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(
            data_dir=Path(tmp),
            config_path=FIXTURE_CONFIG,
            ports=Ports.free(),
            env={"JOBMESH_QUEUEING_MAX_BATCH": str(args.max_batch), "JOBMESH_LOG_LEVEL": "WARNING"},
        )
        try:
            stack.start_etcd()
            stack.wait_etcd(30)
            stack.start_named("queueing-1")
            stack.wait_healthy("queueing-1", 30)
            fence = asyncio.run(quota_term(stack))
            stack.wait_leader("queueing", 30)
            target = f"127.0.0.1:{stack.ports.queueing[0]}"
            result = asyncio.run(enqueue_load(target, stack.identity("gateway"), args.callers, args.seconds, fence))
            batches = batch_stats(stack.procs["queueing-1"].metrics_port)
        finally:
            stack.stop()
    transactions = batches.get("count", 0.0)
    return {
        "mode": "service",
        "callers": args.callers,
        "max_batch": args.max_batch,
        **result,
        "etcd_transactions": int(transactions),
        "jobs_per_transaction": round(batches.get("sum", 0.0) / transactions, 1) if transactions else None,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    e = sub.add_parser("engine", help="the pure fair queue")
    e.add_argument("--jobs", type=int, default=100_000, help="jobs kept queued")
    e.add_argument("--tenants", type=int, default=1_000)
    e.add_argument("--pairs", type=int, default=200_000, help="enqueue+dispatch pairs timed per run")
    e.add_argument("--repeat", type=int, default=3)
    e.add_argument("--sla", action="store_true", help="give every job a finite boost time (more heap work)")
    s = sub.add_parser("service", help="durable enqueues through gRPC and etcd")
    s.add_argument("--callers", type=int, default=64)
    s.add_argument("--seconds", type=float, default=10.0)
    s.add_argument("--max-batch", type=int, default=64, help="jobs per etcd transaction (1: no batching)")
    args = parser.parse_args()
    result = engine(args) if args.mode == "engine" else service(args)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
