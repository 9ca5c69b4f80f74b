"""When a worker must stop its jobs because its lease may lapse (self-fencing). Pure: times come from the caller.

The pool-manager's leader declares a worker lost once its etcd lease expires, and retries its jobs elsewhere. A
worker that cannot refresh the lease (no pool-manager answers, or it is cut off) must have its jobs dead before
that moment, or two copies of one attempt run at once. The worker refreshes every third of the lease's time to
live (TTL) and counts from when it *sent* the last refresh that succeeded (etcd refreshed the lease at or after
that moment, so the lease ends no sooner than TTL later). At two thirds of the TTL without one, it kills its jobs
with SIGKILL: a third of the TTL (1 s with the tests' 3 s lease, 2 s with the default 6 s) is left for the kill
to land before the lease can expire, and one refresh that had to go round the replicas (each tried for at most
half a heartbeat interval) still arrives in time not to fence.
"""

from __future__ import annotations

# The share of the lease's TTL after the last successful refresh at which a worker stops its jobs.
FENCE_AT = 2 / 3


class LeaseFence:
    """Tracks the last successful lease refresh; `due` says when the worker's jobs must be stopped."""

    def __init__(self, ttl_seconds: float, now: float):
        if ttl_seconds <= 0:
            raise ValueError("ttl_seconds must be positive")
        self.ttl = ttl_seconds
        self._refreshed = now

    def refreshed(self, sent_at: float) -> None:
        """A refresh sent at `sent_at` succeeded (a heartbeat answered alive, or a registration)."""
        self._refreshed = max(self._refreshed, sent_at)

    def set_ttl(self, ttl_seconds: float) -> None:
        """The TTL the pool-manager granted (sent with the registration); ignored when not positive."""
        if ttl_seconds > 0:
            self.ttl = ttl_seconds

    @property
    def deadline(self) -> float:
        """When running jobs must be stopped unless a refresh succeeds first."""
        return self._refreshed + self.ttl * FENCE_AT

    @property
    def lease_end(self) -> float:
        """The earliest the lease can expire."""
        return self._refreshed + self.ttl

    def due(self, now: float) -> bool:
        return now >= self.deadline
