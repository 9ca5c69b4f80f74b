"""Load shedding of submits: when queueing's writes are slow, refuse new submits at once instead of queueing them."""

from __future__ import annotations

from libs.clock import Clock
from libs.errors import ResourceExhausted


class SubmitShedder:
    """Tracks the latency of enqueues (the write a submit waits for) as a moving average; above `max_latency` new
    submits are refused with 429 OVERLOADED and a Retry-After, before any work is done for them. While shedding, one
    submit per `probe_interval` still goes through, so that the average follows the store back down; a fresh
    measurement then replaces the stale average outright. A `max_latency` of 0 turns shedding off.

    Envoy bounds the submits in flight (its circuit breaker); this bounds how long an admitted one waits."""

    SMOOTHING = 0.3  # weight of the newest measurement

    def __init__(self, clock: Clock, *, max_latency: float, probe_interval: float, retry_after: int):
        self.clock = clock
        self.max_latency = max_latency
        self.probe_interval = probe_interval
        self.retry_after = retry_after
        self.latency = 0.0
        self._last_probe = float("-inf")

    @property
    def shedding(self) -> bool:
        return self.max_latency > 0 and self.latency > self.max_latency

    def admit(self) -> None:
        """Raise OVERLOADED unless this submit may go on (not shedding, or it is the interval's probe)."""
        if not self.shedding:
            return
        now = self.clock.monotonic()
        if now - self._last_probe >= self.probe_interval:
            self._last_probe = now
            return
        raise ResourceExhausted(
            f"the mesh is saturated (enqueue latency {self.latency * 1000:.0f} ms, bound "
            f"{self.max_latency * 1000:.0f} ms), retry later",
            reason="OVERLOADED",
            metadata={"retry_after_seconds": str(self.retry_after)},
        )

    def observe(self, seconds: float) -> None:
        """One enqueue took `seconds`."""
        if self.shedding:
            self.latency = seconds  # a probe: the only fresh measurement there is
        else:
            self.latency += self.SMOOTHING * (seconds - self.latency)
