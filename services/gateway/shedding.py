"""Load shedding of submits: a bound on submits in flight in the gateway that shrinks while they wait long for their
write in queueing, so that a saturated mesh answers 429 at once instead of letting every submit wait longer."""

from __future__ import annotations

from libs.errors import ResourceExhausted


class SubmitShedder:
    """An adaptive bound on submits in flight (additive increase, multiplicative decrease, as TCP does with its
    window): each submit whose job was written (in queueing, after its quota check) later than `max_latency` after it
    was admitted cuts the bound by a tenth, down to `min_inflight`; each quicker one raises it by 1/bound, up to
    `max_inflight`. A submit beyond the bound is refused
    with 429 OVERLOADED and a Retry-After before any work is done for it. A `max_latency` of 0 leaves the bound at
    `max_inflight`.

    Envoy bounds the submits in flight to the gateway at a fixed number (its circuit breaker); this bound follows
    what the mesh can take, so that the submits it admits do not wait longer than `max_latency` for their write."""

    DECREASE = 0.9

    def __init__(self, *, max_inflight: int, min_inflight: int, max_latency: float, retry_after: int):
        self.max_inflight = max_inflight
        self.min_inflight = min(min_inflight, max_inflight)
        self.max_latency = max_latency
        self.retry_after = retry_after
        self.bound = float(max_inflight)
        self.inflight = 0

    def admit(self) -> None:
        """Count a submit in, or raise OVERLOADED; an admitted submit must be let out with `release`."""
        if self.inflight >= int(self.bound):
            raise ResourceExhausted(
                f"the mesh is saturated ({self.inflight} submits in flight, bound {int(self.bound)}), retry later",
                reason="OVERLOADED",
                metadata={"retry_after_seconds": str(self.retry_after)},
            )
        self.inflight += 1

    def release(self, write_seconds: float | None) -> None:
        """An admitted submit is done; its job was written `write_seconds` after it was admitted (None: never)."""
        self.inflight -= 1
        if write_seconds is None or self.max_latency <= 0:
            return
        if write_seconds > self.max_latency:
            self.bound = max(float(self.min_inflight), self.bound * self.DECREASE)
        else:
            self.bound = min(float(self.max_inflight), self.bound + 1 / self.bound)
