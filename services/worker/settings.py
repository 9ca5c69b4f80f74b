"""Settings of a worker agent (what the pool-manager's provider, or a static worker's manifest, hands it) and of
the join step of a static worker, read once from the environment and validated at start-up."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from libs.settings import CommonSettings, SettingsError, WorkerLeaseSettings, float_var, int_var
from services.worker.sandbox import SandboxSettings


def _json(env: Mapping[str, str], name: str, default: str, kind: type) -> Any:
    try:
        value = json.loads(env.get(name) or default)
    except ValueError as exc:
        raise SettingsError(f"{name} must be JSON, got {env.get(name)!r}") from exc
    if not isinstance(value, kind):
        raise SettingsError(f"{name} must be a JSON {'object' if kind is dict else 'array'}")
    return value


@dataclass(frozen=True)
class WorkerSettings:
    """The worker's description: its id and pool (else its certificate's), its capacity and labels."""

    worker_id: str = ""  # empty: taken from the certificate (a joined worker)
    pool_id: str = ""
    cpu_millis: int = 1000
    memory_mb: int = 1024
    labels: Mapping[str, str] = field(default_factory=dict)
    slots: int = 1  # jobs run at once (the pool's worker_slots)
    spawn_time: float | None = None  # when the provider started it (seconds since the epoch)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerSettings:
        labels = _json(env, "JOBMESH_WORKER_LABELS", "{}", dict)
        spawn_time = env.get("JOBMESH_WORKER_SPAWN_TIME")
        return cls(
            worker_id=env.get("JOBMESH_WORKER_ID", ""),
            pool_id=env.get("JOBMESH_POOL_ID", ""),
            cpu_millis=int_var(env, "JOBMESH_WORKER_CPU_MILLIS", cls.cpu_millis),
            memory_mb=int_var(env, "JOBMESH_WORKER_MEMORY_MB", cls.memory_mb),
            labels={str(k): str(v) for k, v in labels.items()},
            slots=max(1, int_var(env, "JOBMESH_WORKER_SLOTS", cls.slots)),
            spawn_time=float_var(env, "JOBMESH_WORKER_SPAWN_TIME", 0.0) if spawn_time else None,
        )


@dataclass(frozen=True)
class HealthSettings:
    """The worker's own health check (services/worker/health.py): the pool's command, how often, and the free
    scratch space below which it reports itself unhealthy."""

    command: tuple[str, ...] = ()
    interval_seconds: float = 30.0
    min_free_mb: int = 64

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> HealthSettings:
        command = _json(env, "JOBMESH_WORKER_HEALTH_CHECK", "[]", list)
        return cls(
            command=tuple(str(part) for part in command),
            interval_seconds=float_var(env, "JOBMESH_WORKER_HEALTH_INTERVAL", cls.interval_seconds),
            min_free_mb=int_var(env, "JOBMESH_WORKER_MIN_FREE_MB", cls.min_free_mb),
        )


@dataclass(frozen=True)
class Settings:
    common: CommonSettings
    lease: WorkerLeaseSettings
    worker: WorkerSettings
    health: HealthSettings
    # The pool's sandbox; None with the reason when its settings are invalid: the agent then starts and refuses
    # every job with that reason (the pool-manager sees why) rather than crash-looping.
    sandbox: SandboxSettings | None
    sandbox_error: str = ""
    renew_certificate: bool = False  # a joined worker renews its own certificate: nobody else does

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        sandbox, sandbox_error = None, ""
        try:
            sandbox = SandboxSettings.from_env(env)
        except ValueError as exc:
            sandbox_error = str(exc)
        return cls(
            common=CommonSettings.from_env("worker", 0, env),
            lease=WorkerLeaseSettings.from_env(env),
            worker=WorkerSettings.from_env(env),
            health=HealthSettings.from_env(env),
            sandbox=sandbox,
            sandbox_error=sandbox_error,
            renew_certificate=env.get("JOBMESH_WORKER_RENEW_CERT") == "1",
        )


@dataclass(frozen=True)
class JoinSettings:
    """`python -m services.worker.join` (a static worker's first step): where to join, the pool-manager's CA, where
    to write the identity it gets, and the join token (or a file of them)."""

    address: str
    ca: Path
    directory: Path
    token: str = ""
    token_file: Path | None = None
    server_name: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> JoinSettings:
        env = os.environ if env is None else env
        missing = [n for n in ("JOBMESH_JOIN_ADDR", "JOBMESH_JOIN_CA", "JOBMESH_JOIN_DIR") if not env.get(n)]
        if not env.get("JOBMESH_JOIN_TOKEN") and not env.get("JOBMESH_JOIN_TOKEN_FILE"):
            missing.append("JOBMESH_JOIN_TOKEN or JOBMESH_JOIN_TOKEN_FILE")
        if missing:
            raise SettingsError(f"{', '.join(missing)} must be set")
        token_file = env.get("JOBMESH_JOIN_TOKEN_FILE")
        return cls(
            address=env["JOBMESH_JOIN_ADDR"],
            ca=Path(env["JOBMESH_JOIN_CA"]),
            directory=Path(env["JOBMESH_JOIN_DIR"]),
            token=env.get("JOBMESH_JOIN_TOKEN", ""),
            token_file=Path(token_file) if token_file else None,
            server_name=env.get("JOBMESH_JOIN_SERVER_NAME", ""),
        )
