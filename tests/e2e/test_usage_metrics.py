"""What tenants' jobs used, measured, in the mesh's Prometheus exposition: CPU seconds and memory by tenant and pool,
and the execution time histogram, counted when the attempt's cost is recorded; the whole exposition passes
`promtool check metrics`. And what a running job has used so far, sampled by its worker: a job that uses more CPU
than it asked for costs more than its request before it ends, in its own cost and in its tenant's running cost."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from devtools.launcher import Stack
from libs.config import load_config
from services.cost.pricing import AttemptUsage, price_attempt
from tests.helpers import FAST_FAILOVER, Api, job_spec, start_stack, token, wait_for, without_sandbox
from tests.tools import require_tool

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BUSY = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"
# A whole core, for as long as it is let run (unsandboxed: no cgroup holds it to the 100 millicores it asks for).
SPIN = "while :; do :; done"


def samples(text: str, name: str, tenant: str) -> list[float]:
    return [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and f'tenant="{tenant}"' in line
    ]


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """One static worker running jobs unsandboxed; usage samples written and cost gauges published every second."""
    tmp = tmp_path_factory.mktemp("usage")
    env = dict(FAST_FAILOVER, JOBMESH_USAGE_SAMPLE_SECONDS="1", JOBMESH_COST_CYCLE_SECONDS="1")
    stack = start_stack(tmp / "stack", env=env, config=without_sandbox(FIXTURES / "backlog.toml", tmp))
    try:
        yield stack
    finally:
        stack.stop()


def test_measured_usage_and_run_time_are_exported_per_tenant_and_pass_promtool(stack: Stack) -> None:
    promtool = require_tool("promtool", "Debian package `prometheus`; .ci/run installs it")
    api = Api(stack.url, token(stack))
    admin = Api(stack.url, token(stack, admin=True))
    job = api.wait_terminal(api.submit(job_spec("busy", ["sh", "-c", BUSY]))["job_id"])
    assert job["state"] == "JOB_STATE_SUCCEEDED"

    def exposition() -> str:
        return admin.call("GET", "/api/v1/metrics/prometheus").text

    wait_for(
        lambda: sum(samples(exposition(), "jobmesh_job_execution_seconds_count", "acme")) >= 1,
        timeout=30,
        what="the attempt's cost record",
    )
    text = exposition()
    assert sum(samples(text, "jobmesh_cost_used_cpu_seconds_total", "acme")) > 0
    assert sum(samples(text, "jobmesh_cost_used_memory_byte_seconds_total", "acme")) > 0
    assert sum(samples(text, "jobmesh_job_execution_seconds_sum", "acme")) > 0
    assert samples(text, "jobmesh_cost_used_cpu_seconds_total", "globex") == []  # no job of theirs ran
    checked = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_running_job_using_more_cpu_than_it_asked_for_costs_more_than_its_request_before_it_ends(
    stack: Stack,
) -> None:
    api = Api(stack.url, token(stack))
    admin = Api(stack.url, token(stack, admin=True))
    pool = load_config(stack.config_path).pool("static-only")
    assert pool is not None
    # 100 millicores and 64 MB asked for; stopped by its time limit, so that its worker reports what it used.
    spec = job_spec("spin", ["sh", "-c", SPIN], max_runtime_seconds=15)
    job_id = api.submit(spec)["job_id"]

    def at_request(job: dict[str, Any]) -> int:
        """What the running attempt would have cost by now at the resources it asked for."""
        (attempt,) = [c for c in job["cost"]["attempts"] if c["attempt"] == job["attempt"]]
        usage = AttemptUsage(attempt["run_seconds"], requested_cpu_millis=100, requested_memory_mb=64)
        return price_attempt(usage, pool.pricing, burst_premium=1.0)

    def running_above_request() -> dict[str, Any] | None:
        job = api.get(job_id)
        assert job["state"] in ("JOB_STATE_PENDING", "JOB_STATE_RUNNING"), job
        if job["state"] != "JOB_STATE_RUNNING" or not job.get("cost", {}).get("attempts"):
            return None
        return job if int(job["cost"]["total"]["micros"]) > at_request(job) else None

    def gauge_above_request() -> bool:
        text = admin.call("GET", "/api/v1/metrics/prometheus").text
        gauge = sum(samples(text, "jobmesh_cost_tenant_running_micros", "acme"))
        # Read after the gauge: what the request would have cost by now bounds what it cost when the gauge was set.
        return gauge > at_request(api.get(job_id))

    try:
        running = wait_for(running_above_request, timeout=15, what="the running cost to pass the request's")
        assert wait_for(gauge_above_request, timeout=15, what="the tenant's running cost to pass the request's")
        assert api.get(job_id)["state"] == "JOB_STATE_RUNNING"  # all of this before it ended
    except BaseException:
        api.cancel(job_id)
        raise
    done = api.wait_terminal(job_id)
    assert (done["state"], done["reason"]) == ("JOB_STATE_FAILED", "TIMEOUT")
    assert done["attempts"][0]["cpu_seconds"] > 1.0  # measured: its final charge is at max(requested, used) too
    # ... and at least what it showed while it ran.
    assert int(done["cost"]["total"]["micros"]) >= int(running["cost"]["total"]["micros"]) > at_request(running)
