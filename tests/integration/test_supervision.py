"""The supervisor on a real stack: a SIGKILLed process (a standby scheduler, the queueing service) is started again
and the mesh keeps running jobs; a process that keeps dying stops the stack with a message that names it."""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from devtools.launcher import Stack
from devtools.supervisor import CrashLoop, RestartPolicy, StackProcesses, Supervisor
from tests.helpers import Api, job_spec, start_stack, token

POLICY = RestartPolicy(initial_backoff=0.2, max_backoff=1.0, crash_loop_restarts=3, crash_loop_window=60.0)


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator[Stack]:
    s = start_stack(tmp_path / "stack")
    try:
        yield s
    finally:
        s.stop()


def supervise_until(sup: Supervisor, done: object, timeout: float = 60.0) -> None:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        sup.tick()
        if done():  # type: ignore[operator]
            return
        time.sleep(0.1)
    raise AssertionError("the supervisor did not get there in time")


def test_killed_processes_come_back_and_jobs_keep_running(stack: Stack) -> None:
    said: list[str] = []
    registry = CollectorRegistry()
    sup = Supervisor(StackProcesses(stack), time.monotonic, POLICY, registry, said.append)
    api = Api(stack.url, token(stack))
    for name in ("scheduler-2", "queueing-1"):
        old = stack.procs[name].pid
        stack.kill(name, signal.SIGKILL)
        supervise_until(sup, lambda n=name, o=old: stack.procs[n].alive() and stack.procs[n].pid != o)
        stack.wait_healthy(name, 60)
        assert registry.get_sample_value("jobmesh_launcher_restarts_total", {"process": name}) == 1
    assert any(line.startswith("queueing-1 exited (code -9)") for line in said)

    job = api.submit(job_spec("after-restarts", ["true"]))
    assert api.wait_terminal(job["job_id"], timeout=60)["state"] == "JOB_STATE_SUCCEEDED"


def test_a_process_that_keeps_dying_stops_the_stack_with_its_name(stack: Stack) -> None:
    sup = Supervisor(StackProcesses(stack), time.monotonic, POLICY, CollectorRegistry(), lambda _: None)
    with pytest.raises(CrashLoop, match=r"cost-1 keeps crashing .*cost-1\.log"):
        for _ in range(10):
            old = stack.procs["cost-1"].pid
            stack.kill("cost-1", signal.SIGKILL)
            supervise_until(sup, lambda o=old: stack.procs["cost-1"].alive() and stack.procs["cost-1"].pid != o)
