"""Every state change of a job record, as a pure function of the record and the time (no I/O).

    (none) --create--> PENDING --dispatch--> RUNNING --result--> SUCCEEDED | FAILED
                          ^                     |
                          +--- interrupted -----+  (drain, self-fencing: free for FREE_INTERRUPTIONS, then a retry)
                          +--- worker lost -----+  (a retry, or FAILED with WORKER_LOST)
    PENDING | RUNNING --cancel--> CANCELLED;  PENDING --deadline passed--> PENDING with sla_miss

Each function mutates and returns the record it is given; callers that must keep the original copy it first."""

from __future__ import annotations

from jobmesh.common.v1 import types_pb2 as t
from libs.jobs import MAX_MESSAGE, ts

TERMINAL = frozenset({t.JOB_STATE_SUCCEEDED, t.JOB_STATE_FAILED, t.JOB_STATE_CANCELLED})
ACTIVE = frozenset({t.JOB_STATE_PENDING, t.JOB_STATE_RUNNING})

# INTERRUPTED: a draining worker stopped the attempt after its grace (or gave it back before starting it), or a
# worker that could not refresh its lease stopped it before the lease could expire (self-fencing).
INTERRUPTED = "INTERRUPTED"
# OOM_KILLED: the kernel killed a process of the job at its memory limit (a sandboxed job's cgroup).
RESULT_REASONS = {"EXITED", "KILLED", "TIMEOUT", "START_FAILED", "OOM_KILLED", INTERRUPTED}
# Interruptions retried without using up max_retries; past them an interruption counts as a retry, so a job that
# keeps landing on workers being drained cannot bounce for ever.
FREE_INTERRUPTIONS = 3
# Waiting reasons the lifecycle writes on a PENDING record (the queueing service derives the others on read).
QUEUED = "QUEUED"
RETRYING_AFTER_WORKER_LOST = "RETRYING_AFTER_WORKER_LOST"
RETRYING_AFTER_INTERRUPTION = "RETRYING_AFTER_INTERRUPTION"
DEADLINE_MISSED = "DEADLINE_MISSED"


def new_record(*, job_id: str, tenant_id: str, spec: t.JobSpec, queue: str, burst_session_id: str, now: float) -> t.Job:
    """(none) -> PENDING: the record a validated, admitted spec is stored as."""
    return t.Job(
        job_id=job_id,
        tenant_id=tenant_id,
        state=t.JOB_STATE_PENDING,
        spec=spec,
        create_time=ts(now),
        update_time=ts(now),
        waiting_reason=QUEUED,
        queue=queue,
        burst_session_id=burst_session_id,
    )


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


def new_assignment(job: t.Job, now: float) -> t.Assignment:
    """The worker's copy of a dispatched attempt. It carries the job record as dispatched, so the result can be
    recorded without reading the job (see docs/architecture.md, "Assignment.job")."""
    return t.Assignment(
        job_id=job.job_id,
        tenant_id=job.tenant_id,
        attempt=job.attempt,
        worker_id=job.worker_id,
        spec=job.spec,
        assign_time=ts(now),
        job=job,
    )


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
        why = f"attempt {job.attempt} interrupted by its worker ({message[:200]}); retrying"
        _wait_again(job, RETRYING_AFTER_INTERRUPTION, why)
    else:
        _fail(job, INTERRUPTED, f"attempt {job.attempt} interrupted by its worker and no retries are left", now)
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
        why = f"worker lost during attempt {job.attempt}; retry {job.retries} of {job.spec.max_retries}"
        _wait_again(job, RETRYING_AFTER_WORKER_LOST, why)
    else:
        _fail(job, "WORKER_LOST", f"worker lost during attempt {job.attempt} and no retries are left", now)
    return job


def _wait_again(job: t.Job, waiting_reason: str, message: str) -> None:
    """RUNNING -> PENDING for a new attempt."""
    job.state = t.JOB_STATE_PENDING
    job.worker_id = ""
    job.waiting_reason = waiting_reason
    job.message = message


def _fail(job: t.Job, reason: str, message: str, now: float) -> None:
    """RUNNING -> FAILED for a reason of the worker's, not the job's own exit."""
    job.state = t.JOB_STATE_FAILED
    job.reason = reason
    job.exit_code = -1
    job.message = message
    job.end_time.CopyFrom(ts(now))


def apply_cancel(job: t.Job, now: float) -> t.Job:
    """PENDING or RUNNING -> CANCELLED at the user's request; a running attempt ends as CANCELLED."""
    if job.state == t.JOB_STATE_RUNNING and job.worker_id:
        for record in job.attempts:
            if record.attempt == job.attempt and not record.HasField("end_time"):
                record.end_time.CopyFrom(ts(now))
                record.reason = "CANCELLED"
    job.state = t.JOB_STATE_CANCELLED
    job.reason = "CANCELLED_BY_USER"
    job.message = "cancelled by request"
    job.end_time.CopyFrom(ts(now))
    job.update_time.CopyFrom(ts(now))
    job.waiting_reason = ""
    return job


def apply_deadline_missed(job: t.Job, now: float) -> t.Job:
    """PENDING stays PENDING, marked: its deadline passed while it waited (it still runs, first among urgent)."""
    job.sla_miss = True
    job.waiting_reason = DEADLINE_MISSED
    job.update_time.CopyFrom(ts(now))
    return job
