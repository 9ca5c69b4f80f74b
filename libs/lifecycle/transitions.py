"""Every state change of a job record, as a pure function of the record and the time (no I/O).

    (none) --create--> PENDING --dispatch--> RUNNING --result--> SUCCEEDED | FAILED
                          ^                     |
                          +--- failed ----------+  (a retry after a backoff while max_retries allow, see _retry)
                          +--- interrupted -----+  (drain, self-fencing: free for FREE_INTERRUPTIONS, then a retry)
                          +--- worker lost -----+  (a retry, or FAILED with WORKER_LOST)
    PENDING | RUNNING --cancel--> CANCELLED;  PENDING --deadline passed--> PENDING with sla_miss

Each function mutates and returns the record it is given; callers that must keep the original copy it first."""

from __future__ import annotations

from google.protobuf.timestamp_pb2 import Timestamp

from jobmesh.common.v1 import types_pb2 as t
from libs.config import RetryBackoff
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
# The reasons an attempt can fail for that max_retries may retry (what a spec's retry_on may list): the job's own
# failures and its worker's. A cancel (KILLED, CANCELLED) is the user's word and is never retried.
RETRYABLE = ("EXIT_CODE", "OOM_KILLED", "TIMEOUT", "START_FAILED", "WORKER_LOST", INTERRUPTED)
# The backoff when the caller names none (the defaults of the config's [retries] table).
DEFAULT_BACKOFF = RetryBackoff()
# Waiting reasons the lifecycle writes on a PENDING record (the queueing service derives the others on read).
QUEUED = "QUEUED"
RETRYING_AFTER_WORKER_LOST = "RETRYING_AFTER_WORKER_LOST"
RETRYING_AFTER_FAILURE = "RETRYING_AFTER_FAILURE"
RETRYING_AFTER_INTERRUPTION = "RETRYING_AFTER_INTERRUPTION"
DEADLINE_MISSED = "DEADLINE_MISSED"
# The waiting reason of a retry, by why its attempt ended: the worker's reasons have their own, the job's own
# failures (EXIT_CODE, OOM_KILLED, TIMEOUT, START_FAILED) share RETRYING_AFTER_FAILURE.
RETRYING_AFTER = {"WORKER_LOST": RETRYING_AFTER_WORKER_LOST, INTERRUPTED: RETRYING_AFTER_INTERRUPTION}


def new_record(
    *,
    job_id: str,
    tenant_id: str,
    spec: t.JobSpec,
    queue: str,
    burst_session_id: str,
    now: float,
    trace_parent: str = "",
) -> t.Job:
    """(none) -> PENDING: the record a validated, admitted spec is stored as (in the trace of its submit)."""
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
        trace_parent=trace_parent,
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
    job.ClearField("next_attempt_time")
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
        trace_parent=job.trace_parent,
    )


def apply_result(
    job: t.Job,
    *,
    exit_code: int,
    reason: str,
    message: str,
    cpu_seconds: float,
    max_memory_mb: int,
    now: float,
    backoff: RetryBackoff = DEFAULT_BACKOFF,
) -> t.Job:
    """RUNNING -> SUCCEEDED, FAILED, or back to PENDING for a retry (a failure the spec retries, while retries
    are left: see `_retry`) from a worker's report of the current attempt; an INTERRUPTED attempt goes
    back to PENDING (see `apply_interrupted`)."""
    if reason == INTERRUPTED:
        return apply_interrupted(job, message, now, backoff, (cpu_seconds, max_memory_mb))
    succeeded = reason == "EXITED" and exit_code == 0
    outcome = "COMPLETED" if succeeded else ("EXIT_CODE" if reason == "EXITED" else reason)
    _end_attempt(job, outcome, exit_code, now, cpu_seconds, max_memory_mb)
    if not succeeded and _retry(
        job, outcome, f"attempt {job.attempt} failed ({outcome}, exit code {exit_code})", message, now, backoff
    ):
        return job
    job.state = t.JOB_STATE_SUCCEEDED if succeeded else t.JOB_STATE_FAILED
    job.exit_code = exit_code
    job.reason = outcome
    job.message = message[:MAX_MESSAGE]
    job.end_time.CopyFrom(ts(now))
    return job


def apply_interrupted(
    job: t.Job, message: str, now: float, backoff: RetryBackoff, used: tuple[float, int] = (0.0, 0)
) -> t.Job:
    """RUNNING -> PENDING: the worker stopped the current attempt for its own reasons (drain, self-fencing), not
    the job's. The attempt ends (charged for what it ran) and the job waits for a new one at once, without using
    a retry, for the first FREE_INTERRUPTIONS of them (whatever retry_on says); after those, as any failure: a
    retry with backoff if the spec retries INTERRUPTED, or FAILED. `used`: the attempt's CPU-seconds and peak
    memory (MiB), as its worker reported them."""
    _end_attempt(job, INTERRUPTED, -1, now, *used)
    job.interruptions += 1
    what = f"attempt {job.attempt} interrupted by its worker"
    if job.interruptions <= FREE_INTERRUPTIONS:
        _wait_again(job, RETRYING_AFTER_INTERRUPTION, f"{what} ({message[:200]}); retrying", None)
    elif not _retry(job, INTERRUPTED, what, message, now, backoff):
        _fail(job, INTERRUPTED, f"{what}; {_not_retried(job, INTERRUPTED)}", now)
    return job


def apply_worker_lost(job: t.Job, now: float, backoff: RetryBackoff = DEFAULT_BACKOFF) -> t.Job:
    """The worker running the current attempt is gone: a retry with backoff (if the spec retries WORKER_LOST
    and retries are left), or FAILED with WORKER_LOST."""
    _end_attempt(job, "WORKER_LOST", -1, now, None, None)
    what = f"worker lost during attempt {job.attempt}"
    if not _retry(job, "WORKER_LOST", what, "", now, backoff):
        _fail(job, "WORKER_LOST", f"{what}; {_not_retried(job, 'WORKER_LOST')}", now)
    return job


def retries_on(spec: t.JobSpec, reason: str) -> bool:
    """Whether max_retries covers an attempt that ended for `reason`: a retryable reason that the spec's
    retry_on lists (an empty retry_on lists them all)."""
    return reason in RETRYABLE and (not spec.retry_on or reason in spec.retry_on)


def may_start(job: t.Job, now: float) -> bool:
    """Whether a pending job's next attempt may start at `now` (its retry backoff, if any, has passed)."""
    return not job.HasField("next_attempt_time") or job.next_attempt_time.ToNanoseconds() <= int(now * 1e9)


def _not_retried(job: t.Job, reason: str) -> str:
    return "no retries are left" if retries_on(job.spec, reason) else f"its retry_on does not list {reason}"


def _end_attempt(
    job: t.Job, reason: str, exit_code: int, now: float, cpu_seconds: float | None, max_memory_mb: int | None
) -> None:
    """Closes the current attempt's record with how it ended (and what it used, when the worker said)."""
    job.update_time.CopyFrom(ts(now))
    record = current_attempt(job)
    if record is None:
        return
    record.end_time.CopyFrom(ts(now))
    record.reason = reason
    record.exit_code = exit_code
    if cpu_seconds is not None:
        record.cpu_seconds = cpu_seconds
    if max_memory_mb is not None:
        record.max_memory_mb = max_memory_mb


def _retry(job: t.Job, reason: str, what: str, detail: str, now: float, backoff: RetryBackoff) -> bool:
    """RUNNING -> PENDING for the next attempt, not before the backoff of this retry, when the spec retries
    `reason` and retries are left; False (nothing changed) otherwise."""
    if not retries_on(job.spec, reason) or job.retries >= job.spec.max_retries:
        return False
    job.retries += 1
    delay = backoff.delay(job.retries)
    not_before = ts(now + delay) if delay > 0 else None
    when = f" at {not_before.ToJsonString()}" if not_before is not None else ""
    why = f"{what}; retry {job.retries} of {job.spec.max_retries}{when}"
    if detail:
        why = f"{why}: {detail}"
    waiting = RETRYING_AFTER.get(reason, RETRYING_AFTER_FAILURE)
    _wait_again(job, waiting, why[:MAX_MESSAGE], not_before)
    return True


def _wait_again(job: t.Job, waiting_reason: str, message: str, not_before: Timestamp | None) -> None:
    """RUNNING -> PENDING for a new attempt, at once or not before `not_before` (the retry's backoff)."""
    job.state = t.JOB_STATE_PENDING
    job.worker_id = ""
    job.waiting_reason = waiting_reason
    job.message = message
    if not_before is None:
        job.ClearField("next_attempt_time")
    else:
        job.next_attempt_time.CopyFrom(not_before)


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
