"""One submit is one trace: the gateway's span context reaches quota and queueing over gRPC metadata (through
the batched calls that carry submits to them)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from tests.helpers import FAST_FAILOVER, Api, job_spec, start_stack, token, wait_for


def spans(log: Path) -> list[dict[str, object]]:
    """Console-exported spans (multi-line JSON objects) from a service's log."""
    text = log.read_text(errors="replace")
    found = []
    for match in re.finditer(r'^\{\n    "name": .*?^\}$', text, re.MULTILINE | re.DOTALL):
        try:
            found.append(json.loads(match.group(0)))
        except json.JSONDecodeError:
            continue
    return found


def test_a_submit_is_one_trace_across_gateway_quota_and_queueing(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "stack", env={**FAST_FAILOVER, "JOBMESH_OTEL_EXPORTER": "console"})
    try:
        api = Api(stack.url, token(stack))
        job = api.submit(job_spec("traced", ["true"]))
        api.wait_terminal(job["job_id"])
        logs = stack.log_dir
        accepted = next(
            json.loads(line)
            for line in (logs / "gateway.log").read_text().splitlines()
            if line.startswith('{"ts"') and job["job_id"] in line and "job accepted" in line
        )
        trace_id = "0x" + accepted["trace_id"]
        # The replicas that served the submit.
        leaders = {kind: stack.wait_leader(kind) for kind in ("quota", "queueing")}

        def names_in(service: str) -> set[str]:
            log = logs / f"{leaders.get(service, service)}.log"
            return {str(s["name"]) for s in spans(log) if s["context"]["trace_id"] == trace_id}  # type: ignore[index]

        wait_for(
            lambda: all(names_in(s) for s in ("gateway", "quota", "queueing")),
            timeout=15,
            what="every batch exporter to flush",
        )
        # Submits reach quota and queueing in batched calls; each call's span is in the trace of the submit
        # that opened its batch (and linked from the others).
        assert {"/jobmesh.gateway.v1.JobService/SubmitJob", "reserve batch", "enqueue batch"} <= names_in("gateway")
        assert "/jobmesh.quota.v1.QuotaService/ReserveMany" in names_in("quota")
        assert "/jobmesh.queueing.v1.QueueingService/EnqueueMany" in names_in("queueing")
        # Parent links: the quota span's parent is a span of the same trace started in the gateway.
        gateway_ids = {s["context"]["span_id"] for s in spans(logs / "gateway.log")}  # type: ignore[index]
        quota_span = next(s for s in spans(logs / f"{leaders['quota']}.log") if s["context"]["trace_id"] == trace_id)  # type: ignore[index]
        assert quota_span["parent_id"] in gateway_ids
    finally:
        stack.stop()
