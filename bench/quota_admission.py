"""Admission decisions per second through the quota service's gRPC API, with N concurrent callers.

Starts a private etcd and quota service on free ports, then has `--callers` concurrent grpc.aio callers
issue Reserve (and Release, so usage stays bounded) for `--seconds` or `--count` decisions, whichever
comes first, and prints decisions/s and latency percentiles of the Reserve calls.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import grpc

from devtools.launcher import Ports, Stack
from jobmesh.common.v1 import types_pb2 as t
from jobmesh.quota.v1 import quota_pb2 as q
from jobmesh.quota.v1 import quota_pb2_grpc
from libs.settings import TlsSettings
from libs.tls import RenewingChannel
from tests.helpers import FIXTURE_CONFIG


def percentile(sorted_values: list[float], pct: float) -> float:
    if not sorted_values:
        return 0.0
    index = min(len(sorted_values) - 1, round(pct / 100 * (len(sorted_values) - 1)))
    return sorted_values[index]


async def run(
    target: str, tls: TlsSettings, callers: int, count: int, seconds: float, tenants: list[str]
) -> dict[str, object]:
    latencies: list[float] = []
    outcomes = {"admitted": 0, "rejected": 0, "error": 0}
    issued = 0
    deadline = time.perf_counter() + seconds
    async with RenewingChannel(target, tls) as channel:  # mTLS, as the gateway
        stub = quota_pb2_grpc.QuotaServiceStub(channel)
        resources = t.Resources(cpu_millis=100, memory_mb=64)

        async def caller(i: int) -> None:
            nonlocal issued
            tenant = tenants[i % len(tenants)]
            while issued < count and time.perf_counter() < deadline:
                issued += 1
                job_id = uuid.uuid4().hex
                start = time.perf_counter()
                try:
                    await stub.Reserve(
                        q.ReserveRequest(tenant_id=tenant, job_id=job_id, resources=resources), timeout=5
                    )
                    outcomes["admitted"] += 1
                    latencies.append(time.perf_counter() - start)
                    await stub.Release(q.ReleaseRequest(tenant_id=tenant, job_id=job_id), timeout=5)
                except grpc.aio.AioRpcError as exc:
                    latencies.append(time.perf_counter() - start)
                    outcomes["rejected" if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED else "error"] += 1

        async def progress() -> None:
            while True:
                await asyncio.sleep(1)
                print(f"  {issued} decisions so far", file=sys.stderr, flush=True)

        reporter = asyncio.create_task(progress())
        began = time.perf_counter()
        await asyncio.gather(*(caller(i) for i in range(callers)))
        elapsed = time.perf_counter() - began
        reporter.cancel()
    lat = sorted(latencies)
    return {
        "decisions": len(lat),
        "seconds": round(elapsed, 2),
        "decisions_per_s": round(len(lat) / elapsed, 1),
        "reserve_p50_ms": round(percentile(lat, 50) * 1000, 3),
        "reserve_p99_ms": round(percentile(lat, 99) * 1000, 3),
        "reserve_mean_ms": round(statistics.fmean(lat) * 1000, 3) if lat else 0.0,
        **outcomes,
        "note": "each decision is one Reserve RPC; a Release RPC follows every admission (not timed)",
    }


def server_p99_ms(metrics_port: int) -> float:
    """p99 of the quota decision itself, from the service's own histogram (upper bucket bound)."""
    import urllib.request

    from prometheus_client.parser import text_string_to_metric_families

    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    buckets = []
    for family in text_string_to_metric_families(text):
        if family.name == "jobmesh_quota_check_seconds":
            buckets = [(float(s.labels["le"]), s.value) for s in family.samples if s.name.endswith("_bucket")]
    if not buckets:
        return 0.0
    total = buckets[-1][1]
    for bound, count in sorted(buckets):
        if count >= 0.99 * total:
            return round(bound * 1000, 3)
    return float("inf")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--callers", type=int, default=50)
    parser.add_argument("--count", type=int, default=30000, help="stop after this many decisions")
    parser.add_argument("--seconds", type=float, default=10.0, help="stop after this long")
    parser.add_argument("--tenants", default="acme,globex,initech")
    args = parser.parse_args()
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    with tempfile.TemporaryDirectory() as tmp:
        stack = Stack(data_dir=Path(tmp), config_path=FIXTURE_CONFIG, ports=Ports.free())
        try:
            stack.start_etcd()
            stack.wait_etcd(30)
            stack.start_named("quota-1")
            stack.wait_healthy("quota-1", 30)
            stack.wait_leader("quota", 30)
            target = f"127.0.0.1:{stack.ports.quota[0]}"
            tls = stack.identity("gateway")
            tenants = args.tenants.split(",")
            print("quota service up; unloaded latency (1 caller) ...", file=sys.stderr, flush=True)
            single = asyncio.run(run(target, tls, 1, 2000, args.seconds, tenants))
            print(f"throughput ({args.callers} callers) ...", file=sys.stderr, flush=True)
            result = asyncio.run(run(target, tls, args.callers, args.count, args.seconds, tenants))
            result["unloaded_reserve_p50_ms"] = single["reserve_p50_ms"]
            result["unloaded_reserve_p99_ms"] = single["reserve_p99_ms"]
            result["server_check_p99_ms"] = server_p99_ms(stack.procs["quota-1"].metrics_port)
        finally:
            stack.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
