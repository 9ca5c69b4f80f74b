"""A cgroup v1 cpuacct group for a benchmark: its CPU counts every process in it and below it, and the kernel's work
for them, wherever in a namespace they run (a job's processes are reaped inside its pid namespace, not by the
worker, so per-process counters miss them). Only as root where cpuacct is mounted."""

from __future__ import annotations

import os
import time
from pathlib import Path

ROOT = Path("/sys/fs/cgroup/cpuacct")


class CpuacctGroup:
    def __init__(self, name: str) -> None:
        self.path = ROOT / f"{name}-{os.getpid()}"
        self.path.mkdir()

    @classmethod
    def make(cls, name: str) -> CpuacctGroup | None:
        """A new group, or None without root or cpuacct (or when it cannot be made)."""
        if os.geteuid() != 0 or not (ROOT / "cpuacct.usage").exists():
            return None
        try:
            return cls(name)
        except OSError:
            return None

    def join(self) -> None:
        """This process (and so everything it starts from now on) into the group."""
        (self.path / "cgroup.procs").write_text(str(os.getpid()))

    @staticmethod
    def leave() -> None:
        """This process back in the root group; what it started stays where it is."""
        (ROOT / "cgroup.procs").write_text(str(os.getpid()))

    def wrap(self, argv: list[str]) -> list[str]:
        """`argv` started inside the group (the shell joins it, then execs)."""
        return ["/bin/sh", "-c", 'echo $$ > "$0" && exec "$@"', str(self.path / "cgroup.procs"), *argv]

    def seconds(self) -> float:
        return int((self.path / "cpuacct.usage").read_text()) / 1e9

    def remove(self) -> None:
        """The group and every group below it (the worker's job groups), once their last processes have gone."""
        for _ in range(50):
            try:
                for group in sorted(self.path.glob("**/"), key=lambda p: len(p.parts), reverse=True):
                    group.rmdir()
                return
            except OSError:
                time.sleep(0.1)
