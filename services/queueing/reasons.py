"""Why a pending job is still waiting: the codes GetJob shows, derived from what the queueing service sees."""

from __future__ import annotations

from libs.lifecycle.transitions import (
    DEADLINE_MISSED,
    QUEUED,
    RETRYING_AFTER_FAILURE,
    RETRYING_AFTER_INTERRUPTION,
    RETRYING_AFTER_WORKER_LOST,
)

# A retried job whose backoff has not passed (its next_attempt_time says until when).
BACKING_OFF = "BACKING_OFF"
BEHIND_FAIR_SHARE = "BEHIND_FAIR_SHARE"
WAITING_FOR_WORKER = "WAITING_FOR_WORKER"
POOL_SCALING_UP = "POOL_SCALING_UP"

__all__ = [
    "BACKING_OFF",
    "BEHIND_FAIR_SHARE",
    "DEADLINE_MISSED",
    "POOL_SCALING_UP",
    "QUEUED",
    "RETRYING_AFTER_FAILURE",
    "RETRYING_AFTER_INTERRUPTION",
    "RETRYING_AFTER_WORKER_LOST",
    "WAITING_FOR_WORKER",
    "waiting_reason",
]


def waiting_reason(
    *,
    recorded: str,
    deadline_missed: bool,
    offered_recently: bool,
    backing_off: bool = False,
    dynamic_queue: bool,
    ahead_other_tenants: int,
) -> str:
    """The first that applies:

    1. DEADLINE_MISSED: its deadline passed while it waited (it still runs, first among urgent jobs).
    2. BACKING_OFF: a retry whose backoff has not passed yet (not in the fair queue until then).
    3. RETRYING_AFTER_FAILURE, RETRYING_AFTER_WORKER_LOST or RETRYING_AFTER_INTERRUPTION: kept from the record
       while the retry waits.
    4. The scheduler was handed it within the offer window and no worker took it: POOL_SCALING_UP in a
       dynamic pool's queue, WAITING_FOR_WORKER otherwise.
    5. BEHIND_FAIR_SHARE: other tenants' jobs are ahead of it.
    6. QUEUED: only its own tenant's jobs are ahead.
    """
    if deadline_missed:
        return DEADLINE_MISSED
    if backing_off:
        return BACKING_OFF
    if recorded in (RETRYING_AFTER_FAILURE, RETRYING_AFTER_WORKER_LOST, RETRYING_AFTER_INTERRUPTION):
        return recorded
    if offered_recently:
        return POOL_SCALING_UP if dynamic_queue else WAITING_FOR_WORKER
    if ahead_other_tenants > 0:
        return BEHIND_FAIR_SHARE
    return QUEUED
