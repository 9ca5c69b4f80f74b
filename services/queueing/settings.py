"""Settings of the queueing service: the shared ones and the queue's own, read once and validated at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from libs.settings import CommonSettings, LeaderSettings, LogStoreSettings, SettingsError, float_var, int_var


@dataclass(frozen=True)
class QueueingSettings:
    # SLA boost: a job is urgent once it has used this fraction of its SLA window ...
    boost_fraction: float = 0.5
    # ... or is this close to its due time (covers the dispatch path: scheduler cycle, worker start).
    start_slack_seconds: float = 2.0
    # A job handed out by NextJobs this recently and still queued waits for a worker, not for its turn.
    offer_window_seconds: float = 2.0
    # How often changed virtual-time tags are written to etcd (what a crash can lose, see docs/queueing.md).
    snapshot_interval_seconds: float = 0.5
    # Most jobs written in one etcd transaction by the enqueue batcher (2 ops each; etcd allows 128 per txn).
    max_batch: int = 64
    # How often finished jobs past their retention ([retention] in the mesh config) are deleted.
    retention_sweep_seconds: float = 30.0

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> QueueingSettings:
        built = cls(
            boost_fraction=float_var(env, "JOBMESH_QUEUEING_BOOST_FRACTION", cls.boost_fraction),
            start_slack_seconds=float_var(env, "JOBMESH_QUEUEING_START_SLACK_SECONDS", cls.start_slack_seconds),
            offer_window_seconds=float_var(env, "JOBMESH_QUEUEING_OFFER_WINDOW_SECONDS", cls.offer_window_seconds),
            snapshot_interval_seconds=float_var(
                env, "JOBMESH_QUEUEING_SNAPSHOT_INTERVAL_SECONDS", cls.snapshot_interval_seconds
            ),
            max_batch=int_var(env, "JOBMESH_QUEUEING_MAX_BATCH", cls.max_batch),
            retention_sweep_seconds=float_var(
                env, "JOBMESH_QUEUEING_RETENTION_SWEEP_SECONDS", cls.retention_sweep_seconds
            ),
        )
        built.validate()
        return built

    def validate(self) -> None:
        if not 0.0 <= self.boost_fraction <= 1.0:
            raise SettingsError("JOBMESH_QUEUEING_BOOST_FRACTION must be between 0 and 1")
        if self.start_slack_seconds < 0:
            raise SettingsError("JOBMESH_QUEUEING_START_SLACK_SECONDS must not be negative")
        if self.offer_window_seconds <= 0:
            raise SettingsError("JOBMESH_QUEUEING_OFFER_WINDOW_SECONDS must be greater than 0")
        if not 0.05 <= self.snapshot_interval_seconds <= 60:
            raise SettingsError("JOBMESH_QUEUEING_SNAPSHOT_INTERVAL_SECONDS must be between 0.05 and 60")
        if not 1 <= self.max_batch <= 64:
            raise SettingsError("JOBMESH_QUEUEING_MAX_BATCH must be between 1 and 64")
        if self.retention_sweep_seconds <= 0:
            raise SettingsError("JOBMESH_QUEUEING_RETENTION_SWEEP_SECONDS must be greater than 0")


@dataclass(frozen=True)
class Settings:
    common: CommonSettings
    leader: LeaderSettings
    logs: LogStoreSettings  # retention deletes a finished job's logs with its record
    queue: QueueingSettings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        common = CommonSettings.from_env("queueing", 50053, env)
        return cls(
            common=common,
            leader=LeaderSettings.from_env(env),
            logs=LogStoreSettings.from_env(env, common.data_dir),
            queue=QueueingSettings.from_env(env),
        )
