"""Settings of the pool-manager, read once from the environment and validated at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from libs.settings import (
    CommonSettings,
    LeaderSettings,
    LogStoreSettings,
    SettingsError,
    WorkerLeaseSettings,
    float_var,
)
from services.poolmanager.usage import DEFAULT_INTERVAL as DEFAULT_USAGE_INTERVAL


@dataclass(frozen=True)
class Settings:
    common: CommonSettings
    leader: LeaderSettings
    lease: WorkerLeaseSettings
    logs: LogStoreSettings  # the workers' output, appended here and read back for the gateway
    worker_ca_dir: Path  # the worker CA (key and certificate) that the workers' certificates are issued from
    worker_certs_dir: Path  # where the certificates of the workers it starts are written
    # The join port for static workers started elsewhere (server-only TLS, WorkerJoinService alone); None: none.
    join_port: int | None = None
    # Under steady load a result waits this long to share its transaction with other workers' results.
    result_linger_seconds: float = 0.004
    # How often a busy worker's usage samples are written for the cost service (0: never; running attempts are then
    # priced at what they requested until they end).
    usage_sample_seconds: float = DEFAULT_USAGE_INTERVAL
    # What the workers it starts inherit: our environment but our replica id (the provider also drops our
    # identities and issuing key: each worker gets a certificate of its own).
    worker_env: Mapping[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        common = CommonSettings.from_env("poolmanager", 50055, env)
        ca_dir = env.get("JOBMESH_WORKER_CA_DIR", "")
        if not ca_dir:
            raise SettingsError("JOBMESH_WORKER_CA_DIR must name the worker CA's directory (the workers' certificates)")
        join_port = env.get("JOBMESH_JOIN_PORT", "")
        if join_port and (not join_port.isdigit() or int(join_port) > 65535):
            raise SettingsError("JOBMESH_JOIN_PORT must be a port number")
        linger_ms = float_var(env, "JOBMESH_RESULT_LINGER_MS", 4.0)
        if linger_ms < 0:
            raise SettingsError("JOBMESH_RESULT_LINGER_MS must not be negative")
        usage_interval = float_var(env, "JOBMESH_USAGE_SAMPLE_SECONDS", DEFAULT_USAGE_INTERVAL)
        if usage_interval < 0:
            raise SettingsError("JOBMESH_USAGE_SAMPLE_SECONDS must not be negative")
        return cls(
            common=common,
            leader=LeaderSettings.from_env(env),
            lease=WorkerLeaseSettings.from_env(env),
            logs=LogStoreSettings.from_env(env, common.data_dir),
            worker_ca_dir=Path(ca_dir),
            worker_certs_dir=Path(env.get("JOBMESH_WORKER_CERTS_DIR", "") or common.data_dir / "pki" / "workers"),
            join_port=int(join_port) if join_port else None,
            result_linger_seconds=linger_ms / 1000,
            usage_sample_seconds=usage_interval,
            worker_env={k: v for k, v in env.items() if k != "JOBMESH_REPLICA_ID"},
        )
