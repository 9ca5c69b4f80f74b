"""What the sync and the asyncio client share: settings, the channel's options, and how requests are built."""

from __future__ import annotations

import base64
import json
import os
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Required, TypedDict, Unpack
from urllib.parse import urlsplit

from google.protobuf import timestamp_pb2

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.errors import InvalidArgument, JobmeshError
from jobmesh.gateway.v1 import gateway_pb2 as g

DEFAULT_URL = "http://127.0.0.1:8080"
# Every call has a deadline; streams (watch, logs) have none unless the caller gives one.
DEFAULT_TIMEOUT = 30.0
TERMINAL = frozenset({t.JOB_STATE_SUCCEEDED, t.JOB_STATE_FAILED, t.JOB_STATE_CANCELLED})
PAGE_SIZE = 500

# Idempotent calls are retried by gRPC itself when the mesh could not be reached (UNAVAILABLE): reads, cancels, dry
# runs, and submits (each carries an idempotency key, so a retried submit never makes a second job).
_IDEMPOTENT = {
    "jobmesh.gateway.v1.JobService": ["SubmitJob", "GetJob", "ListJobs", "CancelJob", "DryRunJob"],
    "jobmesh.gateway.v1.TenantService": ["GetQuota", "GetBudget"],
    "jobmesh.gateway.v1.PoolService": ["ListPools", "GetPoolMetrics", "GetScalingHistory"],
    "jobmesh.gateway.v1.CostService": ["GetCostReports"],
}
SERVICE_CONFIG = json.dumps(
    {
        "methodConfig": [
            {
                "name": [{"service": s, "method": m} for s, methods in _IDEMPOTENT.items() for m in methods],
                "retryPolicy": {
                    "maxAttempts": 4,
                    "initialBackoff": "0.2s",
                    "maxBackoff": "2s",
                    "backoffMultiplier": 2,
                    "retryableStatusCodes": ["UNAVAILABLE"],
                },
            }
        ]
    }
)
CHANNEL_OPTIONS = [
    ("grpc.service_config", SERVICE_CONFIG),
    ("grpc.enable_retries", 1),
    ("grpc.max_receive_message_length", 16 * 1024 * 1024),
    ("grpc.keepalive_time_ms", 30_000),
]


@dataclass(frozen=True)
class Target:
    address: str  # host:port
    secure: bool


def target_of(url: str | None) -> Target:
    """`http://host:port` (plaintext HTTP/2, as `make run` serves) or `https://host[:port]` (TLS)."""
    raw = url or os.environ.get("JOBMESH_URL") or DEFAULT_URL
    parts = urlsplit(raw if "://" in raw else f"http://{raw}")
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise InvalidArgument(f"not a mesh URL: {raw!r} (expected http://host:port or https://host)", reason="BAD_URL")
    port = parts.port or (443 if parts.scheme == "https" else 80)
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    return Target(f"{host}:{port}", parts.scheme == "https")


def metadata_of(token: str | None) -> tuple[tuple[str, str], ...]:
    token = token if token is not None else os.environ.get("JOBMESH_TOKEN", "")
    return (("authorization", f"Bearer {token}"),) if token else ()


def tenant_of(token: str | None) -> str:
    """The tenant claim of a bearer token (read, not verified: the mesh verifies it)."""
    token = token if token is not None else os.environ.get("JOBMESH_TOKEN", "")
    try:
        payload = token.split(".")[1]
        claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        return str(claims.get("tenant", ""))
    except (IndexError, ValueError):
        return ""


def job_state(state: str | int | None) -> t.JobState.ValueType:
    """A state as `RUNNING`, `running`, `JOB_STATE_RUNNING` or the enum's number; None: any."""
    if state is None or state == "":
        return t.JOB_STATE_UNSPECIFIED
    if isinstance(state, int):
        return t.JobState.ValueType(state)
    name = state.upper()
    name = name if name.startswith("JOB_STATE_") else f"JOB_STATE_{name}"
    try:
        return t.JobState.Value(name)
    except ValueError:
        known = ", ".join(n.removeprefix("JOB_STATE_") for n in t.JobState.keys() if not n.endswith("UNSPECIFIED"))
        raise InvalidArgument(f"unknown job state {state!r} (one of {known})", metadata={"field": "state"}) from None


def timestamp(value: datetime | str) -> timestamp_pb2.Timestamp:
    stamp = timestamp_pb2.Timestamp()
    try:
        if isinstance(value, datetime):
            stamp.FromDatetime(value)
        else:
            stamp.FromJsonString(value)
    except ValueError as exc:
        raise InvalidArgument(f"deadline: not an RFC 3339 time: {value!r}", metadata={"field": "deadline"}) from exc
    return stamp


class SubmitArgs(TypedDict, total=False):
    """The keyword arguments of `submit` and `dry_run` (name, cpu_millis and memory_mb are required)."""

    name: Required[str]
    cpu_millis: Required[int]
    memory_mb: Required[int]
    env: Mapping[str, str] | None
    pool: str | None
    sla_tier: str | None
    # RFC 3339 string or datetime: the job should start by then.
    deadline: datetime | str | None
    burst: bool
    max_runtime_seconds: int | None
    max_retries: int | None
    # The failure reasons max_retries retries (e.g. ["WORKER_LOST"]); None or empty: every retryable reason.
    retry_on: Sequence[str] | None
    idempotency_key: str | None


def job_spec(command: Sequence[str], **args: Unpack[SubmitArgs]) -> t.JobSpec:
    """A job spec from submit's arguments. A submit without an idempotency key gets a fresh one, so that the
    retries of one call (ours or gRPC's) never make two jobs."""
    if isinstance(command, str):
        raise InvalidArgument("command must be a list of arguments, not a string", metadata={"field": "command"})
    retry_on = args.get("retry_on") or []
    if isinstance(retry_on, str):
        raise InvalidArgument("retry_on must be a list of reasons, not a string", metadata={"field": "retry_on"})
    spec = t.JobSpec(
        name=args["name"],
        command=list(command),
        env=dict(args.get("env") or {}),
        resources=t.Resources(cpu_millis=args["cpu_millis"], memory_mb=args["memory_mb"]),
        pool=args.get("pool") or "",
        sla_tier=args.get("sla_tier") or "",
        burst=bool(args.get("burst")),
        max_runtime_seconds=args.get("max_runtime_seconds") or 0,
        max_retries=args.get("max_retries") or 0,
        retry_on=list(retry_on),
        idempotency_key=args.get("idempotency_key") or new_idempotency_key(),
    )
    deadline = args.get("deadline")
    if deadline is not None:
        spec.deadline.CopyFrom(timestamp(deadline))
    return spec


def new_idempotency_key() -> str:
    return f"client-{uuid.uuid4()}"


def burst_request(
    tenant: str, cpu_millis: int, memory_mb: int, concurrent_jobs: int, duration_seconds: int
) -> g.RequestBurstRequest:
    return g.RequestBurstRequest(
        tenant_id=tenant,
        cpu_millis=cpu_millis,
        memory_mb=memory_mb,
        concurrent_jobs=concurrent_jobs,
        duration_seconds=duration_seconds,
    )


def tenant_or_own(tenant: str | None, token: str | None) -> str:
    tenant = tenant or tenant_of(token)
    if not tenant:
        raise InvalidArgument("no tenant given and the token names none", metadata={"field": "tenant_id"})
    return tenant


def is_over(job: t.Job) -> bool:
    return job.state in TERMINAL


def ended_early(job: t.Job | None) -> JobmeshError:
    """A watch stream that closed before the job ended (the edge ends idle streams after an hour)."""
    return JobmeshError(f"the watch of job {job.job_id if job else '?'} ended early", reason="WATCH_ENDED")
