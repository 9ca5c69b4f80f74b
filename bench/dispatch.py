"""Dispatch benchmark: submit-to-RUNNING latency on a static-pool hit, end-to-end throughput, leader failover.

Starts a private stack with eight static workers of two slots each (bench/configs/dispatch.toml; --worker-slots
changes the slots) and runs three phases:
  1. latency: --latency-count jobs running `true`, submitted open-loop at --rate jobs/s; submit-to-RUNNING
     is the job record's start_time minus its create_time (both stamped by the mesh);
  2. throughput: --throughput-count jobs submitted as fast as --concurrency allows (native gRPC through Envoy
     by default, --throughput-via rest for JSON); completed jobs/s is the count over the span from the first
     create_time to the last end_time; also the CPU each process spent per job;
  3. failover: jobs at --failover-rate jobs/s while the scheduler leader is SIGKILLed; the takeover time is
     the longest gap between consecutive dispatches (start_time) around the kill.
Every loop is bounded by its count and by --timeout-seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import sys
import tempfile
import time
from collections.abc import Coroutine
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

from bench.submit_latency import stack_cpu
from devtools.launcher import REPO, Stack
from tests.helpers import job_spec, start_stack, token, wait_for
from tests.integration.test_faults import scheduler_leader

CONFIG = REPO / "bench" / "configs" / "dispatch.toml"
TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}
TENANT = "acme"


def stamp(value: str) -> float:
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1)))] if ordered else 0.0


async def submit_paced(
    client: httpx.AsyncClient, count: int, rate: float | None, concurrency: int, deadline: float, label: str
) -> list[str]:
    sem = asyncio.Semaphore(concurrency)
    ids: list[str] = []
    start = time.perf_counter()

    async def one(i: int) -> None:
        if rate:
            await asyncio.sleep(max(0.0, start + i / rate - time.perf_counter()))
        if time.perf_counter() > deadline:
            return
        async with sem:
            resp = await client.post("/api/v1/jobs", json=job_spec(f"{label}-{i}", ["true"]))
            if resp.status_code == 200:
                ids.append(resp.json()["job_id"])

    await with_progress([one(i) for i in range(count)], ids, label)
    return ids


async def with_progress(calls: list[Coroutine[Any, Any, None]], ids: list[str], label: str) -> None:
    """Runs the submit calls, saying once a second how many were accepted."""

    async def progress() -> None:
        while True:
            await asyncio.sleep(1)
            print(f"  {label}: {len(ids)}/{len(calls)} submitted", file=sys.stderr, flush=True)

    reporter = asyncio.create_task(progress())
    try:
        await asyncio.gather(*calls)
    finally:
        reporter.cancel()


async def submit_grpc(stack: Stack, count: int, concurrency: int, deadline: float, label: str) -> list[str]:
    """As fast as `concurrency` allows, through Envoy's native gRPC route (JobService/SubmitJob): the same
    public API as REST without the JSON client's own CPU, which on two cores would be a large part of what
    is measured."""
    import grpc

    from jobmesh.common.v1 import types_pb2
    from jobmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    metadata = (("authorization", f"Bearer {token(stack, TENANT)}"),)
    target = stack.url.split("://", 1)[1]
    ids: list[str] = []
    sem = asyncio.Semaphore(concurrency)
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.JobServiceStub(channel)

        async def one(i: int) -> None:
            if time.perf_counter() > deadline:
                return
            spec = types_pb2.JobSpec(
                name=f"{label}-{i}", command=["true"], resources=types_pb2.Resources(cpu_millis=100, memory_mb=64)
            )
            async with sem:
                job = await stub.SubmitJob(gateway_pb2.SubmitJobRequest(spec=spec), metadata=metadata, timeout=60)
                ids.append(job.job_id)

        await with_progress([one(i) for i in range(count)], ids, label)
    return ids


async def wait_all(client: httpx.AsyncClient, ids: list[str], deadline: float) -> list[dict[str, object]]:
    """Waits until the tenant holds no pending or running job (its quota usage, which the quota service
    derives from the job records: one cheap call every 0.2 s, where listing jobs would load the mesh we
    measure), then reads every job of the run in pages."""
    wanted = set(ids)
    last_report = 0.0
    while time.perf_counter() < deadline:
        usage = (await client.get(f"/api/v1/tenants/{TENANT}/quotas")).json().get("usage", {})
        busy = int(usage.get("concurrent_jobs", 0))
        if time.perf_counter() - last_report >= 1.0:
            last_report = time.perf_counter()
            print(f"  {busy} pending or running", file=sys.stderr, flush=True)
        if busy == 0:
            break
        await asyncio.sleep(0.2)
    jobs: list[dict[str, object]] = []
    token = ""
    while True:
        params: dict[str, str | int] = {"page_size": 500}
        if token:
            params["page_token"] = token
        body = (await client.get("/api/v1/jobs", params=params)).json()
        jobs += [j for j in body.get("jobs", []) if j["job_id"] in wanted and j["state"] in TERMINAL]
        token = body.get("next_page_token", "")
        if not token:
            return jobs


def started_latencies(jobs: list[dict[str, object]]) -> list[float]:
    return [stamp(str(j["start_time"])) - stamp(str(j["create_time"])) for j in jobs if j.get("start_time")]


async def run(args: argparse.Namespace, stack: Stack) -> dict[str, object]:
    admin = {"Authorization": f"Bearer {token(stack, 'initech', admin=True)}"}
    async with httpx.AsyncClient(base_url=stack.url, headers=admin, timeout=30) as client:
        await client.put(
            "/api/v1/tenants/acme/quotas",
            json={"limits": {"concurrent_jobs": 100000, "cpu_millis": 10**8, "memory_mb": 10**8}},
        )
    headers = {"Authorization": f"Bearer {token(stack, 'acme')}"}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    result: dict[str, object] = {}
    async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=60, limits=limits) as client:
        deadline = time.perf_counter() + args.timeout_seconds
        ids = await submit_paced(client, args.latency_count, args.rate, args.concurrency, deadline, "latency")
        jobs = await wait_all(client, ids, deadline)
        lat = started_latencies(jobs)
        result["latency"] = {
            "jobs": len(jobs),
            "rate": args.rate,
            "submit_to_running_p50_ms": round(pct(lat, 50) * 1000, 1),
            "submit_to_running_p99_ms": round(pct(lat, 99) * 1000, 1),
            "submit_to_running_max_ms": round(max(lat) * 1000, 1) if lat else 0.0,
        }
        deadline = time.perf_counter() + args.timeout_seconds
        # Each stack process leads its own process group; a pool-manager's group holds its workers.
        groups = {proc.pid: name for name, proc in stack.procs.items() if proc.popen is not None}
        cpu_before = stack_cpu(groups)
        if args.throughput_via == "grpc":
            ids = await submit_grpc(stack, args.throughput_count, args.concurrency, deadline, "throughput")
        else:
            ids = await submit_paced(client, args.throughput_count, None, args.concurrency, deadline, "throughput")
        jobs = await wait_all(client, ids, deadline)
        cpu_after = stack_cpu(groups)
        first = min(stamp(str(j["create_time"])) for j in jobs)
        last = max(stamp(str(j["end_time"])) for j in jobs if j.get("end_time"))
        ok = sum(1 for j in jobs if j["state"] == "JOB_STATE_SUCCEEDED")
        per_job = {n: round((cpu_after[n] - cpu_before[n]) * 1000 / max(len(jobs), 1), 2) for n in cpu_before}
        result["throughput"] = {
            "via": args.throughput_via,
            "jobs": len(jobs),
            "succeeded": ok,
            "span_s": round(last - first, 2),
            "completed_per_s": round(len(jobs) / (last - first), 1),
            "cpu_ms_per_job": dict(sorted(per_job.items(), key=lambda kv: -kv[1])),
            "cpu_ms_per_job_total": round(sum(per_job.values()), 2),
        }
        leader = wait_for(lambda: scheduler_leader(stack), what="a scheduler leader")
        deadline = time.perf_counter() + args.timeout_seconds
        task = asyncio.ensure_future(
            submit_paced(client, args.failover_count, args.failover_rate, args.concurrency, deadline, "failover")
        )
        await asyncio.sleep(args.failover_count / args.failover_rate / 3)
        killed_at = time.time()
        stack.kill(leader)
        ids = await task
        jobs = await wait_all(client, ids, deadline)
        starts = sorted(stamp(str(j["start_time"])) for j in jobs if j.get("start_time"))
        after = [s for s in starts if s >= killed_at]
        result["failover"] = {
            "killed": leader,
            "jobs": len(jobs),
            "succeeded": sum(1 for j in jobs if j["state"] == "JOB_STATE_SUCCEEDED"),
            "max_attempt": max((int(str(j["attempt"])) for j in jobs), default=0),
            "first_dispatch_after_kill_s": round(after[0] - killed_at, 2) if after else None,
            "leader_ttl_s": int(stack.env.get("JOBMESH_LEADER_TTL", "2")),
        }
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=float, default=50.0)
    parser.add_argument("--latency-count", type=int, default=500)
    parser.add_argument("--throughput-count", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument(
        "--throughput-via",
        choices=("grpc", "rest"),
        default="grpc",
        help="how the throughput phase submits (both go through Envoy to the same JobService)",
    )
    parser.add_argument("--failover-count", type=int, default=300)
    parser.add_argument("--failover-rate", type=float, default=30.0)
    parser.add_argument("--leader-ttl", type=int, default=2)  # the default lease (libs/settings.py LeaderSettings)
    parser.add_argument("--timeout-seconds", type=float, default=180.0)
    parser.add_argument(
        "--worker-slots", type=int, default=None, help="jobs each static worker runs at once (default: the config's)"
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        env = {"JOBMESH_LEADER_TTL": str(args.leader_ttl), "JOBMESH_WORKER_LEASE_TTL": "6"}
        config = CONFIG
        if args.worker_slots is not None:
            config = Path(tmp) / "dispatch.toml"
            text, n = re.subn(r"(?m)^worker_slots = \d+$", f"worker_slots = {args.worker_slots}", CONFIG.read_text())
            if n != 1:
                raise SystemExit(f"{CONFIG}: expected one worker_slots line")
            config.write_text(text)
        stack = start_stack(Path(tmp) / "stack", env=env, config=config)
        try:
            wait_for(
                lambda: (
                    httpx.get(f"{stack.url}/api/v1/pools", headers={"Authorization": f"Bearer {token(stack)}"}).json()[
                        "pools"
                    ][0]["idle_workers"]
                    >= 8
                ),
                timeout=60,
                what="eight idle workers",
            )
            result = asyncio.run(run(args, stack))
        finally:
            stack.stop()
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
