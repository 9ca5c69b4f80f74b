#!/usr/bin/env python3
"""First render of the console's Jobs view with many jobs stored: time from navigation to the first job row.

Starts a private stack on the dev configuration (config/dev.toml, as `make run`) unless --url is given, raises
the tenant's quota through the admin API, stores --count jobs (default 10,000) by native gRPC submits that
end at once (`true`), waits until none is pending or running, then opens the console in Debian's headless
Chromium --runs times (see measure() for the three ways it is opened) and reports, per run, the milliseconds
from navigation start to the first `tr[data-job-id]` in the page (a MutationObserver installed before the page
loads records it) and the /api/v1/jobs requests it made. The last stdout line is a JSON summary.

    .venv/bin/python bench/console_first_render.py                 # private stack, 10,000 jobs
    .venv/bin/python bench/console_first_render.py --url http://127.0.0.1:8080 --data-dir .jobmesh
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import grpc
import httpx

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from devtools.launcher import Ports, Stack  # noqa: E402
from jobmesh.common.v1 import types_pb2 as t  # noqa: E402
from jobmesh.gateway.v1 import gateway_pb2 as g  # noqa: E402
from jobmesh.gateway.v1 import gateway_pb2_grpc  # noqa: E402
from libs.auth import issue_token  # noqa: E402
from libs.config import load_config  # noqa: E402

CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
FIRST_ROW_PROBE = """
(() => {
  const seen = () => {
    if (window.__firstRowMs === undefined && document.querySelector('tr[data-job-id]')) {
      window.__firstRowMs = performance.now();
    }
  };
  new MutationObserver(seen).observe(document, { childList: true, subtree: true });
})();
"""
RESOURCE_TIMING = """
(() => {
  const all = performance.getEntriesByType('resource');
  const list = all.find((e) => e.name.includes('/api/v1/jobs?'));
  const scripts = all.filter((e) => e.initiatorType === 'script' || e.name.endsWith('.js'));
  return {
    scripts_loaded_ms: scripts.length ? Math.max(...scripts.map((e) => e.responseEnd)) : 0,
    list_sent_ms: list ? list.startTime : 0,
    list_answered_ms: list ? list.responseEnd : 0,
  };
})()
"""
MODES = ("newest_cold", "newest_warm", "oldest")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


async def store_jobs(target: str, token: str, count: int, concurrency: int) -> float:
    started = time.monotonic()
    auth = [("authorization", f"Bearer {token}")]
    spec = t.JobSpec(name="bench-first-render", command=["true"], resources=t.Resources(cpu_millis=10, memory_mb=16))
    async with grpc.aio.insecure_channel(target) as channel:
        stub = gateway_pb2_grpc.JobServiceStub(channel)
        next_index = 0
        done = 0

        async def worker() -> None:
            nonlocal next_index, done
            while next_index < count:
                i = next_index
                next_index += 1
                one = t.JobSpec()
                one.CopyFrom(spec)
                one.name = f"bench-{i:05d}"
                for attempt in range(5):
                    try:
                        await stub.SubmitJob(g.SubmitJobRequest(spec=one), metadata=auth, timeout=30)
                        break
                    except grpc.aio.AioRpcError as exc:
                        if attempt == 4 or exc.code() != grpc.StatusCode.RESOURCE_EXHAUSTED:
                            raise
                        await asyncio.sleep(0.5)
                done += 1
                if done % 1000 == 0:
                    log(f"stored {done}/{count}")

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return time.monotonic() - started


def count_state(url: str, token: str, state: str, limit_pages: int = 100) -> int:
    total, page_token = 0, ""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=30) as client:
        for _ in range(limit_pages):
            params: dict[str, Any] = {"page_size": 500}
            if state:
                params["state"] = state
            if page_token:
                params["page_token"] = page_token
            body = client.get("/api/v1/jobs", params=params).json()
            total += len(body["jobs"])
            page_token = body["next_page_token"]
            if not page_token:
                break
    return total


def wait_settled(url: str, token: str, timeout: float) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        active = count_state(url, token, "JOB_STATE_PENDING") + count_state(url, token, "JOB_STATE_RUNNING")
        log(f"{active} jobs pending or running")
        if active == 0:
            return
        time.sleep(5)
    raise TimeoutError("jobs still pending or running")


def _first_row(context: Any, url: str) -> dict[str, float]:
    page = context.new_page()
    calls: list[str] = []
    page.on("request", lambda r: calls.append(r.url) if "/api/v1/jobs?" in r.url else None)
    page.goto(url)
    page.wait_for_selector("tr[data-job-id]", timeout=60_000)
    ms = float(page.evaluate("window.__firstRowMs"))
    before_first_row = len(calls)
    # Where the time went: the first list request (sent, answered) and the last script file's arrival.
    timing = page.evaluate(RESOURCE_TIMING)
    page.close()
    return {
        "ms": round(ms, 1),
        "list_requests": before_first_row,
        "list_requests_total": len(calls),
        **{k: round(float(v), 1) for k, v in timing.items()},
    }


def measure(url: str, token: str, runs: int) -> dict[str, list[dict[str, float]]]:
    """Per run: a new browser context opens the console link (cold: nothing cached), then opens it again in a new
    tab of the same context (warm: the console's files cached); a third context opens the oldest-first pages.
    Newest first is one request since ListJobs takes order_by=create_time desc."""
    from playwright.sync_api import sync_playwright

    link = f"{url}/console/#token={token}"
    results: dict[str, list[dict[str, float]]] = {mode: [] for mode in MODES}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path="/usr/bin/chromium", args=CHROMIUM_ARGS)
        try:
            for run in range(runs + 1):  # the first round warms the server's caches and is not reported
                context = browser.new_context(viewport={"width": 1360, "height": 900})
                context.add_init_script(FIRST_ROW_PROBE)
                round_ = {"newest_cold": _first_row(context, link), "newest_warm": _first_row(context, link)}
                context.close()
                context = browser.new_context(viewport={"width": 1360, "height": 900})
                context.add_init_script(FIRST_ROW_PROBE)
                context.add_init_script(f"sessionStorage.setItem('jobmesh.console.token', {json.dumps(token)})")
                round_["oldest"] = _first_row(context, f"{url}/console/#/jobs?order=oldest")
                context.close()
                if run:
                    for mode, r in round_.items():
                        results[mode].append(r)
                        log(
                            f"{mode}: first row after {r['ms']:.0f} ms ({r['list_requests']} list requests; scripts"
                            f" by {r['scripts_loaded_ms']:.0f} ms, list sent {r['list_sent_ms']:.0f}, answered"
                            f" {r['list_answered_ms']:.0f})"
                        )
        finally:
            browser.close()
    return results


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", help="an already running stack (else a private one is started)")
    parser.add_argument("--data-dir", type=Path, default=REPO / ".jobmesh", help="with --url: its data dir")
    parser.add_argument("--config", type=Path, default=REPO / "config" / "dev.toml")
    parser.add_argument("--tenant", default="acme")
    parser.add_argument("--count", type=int, default=10_000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--skip-store", action="store_true", help="measure only (the jobs are there already)")
    args = parser.parse_args()

    config = load_config(args.config)
    stack: Stack | None = None
    tmp = None
    if args.url:
        url, data_dir = args.url.rstrip("/"), args.data_dir
    else:
        tmp = tempfile.TemporaryDirectory(prefix="jobmesh-console-bench-")
        stack = Stack(data_dir=Path(tmp.name) / "stack", config_path=args.config, ports=Ports.free())
        log("starting a private stack ...")
        stack.start()
        url, data_dir = stack.url, stack.data_dir
    try:
        token = issue_token(data_dir, tenant=args.tenant, issuer=config.issuer, audience=config.audience, ttl=7200)
        admin = issue_token(data_dir, tenant=args.tenant, issuer=config.issuer, audience=config.audience, admin=True)
        stored_seconds = 0.0
        if not args.skip_store:
            limits = {"cpu_millis": 2_000_000, "memory_mb": 4_000_000, "concurrent_jobs": args.count + 1000}
            resp = httpx.put(
                f"{url}/api/v1/tenants/{args.tenant}/quotas",
                json={"limits": limits},
                headers={"Authorization": f"Bearer {admin}"},
                timeout=30,
            )
            resp.raise_for_status()
            target = url.split("://", 1)[1]
            stored_seconds = asyncio.run(store_jobs(target, token, args.count, args.concurrency))
            log(f"stored {args.count} jobs in {stored_seconds:.1f} s")
            wait_settled(url, token, timeout=1800)
        stored = count_state(url, token, "", limit_pages=1000)
        results = measure(url, token, args.runs)
    finally:
        if stack is not None:
            stack.stop()
        if tmp is not None:
            tmp.cleanup()
    summary = {
        "jobs_stored": stored,
        "store_seconds": round(stored_seconds, 1),
        **{f"{mode}_ms_median": statistics.median(r["ms"] for r in rs) for mode, rs in results.items()},
        "runs": results,
    }
    for mode, rs in results.items():
        median = summary[f"{mode}_ms_median"]
        print(f"{mode:>7}: first row median {median:.0f} ms over {len(rs)} runs: {[r['ms'] for r in rs]}")
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
