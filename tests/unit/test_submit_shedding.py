"""The gateway's bound on submits in flight: fixed while writes are fast, shrinking while they are slow."""

from __future__ import annotations

import pytest

from libs.errors import ResourceExhausted
from services.gateway.shedding import SubmitShedder


def shedder(max_latency: float = 0.1, max_inflight: int = 8, min_inflight: int = 2) -> SubmitShedder:
    return SubmitShedder(max_inflight=max_inflight, min_inflight=min_inflight, max_latency=max_latency, retry_after=2)


def fill(s: SubmitShedder, count: int) -> None:
    for _ in range(count):
        s.admit()


def test_submits_beyond_the_bound_are_overloaded_with_a_retry_hint() -> None:
    s = shedder()
    fill(s, 8)
    with pytest.raises(ResourceExhausted) as refused:
        s.admit()
    assert refused.value.reason == "OVERLOADED"
    assert refused.value.metadata == {"retry_after_seconds": "2"}
    s.release(0.01)
    s.admit()  # a slot is free again


def test_slow_writes_shrink_the_bound_down_to_its_floor() -> None:
    s = shedder()
    for _ in range(50):
        s.admit()
        s.release(0.5)
    assert int(s.bound) == 2
    fill(s, 2)
    with pytest.raises(ResourceExhausted):
        s.admit()


def test_fast_writes_grow_it_back_to_the_ceiling() -> None:
    s = shedder()
    for _ in range(50):
        s.admit()
        s.release(0.5)
    for _ in range(200):
        s.admit()
        s.release(0.01)
    assert s.bound == 8


def test_a_submit_that_failed_before_its_write_leaves_the_bound_alone() -> None:
    s = shedder()
    s.admit()
    s.release(None)
    assert (s.inflight, s.bound) == (0, 8)


def test_a_latency_bound_of_zero_keeps_the_fixed_bound() -> None:
    s = shedder(max_latency=0)
    for _ in range(50):
        s.admit()
        s.release(60.0)
    assert s.bound == 8
