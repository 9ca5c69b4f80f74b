"""The worker's self-fencing timer (services/worker/fencing.py) on a fake clock."""

from __future__ import annotations

import pytest

from services.worker.fencing import LeaseFence

KILL_GRACE = 0.0  # a fencing worker kills with SIGKILL at once


@pytest.mark.parametrize("ttl", [3.0, 6.0])
def test_jobs_are_stopped_before_the_lease_can_expire_with_a_margin_of_a_third(ttl: float) -> None:
    fence = LeaseFence(ttl, now=100.0)

    assert not fence.due(100.0 + ttl * 0.6)
    assert fence.due(fence.deadline)
    assert fence.deadline + KILL_GRACE <= fence.lease_end - ttl / 3
    assert fence.lease_end == 100.0 + ttl


@pytest.mark.parametrize("ttl", [3.0, 6.0])
def test_a_refresh_through_the_second_replica_arrives_before_the_fence(ttl: float) -> None:
    heartbeat = ttl / 3
    fence = LeaseFence(ttl, now=0.0)

    # The next heartbeat waits its interval, gives the frozen session replica half an interval, then tries the
    # other replica, which answers.
    sent = heartbeat + heartbeat / 2
    assert not fence.due(sent)
    fence.refreshed(sent)

    assert fence.deadline == pytest.approx(sent + ttl * 2 / 3)


def test_each_successful_refresh_moves_the_deadline_and_an_older_one_never_moves_it_back() -> None:
    fence = LeaseFence(6.0, now=0.0)
    fence.refreshed(2.0)
    fence.refreshed(1.0)  # a slow answer to an earlier heartbeat

    assert fence.deadline == pytest.approx(6.0)
    assert not fence.due(5.9)
    assert fence.due(6.0)


def test_the_ttl_granted_at_registration_replaces_the_default_unless_missing() -> None:
    fence = LeaseFence(6.0, now=0.0)
    fence.set_ttl(0)  # an older pool-manager does not say
    assert fence.ttl == 6.0

    fence.set_ttl(3.0)
    assert fence.deadline == pytest.approx(2.0)


def test_a_ttl_that_is_not_positive_is_refused() -> None:
    with pytest.raises(ValueError):
        LeaseFence(0.0, now=0.0)
