#!/usr/bin/env python3
"""Submit latency and throughput: N job submits through Envoy at a fixed open-loop rate.

Requests are evenly spaced: request i is due at start + i/rate, whether or not earlier ones have
answered (open loop). Latency is measured from that scheduled time, so time spent waiting for a
free concurrency slot or for a late event loop counts (no coordinated omission); service time is
measured from the moment the request was actually sent. Latencies are over successful (200 / OK)
answers only; every other answer is counted by its status code.

By default a private stack (etcd, services, workers, Envoy) is started on free loopback ports in a
temporary directory and stopped at the end. With --url an already running stack is used, and the
tokens are minted from --data-dir's signing key with the issuer/audience of --config.

Run as root where cgroup v1's cpuacct is mounted, the private stack runs in a cpuacct group of its own, and
stack_cpu_ms_per_job_cgroup counts everything it ran (its jobs' starts and the kernel's work for them, which the
per-process figures miss: a job's processes are reaped inside its pid namespace).

Before the run the tenant's quota is raised through the admin API (PUT /api/v1/tenants/{t}/quotas)
so that no submit is refused with 429. Progress goes to stderr every second; the report goes to
stdout and ends with a one-line JSON summary. Exit status: 0 when every submit succeeded, 1 when
some failed or did not finish (or --wait timed out), 2 when the benchmark could not run.

Examples:
    .venv/bin/python bench/submit_latency.py --count 1000 --rate 100
    .venv/bin/python bench/submit_latency.py --grpc --count 1000 --rate 300
    .venv/bin/python bench/submit_latency.py --url http://127.0.0.1:8080 --count 200 --rate 50 --wait
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import re
import shlex
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx

from bench.cpuacct import CpuacctGroup

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # normally on the venv's path already (jobmesh-dev.pth)
    sys.path.insert(0, str(REPO))

TERMINAL = ("JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED")
INT32_MAX = 2**31 - 1
REQUEST_TIMEOUT = 30.0  # per request; what is still in flight at the overall deadline is abandoned
WORKER_WAIT_SECONDS = 60.0
BASELINE_SECONDS = 3.0  # idle CPU (stack, machine) measured for this long before the run
FOREIGN_LOAD_WARN_CORES = 0.25

# A sender returns (status key, job id or None, short error text or None).
Sender = Callable[[int], Awaitable[tuple[str, str | None, str | None]]]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# Arguments -----------------------------------------------------------------------------------------


def parse_command(text: str) -> list[str]:
    text = text.strip()
    if text.startswith("["):
        value = json.loads(text)
        if not isinstance(value, list) or not value or not all(isinstance(x, str) for x in value):
            raise argparse.ArgumentTypeError("--command as JSON must be a non-empty list of strings")
        return value
    argv = shlex.split(text)
    if not argv:
        raise argparse.ArgumentTypeError("--command must not be empty")
    return argv


def positive(kind: type) -> Callable[[str], Any]:
    def convert(text: str) -> Any:
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value

    return convert


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="submit_latency.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    target = p.add_argument_group("target stack")
    target.add_argument(
        "--url",
        help="Envoy URL of a running stack, e.g. http://127.0.0.1:8080 (loopback only). "
        "Default: start a private stack on free ports in a temp dir and stop it at the end.",
    )
    target.add_argument(
        "--data-dir",
        type=Path,
        default=Path(os.environ.get("JOBMESH_DATA_DIR", REPO / ".jobmesh")),
        help="with --url: data dir whose signing key mints the tokens (default: %(default)s)",
    )
    target.add_argument(
        "--config",
        type=Path,
        default=Path(os.environ.get("JOBMESH_CONFIG", REPO / "config" / "dev.toml")),
        help="with --url: mesh config giving the token issuer/audience (default: %(default)s)",
    )
    target.add_argument(
        "--stack-config",
        type=Path,
        default=None,
        help="private stack: its mesh config (default: the test fixture, tests/fixtures/mesh.toml; "
        "bench/configs/steady.toml runs the jobs on four long-lived workers)",
    )
    target.add_argument(
        "--keep-data",
        action="store_true",
        help="private stack: keep its temp dir (logs under <dir>/stack/logs) instead of deleting it "
        "(it is always kept when something went wrong)",
    )
    load = p.add_argument_group("load")
    load.add_argument("--count", type=positive(int), default=1000, help="jobs to submit (default: %(default)s)")
    load.add_argument("--rate", type=positive(float), default=100.0, help="target jobs/s (default: %(default)s)")
    load.add_argument(
        "--concurrency", type=positive(int), default=64, help="cap on in-flight requests (default: %(default)s)"
    )
    load.add_argument(
        "--command",
        type=parse_command,
        default=["true"],
        help="job argv, as a shell-like string or a JSON list, e.g. 'sh -c \"echo hi\"' (default: true)",
    )
    load.add_argument("--tenant", default="acme", help="tenant to submit as (default: %(default)s)")
    load.add_argument("--cpu-millis", type=positive(int), default=100, help="per job (default: %(default)s)")
    load.add_argument("--memory-mb", type=positive(int), default=64, help="per job (default: %(default)s)")
    load.add_argument(
        "--timeout-seconds",
        type=positive(float),
        default=120.0,
        help="overall cap on the submit phase: stop sending, abandon what is in flight and report "
        "what finished (default: %(default)s)",
    )
    load.add_argument(
        "--grpc",
        action="store_true",
        help="submit through native gRPC (jobmesh.gateway.v1.JobService/SubmitJob via grpc.aio) on the "
        "same Envoy port instead of REST",
    )
    after = p.add_argument_group("after the submits")
    after.add_argument(
        "--wait", action="store_true", help="wait until every submitted job is terminal; report end-to-end jobs/s"
    )
    after.add_argument(
        "--wait-timeout",
        type=positive(float),
        default=300.0,
        help="cap on the --wait phase (default: %(default)s)",
    )
    return p


def check_loopback(url: str) -> tuple[str, int]:
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme != "http" or host not in ("127.0.0.1", "localhost", "::1") or not parts.port:
        raise SystemExit(f"--url must be http://127.0.0.1:<port> (loopback only), got {url!r}")
    return host, parts.port


# CPU accounting (private stack only) ---------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _proc_stat(pid: str) -> tuple[int, float] | None:
    """(process group, CPU seconds incl. reaped children) of one process, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = raw[raw.rfind(")") + 2 :].split()
    # after the comm: state ppid pgrp session tty tpgid flags minflt cminflt majflt cmajflt utime stime cutime cstime
    pgrp = int(fields[2])
    ticks = int(fields[11]) + int(fields[12]) + int(fields[13]) + int(fields[14])
    return pgrp, ticks / CLK_TCK


def stack_cpu(groups: dict[int, str]) -> dict[str, float]:
    """CPU seconds so far per stack process, keyed by name; processes a service started (its workers,
    etcd none) are added under that name. Each stack process leads its own process group."""
    out: dict[str, float] = dict.fromkeys(groups.values(), 0.0)
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _proc_stat(entry)
        if stat is None or stat[0] not in groups:
            continue
        name = groups[stat[0]]
        if int(entry) != stat[0]:
            name = "workers" if name.startswith("poolmanager") else f"{name}-children"
        out[name] = out.get(name, 0.0) + stat[1]
    return out


def machine_busy() -> float:
    """Busy CPU seconds of the whole machine since boot (user, nice, system, irq, softirq; not idle,
    iowait or steal)."""
    values = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return sum(values[i] for i in (0, 1, 2, 5, 6) if i < len(values)) / CLK_TCK


# Messages per job (private stack only) -------------------------------------------------------------

_RPC_COUNT = re.compile(r'^jobmesh_\w+_rpc_duration_seconds_count\{.*method="(\w+)".*\} ([0-9.e+]+)$', re.M)
_INFORMER_EVENTS = re.compile(r'^jobmesh_informer_events_total\{informer="([\w-]+)"\} ([0-9.e+]+)$', re.M)
_ETCD_HANDLED = re.compile(r'^grpc_server_handled_total\{[^}]*grpc_method="(\w+)"[^}]*grpc_type="unary"\} (\d+)$', re.M)
_ETCD_STREAMED = re.compile(
    r'^grpc_server_msg_(sent|received)_total\{grpc_method="(Watch|LeaseKeepAlive)"[^}]*\} (\d+)$', re.M
)


_LEADER_LOSSES = re.compile(r'^jobmesh_leader_losses_total\{election="([\w-]+)",reason="(\w+)"\} ([0-9.e+]+)$', re.M)


def losses_in(text: str, process: str) -> dict[str, float]:
    """Leader terms a process lost without resigning, by election and reason, from its /metrics text."""
    return {f"{process} {e} {r}": float(v) for e, r, v in _LEADER_LOSSES.findall(text)}


def leader_losses(stack: Any) -> dict[str, float]:
    """Leader terms lost so far without resigning, by process, election and reason (jobmesh_leader_losses_total
    on each service's /metrics): compared before and after a run, a leadership that flapped under the load."""
    out: dict[str, float] = {}
    with httpx.Client(timeout=5) as client:
        for name, proc in stack.procs.items():
            if proc.metrics_port and proc.alive():
                out |= losses_in(client.get(f"http://127.0.0.1:{proc.metrics_port}/metrics").text, name)
    return out


LOST = "leader term lost:"  # the prefix of those counts among the scraped ones (not divided by jobs)


def lost_since(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: v - before.get(k, 0.0) for k, v in sorted(after.items()) if v > before.get(k, 0.0)}


def message_counter(stack: Any) -> Callable[[], dict[str, float]]:
    """What each service answered so far (its RPCs by method, from its /metrics), the changes its informers received
    (by informer), and what etcd did (unary calls by method, watch events sent, lease keep-alives received), for
    counting the messages each job costs."""
    import ssl

    ports = {name: proc.metrics_port for name, proc in stack.procs.items() if proc.metrics_port}
    pki = stack.data_dir / "pki"
    tls = ssl.create_default_context(cafile=str(pki / "etcd-ca" / "ca.crt"))
    tls.load_cert_chain(str(pki / "etcd" / "client-launcher.crt"), str(pki / "etcd" / "client-launcher.key"))
    etcd = stack.etcd_endpoints()[0]
    etcd = etcd if "://" in etcd else f"https://{etcd}"

    def scrape() -> dict[str, float]:
        out: dict[str, float] = {}
        with httpx.Client(timeout=5) as client:
            for name, port in ports.items():
                text = client.get(f"http://127.0.0.1:{port}/metrics").text
                for method, value in _RPC_COUNT.findall(text):
                    out[f"{name} {method}"] = out.get(f"{name} {method}", 0.0) + float(value)
                for informer, value in _INFORMER_EVENTS.findall(text):
                    out[f"{name} {informer} events"] = float(value)
                out |= {f"{LOST} {k}": v for k, v in losses_in(text, name).items()}
        text = httpx.get(f"{etcd}/metrics", verify=tls, timeout=5).text
        for method, value in _ETCD_HANDLED.findall(text):
            out[f"etcd {method}"] = out.get(f"etcd {method}", 0.0) + float(value)
        for way, method, value in _ETCD_STREAMED.findall(text):
            key = "etcd watch events sent" if method == "Watch" else f"etcd {method} messages {way}"
            out[key] = out.get(key, 0.0) + float(value)
        return out

    return scrape


# Statistics ----------------------------------------------------------------------------------------


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_ms(values: list[float]) -> dict[str, float]:
    s = sorted(values)
    if not s:
        return {}
    return {
        "p50": round(percentile(s, 50) * 1000, 2),
        "p90": round(percentile(s, 90) * 1000, 2),
        "p99": round(percentile(s, 99) * 1000, 2),
        "max": round(s[-1] * 1000, 2),
        "mean": round(sum(s) / len(s) * 1000, 2),
    }


def parse_rfc3339(text: str) -> float | None:
    if not text:
        return None
    text = text.replace("Z", "+00:00")
    if "." in text:  # fromisoformat wants at most 6 fractional digits
        head, rest = text.split(".", 1)
        digits = "".join(c for c in rest if c.isdigit())
        text = f"{head}.{digits[:6].ljust(6, '0')}{rest[len(digits) :]}"
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        return None


# The run -------------------------------------------------------------------------------------------


@dataclass
class Run:
    count: int
    rate: float
    concurrency: int
    deadline_s: float
    sent: int = 0
    done: int = 0
    ok: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    error_samples: dict[str, str] = field(default_factory=dict)
    latency: list[float] = field(default_factory=list)
    service: list[float] = field(default_factory=list)
    job_ids: list[str] = field(default_factory=list)
    t0: float = 0.0
    wall0: float = 0.0
    last_send: float = 0.0
    last_done: float = 0.0
    unfinished: int = 0
    stopped_early: bool = False

    @property
    def errors(self) -> int:
        return self.done - self.ok


async def progress(run: Run, stop: asyncio.Event, label: str) -> None:
    while True:
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
            return
        except TimeoutError:
            pass
        elapsed = time.perf_counter() - run.t0
        log(
            f"[{label} {elapsed:6.1f}s] sent={run.sent}/{run.count} done={run.done} ok={run.ok} "
            f"errors={run.errors} in_flight={run.sent - run.done}"
        )


async def open_loop(run: Run, send: Sender, label: str) -> None:
    sem = asyncio.Semaphore(run.concurrency)
    tasks: set[asyncio.Task[None]] = set()
    now = time.perf_counter

    async def one(i: int, scheduled: float) -> None:
        sent_at = now()
        try:
            status, job_id, detail = await send(i)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # transport errors: count them by exception type
            status, job_id, detail = type(exc).__name__, None, str(exc)[:300]
        finally:
            sem.release()
        finished = now()
        run.done += 1
        run.last_done = finished
        run.statuses[status] += 1
        if job_id is not None:
            run.ok += 1
            run.job_ids.append(job_id)
            run.latency.append(finished - scheduled)
            run.service.append(finished - sent_at)
        elif detail and status not in run.error_samples:
            run.error_samples[status] = detail

    stop = asyncio.Event()
    run.t0 = now()
    run.wall0 = time.time()
    deadline = run.t0 + run.deadline_s
    reporter = asyncio.create_task(progress(run, stop, label))
    try:
        for i in range(run.count):
            scheduled = run.t0 + i / run.rate
            delay = scheduled - now()
            if delay > 0:
                await asyncio.sleep(delay)
            left = deadline - now()
            if left <= 0:
                run.stopped_early = True
                break
            try:
                await asyncio.wait_for(sem.acquire(), left)
            except TimeoutError:
                run.stopped_early = True
                break
            run.sent += 1
            run.last_send = now()
            task = asyncio.create_task(one(i, scheduled))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            _, pending = await asyncio.wait(set(tasks), timeout=max(0.0, deadline - now()))
            if pending:
                run.stopped_early = True
                run.unfinished = len(pending)
                for task in pending:
                    task.cancel()
                await asyncio.gather(*pending, return_exceptions=True)
    finally:
        stop.set()
        await reporter


def rest_sender(client: httpx.AsyncClient, args: argparse.Namespace) -> Sender:
    async def send(i: int) -> tuple[str, str | None, str | None]:
        body = {
            "name": f"bench-{i}",
            "command": args.command,
            "resources": {"cpu_millis": args.cpu_millis, "memory_mb": args.memory_mb},
        }
        resp = await client.post("/api/v1/jobs", json=body)
        if resp.status_code == 200:
            return "200", resp.json()["job_id"], None
        return str(resp.status_code), None, resp.text[:300]

    return send


def grpc_sender(stub: Any, token: str, args: argparse.Namespace) -> Sender:
    import grpc

    from jobmesh.common.v1 import types_pb2
    from jobmesh.gateway.v1 import gateway_pb2

    metadata = (("authorization", f"Bearer {token}"),)

    async def send(i: int) -> tuple[str, str | None, str | None]:
        request = gateway_pb2.SubmitJobRequest(
            spec=types_pb2.JobSpec(
                name=f"bench-{i}",
                command=args.command,
                resources=types_pb2.Resources(cpu_millis=args.cpu_millis, memory_mb=args.memory_mb),
            )
        )
        try:
            job = await stub.SubmitJob(request, metadata=metadata, timeout=REQUEST_TIMEOUT)
        except grpc.aio.AioRpcError as exc:
            return exc.code().name, None, (exc.details() or "")[:300]
        return "OK", job.job_id, None

    return send


# Setup: quota, workers ---------------------------------------------------------------------------


async def raise_quota(url: str, admin_token: str, args: argparse.Namespace) -> dict[str, Any]:
    """Raises the tenant's limits (never lowers them) so that `count` more jobs fit."""
    headers = {"Authorization": f"Bearer {admin_token}"}
    path = f"/api/v1/tenants/{args.tenant}/quotas"
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30.0) as client:
        resp = await client.get(path)
        if resp.status_code != 200:
            raise RuntimeError(f"GET {path}: {resp.status_code} {resp.text[:500]}")
        quota = resp.json()
        limits = quota.get("limits") or {}
        usage = quota.get("usage") or {}
        margin = max(10, args.count // 10)
        per_job = {"cpu_millis": args.cpu_millis, "memory_mb": args.memory_mb, "concurrent_jobs": 1}
        wanted = {}
        for name, each in per_job.items():
            need = int(usage.get(name, 0)) + (args.count + margin) * each
            wanted[name] = min(INT32_MAX, max(int(limits.get(name, 0)), need))
        resp = await client.put(path, json={"limits": wanted})
        if resp.status_code != 200:
            raise RuntimeError(f"PUT {path}: {resp.status_code} {resp.text[:500]}")
        after = resp.json().get("limits", {})
        log(f"quota of {args.tenant}: limits {limits} -> {after} (usage {usage})")
        return {"before": limits, "after": after, "usage": usage}


def wait_for_workers(url: str, token: str, timeout: float) -> None:
    """Private stack: wait (bounded) until every static pool has its workers registered and idle."""
    end = time.monotonic() + timeout
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=5.0) as client:
        while True:
            try:
                pools = client.get("/api/v1/pools").json().get("pools", [])
                static = [p for p in pools if p.get("kind") == "POOL_KIND_STATIC"]
                if static and all(p.get("idle_workers", 0) >= max(p.get("min_workers", 0), 1) for p in static):
                    log("workers ready: " + ", ".join(f"{p['pool_id']}={p.get('idle_workers', 0)}" for p in static))
                    return
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() > end:
                log(f"warning: static workers not all idle after {timeout:.0f}s; running anyway")
                return
            time.sleep(0.25)


# --wait ------------------------------------------------------------------------------------------


async def list_jobs(client: httpx.AsyncClient, state: str | None) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    token = ""
    for _ in range(10_000):  # bounded paging
        params: dict[str, Any] = {"page_size": 500}
        if state:
            params["state"] = state
        if token:
            params["page_token"] = token
        resp = await client.get("/api/v1/jobs", params=params)
        resp.raise_for_status()
        body = resp.json()
        jobs += body.get("jobs", [])
        token = body.get("next_page_token", "")
        if not token:
            break
    return jobs


async def wait_terminal(url: str, token: str, run: Run, timeout: float) -> dict[str, Any]:
    ids = set(run.job_ids)
    start = time.perf_counter()
    end = start + timeout
    headers = {"Authorization": f"Bearer {token}"}
    left = len(ids)
    polls = 0
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60.0) as client:
        while True:
            polls += 1
            try:
                active: set[str] = set()
                for state in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING"):
                    active |= {j["job_id"] for j in await list_jobs(client, state)}
                left = len(ids & active)
                if left == 0:  # confirm with one full listing (a retried job can go back to PENDING)
                    jobs = [j for j in await list_jobs(client, None) if j["job_id"] in ids]
                    if all(j.get("state") in TERMINAL for j in jobs) and len(jobs) == len(ids):
                        break
                    left = sum(1 for j in jobs if j.get("state") not in TERMINAL) or 1
            except (httpx.HTTPError, KeyError, ValueError) as exc:
                log(f"wait: poll failed: {type(exc).__name__}: {exc}")
            now = time.perf_counter()
            log(f"[wait {now - run.t0:6.1f}s] terminal={len(ids) - left}/{len(ids)}")
            if now >= end:
                break
            await asyncio.sleep(min(1.0, max(0.0, end - now)))
        jobs = [j for j in await list_jobs(client, None) if j["job_id"] in ids]
    states = Counter(j.get("state", "?") for j in jobs)
    terminal = [j for j in jobs if j.get("state") in TERMINAL]
    ends = [t for t in (parse_rfc3339(j.get("end_time", "")) for j in terminal) if t is not None]
    e2e = []
    for j in terminal:
        created, ended = parse_rfc3339(j.get("create_time", "")), parse_rfc3339(j.get("end_time", ""))
        if created is not None and ended is not None:
            e2e.append(ended - created)
    span = (max(ends) - run.wall0) if ends else math.nan
    return {
        "timed_out": len(terminal) < len(ids),
        "jobs": len(ids),
        "terminal": len(terminal),
        "states": dict(states),
        "last_end_after_s": round(span, 2),
        "completed_jobs_per_s": round(len(terminal) / span, 1) if ends and span > 0 else None,
        "create_to_end_ms": summarize_ms(e2e),
        "wait_seconds": round(time.perf_counter() - start, 1),
    }


# Main --------------------------------------------------------------------------------------------


async def bench(
    args: argparse.Namespace,
    url: str,
    token: str,
    admin_token: str,
    groups: dict[int, str],
    messages: Callable[[], dict[str, float]] | None = None,
    cgroup: CpuacctGroup | None = None,
) -> dict:
    # Before the run: the stack's own background CPU (elections, informers, workers polling), subtracted
    # below, and whatever else keeps the machine busy (other processes skew every figure).
    stack_before = sum(stack_cpu(groups).values()) if groups else 0.0
    group_before = cgroup.seconds() if cgroup else 0.0
    machine_before, t_before = machine_busy(), time.perf_counter()
    await asyncio.sleep(BASELINE_SECONDS)
    span = time.perf_counter() - t_before
    idle_cores = (sum(stack_cpu(groups).values()) - stack_before) / span if groups else None
    group_idle_cores = (cgroup.seconds() - group_before) / span if cgroup else 0.0
    busy_before = (machine_busy() - machine_before) / span
    others_before = busy_before - (idle_cores or 0.0)
    if others_before > FOREIGN_LOAD_WARN_CORES:
        log(
            f"warning: {others_before:.2f} cores were busy outside the benchmarked stack before the run; "
            "every figure is skewed"
        )
    quota = await raise_quota(url, admin_token, args)
    mode = "grpc" if args.grpc else "rest"
    run = Run(count=args.count, rate=args.rate, concurrency=args.concurrency, deadline_s=args.timeout_seconds)

    cpu0 = stack_cpu(groups) if groups else {}
    group0 = cgroup.seconds() if cgroup else 0.0
    counted0 = messages() if messages else {}
    window0 = time.perf_counter()
    busy0 = machine_busy()
    client_cpu0 = time.process_time()
    if args.grpc:
        import grpc

        from jobmesh.gateway.v1 import gateway_pb2_grpc

        host, port = check_loopback(url)
        async with grpc.aio.insecure_channel(f"{host}:{port}") as channel:
            await asyncio.wait_for(channel.channel_ready(), 10.0)
            stub = gateway_pb2_grpc.JobServiceStub(channel)
            await open_loop(run, grpc_sender(stub, token, args), mode)
    else:
        limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
        headers = {"Authorization": f"Bearer {token}"}
        async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=REQUEST_TIMEOUT) as client:
            await open_loop(run, rest_sender(client, args), mode)
    client_cpu = time.process_time() - client_cpu0
    busy1 = machine_busy()
    cpu1 = stack_cpu(groups) if groups else {}
    group1 = cgroup.seconds() if cgroup else 0.0
    window = time.perf_counter() - window0

    elapsed = (run.last_done or run.t0) - run.t0
    send_span = run.last_send - run.t0
    result: dict[str, Any] = {
        "mode": mode,
        "url": url,
        "tenant": args.tenant,
        "command": args.command,
        "count": args.count,
        "target_rate": args.rate,
        "concurrency": args.concurrency,
        "sent": run.sent,
        "completed": run.done,
        "ok": run.ok,
        "errors": run.errors,
        "errors_by_status": {k: v for k, v in sorted(run.statuses.items()) if k not in ("200", "OK")},
        "unfinished": run.unfinished,
        "stopped_early": run.stopped_early,
        "duration_s": round(elapsed, 3),
        "achieved_rate": round(run.ok / elapsed, 1) if elapsed > 0 else None,
        "send_rate": round((run.sent - 1) / send_span, 1) if send_span > 0 else None,
        "latency_ms": summarize_ms(run.latency),
        "service_ms": summarize_ms(run.service),
        "client_cpu_s": round(client_cpu, 2),
        "machine_busy_cores": round((busy1 - busy0) / window, 2),
        "machine_busy_cores_before": round(busy_before, 2),
        "quota": quota["after"],
    }
    if run.error_samples:
        result["error_samples"] = run.error_samples
    if groups:
        by_proc = {k: round(cpu1.get(k, 0.0) - cpu0.get(k, 0.0), 2) for k in sorted(set(cpu0) | set(cpu1))}
        stack_total = sum(by_proc.values())
        result["stack_cpu_s"] = round(stack_total, 2)
        result["stack_cpu_ms_per_job"] = round(stack_total / run.ok * 1000, 2) if run.ok else None
        result["stack_cpu_by_process_s"] = by_proc
        if idle_cores is not None:
            net = stack_total - idle_cores * window
            result["stack_idle_cpu_cores"] = round(idle_cores, 3)
            result["stack_cpu_ms_per_job_net"] = round(net / run.ok * 1000, 2) if run.ok else None
        if cgroup is not None and run.ok:
            # Everything the stack ran, its jobs' starts included (what per-process counters miss: bench/cpuacct.py).
            whole = group1 - group0
            result["stack_cpu_s_cgroup"] = round(whole, 2)
            result["stack_cpu_ms_per_job_cgroup"] = round(whole / run.ok * 1000, 2)
            result["stack_cpu_ms_per_job_cgroup_net"] = round((whole - group_idle_cores * window) / run.ok * 1000, 2)
        # Busy CPU not charged to the stack or to this client: other processes, unattributed kernel work.
        result["other_cpu_cores"] = round((busy1 - busy0 - stack_total - client_cpu) / window, 2)
    if args.wait and run.job_ids:
        result["wait"] = await wait_terminal(url, token, run, args.wait_timeout)
    if messages and run.ok:
        # Over the submits and, with --wait, the jobs' whole lives (and whatever the stack did meanwhile anyway).
        counted1 = messages()
        losses = {k: v for k, v in counted1.items() if k.startswith(LOST)}
        per_job = {
            k: round((v - counted0.get(k, 0.0)) / run.ok, 2) for k, v in sorted(counted1.items()) if k not in losses
        }
        result["messages_per_job"] = {k: v for k, v in per_job.items() if v > 0}
        # Terms lost without resigning during the run: a leadership that flapped under this load (0 expected).
        result["leader_losses"] = {k.removeprefix(LOST).strip(): v for k, v in lost_since(counted0, losses).items()}
    return result


def print_report(r: dict[str, Any]) -> None:
    lat, svc = r["latency_ms"], r["service_ms"]
    print(f"mode              {r['mode']}  ({r['url']}, tenant {r['tenant']}, command {r['command']})")
    print(f"jobs              {r['ok']} ok / {r['sent']} sent / {r['count']} planned, cap {r['concurrency']} in flight")
    rates = f"target {r['target_rate']:g}/s, sent at {r['send_rate']}/s, achieved {r['achieved_rate']}/s"
    print(f"rate              {rates}")
    print(f"duration          {r['duration_s']} s")
    if lat:
        print(f"latency (sched)   p50 {lat['p50']} ms  p90 {lat['p90']} ms  p99 {lat['p99']} ms  max {lat['max']} ms")
        print(f"service (sent)    p50 {svc['p50']} ms  p90 {svc['p90']} ms  p99 {svc['p99']} ms  max {svc['max']} ms")
    errors = ", ".join(f"{k}: {v}" for k, v in r["errors_by_status"].items()) or "none"
    print(f"non-OK answers    {r['errors']} ({errors}); unfinished {r['unfinished']}")
    for status, sample in r.get("error_samples", {}).items():
        print(f"  e.g. {status}: {sample}")
    print(
        f"client CPU        {r['client_cpu_s']} s; machine busy {r['machine_busy_cores']} of {os.cpu_count()} cores "
        f"(before the run {r['machine_busy_cores_before']})"
    )
    if "stack_cpu_s" in r:
        procs = ", ".join(f"{k} {v}" for k, v in sorted(r["stack_cpu_by_process_s"].items(), key=lambda kv: -kv[1]))
        print(f"stack CPU         {r['stack_cpu_s']} s = {r['stack_cpu_ms_per_job']} ms/job ({procs})")
        if "messages_per_job" in r:
            print("messages/job      " + ", ".join(f"{k} {v}" for k, v in r["messages_per_job"].items()))
        if "leader_losses" in r:
            print(f"leader terms lost {sum(r['leader_losses'].values()):g} {r['leader_losses'] or ''}")
        if "stack_cpu_ms_per_job_cgroup" in r:
            whole, net = r["stack_cpu_ms_per_job_cgroup"], r["stack_cpu_ms_per_job_cgroup_net"]
            print(
                f"stack CPU, all    {whole} ms/job ({net} net): the stack's cpuacct group, jobs' starts and the"
                " kernel's work for them included"
            )
        if "stack_idle_cpu_cores" in r:
            print(
                f"stack CPU net     {r['stack_cpu_ms_per_job_net']} ms/job after subtracting the idle "
                f"{r['stack_idle_cpu_cores']} cores measured for {BASELINE_SECONDS:g}s before the run"
            )
        print(f"other CPU         {r['other_cpu_cores']} cores busy outside the stack and this client during the run")
    if "wait" in r:
        w = r["wait"]
        e2e = w["create_to_end_ms"]
        print(
            f"until terminal    {w['terminal']}/{w['jobs']} terminal {w['states']}; last ended "
            f"{w['last_end_after_s']} s after start -> {w['completed_jobs_per_s']} jobs/s end-to-end"
            + (" (TIMED OUT)" if w["timed_out"] else "")
        )
        if e2e:
            print(f"create->end       p50 {e2e['p50']} ms  p99 {e2e['p99']} ms  max {e2e['max']} ms")
    print(json.dumps(r, separators=(",", ":"), sort_keys=True))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from libs.auth import issue_token
    from libs.config import load_config

    stack = None
    tmp: Path | None = None
    cgroup: CpuacctGroup | None = None
    failed = False
    groups: dict[int, str] = {}
    ttl = int(args.timeout_seconds + (args.wait_timeout if args.wait else 0) + 3600)
    try:
        if args.url:
            check_loopback(args.url)
            url = args.url.rstrip("/")
            config = load_config(args.config)
            mint = lambda admin: issue_token(
                args.data_dir, tenant=args.tenant, issuer=config.issuer, audience=config.audience, admin=admin, ttl=ttl
            )
            token, admin_token = mint(False), mint(True)
        else:
            from tests.helpers import start_stack
            from tests.helpers import token as stack_token

            tmp = Path(tempfile.mkdtemp(prefix="jobmesh-bench-"))
            log(f"starting a private stack in {tmp / 'stack'} (logs in {tmp / 'stack' / 'logs'}) ...")
            started = time.perf_counter()
            # The stack in a cpuacct group of its own (bench/cpuacct.py): the client's CPU stays out of it.
            cgroup = CpuacctGroup.make("jobmesh-bench")
            if cgroup is not None:
                cgroup.join()
            try:
                stack = start_stack(tmp / "stack", **({"config": args.stack_config} if args.stack_config else {}))
            except BaseException:
                failed = True
                raise
            finally:
                if cgroup is not None:
                    cgroup.leave()
            url = stack.url
            log(f"stack up at {url} in {time.perf_counter() - started:.1f}s")
            token = stack_token(stack, args.tenant, ttl=ttl)
            admin_token = stack_token(stack, args.tenant, admin=True, ttl=ttl)
            groups = {proc.pid: name for name, proc in stack.procs.items() if proc.popen is not None}
            wait_for_workers(url, token, WORKER_WAIT_SECONDS)
        counter = message_counter(stack) if stack is not None else None
        result = asyncio.run(bench(args, url, token, admin_token, groups, counter, cgroup))
        if stack is not None:
            dead = [name for name, proc in stack.procs.items() if not proc.alive()]
            if dead:
                result["dead_processes"] = dead
                failed = True
            result["data_dir"] = str(stack.data_dir)
        print_report(result)
        if (
            result["errors"]
            or result["unfinished"]
            or result["stopped_early"]
            or result.get("wait", {}).get("timed_out")
        ):
            failed = True
        return 1 if failed else 0
    except KeyboardInterrupt:
        failed = True
        log("interrupted")
        return 130
    except Exception as exc:
        failed = True
        log(f"benchmark failed: {type(exc).__name__}: {exc}")
        return 2
    finally:
        if stack is not None:
            log("stopping the private stack ...")
            stack.stop()
        if cgroup is not None:
            cgroup.remove()
        if tmp is not None:
            if failed or args.keep_data:
                log(f"kept {tmp} (logs in {tmp / 'stack' / 'logs'})")
            else:
                shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
