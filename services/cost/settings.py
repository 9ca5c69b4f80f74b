"""Settings of the cost service: the shared ones plus its cycle, read once and validated at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from libs.settings import CommonSettings, LeaderSettings, SettingsError, float_var, int_var


@dataclass(frozen=True)
class Settings:
    common: CommonSettings
    leader: LeaderSettings  # active/standby: the leader alone serves, charges and writes
    cycle_seconds: float = 5.0  # how often gauges are published and failed record writes retried
    rescan_every: int = 6  # every this many cycles, re-read all jobs for ended attempts without a record
    # How long an ended attempt's record may wait so that it shares a transaction with others: charging is not
    # on any job's path, and under load one write per interval replaces one per finished batch of jobs.
    record_delay_seconds: float = 0.25

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        settings = cls(
            common=CommonSettings.from_env("cost", 50056, env),
            leader=LeaderSettings.from_env(env),
            cycle_seconds=float_var(env, "JOBMESH_COST_CYCLE_SECONDS", cls.cycle_seconds),
            rescan_every=int_var(env, "JOBMESH_COST_RESCAN_EVERY", cls.rescan_every),
            record_delay_seconds=float_var(env, "JOBMESH_COST_RECORD_DELAY_SECONDS", cls.record_delay_seconds),
        )
        if settings.cycle_seconds <= 0:
            raise SettingsError("JOBMESH_COST_CYCLE_SECONDS must be positive")
        if not 0 <= settings.record_delay_seconds <= settings.cycle_seconds:
            raise SettingsError("JOBMESH_COST_RECORD_DELAY_SECONDS must be between 0 and the cycle interval")
        if settings.rescan_every < 1:
            raise SettingsError("JOBMESH_COST_RESCAN_EVERY must be at least 1")
        return settings
