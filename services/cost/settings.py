"""Settings of the cost service: the shared ones plus its cycle, validated at start-up."""

from __future__ import annotations

from dataclasses import dataclass

from libs.settings import CommonSettings, SettingsError


@dataclass(frozen=True)
class CostSettings:
    common: CommonSettings
    cycle_seconds: float = 5.0  # how often gauges are published and failed record writes retried
    rescan_every: int = 6  # every this many cycles, re-read all jobs for ended attempts without a record
    # How long an ended attempt's record may wait so that it shares a transaction with others: charging is not
    # on any job's path, and under load one write per interval replaces one per finished batch of jobs.
    record_delay_seconds: float = 0.25

    @classmethod
    def from_common(cls, common: CommonSettings) -> CostSettings:
        settings = cls(
            common=common,
            cycle_seconds=common.get_float("JOBMESH_COST_CYCLE_SECONDS", 5.0),
            rescan_every=common.get_int("JOBMESH_COST_RESCAN_EVERY", 6),
            record_delay_seconds=common.get_float("JOBMESH_COST_RECORD_DELAY_SECONDS", 0.25),
        )
        if settings.cycle_seconds <= 0:
            raise SettingsError("JOBMESH_COST_CYCLE_SECONDS must be positive")
        if not 0 <= settings.record_delay_seconds <= settings.cycle_seconds:
            raise SettingsError("JOBMESH_COST_RECORD_DELAY_SECONDS must be between 0 and the cycle interval")
        if settings.rescan_every < 1:
            raise SettingsError("JOBMESH_COST_RESCAN_EVERY must be at least 1")
        return settings
