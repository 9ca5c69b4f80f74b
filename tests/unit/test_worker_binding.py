"""What a worker may say about itself (services/poolmanager/binding.py): its own id and pool, what its pool grants,
and results whose numbers could be true."""

from __future__ import annotations

import math

import pytest

from jobmesh.common.v1 import types_pb2 as t
from libs.config import PoolConfig
from libs.identity import parse_spiffe
from services.poolmanager.binding import (
    ResultBounds,
    ResultOutOfRange,
    WorkerIdentityMismatch,
    check_result_numbers,
    check_speaks_for,
    clamp_to_pool,
)

POOL = PoolConfig("general", "static", worker_cpu_millis=2000, worker_memory_mb=1024, labels={"class": "general"})
W1 = parse_spiffe("spiffe://jobmesh/worker/general/w-1")
GATEWAY = parse_spiffe("spiffe://jobmesh/service/gateway")


@pytest.mark.parametrize(
    "worker_id, pool_id",
    [("w-2", "general"), ("w-1", "large"), ("w-10", None)],
    ids=["another-worker", "another-pool", "a-prefix-of-its-id"],
)
def test_a_worker_speaks_only_for_itself(worker_id: str, pool_id: str | None) -> None:
    check_speaks_for(W1, "w-1", "general", "Connect")
    check_speaks_for(W1, "w-1", None, "Heartbeat")
    with pytest.raises(WorkerIdentityMismatch, match="w-1"):
        check_speaks_for(W1, worker_id, pool_id, "Connect")


def test_a_service_or_a_caller_without_identity_speaks_for_no_worker() -> None:
    for caller in (GATEWAY, None):
        with pytest.raises(WorkerIdentityMismatch):
            check_speaks_for(caller, "w-1", "general", "Connect")


def test_capacity_and_labels_are_clamped_to_the_pool() -> None:
    worker = t.Worker(
        worker_id="w-1",
        pool_id="general",
        capacity=t.Resources(cpu_millis=64_000, memory_mb=512),
        labels={"class": "general", "gpu": "a100", "tier": "x"},
    )

    cut = clamp_to_pool(worker, POOL)

    assert (worker.capacity.cpu_millis, worker.capacity.memory_mb) == (2000, 512)  # less than granted is kept
    assert dict(worker.labels) == {"class": "general"}
    assert cut == ["cpu_millis 64000 > 2000", "labels ['gpu', 'tier']"]


def test_a_worker_may_declare_itself_draining_but_not_idle_or_busy() -> None:
    for declared, kept in [
        (t.WORKER_STATE_DRAINING, t.WORKER_STATE_DRAINING),
        (t.WORKER_STATE_IDLE, t.WORKER_STATE_UNSPECIFIED),
        (t.WORKER_STATE_BUSY, t.WORKER_STATE_UNSPECIFIED),
    ]:
        worker = t.Worker(worker_id="w-1", pool_id="general", state=declared)
        clamp_to_pool(worker, POOL)
        assert worker.state == kept


def test_an_undeclared_capacity_is_the_pools() -> None:
    worker = t.Worker(worker_id="w-1", pool_id="general", labels={"class": "other"})

    assert clamp_to_pool(worker, POOL) == ["labels ['class']"]
    assert (worker.capacity.cpu_millis, worker.capacity.memory_mb) == (2000, 1024)


BOUNDS = ResultBounds(cores=2.0, memory_mb=1024, elapsed_seconds=10.0)


@pytest.mark.parametrize(
    "run, cpu, memory",
    [(2.0, 0.5, 32), (10.0, 20.0, 1024), (0.0, 0.9, 0), (12.0, 0.0, 1280)],
    ids=["typical", "all-cores-whole-run", "too-short-to-sample", "within-slack"],
)
def test_results_that_could_be_true_pass(run: float, cpu: float, memory: int) -> None:
    check_result_numbers(run, cpu, memory, BOUNDS)


@pytest.mark.parametrize(
    "run, cpu, memory, field",
    [
        (2.0, math.nan, 0, "cpu_seconds"),
        (2.0, math.inf, 0, "cpu_seconds"),
        (2.0, -0.1, 0, "cpu_seconds"),
        (math.nan, 0.0, 0, "run_seconds"),
        (-1.0, 0.0, 0, "run_seconds"),
        (2.0, 1e9, 0, "cpu_seconds"),
        (2.0, 6.1, 0, "cpu_seconds"),
        (1e9, 1e9, 0, "run_seconds"),
        (2.0, 0.5, 1281, "max_memory_mb"),
        (2.0, 0.5, -1, "max_memory_mb"),
    ],
)
def test_results_that_cannot_be_true_are_refused_naming_the_field(
    run: float, cpu: float, memory: int, field: str
) -> None:
    with pytest.raises(ResultOutOfRange) as caught:
        check_result_numbers(run, cpu, memory, BOUNDS)
    assert caught.value.field == field
    assert caught.value.reason == "RESULT_OUT_OF_RANGE"


def test_without_a_known_start_the_run_time_still_bounds_the_cpu_time() -> None:
    unknown = ResultBounds(cores=1.0, memory_mb=1024, elapsed_seconds=None)
    check_result_numbers(1e6, 1e6, 0, unknown)
    with pytest.raises(ResultOutOfRange):
        check_result_numbers(10.0, 1e6, 0, unknown)


def test_bounds_come_from_the_pool_and_the_assignment_time() -> None:
    assert ResultBounds.of(POOL, 100.0, 130.0) == ResultBounds(2.0, 1024, 30.0)
    assert ResultBounds.of(POOL, 200.0, 130.0).elapsed_seconds == 0.0  # a clock behind the scheduler's
    assert ResultBounds.of(POOL, None, 130.0).elapsed_seconds is None


def test_only_the_workers_own_process_is_taken_for_it() -> None:
    import os
    import subprocess
    import sys

    from services.poolmanager.binding import process_is_worker

    env = {**os.environ, "JOBMESH_WORKER_ID": "w-7"}
    child = subprocess.Popen(
        [sys.executable, "-c", "import time; print('up', flush=True); time.sleep(30)"], env=env, stdout=subprocess.PIPE
    )
    try:
        assert child.stdout is not None and child.stdout.readline() == b"up\n"  # exec'd: its own environment
        assert process_is_worker(child.pid, "w-7")
        assert not process_is_worker(child.pid, "w-70")
        assert not process_is_worker(os.getpid(), "w-7")  # e.g. the pool-manager itself
        assert not process_is_worker(1, "w-7")
        assert not process_is_worker(2**22 + 12345, "w-7")  # no such process
    finally:
        child.kill()
        child.wait()
