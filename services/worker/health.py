"""The worker's own health check: built-in checks every time, the pool's health command at most once per
interval. An unhealthy worker says so to the pool-manager, which drains and replaces it."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from collections.abc import Sequence

_COMMAND_TIMEOUT_SECONDS = 10.0
_OUTPUT_CHARS = 200


class HealthCheck:
    def __init__(
        self,
        scratch_root: str,
        command: Sequence[str] = (),
        interval: float = 30.0,
        min_free_mb: int = 64,
        env: dict[str, str] | None = None,
    ):
        self.scratch_root = scratch_root
        self.command = list(command)
        self.interval = interval
        self.min_free_mb = min_free_mb
        self.env = dict(env or {})
        self._last_run = -float("inf")
        self._last_reason = ""

    async def check(self) -> str:
        """'' when healthy, else why not. Once unhealthy, always unhealthy: the worker is replaced, not healed."""
        if self._last_reason:
            return self._last_reason
        reason = self._builtin()
        if not reason and self.command and time.monotonic() - self._last_run >= self.interval:
            self._last_run = time.monotonic()
            reason = await asyncio.to_thread(self._run_command)
        self._last_reason = reason
        return reason

    def _builtin(self) -> str:
        if not os.path.isdir(self.scratch_root) or not os.access(self.scratch_root, os.W_OK | os.X_OK):
            return f"scratch directory {self.scratch_root} is missing or not writable"
        try:
            stat = os.statvfs(self.scratch_root)
        except OSError as exc:
            return f"cannot read free space of {self.scratch_root}: {exc.strerror or exc}"
        free_mb = stat.f_bavail * stat.f_frsize // (1024 * 1024)
        if free_mb < self.min_free_mb:
            return f"only {free_mb} MB free for scratch (needs {self.min_free_mb} MB)"
        return ""

    def _run_command(self) -> str:
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), **self.env}
        try:
            done = subprocess.run(
                self.command,
                env=env,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=_COMMAND_TIMEOUT_SECONDS,
                check=False,
            )
        except subprocess.TimeoutExpired:
            return f"health check did not finish in {_COMMAND_TIMEOUT_SECONDS:.0f}s"
        except OSError as exc:
            return f"health check could not start: {exc.strerror or exc}"
        if done.returncode == 0:
            return ""
        output = (done.stdout + done.stderr).decode("utf-8", errors="replace").strip()[-_OUTPUT_CHARS:]
        return f"health check exited {done.returncode}" + (f": {output}" if output else "")
