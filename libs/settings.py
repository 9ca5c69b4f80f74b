"""Settings shared by every service, read from the environment in one place and validated at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path


class SettingsError(ValueError):
    pass


def _env(env: Mapping[str, str], name: str, default: str | None = None) -> str:
    value = env.get(name, default)
    if value is None:
        raise SettingsError(f"{name} must be set")
    return value


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from exc


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    prefix: str = "/jobmesh"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> EtcdSettings:
        endpoints = tuple(e.strip() for e in _env(env, "JOBMESH_ETCD_ENDPOINTS", "127.0.0.1:2379").split(","))
        prefix = _env(env, "JOBMESH_ETCD_PREFIX", "/jobmesh").rstrip("/")
        if not prefix.startswith("/"):
            raise SettingsError("JOBMESH_ETCD_PREFIX must start with /")
        return cls(endpoints=endpoints, prefix=prefix)


@dataclass(frozen=True)
class TelemetrySettings:
    service_name: str = "jobmesh"
    exporter: str = "none"  # none | console | otlp
    otlp_endpoint: str = "127.0.0.1:4317"
    log_level: str = "INFO"
    metrics_port: int = 0  # 0: no HTTP /metrics endpoint

    @classmethod
    def from_env(cls, env: Mapping[str, str], service_name: str) -> TelemetrySettings:
        exporter = _env(env, "JOBMESH_OTEL_EXPORTER", "none")
        if exporter not in ("none", "console", "otlp"):
            raise SettingsError("JOBMESH_OTEL_EXPORTER must be none, console or otlp")
        return cls(
            service_name=service_name,
            exporter=exporter,
            otlp_endpoint=_env(env, "JOBMESH_OTEL_ENDPOINT", "127.0.0.1:4317"),
            log_level=_env(env, "JOBMESH_LOG_LEVEL", "INFO").upper(),
            metrics_port=_int(env, "JOBMESH_METRICS_PORT", 0),
        )


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 0
    grace_seconds: float = 5.0
    replica_id: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str], default_port: int) -> ServerSettings:
        port = _int(env, "JOBMESH_PORT", default_port)
        if not 0 <= port < 65536:
            raise SettingsError("JOBMESH_PORT out of range")
        return cls(
            host=_env(env, "JOBMESH_HOST", "127.0.0.1"),
            port=port,
            grace_seconds=_float(env, "JOBMESH_GRACE_SECONDS", 5.0),
            replica_id=_env(env, "JOBMESH_REPLICA_ID", f"{os.uname().nodename}-{os.getpid()}"),
        )


@dataclass(frozen=True)
class PeerSettings:
    """Where the other services listen."""

    quota: str = "127.0.0.1:50052"
    queueing: str = "127.0.0.1:50053"
    scheduler: tuple[str, ...] = ("127.0.0.1:50054",)
    poolmanager: tuple[str, ...] = ("127.0.0.1:50055",)
    cost: str = "127.0.0.1:50056"
    metrics_targets: tuple[str, ...] = ()  # host:port of every /metrics endpoint, for the mesh-wide scrape

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PeerSettings:
        def many(name: str, default: str) -> tuple[str, ...]:
            return tuple(x.strip() for x in _env(env, name, default).split(",") if x.strip())

        return cls(
            quota=_env(env, "JOBMESH_QUOTA_ADDR", "127.0.0.1:50052"),
            queueing=_env(env, "JOBMESH_QUEUEING_ADDR", "127.0.0.1:50053"),
            scheduler=many("JOBMESH_SCHEDULER_ADDRS", "127.0.0.1:50054"),
            poolmanager=many("JOBMESH_POOLMANAGER_ADDRS", "127.0.0.1:50055"),
            cost=_env(env, "JOBMESH_COST_ADDR", "127.0.0.1:50056"),
            metrics_targets=many("JOBMESH_METRICS_TARGETS", ""),
        )


@dataclass(frozen=True)
class CommonSettings:
    """What every service reads: its server, etcd, telemetry, the mesh config file and the data dir."""

    server: ServerSettings
    etcd: EtcdSettings
    telemetry: TelemetrySettings
    peers: PeerSettings
    config_path: Path
    data_dir: Path
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def from_env(cls, service_name: str, default_port: int, env: Mapping[str, str] | None = None) -> CommonSettings:
        env = os.environ if env is None else env
        config_path = Path(_env(env, "JOBMESH_CONFIG", "config/dev.toml"))
        if not config_path.is_file():
            raise SettingsError(f"JOBMESH_CONFIG: no such file {config_path}")
        return cls(
            server=ServerSettings.from_env(env, default_port),
            etcd=EtcdSettings.from_env(env),
            telemetry=TelemetrySettings.from_env(env, service_name),
            peers=PeerSettings.from_env(env),
            config_path=config_path,
            data_dir=Path(_env(env, "JOBMESH_DATA_DIR", ".jobmesh")),
            extra={k: v for k, v in env.items() if k.startswith("JOBMESH_")},
        )

    def get_float(self, name: str, default: float) -> float:
        return _float(self.extra, name, default)

    def get_int(self, name: str, default: int) -> int:
        return _int(self.extra, name, default)
