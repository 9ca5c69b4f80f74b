"""One submit is one trace: the gateway's span context reaches quota and queueing over gRPC metadata (through
the batched calls that carry submits to them)."""

from __future__ import annotations

import json
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

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
        # The replicas that served the submit: the gateway Envoy sent it to, and the quota and queueing leaders.
        accepted, gateway = next(
            (json.loads(line), name)
            for name in ("gateway-1", "gateway-2")
            for line in (logs / f"{name}.log").read_text().splitlines()
            if line.startswith('{"ts"') and job["job_id"] in line and "job accepted" in line
        )
        trace_id = "0x" + accepted["trace_id"]
        leaders = {"gateway": gateway, **{kind: stack.wait_leader(kind) for kind in ("quota", "queueing")}}

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
        gateway_ids = {s["context"]["span_id"] for s in spans(logs / f"{gateway}.log")}  # type: ignore[index]
        quota_span = next(s for s in spans(logs / f"{leaders['quota']}.log") if s["context"]["trace_id"] == trace_id)  # type: ignore[index]
        assert quota_span["parent_id"] in gateway_ids
    finally:
        stack.stop()


def test_a_job_is_one_trace_from_submit_to_cost(tmp_path: Path) -> None:
    """The hops no request carries (the scheduler's dispatch, the worker's run, the pool-manager's result, the
    cost service's charge) join the trace of the submit through the job record's trace_parent."""
    stack = start_stack(tmp_path / "stack", env={**FAST_FAILOVER, "JOBMESH_OTEL_EXPORTER": "console"})
    try:
        api = Api(stack.url, token(stack))
        job = api.wait_terminal(api.submit(job_spec("traced-to-cost", ["true"]))["job_id"])
        assert job["state"] == "JOB_STATE_SUCCEEDED"
        trace_id = "0x" + job["trace_parent"].split("-")[1]
        logs = sorted(stack.log_dir.glob("*.log"))

        def names() -> set[str]:
            return {
                str(s["name"])
                for log in logs
                for s in spans(log)
                if s["context"]["trace_id"] == trace_id  # type: ignore[index]
            }

        wanted = {"/jobmesh.gateway.v1.JobService/SubmitJob", "dispatch", "run job", "record result", "charge attempt"}
        wait_for(lambda: wanted <= names(), timeout=30, what=f"spans {sorted(wanted)} in one trace")
        # The worker's run is a child of the submit's span, in the same trace as the gateway's.
        runs = [s for log in logs for s in spans(log) if s["name"] == "run job"]
        assert [s["context"]["trace_id"] for s in runs] == [trace_id]  # type: ignore[index]
    finally:
        stack.stop()


class Collector(trace_service_pb2_grpc.TraceServiceServicer):
    """An OTLP/gRPC trace receiver in the test process: (service, span name, trace id) of every span it is sent."""

    def __init__(self) -> None:
        self.spans: list[tuple[str, str, str]] = []

    def Export(self, request: trace_service_pb2.ExportTraceServiceRequest, context: grpc.ServicerContext) -> Any:
        for resource_spans in request.resource_spans:
            attributes = {a.key: a.value.string_value for a in resource_spans.resource.attributes}
            for scope in resource_spans.scope_spans:
                for span in scope.spans:
                    self.spans.append((attributes.get("service.name", ""), span.name, span.trace_id.hex()))
        return trace_service_pb2.ExportTraceServiceResponse()


def test_over_otlp_a_job_is_one_trace_from_envoys_span_to_its_cost(tmp_path: Path) -> None:
    collector = Collector()
    server = grpc.server(ThreadPoolExecutor(max_workers=4))
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(collector, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    env = {**FAST_FAILOVER, "JOBMESH_OTEL_EXPORTER": "otlp", "JOBMESH_OTEL_ENDPOINT": f"127.0.0.1:{port}"}
    stack = start_stack(tmp_path / "stack", env=env)
    try:
        api = Api(stack.url, token(stack))
        job = api.wait_terminal(api.submit(job_spec("traced-over-otlp", ["true"]))["job_id"])
        trace_id = job["trace_parent"].split("-")[1]

        def services() -> set[str]:
            return {service for service, _, tid in list(collector.spans) if tid == trace_id}

        wanted = {"envoy", "gateway", "quota", "queueing", "scheduler", "poolmanager", "worker", "cost"}
        wait_for(lambda: wanted <= services(), timeout=40, what=f"spans of {sorted(wanted)} in one trace")
        # Envoy's span is the root: the submit's gateway span is its child, in the same trace.
        envoy = [name for service, name, tid in collector.spans if service == "envoy" and tid == trace_id]
        assert envoy, collector.spans
    finally:
        stack.stop()
        server.stop(0)
