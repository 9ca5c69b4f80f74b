"""Settings of the scheduler, read once from the environment and validated at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from libs.settings import CommonSettings, LeaderSettings, SettingsError, float_var


@dataclass(frozen=True)
class Settings:
    common: CommonSettings
    leader: LeaderSettings
    # The shortest time between two scheduling cycles: changes arriving within it are placed together.
    min_interval_seconds: float = 0.01

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        min_interval_ms = float_var(env, "JOBMESH_SCHEDULER_MIN_INTERVAL_MS", 10.0)
        if min_interval_ms < 0:
            raise SettingsError("JOBMESH_SCHEDULER_MIN_INTERVAL_MS must not be negative")
        return cls(
            common=CommonSettings.from_env("scheduler", 50054, env),
            leader=LeaderSettings.from_env(env),
            min_interval_seconds=min_interval_ms / 1000,
        )
