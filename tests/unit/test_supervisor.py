"""The supervisor of `jobmesh run` (devtools/supervisor.py) on a fake stack and a fake clock."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry

from devtools.supervisor import CrashLoop, RestartPolicy, Supervisor


class FakeStack:
    def __init__(self, *names: str) -> None:
        self.up = dict.fromkeys(names, True)
        self.starts: list[str] = []

    def names(self) -> list[str]:
        return list(self.up)

    def alive(self, name: str) -> bool:
        return self.up[name]

    def exit_code(self, name: str) -> int | None:
        return None if self.up[name] else -9

    def log_path(self, name: str) -> str:
        return f"/logs/{name}.log"

    def start(self, name: str) -> None:
        self.starts.append(name)
        self.up[name] = True


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


POLICY = RestartPolicy(initial_backoff=0.5, max_backoff=4.0, crash_loop_restarts=3, crash_loop_window=60.0)


def make(*names: str) -> tuple[FakeStack, Clock, Supervisor, list[str], CollectorRegistry]:
    stack, clock, said, registry = FakeStack(*names), Clock(), [], CollectorRegistry()
    return stack, clock, Supervisor(stack, clock, POLICY, registry, said.append), said, registry


def test_a_crashed_process_is_restarted_after_its_backoff_and_counted() -> None:
    stack, clock, sup, said, registry = make("quota", "scheduler-2")
    stack.up["scheduler-2"] = False

    sup.tick()
    assert stack.starts == []  # noticed; waits 0.5 s first
    clock.now += 0.5
    sup.tick()

    assert stack.starts == ["scheduler-2"]
    assert registry.get_sample_value("jobmesh_launcher_restarts_total", {"process": "scheduler-2"}) == 1
    assert "scheduler-2 exited (code -9); restarting in 0.5s (see /logs/scheduler-2.log)" in said


def test_the_backoff_doubles_with_each_recent_restart_up_to_the_maximum() -> None:
    assert [POLICY.backoff(n) for n in range(6)] == [0.5, 1.0, 2.0, 4.0, 4.0, 4.0]
    stack, clock, sup, _, _ = make("cost")
    for wait in (0.5, 1.0):
        stack.up["cost"] = False
        sup.tick()
        clock.now += wait - 0.01
        sup.tick()
        assert stack.up["cost"] is False
        clock.now += 0.01
        sup.tick()
        assert stack.up["cost"] is True


def test_a_crash_loop_stops_the_stack_naming_the_process_and_its_log() -> None:
    stack, clock, sup, _, _ = make("queueing")
    for _ in range(3):
        stack.up["queueing"] = False
        sup.tick()
        clock.now += 5
        sup.tick()
    stack.up["queueing"] = False
    with pytest.raises(CrashLoop, match=r"queueing keeps crashing .* see /logs/queueing.log"):
        sup.tick()


def test_restarts_long_ago_do_not_count_toward_a_crash_loop() -> None:
    stack, clock, sup, _, _ = make("gateway")
    for _ in range(6):
        stack.up["gateway"] = False
        sup.tick()
        clock.now += 30  # well past the backoff, and each restart ages out of the 60 s window in time
        sup.tick()
        clock.now += 31
    assert stack.starts == ["gateway"] * 6
