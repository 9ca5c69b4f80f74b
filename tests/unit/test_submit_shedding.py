"""The gateway sheds submits while queueing's writes are slow, probing now and then to notice when they are not."""

from __future__ import annotations

import pytest

from libs.clock import FakeClock
from libs.errors import ResourceExhausted
from services.gateway.shedding import SubmitShedder


def shedder(clock: FakeClock, max_latency: float = 0.1) -> SubmitShedder:
    return SubmitShedder(clock, max_latency=max_latency, probe_interval=0.5, retry_after=2)


def test_submits_pass_while_writes_are_fast() -> None:
    s = shedder(FakeClock())
    for _ in range(20):
        s.admit()
        s.observe(0.01)
    assert not s.shedding


def test_slow_writes_shed_submits_with_overloaded_and_a_retry_hint() -> None:
    clock = FakeClock()
    s = shedder(clock)
    for _ in range(10):
        s.observe(0.5)
    assert s.shedding
    s.admit()  # the first probe
    with pytest.raises(ResourceExhausted) as refused:
        s.admit()
    assert refused.value.reason == "OVERLOADED"
    assert refused.value.metadata == {"retry_after_seconds": "2"}


def test_one_probe_per_interval_goes_through_and_a_fast_one_ends_shedding() -> None:
    clock = FakeClock()
    s = shedder(clock)
    for _ in range(10):
        s.observe(0.5)
    s.admit()
    clock.advance(0.2)
    with pytest.raises(ResourceExhausted):
        s.admit()
    clock.advance(0.3)
    s.admit()  # the next probe
    s.observe(0.02)  # the store is fast again
    assert not s.shedding
    s.admit()
    s.admit()


def test_a_single_slow_write_does_not_shed() -> None:
    s = shedder(FakeClock())
    for _ in range(10):
        s.observe(0.01)
    s.observe(0.2)
    assert not s.shedding


def test_a_bound_of_zero_never_sheds() -> None:
    s = shedder(FakeClock(), max_latency=0)
    for _ in range(10):
        s.observe(60.0)
    s.admit()
    assert not s.shedding
