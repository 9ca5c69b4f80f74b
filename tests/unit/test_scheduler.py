"""Unit tests for worker selection (services/scheduler/scheduler.py `pick_worker`): pure, no etcd."""

from __future__ import annotations

import pytest

from jobmesh.common.v1 import types_pb2 as t
from services.scheduler.placement import TIER_BURST, TIER_DYNAMIC, TIER_STATIC, Candidate, pick_worker
from tests.unit.builders import SpecBuilder


class Fleet:
    """Idle workers, described one per call."""

    def __init__(self) -> None:
        self._idle: list[Candidate] = []

    def worker(
        self,
        worker_id: str,
        *,
        pool: str = "static-general",
        tier: int = TIER_STATIC,
        cpu: int = 2000,
        mem: int = 2048,
        **labels: str,
    ) -> Fleet:
        w = t.Worker(worker_id=worker_id, pool_id=pool, capacity=t.Resources(cpu_millis=cpu, memory_mb=mem))
        w.labels.update(labels)
        self._idle.append(Candidate(worker=w, mod_revision=len(self._idle) + 1, tier=tier))
        return self

    def dynamic(self, worker_id: str, *, cpu: int = 4000, mem: int = 8192, **labels: str) -> Fleet:
        return self.worker(worker_id, pool="dynamic-large", tier=TIER_DYNAMIC, cpu=cpu, mem=mem, **labels)

    def burst(self, worker_id: str, *, cpu: int = 2000, mem: int = 2048, **labels: str) -> Fleet:
        return self.worker(worker_id, pool="burst", tier=TIER_BURST, cpu=cpu, mem=mem, **labels)

    @property
    def idle(self) -> list[Candidate]:
        return list(self._idle)


def picked(spec: SpecBuilder, fleet: Fleet, burst_ok: bool = False) -> str | None:
    choice = pick_worker(spec.build(), fleet.idle, burst_ok)
    return None if choice is None else choice.worker.worker_id


CASES = [
    pytest.param(
        SpecBuilder().resources(1000, 512),
        Fleet().dynamic("dyn-tight", cpu=1000, mem=512).worker("static-loose", cpu=4000, mem=8192),
        "static-loose",
        id="static-preferred-over-a-tighter-dynamic-worker",
    ),
    pytest.param(
        SpecBuilder().resources(1000, 512),
        Fleet().worker("roomy", cpu=4000, mem=1024).worker("snug", cpu=1000, mem=4096),
        "snug",
        id="least-spare-cpu-first",
    ),
    pytest.param(
        SpecBuilder().resources(1000, 512),
        Fleet().worker("more-mem", cpu=2000, mem=4096).worker("less-mem", cpu=2000, mem=1024),
        "less-mem",
        id="then-least-spare-memory",
    ),
    pytest.param(
        SpecBuilder().resources(1000, 512),
        Fleet().worker("w-b").worker("w-a"),
        "w-a",
        id="identical-workers-by-id",
    ),
    pytest.param(
        SpecBuilder().resources(500, 256).needs(gpu="a100"),
        Fleet().worker("cpu-only", cpu=500, mem=256).dynamic("gpu-box", gpu="a100"),
        "gpu-box",
        id="capability-mismatch-falls-through-to-the-suitable-worker",
    ),
    pytest.param(
        SpecBuilder().resources(3000, 512),
        Fleet().worker("small", cpu=2000).dynamic("large"),
        "large",
        id="too-small-static-falls-through-to-dynamic",
    ),
    pytest.param(
        SpecBuilder().resources(500, 256).with_(pool="dynamic-large"),
        Fleet().worker("static-snug", cpu=500, mem=256).dynamic("dyn"),
        "dyn",
        id="pinned-pool-respected-over-static-preference",
    ),
    pytest.param(
        SpecBuilder().resources(500, 256).with_(pool="static-general"),
        Fleet().dynamic("dyn", cpu=500, mem=256).worker("static"),
        "static",
        id="pinned-static-pool",
    ),
    pytest.param(
        SpecBuilder().resources(8000, 256),
        Fleet().worker("s").dynamic("d"),
        None,
        id="nothing-big-enough",
    ),
    pytest.param(
        SpecBuilder().resources(500, 256).with_(pool="gpu-pool"),
        Fleet().worker("s").dynamic("d"),
        None,
        id="pinned-pool-without-idle-workers",
    ),
    pytest.param(SpecBuilder(), Fleet(), None, id="no-idle-workers"),
]


@pytest.mark.parametrize(("spec", "fleet", "expected"), CASES)
def test_pick_worker(spec: SpecBuilder, fleet: Fleet, expected: str | None) -> None:
    assert picked(spec, fleet) == expected


def test_pick_worker_returns_the_candidate_with_its_revision() -> None:
    fleet = Fleet().worker("a").worker("b", cpu=1000, mem=256)

    choice = pick_worker(SpecBuilder().resources(1000, 256).build(), fleet.idle)

    assert choice is not None
    assert (choice.worker.worker_id, choice.mod_revision, choice.tier) == ("b", 2, TIER_STATIC)


@pytest.mark.parametrize(
    ("fleet", "burst_ok", "expected"),
    [
        pytest.param(Fleet().burst("b1").dynamic("d1").worker("s1"), True, "s1", id="static-before-all"),
        pytest.param(Fleet().burst("b1").dynamic("d1"), True, "d1", id="dynamic-before-burst"),
        pytest.param(Fleet().burst("b1"), True, "b1", id="burst-when-nothing-else"),
        pytest.param(Fleet().burst("b1"), False, None, id="burst-refused-without-session"),
        pytest.param(Fleet().burst("b1", cpu=500), True, None, id="burst-worker-too-small"),
    ],
)
def test_burst_capacity_is_the_last_resort_and_only_for_burst_jobs(
    fleet: Fleet, burst_ok: bool, expected: str | None
) -> None:
    assert picked(SpecBuilder().resources(1000, 256), fleet, burst_ok) == expected
