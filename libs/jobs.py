"""Pure job rules: ids, spec validation, state transitions. No I/O."""

from __future__ import annotations

import os
import re

from google.protobuf.timestamp_pb2 import Timestamp

from jobmesh.common.v1 import types_pb2 as t
from libs.config import MeshConfig
from libs.errors import InvalidArgument

TERMINAL = frozenset({t.JOB_STATE_SUCCEEDED, t.JOB_STATE_FAILED, t.JOB_STATE_CANCELLED})
ACTIVE = frozenset({t.JOB_STATE_PENDING, t.JOB_STATE_RUNNING})

# A job's message is kept up to this many characters (a failed attempt's ends with the tail of its stderr).
MAX_MESSAGE = 4096
MAX_NAME = 253
MAX_ARGS = 256
MAX_ARGV_BYTES = 64 * 1024
MAX_ENV = 128
MAX_ENV_BYTES = 64 * 1024
MAX_RUNTIME = 7 * 24 * 3600
MAX_RETRIES = 10
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,62})$")
_IDEM = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def new_job_id(now: float) -> str:
    """Time-ordered (millisecond prefix) so a tenant's jobs list in submission order."""
    return f"{int(now * 1000):012x}{os.urandom(5).hex()}"


def ts(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def validate_spec(spec: t.JobSpec, config: MeshConfig, now: float | None = None) -> None:
    """Raises InvalidArgument naming the first bad field."""
    size = spec.ByteSize()
    if size > config.max_spec_bytes:
        raise InvalidArgument(
            "spec",
            f"is {size} bytes; the limit is {config.max_spec_bytes} bytes ({config.max_spec_bytes // 1024} KiB)",
            reason="SPEC_TOO_LARGE",
        )
    if not spec.name.strip():
        raise InvalidArgument("name", "is required")
    if len(spec.name) > MAX_NAME:
        raise InvalidArgument("name", f"is longer than {MAX_NAME} characters")
    if not spec.command:
        raise InvalidArgument("command", "is required (a list: program and arguments)")
    if not spec.command[0]:
        raise InvalidArgument("command", "the program (first element) must not be empty")
    if len(spec.command) > MAX_ARGS:
        raise InvalidArgument("command", f"has more than {MAX_ARGS} arguments")
    if sum(len(a.encode()) for a in spec.command) > MAX_ARGV_BYTES:
        raise InvalidArgument("command", f"is larger than {MAX_ARGV_BYTES // 1024} KiB")
    if len(spec.env) > MAX_ENV:
        raise InvalidArgument("env", f"has more than {MAX_ENV} variables")
    if sum(len(k) + len(v.encode()) for k, v in spec.env.items()) > MAX_ENV_BYTES:
        raise InvalidArgument("env", f"is larger than {MAX_ENV_BYTES // 1024} KiB")
    for key in spec.env:
        if not _ENV_NAME.match(key):
            raise InvalidArgument("env", f"{key!r} is not a valid variable name")
    if not spec.HasField("resources"):
        raise InvalidArgument("resources", "is required (cpu_millis and memory_mb)")
    if spec.resources.cpu_millis <= 0:
        raise InvalidArgument("resources.cpu_millis", "must be greater than 0")
    if spec.resources.memory_mb <= 0:
        raise InvalidArgument("resources.memory_mb", "must be greater than 0")
    if spec.pool:
        pool = config.pool(spec.pool)
        if pool is None:
            raise InvalidArgument("pool", f"unknown pool {spec.pool!r}")
        candidates = [pool]
    else:
        candidates = list(config.pools)
    for key, value in spec.required_capabilities.items():
        if not _LABEL.match(key) or len(value) > 63:
            raise InvalidArgument("required_capabilities", f"{key!r} is not a valid label")
    fitting = [
        p
        for p in candidates
        if p.worker_cpu_millis >= spec.resources.cpu_millis
        and p.worker_memory_mb >= spec.resources.memory_mb
        and all(p.labels.get(k) == v for k, v in spec.required_capabilities.items())
    ]
    if not fitting:
        where = f"pool {spec.pool!r}" if spec.pool else "any pool"
        raise InvalidArgument(
            "resources",
            f"no worker in {where} has {spec.resources.cpu_millis}m CPU, "
            f"{spec.resources.memory_mb} MB and the required capabilities",
            reason="UNSCHEDULABLE",
        )
    if spec.max_runtime_seconds < 0 or spec.max_runtime_seconds > MAX_RUNTIME:
        raise InvalidArgument("max_runtime_seconds", f"must be between 0 and {MAX_RUNTIME}")
    if spec.max_retries < 0 or spec.max_retries > MAX_RETRIES:
        raise InvalidArgument("max_retries", f"must be between 0 and {MAX_RETRIES}")
    if spec.idempotency_key and not _IDEM.match(spec.idempotency_key):
        raise InvalidArgument("idempotency_key", "must be 1-128 characters of [A-Za-z0-9._:-]")
    if spec.working_dir and not spec.working_dir.startswith("/"):
        raise InvalidArgument("working_dir", "must be an absolute path")
    if spec.sla_tier and spec.sla_tier not in config.sla_tiers:
        raise InvalidArgument("sla_tier", f"must be one of {', '.join(sorted(config.sla_tiers))}")
    if now is not None and spec.HasField("deadline") and spec.deadline.ToNanoseconds() / 1e9 <= now:
        raise InvalidArgument("deadline", "is already in the past")
    if abs(spec.priority) > 1000:
        raise InvalidArgument("priority", "must be between -1000 and 1000")


def fits(capacity: t.Resources, labels: dict[str, str], spec: t.JobSpec) -> bool:
    return (
        capacity.cpu_millis >= spec.resources.cpu_millis
        and capacity.memory_mb >= spec.resources.memory_mb
        and all(labels.get(k) == v for k, v in spec.required_capabilities.items())
    )


def decode_job(raw: bytes) -> t.Job:
    job = t.Job()
    job.ParseFromString(raw)
    return job


def current_attempt(job: t.Job) -> t.AttemptRecord | None:
    for record in reversed(job.attempts):
        if record.attempt == job.attempt:
            return record
    return None


def apply_dispatch(job: t.Job, worker: t.Worker, now: float) -> t.Job:
    """PENDING -> RUNNING on a worker, as a new attempt."""
    job.state = t.JOB_STATE_RUNNING
    job.attempt += 1
    job.worker_id = worker.worker_id
    job.pool_id = worker.pool_id
    job.start_time.CopyFrom(ts(now))
    job.ClearField("end_time")
    job.update_time.CopyFrom(ts(now))
    job.waiting_reason = ""
    job.reason = ""
    job.message = ""
    job.attempts.append(
        t.AttemptRecord(attempt=job.attempt, worker_id=worker.worker_id, pool_id=worker.pool_id, start_time=ts(now))
    )
    return job


# INTERRUPTED: a draining worker stopped the attempt after its grace (or gave it back before starting it), or a
# worker that could not refresh its lease stopped it before the lease could expire (self-fencing).
INTERRUPTED = "INTERRUPTED"
# OOM_KILLED: the kernel killed a process of the job at its memory limit (a sandboxed job's cgroup).
RESULT_REASONS = {"EXITED", "KILLED", "TIMEOUT", "START_FAILED", "OOM_KILLED", INTERRUPTED}
# Interruptions retried without using up max_retries; past them an interruption counts as a retry, so a job that
# keeps landing on workers being drained cannot bounce for ever.
FREE_INTERRUPTIONS = 3


def apply_result(
    job: t.Job, *, exit_code: int, reason: str, message: str, cpu_seconds: float, max_memory_mb: int, now: float
) -> t.Job:
    """RUNNING -> SUCCEEDED or FAILED from a worker's report of the current attempt; an INTERRUPTED attempt goes
    back to PENDING (see `apply_interrupted`)."""
    if reason == INTERRUPTED:
        return apply_interrupted(job, message=message, cpu_seconds=cpu_seconds, max_memory_mb=max_memory_mb, now=now)
    succeeded = reason == "EXITED" and exit_code == 0
    job.state = t.JOB_STATE_SUCCEEDED if succeeded else t.JOB_STATE_FAILED
    job.exit_code = exit_code
    job.reason = "COMPLETED" if succeeded else ("EXIT_CODE" if reason == "EXITED" else reason)
    job.message = message[:MAX_MESSAGE]
    job.end_time.CopyFrom(ts(now))
    job.update_time.CopyFrom(ts(now))
    record = current_attempt(job)
    if record is not None:
        record.end_time.CopyFrom(ts(now))
        record.exit_code = exit_code
        record.reason = job.reason
        record.cpu_seconds = cpu_seconds
        record.max_memory_mb = max_memory_mb
    return job


def apply_interrupted(job: t.Job, *, message: str, cpu_seconds: float, max_memory_mb: int, now: float) -> t.Job:
    """RUNNING -> PENDING: the worker stopped the current attempt for its own reasons (drain, self-fencing), not
    the job's. The attempt ends (charged for what it ran) and the job waits for a new one, without using a retry
    for the first FREE_INTERRUPTIONS of them; after those, as a lost worker's job: a retry, or FAILED."""
    record = current_attempt(job)
    if record is not None:
        record.end_time.CopyFrom(ts(now))
        record.reason = INTERRUPTED
        record.exit_code = -1
        record.cpu_seconds = cpu_seconds
        record.max_memory_mb = max_memory_mb
    job.update_time.CopyFrom(ts(now))
    job.interruptions += 1
    free = job.interruptions <= FREE_INTERRUPTIONS
    if free or job.retries < job.spec.max_retries:
        if not free:
            job.retries += 1
        job.state = t.JOB_STATE_PENDING
        job.worker_id = ""
        job.waiting_reason = "RETRYING_AFTER_INTERRUPTION"
        job.message = f"attempt {job.attempt} interrupted by its worker ({message[:200]}); retrying"
    else:
        job.state = t.JOB_STATE_FAILED
        job.reason = INTERRUPTED
        job.exit_code = -1
        job.message = f"attempt {job.attempt} interrupted by its worker and no retries are left"
        job.end_time.CopyFrom(ts(now))
    return job


def apply_worker_lost(job: t.Job, now: float) -> t.Job:
    """The worker running the current attempt is gone: retry as a new attempt, or fail with WORKER_LOST."""
    record = current_attempt(job)
    if record is not None:
        record.end_time.CopyFrom(ts(now))
        record.reason = "WORKER_LOST"
        record.exit_code = -1
    job.update_time.CopyFrom(ts(now))
    if job.retries < job.spec.max_retries:
        job.retries += 1
        job.state = t.JOB_STATE_PENDING
        job.worker_id = ""
        job.waiting_reason = "RETRYING_AFTER_WORKER_LOST"
        job.message = f"worker lost during attempt {job.attempt}; retry {job.retries} of {job.spec.max_retries}"
    else:
        job.state = t.JOB_STATE_FAILED
        job.reason = "WORKER_LOST"
        job.exit_code = -1
        job.message = f"worker lost during attempt {job.attempt} and no retries are left"
        job.end_time.CopyFrom(ts(now))
    return job


DEFAULT_QUEUE = "default"


def assign_queue(spec: t.JobSpec, config: MeshConfig) -> str:
    """A pinned job queues for its pool; one that fits a static pool queues in `default` (static first, dynamic
    overflow); one only a dynamic pool can run queues for that pool, which is what makes it scale."""
    if spec.pool:
        return spec.pool
    fitting = [
        p
        for p in config.pools
        if p.worker_cpu_millis >= spec.resources.cpu_millis
        and p.worker_memory_mb >= spec.resources.memory_mb
        and all(p.labels.get(k) == v for k, v in spec.required_capabilities.items())
    ]
    if not fitting or any(p.kind == "static" for p in fitting):
        return DEFAULT_QUEUE
    # Dynamic before burst: burst capacity is the last resort, and only for some jobs.
    return min(fitting, key=lambda p: p.kind == "burst").pool_id
