#!/usr/bin/env python3
"""Overload benchmark: REST submits, closed loop with wrk, first unloaded then with 256 connections.

Phases (a private stack on bench/configs/overload.toml, whose one worker is held by a long job so that the
submitted jobs stay pending and only the submit path is measured):
  1. unloaded: wrk with a few connections (--unloaded-connections, each for --unloaded-seconds); the best
     accepted (200) throughput of these is the "unloaded maximum".
  2. overload: wrk with --connections (256) for --seconds (15).
For each phase: accepted jobs/s, and from Envoy's access log (the time Envoy held each request, ms) the count,
p50, p99 and max latency of each status; wrk's own latency over all answers; during the overload phase the
largest resident memory of each stack process, against the memory limit of its Kubernetes manifest
(k8s/base). The machine's load average before and after. By default wrk does not honour Retry-After: every connection
sends its next request as soon as it has an answer, which is the worst case for the edge.

The goals (issue 14): accepted >= 90% of the unloaded maximum, accepted p99 <= 100 ms, every excess answered 429
fast (< 10 ms), no process above its memory limit. The report ends with a one-line JSON summary.

The same script measures an older checkout's stack when that checkout comes first on the path (its devtools.launcher
starts the stack), e.g. PYTHONPATH=/tmp/before:/tmp/before/gen .venv/bin/python bench/overload.py.

Needs `wrk` (Debian: apt-get install wrk).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx
import psutil
import yaml

from bench.submit_latency import leader_losses, lost_since

BENCH = Path(__file__).resolve().parent
CONFIG = BENCH / "configs" / "overload.toml"
K8S_BASE = BENCH.parent / "k8s" / "base"
SPEC = {"name": "overload", "command": ["true"], "resources": {"cpu_millis": 10, "memory_mb": 16}}
# Envoy's access log line: ... "POST /api/v1/jobs HTTP/1.1" 200 grpc=0 flags=- in=.. out=.. 3ms ...
ACCESS = re.compile(r'"POST /api/v1/jobs HTTP/1.1" (\d{3}) .* (\d+)ms ')


def workload(process: str) -> str:
    """The Kubernetes workload whose memory limit applies to a stack process (its replicas share one)."""
    kind = re.sub(r"-\d+$", "", process)
    return {"poolmanager": "pool-manager", "worker": "worker-static-general"}.get(kind, kind)


# A fixed request (built once by wrk, no per-request Lua): the load generator spends as little CPU as it can, since
# it shares the machine with the mesh. wrk counts the non-2xx answers itself (summary.errors.status).
WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = [[%(body)s]]
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %(token)s"
function done(summary, latency, requests)
  io.write(string.format('WRK {"requests": %%d, "duration_us": %%d, "not_ok": %%d, "socket_errors": %%d, ' ..
    '"p50_ms": %%.2f, "p99_ms": %%.2f, "max_ms": %%.2f}\\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
end
"""

# With --honour-retry-after: a connection answered 429 waits the Retry-After it was given before its next request,
# as a well-behaved client does (wrk calls response() for each answer and delay() before each next request, both
# in the connection's thread; a count of waits owed keeps them matched).
WRK_HONOUR_RETRY_AFTER = """
local owed, wait_ms = 0, 1000
function response(status, headers, body)
  if status == 429 then
    owed = owed + 1
    wait_ms = 1000 * (tonumber(headers["retry-after"] or headers["Retry-After"]) or 1)
  end
end
function delay()
  if owed > 0 then
    owed = owed - 1
    return wait_ms
  end
  return 0
end
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def memory_limits() -> dict[str, int]:
    """Memory limit (bytes) of each workload's first container in k8s/base."""
    units = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3}
    limits = {}
    for path in K8S_BASE.glob("*.yaml"):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") not in ("Deployment", "StatefulSet"):
                continue
            container = doc["spec"]["template"]["spec"]["containers"][0]
            text = container.get("resources", {}).get("limits", {}).get("memory", "")
            if text[-2:] in units:
                limits[doc["metadata"]["name"]] = int(text[:-2]) * units[text[-2:]]
    return limits


def pct(values: list[int], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return float(ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))])


class RssSampler:
    """The largest RSS of each stack process (its own, not its children's) and of any worker, sampled every 0.5 s."""

    def __init__(self, procs: dict[str, int]):
        self.procs = procs
        self.peak: dict[str, int] = defaultdict(int)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            for name, pid in self.procs.items():
                try:
                    proc = psutil.Process(pid)
                    self.peak[name] = max(self.peak[name], proc.memory_info().rss)
                    for child in proc.children(recursive=True):
                        if "services.worker" in " ".join(child.cmdline()):
                            self.peak["worker"] = max(self.peak["worker"], child.memory_info().rss)
                except psutil.Error:
                    continue

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)


def cpu_seconds(procs: dict[str, int]) -> dict[str, float]:
    """CPU (user + system) each stack process has used so far, its own and its reaped children's."""
    used = {}
    for name, pid in procs.items():
        try:
            t = psutil.Process(pid).cpu_times()
            used[name] = t.user + t.system + t.children_user + t.children_system
        except psutil.Error:
            continue
    return used


def machine_busy_seconds() -> float:
    """CPU time all of the machine's cores have spent not idle so far (/proc/stat)."""
    with open("/proc/stat") as fh:
        fields = [int(x) for x in fh.readline().split()[1:]]
    idle = fields[3] + fields[4]
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def run_wrk(
    url: str, script: Path, connections: int, seconds: int, access_log: Path, procs: dict[str, int]
) -> dict[str, Any]:
    """One closed-loop wrk run; the answers' statuses and latencies from wrk and from Envoy's access log, and the
    cores each stack process and wrk itself used meanwhile."""
    offset = access_log.stat().st_size
    argv = ["wrk", "-t1", f"-c{connections}", f"-d{seconds}s", "--timeout", "30s", "-s", str(script), url]
    cpu_before, busy_before = cpu_seconds(procs), machine_busy_seconds()
    wrk_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    out = subprocess.run(argv, capture_output=True, text=True, timeout=seconds + 60, check=True).stdout
    elapsed = time.monotonic() - started
    wrk_after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_after, busy_after = cpu_seconds(procs), machine_busy_seconds()
    cores = {name: round((cpu_after[name] - cpu_before[name]) / elapsed, 3) for name in cpu_after if name in cpu_before}
    wrk_cpu = (wrk_after.ru_utime + wrk_after.ru_stime) - (wrk_before.ru_utime + wrk_before.ru_stime)
    cores["wrk"] = round(wrk_cpu / elapsed, 3)
    cores["machine"] = round((busy_after - busy_before) / elapsed, 3)
    wrk = json.loads(next(line[4:] for line in out.splitlines() if line.startswith("WRK ")))
    time.sleep(2.5)  # Envoy flushes its access log every second
    by_status: dict[str, list[int]] = defaultdict(list)
    with open(access_log, "rb") as fh:
        fh.seek(offset)
        for line in fh.read().decode(errors="replace").splitlines():
            match = ACCESS.search(line)
            if match:
                by_status[match.group(1)].append(int(match.group(2)))
    seconds_run = wrk["duration_us"] / 1e6
    return {
        "connections": connections,
        "seconds": round(seconds_run, 1),
        "accepted_per_s": round(len(by_status.get("200", [])) / seconds_run, 1),
        "answers_per_s": round(wrk["requests"] / seconds_run, 1),
        "wrk": wrk,
        "cores": cores,
        "envoy_ms": {
            status: {
                "count": len(v),
                "p50": pct(v, 50),
                "p99": pct(v, 99),
                "max": max(v),
                "over_10ms": sum(x > 10 for x in v),
            }
            for status, v in sorted(by_status.items())
        },
    }


def prepare(stack: Any, token_for: Any) -> None:
    """Lift acme's quota out of the way and park the one worker on a long job, so submits stay pending."""
    admin = {"Authorization": f"Bearer {token_for('globex', True)}"}
    acme = {"Authorization": f"Bearer {token_for('acme', False)}"}
    big = {"cpu_millis": 2**31 - 1, "memory_mb": 2**31 - 1, "concurrent_jobs": 2**31 - 1}
    with httpx.Client(base_url=stack.url, timeout=30) as client:
        resp = client.put("/api/v1/tenants/acme/quotas", json={"limits": big}, headers=admin)
        resp.raise_for_status()
        for _ in range(240):
            pools = client.get("/api/v1/pools", headers=acme).json()["pools"]
            if pools and pools[0].get("idle_workers", 0) >= 1:
                break
            time.sleep(0.25)
        holder = {
            **SPEC,
            "name": "holder",
            "command": ["sleep", "3600"],
            "resources": {"cpu_millis": 1000, "memory_mb": 64},
        }
        job = client.post("/api/v1/jobs", json=holder, headers=acme).json()
        for _ in range(240):
            if client.get(f"/api/v1/jobs/{job['job_id']}", headers=acme).json()["state"] == "JOB_STATE_RUNNING":
                return
            time.sleep(0.25)
    raise RuntimeError("the holder job did not start")


def bench(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from devtools.launcher import Ports, Stack
    from libs.auth import issue_token
    from libs.config import load_config

    config = load_config(args.config)
    stack = Stack(data_dir=workdir / "stack", config_path=args.config, ports=Ports.free(), env={})
    log(f"starting a private stack in {stack.data_dir} ...")
    stack.start()
    try:
        token_for = lambda tenant, admin: issue_token(
            stack.data_dir, tenant=tenant, issuer=config.issuer, audience=config.audience, admin=admin, ttl=7200
        )
        prepare(stack, token_for)
        script = workdir / "submit.lua"
        script.write_text(
            WRK_SCRIPT % {"body": json.dumps(SPEC), "token": token_for("acme", False)}
            + (WRK_HONOUR_RETRY_AFTER if args.honour_retry_after else "")
        )
        access_log = stack.log_dir / "envoy.log"
        url = f"{stack.url}/api/v1/jobs"
        load_before = os.getloadavg()
        unloaded = []
        procs = {name: proc.pid for name, proc in stack.procs.items() if proc.alive()}
        for connections in args.unloaded_connections:
            log(f"unloaded: {connections} connections, {args.unloaded_seconds} s ...")
            unloaded.append(run_wrk(url, script, connections, args.unloaded_seconds, access_log, procs))
            log(f"  {unloaded[-1]['accepted_per_s']} accepted/s")
        log(f"overload: {args.connections} connections, {args.seconds} s ...")
        losses_before = leader_losses(stack)
        with RssSampler(procs) as rss:
            overload = run_wrk(url, script, args.connections, args.seconds, access_log, procs)
        # Terms lost without resigning while the machine was saturated: a leadership that flapped (0 expected).
        overload["leader_losses"] = lost_since(losses_before, leader_losses(stack))
        load_after = os.getloadavg()
        limits = memory_limits()
        memory = {
            name: {
                "peak_rss_mib": round(peak / 1024**2, 1),
                "limit_mib": limits.get(workload(name), 0) // 1024**2,
            }
            for name, peak in sorted(rss.peak.items())
        }
        best = max(unloaded, key=lambda r: r["accepted_per_s"])
        return {
            "code": _git_head(stack),
            "config": str(args.config),
            "honour_retry_after": args.honour_retry_after,
            "load_average_before": [round(x, 2) for x in load_before],
            "load_average_after": [round(x, 2) for x in load_after],
            "unloaded": unloaded,
            "unloaded_max_per_s": best["accepted_per_s"],
            "overload": overload,
            "accepted_share_of_unloaded_max": round(overload["accepted_per_s"] / best["accepted_per_s"], 3),
            "memory": memory,
            "dead": [name for name, proc in stack.procs.items() if not proc.alive()],
        }
    finally:
        log("stopping the stack ...")
        stack.stop()


def _git_head(stack: Any) -> str:
    from devtools.launcher import REPO

    out = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True, text=True)
    dirty = subprocess.run(
        ["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True
    )
    return out.stdout.strip() + ("+changes" if dirty.stdout.strip() else "") + f" ({REPO})"


def print_report(r: dict[str, Any]) -> None:
    print(f"code: {r['code']}, config {r['config']}, honour Retry-After: {r['honour_retry_after']}")
    print(f"load average before {r['load_average_before']}, after {r['load_average_after']}")
    print(f"{'phase':<22}{'accepted/s':>11}{'answers/s':>11}  per status (Envoy ms: count p50/p99/max, >10ms)")
    for phase in [*r["unloaded"], r["overload"]]:
        statuses = "; ".join(
            f"{s}: {v['count']} {v['p50']:.0f}/{v['p99']:.0f}/{v['max']:.0f} ms, {v['over_10ms']} >10ms"
            for s, v in phase["envoy_ms"].items()
        )
        label = f"{phase['connections']} conn, {phase['seconds']} s"
        print(f"{label:<22}{phase['accepted_per_s']:>11}{phase['answers_per_s']:>11}  {statuses}")
        w = phase["wrk"]
        wrk = f"p50 {w['p50_ms']:.1f} p99 {w['p99_ms']:.1f} max {w['max_ms']:.1f} ms"
        print(f"{'':<22}wrk, all answers: {wrk}, socket errors {w['socket_errors']}")
        top = sorted(phase["cores"].items(), key=lambda kv: -kv[1])
        print(f"{'':<22}cores used: " + ", ".join(f"{n} {c:.2f}" for n, c in top if c >= 0.01))
    print(f"accepted under overload / unloaded max: {r['accepted_share_of_unloaded_max']:.0%}")
    losses = r["overload"]["leader_losses"]
    print(f"leader terms lost under overload: {sum(losses.values()):g} {losses or ''}")
    print(
        "peak RSS (MiB) / k8s limit: "
        + ", ".join(f"{n} {m['peak_rss_mib']}/{m['limit_mib'] or '-'}" for n, m in r["memory"].items())
    )
    if r["dead"]:
        print(f"processes that died: {r['dead']}")
    print(json.dumps(r))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], epilog=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--connections", type=int, default=256)
    p.add_argument("--seconds", type=int, default=15)
    p.add_argument("--unloaded-connections", type=int, nargs="+", default=[4, 16])
    p.add_argument("--unloaded-seconds", type=int, default=8)
    p.add_argument("--config", type=Path, default=CONFIG, help="the stack's mesh config (default: %(default)s)")
    p.add_argument(
        "--honour-retry-after",
        action="store_true",
        help="a connection answered 429 waits its Retry-After before the next request (default: it does not)",
    )
    p.add_argument("--keep-data", action="store_true", help="keep the stack's temp dir (logs)")
    args = p.parse_args(argv)
    if shutil.which("wrk") is None:
        log("wrk is needed (Debian: apt-get install wrk)")
        return 2
    workdir = Path(tempfile.mkdtemp(prefix="jobmesh-overload-"))
    try:
        print_report(bench(args, workdir))
        return 0
    finally:
        if args.keep_data:
            log(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
