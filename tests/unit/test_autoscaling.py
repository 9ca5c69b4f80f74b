"""Unit tests for the autoscaling policy (services/poolmanager/reconciler.py `scaling_target`): pure, no etcd."""

from __future__ import annotations

from typing import Any

import pytest

from libs.config import PoolConfig
from services.poolmanager.reconciler import PoolLoad, scaling_target
from tests.unit.builders import ConfigBuilder


def pool(kind: str = "dynamic", **extra: Any) -> PoolConfig:
    extra.setdefault("min_workers", 0)
    extra.setdefault("max_workers", 8)
    return ConfigBuilder().pool("p", kind, **extra).build().pools[0]


def load(active: int = 0, busy: int = 0, backlog: int = 0, wait: float = 0.0, starting: int = 0) -> PoolLoad:
    return PoolLoad(active=active, starting=starting, busy=busy, backlog=backlog, oldest_wait=wait)


@pytest.mark.parametrize(
    ("config", "now", "expected"),
    [
        pytest.param(pool("static", workers=3), load(active=1), (3, "pool_size"), id="static-holds-its-size"),
        pytest.param(pool(), load(backlog=5), (5, "queue_depth"), id="depth-one-worker-per-job"),
        pytest.param(
            pool(worker_slots=2), load(active=1, busy=1, backlog=5), (4, "queue_depth"), id="depth-one-worker-per-slots"
        ),
        pytest.param(pool(max_workers=3), load(backlog=5), (3, "queue_depth"), id="depth-capped-at-max"),
        pytest.param(pool("burst"), load(backlog=2), (2, "burst_demand"), id="burst-pool-names-its-demand"),
        pytest.param(
            pool(scale_up_queue_depth=4), load(active=1, busy=1, backlog=2), (1, ""), id="depth-below-threshold"
        ),
        pytest.param(
            pool(scale_up_queue_depth=4, scale_up_queue_wait_seconds=10),
            load(active=1, busy=1, backlog=2, wait=12.0),
            (3, "queue_wait"),
            id="a-job-waited-too-long",
        ),
        pytest.param(
            pool(scale_up_queue_depth=4, scale_up_queue_wait_seconds=10),
            load(active=1, busy=1, backlog=2, wait=3.0),
            (1, ""),
            id="not-waited-long-enough",
        ),
        pytest.param(
            pool(scale_up_utilization=0.75), load(active=4, busy=3), (5, "utilization"), id="headroom-at-75-percent"
        ),
        pytest.param(
            pool(scale_up_utilization=0.75), load(active=4, busy=2), (3, "idle_workers"), id="down-to-headroom"
        ),
        pytest.param(pool(scale_up_utilization=0.75), load(active=3, busy=2), (3, ""), id="headroom-holds"),
        pytest.param(
            pool(scale_up_utilization=0.75),
            load(active=4, busy=3, starting=1),
            (5, ""),
            id="no-second-headroom-while-one-starts",
        ),
        pytest.param(pool(min_workers=2), load(), (2, "min_workers"), id="up-to-min"),
        pytest.param(pool(min_workers=1), load(active=4, busy=1), (1, "idle_workers"), id="down-to-need"),
        pytest.param(
            pool(scale_up_utilization=0.5), load(active=6, busy=2), (5, "idle_workers"), id="down-keeps-headroom"
        ),
        pytest.param(pool(), load(active=2, busy=2, backlog=1, starting=1), (3, ""), id="starting-covers-backlog"),
    ],
)
def test_scaling_target(config: PoolConfig, now: PoolLoad, expected: tuple[int, str]) -> None:
    assert scaling_target(config, now) == expected


def test_scaling_down_never_lands_where_the_utilization_trigger_fires_again() -> None:
    config = pool(scale_up_utilization=0.8)
    for busy in range(0, 9):
        for active in range(busy, 9):
            want, trigger = scaling_target(config, load(active=active, busy=busy))
            if trigger == "idle_workers":
                again, _ = scaling_target(config, load(active=want, busy=busy))
                assert again <= want, (busy, active, want)


@pytest.mark.parametrize(
    "bad",
    [{"scale_up_queue_depth": 0}, {"scale_up_queue_wait_seconds": -1}, {"scale_up_utilization": 1.5}],
)
def test_bad_trigger_settings_are_refused(bad: dict[str, Any]) -> None:
    from libs.config import ConfigError

    with pytest.raises(ConfigError, match="scale_up"):
        pool(**bad)
