"""Keeps the processes of `jobmesh run` running: one that exits unexpectedly is started again after an
exponential backoff; one that keeps crashing (a crash loop) stops the whole stack with a message naming it.

The policy (`RestartPolicy.decide`) is pure and tested with a fake clock; `Supervisor.tick` applies it to a Stack.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter

from devtools.launcher import Stack

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RestartPolicy:
    initial_backoff: float = 0.5
    max_backoff: float = 30.0
    # More than this many restarts of one process within the window is a crash loop: give up.
    crash_loop_restarts: int = 5
    crash_loop_window: float = 120.0

    def backoff(self, recent: int) -> float:
        """The wait before the next start of a process that was restarted `recent` times within the window."""
        return min(self.initial_backoff * (2**recent), self.max_backoff)

    def recent(self, restarts: list[float], now: float) -> int:
        """How many of a process's restarts fall within the crash-loop window."""
        return sum(1 for t in restarts if now - t <= self.crash_loop_window)


@dataclass
class _Track:
    restarts: list[float] = field(default_factory=list)  # when each restart happened
    exited_at: float | None = None  # when we noticed the current exit


class Supervised(Protocol):
    """What the supervisor needs of the stack: its process names, who is alive, and how to start one again."""

    def names(self) -> list[str]: ...

    def alive(self, name: str) -> bool: ...

    def exit_code(self, name: str) -> int | None: ...

    def log_path(self, name: str) -> str: ...

    def start(self, name: str) -> None: ...


class CrashLoop(RuntimeError):
    """A process kept crashing: the stack stops, and this names it and its log."""


class Supervisor:
    def __init__(
        self,
        stack: Supervised,
        clock: Callable[[], float],
        policy: RestartPolicy | None = None,
        registry: CollectorRegistry | None = None,
        say: Callable[[str], None] = print,
    ):
        self.stack = stack
        self.clock = clock
        self.policy = policy or RestartPolicy()
        self.say = say
        self._tracks: dict[str, _Track] = {}
        self.restarts = Counter(
            "jobmesh_launcher_restarts_total",
            "Processes of the stack started again after they exited unexpectedly.",
            ["process"],
            registry=registry,
        )

    def tick(self) -> None:
        """One pass: notes exits, restarts what is due, raises CrashLoop for a process that keeps crashing."""
        now = self.clock()
        for name in self.stack.names():
            track = self._tracks.setdefault(name, _Track())
            if self.stack.alive(name):
                track.exited_at = None
                continue
            recent = self.policy.recent(track.restarts, now)
            if track.exited_at is None:
                track.exited_at = now
                if recent >= self.policy.crash_loop_restarts:
                    raise CrashLoop(
                        f"{name} keeps crashing ({recent} restarts in "
                        f"{self.policy.crash_loop_window:g}s, last exit code {self.stack.exit_code(name)}); "
                        f"stopping the stack; see {self.stack.log_path(name)}"
                    )
                self.say(
                    f"{name} exited (code {self.stack.exit_code(name)}); restarting in "
                    f"{self.policy.backoff(recent):.1f}s (see {self.stack.log_path(name)})"
                )
            if now - track.exited_at >= self.policy.backoff(recent):
                self.stack.start(name)
                track.restarts = [t for t in track.restarts if now - t <= self.policy.crash_loop_window] + [now]
                track.exited_at = None
                self.restarts.labels(name).inc()
                self.say(f"{name} restarted")


class StackProcesses:
    """The Supervised view of a launcher Stack."""

    def __init__(self, stack: Stack):
        self.stack = stack

    def names(self) -> list[str]:
        return list(self.stack.procs)

    def alive(self, name: str) -> bool:
        return self.stack.procs[name].alive()

    def exit_code(self, name: str) -> int | None:
        popen = self.stack.procs[name].popen
        return None if popen is None else popen.returncode

    def log_path(self, name: str) -> str:
        return str(self.stack.procs[name].log)

    def start(self, name: str) -> None:
        self.stack.start_named(name)
