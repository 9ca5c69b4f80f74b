#!/usr/bin/env python3
"""Backlog benchmark: submit latency, stack CPU per job and memory with 0, 10,000 and 100,000 jobs pending.

One private stack on bench/configs/overload.toml (one static worker, held by a long job, so that every other job
stays PENDING in the queue without failing), the tenant's quota lifted. The stack is filled in steps (--backlog,
default 0 10000 100000): at each step the backlog is topped up to N pending jobs with native gRPC submits through
Envoy (closed loop, --fill-concurrency in flight, bounded by --fill-timeout), the stack is left to settle, and then
  - the resident memory (RSS) of every stack process is read,
  - the stack's idle CPU is measured for --idle-seconds (periodic work that grows with the backlog shows here),
  - --count jobs are submitted at --rate per second, open loop (bench/submit_latency.py's loop: latency from each
    request's scheduled time), over gRPC (default) or REST (--rest): latency p50/p99 and the stack's CPU per
    submitted job per process.
Memory per pending job per process is (RSS at N - RSS at the first step) / (pending at N - pending at the first
step). With --failover, at the last step each replicated service that holds the job records (queueing, quota,
cost) has its standby killed and restarted (start-up time until healthy: its informers have listed every record)
and then its leader killed (time until the standby serves: the takeover); the scheduler and the pool-manager
too (their leader killed: time until the standby leads).

Progress goes to stderr; the report goes to stdout and ends with a one-line JSON summary.

Examples:
    .venv/bin/python bench/backlog.py
    .venv/bin/python bench/backlog.py --backlog 0 2000 --count 200 --failover
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
if str(REPO) not in sys.path:  # normally on the venv's path already (jobmesh-dev.pth)
    sys.path.insert(0, str(REPO))

from bench.submit_latency import (  # noqa: E402
    REQUEST_TIMEOUT,
    Run,
    grpc_sender,
    log,
    machine_busy,
    open_loop,
    rest_sender,
    stack_cpu,
    summarize_ms,
)

CONFIG = BENCH / "configs" / "overload.toml"
FILL_SPEC = {"cpu_millis": 10, "memory_mb": 16}
MAX_JOBS = 200_000  # never more than this many jobs in one run
SETTLE_MAX_SECONDS = 120.0
LEADER_KINDS = ("queueing", "quota", "cost")  # the replicated services that hold every job record
ELECTED = {
    "scheduler": ("scheduler", ("scheduler-1", "scheduler-2")),
    "poolmanager": ("pool-manager", ("poolmanager-1", "poolmanager-2")),
}


def positive_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="backlog.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--backlog", type=positive_int, nargs="+", default=[0, 10_000, 100_000], help="pending jobs")
    p.add_argument("--rate", type=float, default=50.0, help="measured submits per second (default: %(default)s)")
    p.add_argument("--count", type=int, default=500, help="measured submits per step (default: %(default)s)")
    p.add_argument("--rest", action="store_true", help="measure REST submits instead of native gRPC")
    p.add_argument("--fill-concurrency", type=int, default=48, help="gRPC fill submits in flight")
    p.add_argument("--fill-timeout", type=float, default=900.0, help="cap on each fill (s, default: %(default)s)")
    p.add_argument("--idle-seconds", type=float, default=5.0, help="idle CPU window per step (default: %(default)s)")
    p.add_argument("--failover", action="store_true", help="at the last step: replica start-up and takeover times")
    p.add_argument("--config", type=Path, default=CONFIG, help="the stack's mesh config (default: %(default)s)")
    p.add_argument("--keep-data", action="store_true", help="keep the stack's temp dir (logs)")
    return p


# Fill ----------------------------------------------------------------------------------------------


async def fill(target: str, token: str, jobs: int, concurrency: int, timeout: float) -> dict[str, Any]:
    """Submits `jobs` jobs over gRPC, closed loop with `concurrency` in flight, for at most `timeout` s."""
    import grpc

    from jobmesh.common.v1 import types_pb2
    from jobmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc

    metadata = (("authorization", f"Bearer {token}"),)
    spec = types_pb2.JobSpec(command=["true"], resources=types_pb2.Resources(**FILL_SPEC))
    counter = iter(range(jobs))
    ok = errors = shed = 0
    samples: dict[str, str] = {}
    start = time.perf_counter()
    end = start + timeout

    async with grpc.aio.insecure_channel(target) as channel:
        await asyncio.wait_for(channel.channel_ready(), 10.0)
        stub = gateway_pb2_grpc.JobServiceStub(channel)

        async def worker() -> None:
            nonlocal ok, errors, shed
            for i in counter:
                if time.perf_counter() > end or errors > 1000:
                    return
                spec.name = f"fill-{i}"
                for attempt in range(50):  # shed answers (the edge's overload limits) are retried after a pause
                    try:
                        await stub.SubmitJob(
                            gateway_pb2.SubmitJobRequest(spec=spec), metadata=metadata, timeout=REQUEST_TIMEOUT
                        )
                        ok += 1
                        break
                    except grpc.aio.AioRpcError as exc:
                        if exc.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and attempt < 49:
                            shed += 1
                            await asyncio.sleep(0.1)
                            continue
                        errors += 1
                        samples.setdefault(exc.code().name, (exc.details() or "")[:200])
                        break

        async def report() -> None:
            while True:
                await asyncio.sleep(5.0)
                spent = time.perf_counter() - start
                log(f"[fill {spent:6.1f}s] {ok}/{jobs} ok ({ok / spent:.0f}/s), {shed} shed (retried), {errors} errors")

        reporter = asyncio.create_task(report())
        try:
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        finally:
            reporter.cancel()
    seconds = time.perf_counter() - start
    return {
        "jobs": jobs,
        "ok": ok,
        "errors": errors,
        "shed_retried": shed,
        "error_samples": samples,
        "seconds": round(seconds, 1),
        "per_s": round(ok / seconds, 1) if seconds > 0 else None,
    }


# Measurements --------------------------------------------------------------------------------------


def rss_by_process(stack: Any) -> dict[str, float]:
    """Resident memory (MiB) of each stack process (its own; its workers summed under "workers")."""
    out: dict[str, float] = {}
    for name, proc in stack.procs.items():
        if not proc.alive():
            continue
        try:
            ps = psutil.Process(proc.pid)
            out[name] = ps.memory_info().rss / 1024**2
            for child in ps.children(recursive=True):
                if "services.worker" in " ".join(child.cmdline()):
                    out["workers"] = out.get("workers", 0.0) + child.memory_info().rss / 1024**2
        except psutil.Error:
            continue
    return {k: round(v, 1) for k, v in sorted(out.items())}


async def settle(groups: dict[int, str], quiet_cores: float = 0.5) -> float:
    """Waits (bounded) until the stack's CPU over one second drops below `quiet_cores` twice running (the fill's
    tail of events handled); returns the seconds waited."""
    start = time.perf_counter()
    quiet = 0
    while time.perf_counter() - start < SETTLE_MAX_SECONDS and quiet < 2:
        before = sum(stack_cpu(groups).values())
        await asyncio.sleep(1.0)
        quiet = quiet + 1 if sum(stack_cpu(groups).values()) - before < quiet_cores else 0
    return round(time.perf_counter() - start, 1)


async def idle_cpu(groups: dict[int, str], seconds: float) -> dict[str, float]:
    """The stack's CPU (cores) per process over `seconds` with no submits."""
    cpu0, t0 = stack_cpu(groups), time.perf_counter()
    await asyncio.sleep(seconds)
    cpu1, span = stack_cpu(groups), time.perf_counter() - t0
    return {k: round((cpu1.get(k, 0.0) - cpu0.get(k, 0.0)) / span, 3) for k in sorted(set(cpu0) | set(cpu1))}


async def measured(args: argparse.Namespace, stack: Any, token: str, groups: dict[int, str]) -> dict[str, Any]:
    """--count submits at --rate, open loop: latency and the stack's CPU per job per process."""
    run = Run(count=args.count, rate=args.rate, concurrency=64, deadline_s=args.count / args.rate + 60)
    send_args = argparse.Namespace(
        command=["true"], cpu_millis=FILL_SPEC["cpu_millis"], memory_mb=FILL_SPEC["memory_mb"]
    )
    cpu0, busy0, t0 = stack_cpu(groups), machine_busy(), time.perf_counter()
    client0 = time.process_time()
    if args.rest:
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=stack.url, headers=headers, timeout=REQUEST_TIMEOUT) as client:
            await open_loop(run, rest_sender(client, send_args), "rest")
    else:
        import grpc

        from jobmesh.gateway.v1 import gateway_pb2_grpc

        async with grpc.aio.insecure_channel(stack.grpc_target) as channel:
            await asyncio.wait_for(channel.channel_ready(), 10.0)
            await open_loop(run, grpc_sender(gateway_pb2_grpc.JobServiceStub(channel), token, send_args), "grpc")
    client_cpu = time.process_time() - client0
    cpu1, busy1, window = stack_cpu(groups), machine_busy(), time.perf_counter() - t0
    by_proc = {k: cpu1.get(k, 0.0) - cpu0.get(k, 0.0) for k in sorted(set(cpu0) | set(cpu1))}
    total = sum(by_proc.values())
    elapsed = (run.last_done or run.t0) - run.t0
    per_job = lambda seconds: round(seconds / run.ok * 1000, 2) if run.ok else None
    return {
        "ok": run.ok,
        "errors": run.errors,
        "errors_by_status": {k: v for k, v in run.statuses.items() if k not in ("200", "OK")},
        "achieved_rate": round(run.ok / elapsed, 1) if elapsed > 0 else None,
        "latency_ms": summarize_ms(run.latency),
        "stack_cpu_s": round(total, 2),
        "stack_cpu_ms_per_job": per_job(total),
        "stack_cpu_ms_per_job_by_process": {k: per_job(v) for k, v in by_proc.items()},
        "client_cpu_s": round(client_cpu, 2),
        "machine_busy_cores": round((busy1 - busy0) / window, 2),
    }


def failover(stack: Any, killed: list[int]) -> dict[str, Any]:
    """Start-up of a standby replica and takeover by it, for each replicated service (bounded waits). The process
    groups of the replicas it SIGKILLs go into `killed`: what they started (a pool-manager's workers) outlives them,
    and the stack's stop reaches only the groups of the processes it runs at the end."""
    out: dict[str, Any] = {}
    for kind in LEADER_KINDS:
        leader = stack.wait_leader(kind, 30)
        _, replicas = stack.LEADER_SERVED[kind]
        standby = next(n for n in replicas if n != leader)
        killed.append(stack.procs[standby].pid)
        stack.kill(standby)
        t0 = time.perf_counter()
        stack.restart(standby, timeout=300)
        startup = time.perf_counter() - t0
        killed.append(stack.procs[leader].pid)
        stack.kill(leader)
        t0 = time.perf_counter()
        now = stack.wait_leader(kind, 60)
        takeover = time.perf_counter() - t0
        t0 = time.perf_counter()
        stack.restart(leader, timeout=300)
        restart = time.perf_counter() - t0
        out[kind] = {
            "standby_startup_s": round(startup, 2),
            "takeover_s": round(takeover, 2),
            "new_leader": now,
            "old_leader_restart_s": round(restart, 2),
        }
        log(f"{kind}: {out[kind]}")
    from bench.failover import leader_key

    for kind, (role, replicas) in ELECTED.items():
        held = leader_key(stack, role)
        if held is None or held[0] not in replicas:
            out[kind] = {"error": f"no leader key for {role}: {held}"}
            continue
        leader = held[0]
        killed.append(stack.procs[leader].pid)
        stack.kill(leader)
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 60:
            now_held = leader_key(stack, role)
            if now_held is not None and now_held[0] != leader:
                break
            time.sleep(0.02)
        takeover = time.perf_counter() - t0
        t0 = time.perf_counter()
        stack.restart(leader, timeout=300)
        out[kind] = {
            "takeover_s": round(takeover, 2),
            "old_leader_restart_s": round(time.perf_counter() - t0, 2),
        }
        log(f"{kind}: {out[kind]}")
    return out


def reap_orphans(groups: list[int], data_dir: Path) -> None:
    """SIGKILLs what is left in the process groups of replicas killed during the run (a killed pool-manager's
    workers), only processes started for this stack (their environment names its data dir)."""
    mark = f"JOBMESH_DATA_DIR={data_dir}".encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if os.getpgid(int(entry)) not in groups:
                continue
            if mark not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            os.kill(int(entry), signal.SIGKILL)
        except (OSError, ValueError):
            continue


# Main ----------------------------------------------------------------------------------------------


async def steps(args: argparse.Namespace, stack: Any, token: str, groups: dict[int, str]) -> list[dict[str, Any]]:
    pending = 0
    out = []
    for target in args.backlog:
        step: dict[str, Any] = {"backlog_target": target}
        if target > pending:
            log(f"filling the backlog from {pending} to {target} jobs ...")
            step["fill"] = await fill(
                stack.grpc_target, token, target - pending, args.fill_concurrency, args.fill_timeout
            )
            pending += step["fill"]["ok"]
            step["settle_s"] = await settle(groups)
        step["pending"] = pending
        step["load_average"] = [round(x, 2) for x in os.getloadavg()]
        step["rss_mib"] = rss_by_process(stack)
        step["idle_cpu_cores"] = await idle_cpu(groups, args.idle_seconds)
        log(f"backlog {pending}: measuring {args.count} submits at {args.rate:g}/s ...")
        step.update(await measured(args, stack, token, groups))
        pending += step["ok"]
        log(
            f"backlog {step['pending']}: p50 {step['latency_ms'].get('p50')} ms, p99 {step['latency_ms'].get('p99')} "
            f"ms, {step['stack_cpu_ms_per_job']} ms CPU/job"
        )
        out.append(step)
    return out


def memory_per_job(results: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per process, bytes of RSS per pending job between the first step and each later one."""
    first = results[0]
    out: dict[str, dict[str, float]] = {}
    for step in results[1:]:
        jobs = step["pending"] - first["pending"]
        if jobs <= 0:
            continue
        out[str(step["pending"])] = {
            name: round((mib - first["rss_mib"].get(name, 0.0)) * 1024**2 / jobs)
            for name, mib in step["rss_mib"].items()
            if name in first["rss_mib"]
        }
    return out


def per_service(per_process: dict[str, float]) -> dict[str, float]:
    """The mean over a service's replicas (each replica holds the same records)."""
    groups: dict[str, list[float]] = {}
    for name, value in per_process.items():
        groups.setdefault(name.rsplit("-", 1)[0] if name[-1:].isdigit() else name, []).append(value)
    return {k: round(sum(v) / len(v)) for k, v in sorted(groups.items())}


def git_head() -> str:
    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "")


def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from bench.overload import prepare
    from devtools.launcher import Ports, Stack
    from libs.auth import issue_token
    from libs.config import load_config

    config = load_config(args.config)
    env = {"JOBMESH_LEADER_TTL": "3", "JOBMESH_WORKER_LEASE_TTL": "3"}
    stack = Stack(data_dir=workdir / "stack", config_path=args.config, ports=Ports.free(), env=env)
    log(f"starting a private stack in {stack.data_dir} ...")
    started = time.perf_counter()
    killed: list[int] = []
    try:
        stack.start()
        log(f"stack up in {time.perf_counter() - started:.1f}s")
        ttl = 4 * 3600
        token_for = lambda tenant, admin: issue_token(
            stack.data_dir, tenant=tenant, issuer=config.issuer, audience=config.audience, admin=admin, ttl=ttl
        )
        prepare(stack, token_for)
        groups = {proc.pid: name for name, proc in stack.procs.items() if proc.popen is not None}
        results = asyncio.run(steps(args, stack, token_for("acme", False), groups))
        summary: dict[str, Any] = {
            "code": git_head(),
            "mode": "rest" if args.rest else "grpc",
            "rate": args.rate,
            "count": args.count,
            "cpus": os.cpu_count(),
            "steps": results,
        }
        mem = memory_per_job(results)
        summary["memory_bytes_per_pending_job"] = mem
        if mem:
            summary["memory_bytes_per_pending_job_by_service"] = per_service(mem[max(mem, key=int)])
        if args.failover:
            log("failover at the last step ...")
            summary["failover"] = failover(stack, killed)
        summary["dead"] = [name for name, proc in stack.procs.items() if not proc.alive()]
        return summary
    finally:
        log("stopping the stack ...")
        stack.stop()
        reap_orphans(killed, stack.data_dir)


def print_report(r: dict[str, Any]) -> None:
    print(f"code {r['code']}, {r['mode']} submits at {r['rate']:g}/s x {r['count']} per step, {r['cpus']} cores")
    head = ("pending", "load avg", "p50 ms", "p99 ms", "rate/s", "CPU ms/job", "idle cores")
    print("{:>8} {:>16} {:>8} {:>8} {:>7} {:>11} {:>10}".format(*head))
    for s in r["steps"]:
        lat = s["latency_ms"]
        idle = sum(s["idle_cpu_cores"].values())
        load = "/".join(f"{x:.1f}" for x in s["load_average"])
        print(
            f"{s['pending']:>8} {load:>16} {lat.get('p50', '-'):>8} {lat.get('p99', '-'):>8} "
            f"{s['achieved_rate']:>7} {s['stack_cpu_ms_per_job']:>11} {idle:>10.3f}"
        )
    names = sorted({n for s in r["steps"] for n in s["stack_cpu_ms_per_job_by_process"]})
    print("CPU ms per job by process:")
    for name in names:
        values = "  ".join(f"{s['stack_cpu_ms_per_job_by_process'].get(name, 0):7.2f}" for s in r["steps"])
        print(f"  {name:<16} {values}")
    print("RSS MiB by process:")
    for name in sorted({n for s in r["steps"] for n in s["rss_mib"]}):
        values = "  ".join(f"{s['rss_mib'].get(name, 0):7.1f}" for s in r["steps"])
        print(f"  {name:<16} {values}")
    for n, per in r.get("memory_bytes_per_pending_job", {}).items():
        print(f"bytes per pending job at {n}: " + ", ".join(f"{k} {v}" for k, v in per.items()))
    if "memory_bytes_per_pending_job_by_service" in r:
        by = r["memory_bytes_per_pending_job_by_service"]
        print("bytes per pending job by service (mean of replicas): " + ", ".join(f"{k} {v}" for k, v in by.items()))
    for s in r["steps"]:
        if "fill" in s:
            f = s["fill"]
            print(f"fill to {s['pending']}: {f['ok']} ok, {f['errors']} errors in {f['seconds']} s ({f['per_s']}/s)")
    for kind, f in r.get("failover", {}).items():
        print(f"failover {kind}: {f}")
    if r["dead"]:
        print(f"processes that died: {r['dead']}")
    print(json.dumps(r, separators=(",", ":"), sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if sum(args.backlog) > MAX_JOBS or max(args.backlog) + args.count * len(args.backlog) > MAX_JOBS:
        log(f"at most {MAX_JOBS} jobs in one run")
        return 2
    args.backlog = sorted(args.backlog)
    workdir = Path(tempfile.mkdtemp(prefix="jobmesh-backlog-"))
    failed = True
    try:
        result = bench(args, workdir)
        print_report(result)
        failed = bool(result["dead"]) or any(s["errors"] for s in result["steps"])
        return 1 if failed else 0
    except KeyboardInterrupt:
        return 130
    finally:
        if args.keep_data or failed:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
