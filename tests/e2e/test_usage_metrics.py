"""What tenants' jobs used, measured, in the mesh's Prometheus exposition: CPU seconds and memory by tenant and pool,
and the execution time histogram, counted when the attempt's cost is recorded; the whole exposition passes
`promtool check metrics`."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.helpers import Api, job_spec, start_stack, token, wait_for, without_sandbox
from tests.tools import require_tool

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BUSY = "i=0; while [ $i -lt 300000 ]; do i=$((i+1)); done"


def samples(text: str, name: str, tenant: str) -> list[float]:
    return [
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith(name + "{") and f'tenant="{tenant}"' in line
    ]


def test_measured_usage_and_run_time_are_exported_per_tenant_and_pass_promtool(tmp_path: Path) -> None:
    promtool = require_tool("promtool", "Debian package `prometheus`; .ci/run installs it")
    stack = start_stack(tmp_path / "stack", config=without_sandbox(FIXTURES / "backlog.toml", tmp_path))
    try:
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
    finally:
        stack.stop()
