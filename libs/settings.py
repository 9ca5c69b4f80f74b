"""Settings shared by every service, read from the environment in one place and validated at start-up."""

from __future__ import annotations

import difflib
import logging
import os
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

log = logging.getLogger(__name__)
T = TypeVar("T")


class SettingsError(ValueError):
    pass


def _env(env: Mapping[str, str], name: str, default: str | None = None) -> str:
    value = env.get(name, default)
    if value is None:
        raise SettingsError(f"{name} must be set")
    return value


def int_var(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be an integer, got {raw!r}") from exc


def positive_int(env: Mapping[str, str], name: str, default: int) -> int:
    value = int_var(env, name, default)
    if value < 1:
        raise SettingsError(f"{name} must be at least 1, got {value}")
    return value


def float_var(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise SettingsError(f"{name} must be a number, got {raw!r}") from exc


@dataclass(frozen=True)
class TlsSettings:
    """The files of one mesh identity: its certificate chain, its private key and the CA bundle that peers'
    certificates are verified against. Only paths: the files are re-read when they are renewed."""

    cert: Path
    key: Path
    ca: Path
    # The name a client checks the server's certificate against when it does not dial that name itself
    # (e.g. a pod IP); empty: the host of the target.
    server_name: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str], name: str, prefix: str = "JOBMESH_TLS") -> TlsSettings | None:
        """`<prefix>_CERT`, `_KEY`, `_CA`, or `<prefix>_DIR` holding `<name>.crt`, `<name>.key` and `ca.crt`
        (`<prefix>_NAME` overrides the name). None when none of them is set; an error when only some are."""
        directory = env.get(f"{prefix}_DIR", "")
        file_name = env.get(f"{prefix}_NAME", "") or name
        paths = {
            "CERT": env.get(f"{prefix}_CERT", "") or (f"{directory}/{file_name}.crt" if directory else ""),
            "KEY": env.get(f"{prefix}_KEY", "") or (f"{directory}/{file_name}.key" if directory else ""),
            "CA": env.get(f"{prefix}_CA", "") or (f"{directory}/ca.crt" if directory else ""),
        }
        if not any(paths.values()):
            return None
        missing = [f"{prefix}_{k}" for k, v in paths.items() if not v]
        if missing:
            raise SettingsError(f"{', '.join(missing)} must be set too (or {prefix}_DIR)")
        return cls(Path(paths["CERT"]), Path(paths["KEY"]), Path(paths["CA"]), env.get(f"{prefix}_SERVER_NAME", ""))

    @classmethod
    def required(cls, env: Mapping[str, str], name: str, prefix: str = "JOBMESH_TLS") -> TlsSettings:
        tls = cls.from_env(env, name, prefix)
        if tls is None:
            raise SettingsError(
                f"mTLS is not optional: set {prefix}_CERT, {prefix}_KEY and {prefix}_CA "
                f"(or {prefix}_DIR with {name}.crt, {name}.key and ca.crt)"
            )
        return tls

    def env(self, prefix: str = "JOBMESH_TLS") -> dict[str, str]:
        """The variables that hand these paths (never the key material) to a child process."""
        out = {f"{prefix}_CERT": str(self.cert), f"{prefix}_KEY": str(self.key), f"{prefix}_CA": str(self.ca)}
        if self.server_name:
            out[f"{prefix}_SERVER_NAME"] = self.server_name
        return out


@dataclass(frozen=True)
class EtcdSettings:
    endpoints: tuple[str, ...] = ("127.0.0.1:2379",)
    prefix: str = "/jobmesh"
    # The client certificate etcd asks for (`--client-cert-auth`): only services that use etcd are given one.
    tls: TlsSettings | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str], service_name: str = "jobmesh") -> EtcdSettings:
        endpoints = tuple(e.strip() for e in _env(env, "JOBMESH_ETCD_ENDPOINTS", "127.0.0.1:2379").split(","))
        prefix = _env(env, "JOBMESH_ETCD_PREFIX", "/jobmesh").rstrip("/")
        if not prefix.startswith("/"):
            raise SettingsError("JOBMESH_ETCD_PREFIX must start with /")
        tls = TlsSettings.from_env(env, f"{service_name}-etcd", "JOBMESH_ETCD_TLS")
        return cls(endpoints=endpoints, prefix=prefix, tls=tls)

    def client_tls(self) -> TlsSettings:
        """The etcd client identity of a service that uses etcd; refuses to go on without one."""
        if self.tls is None:
            raise SettingsError(
                "etcd requires a client certificate: set JOBMESH_ETCD_TLS_CERT, JOBMESH_ETCD_TLS_KEY and "
                "JOBMESH_ETCD_TLS_CA (or JOBMESH_ETCD_TLS_DIR)"
            )
        return self.tls


@dataclass(frozen=True)
class TelemetrySettings:
    service_name: str = "jobmesh"
    exporter: str = "none"  # none | console | otlp
    otlp_endpoint: str = "127.0.0.1:4317"
    log_level: str = "INFO"
    metrics_port: int = 0  # 0: no HTTP /metrics endpoint

    @classmethod
    def from_env(cls, env: Mapping[str, str], service_name: str) -> TelemetrySettings:
        # OpenTelemetry's own variables are honoured; ours, when set, win.
        exporter = _env(env, "JOBMESH_OTEL_EXPORTER", env.get("OTEL_TRACES_EXPORTER") or "none")
        if exporter not in ("none", "console", "otlp"):
            raise SettingsError("JOBMESH_OTEL_EXPORTER (or OTEL_TRACES_EXPORTER) must be none, console or otlp")
        endpoint = env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT") or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        return cls(
            service_name=service_name,
            exporter=exporter,
            otlp_endpoint=_env(env, "JOBMESH_OTEL_ENDPOINT", endpoint or "127.0.0.1:4317"),
            log_level=_env(env, "JOBMESH_LOG_LEVEL", "INFO").upper(),
            metrics_port=int_var(env, "JOBMESH_METRICS_PORT", 0),
        )


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 0
    grace_seconds: float = 5.0
    replica_id: str = ""

    @classmethod
    def from_env(cls, env: Mapping[str, str], default_port: int) -> ServerSettings:
        port = int_var(env, "JOBMESH_PORT", default_port)
        if not 0 <= port < 65536:
            raise SettingsError("JOBMESH_PORT out of range")
        return cls(
            host=_env(env, "JOBMESH_HOST", "127.0.0.1"),
            port=port,
            grace_seconds=float_var(env, "JOBMESH_GRACE_SECONDS", 5.0),
            replica_id=_env(env, "JOBMESH_REPLICA_ID", f"{os.uname().nodename}-{os.getpid()}"),
        )


@dataclass(frozen=True)
class PeerSettings:
    """Where the other services listen."""

    quota: tuple[str, ...] = ("127.0.0.1:50052",)  # active/standby replicas: calls go to the leader
    queueing: tuple[str, ...] = ("127.0.0.1:50053",)  # active/standby replicas: calls go to the leader
    scheduler: tuple[str, ...] = ("127.0.0.1:50054",)
    poolmanager: tuple[str, ...] = ("127.0.0.1:50055",)
    cost: tuple[str, ...] = ("127.0.0.1:50056",)  # active/standby replicas: calls go to the leader
    metrics_targets: tuple[str, ...] = ()  # host:port of every /metrics endpoint, for the mesh-wide scrape

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> PeerSettings:
        def many(name: str, default: str) -> tuple[str, ...]:
            return tuple(x.strip() for x in _env(env, name, default).split(",") if x.strip())

        return cls(
            quota=many("JOBMESH_QUOTA_ADDRS", "127.0.0.1:50052"),
            queueing=many("JOBMESH_QUEUEING_ADDRS", "127.0.0.1:50053"),
            scheduler=many("JOBMESH_SCHEDULER_ADDRS", "127.0.0.1:50054"),
            poolmanager=many("JOBMESH_POOLMANAGER_ADDRS", "127.0.0.1:50055"),
            cost=many("JOBMESH_COST_ADDRS", "127.0.0.1:50056"),
            metrics_targets=many("JOBMESH_METRICS_TARGETS", ""),
        )


@dataclass(frozen=True)
class LeaderSettings:
    """Leader election of the replicated services (quota, queueing, cost, scheduler, pool-manager)."""

    # The leader key's lease: how long a dead leader's term lasts before a standby takes over. Renewed every third
    # of it from a thread of its own (libs/etcd/client.py LeaseKeeper), so a busy event loop does not end a term;
    # a leader steps down after two thirds of it without a successful renewal.
    ttl_seconds: int = 2

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> LeaderSettings:
        return cls(positive_int(env, "JOBMESH_LEADER_TTL", cls.ttl_seconds))


@dataclass(frozen=True)
class WorkerLeaseSettings:
    """The worker's lease in etcd, which the pool-manager grants and the worker's heartbeats keep alive."""

    ttl_seconds: int = 6

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WorkerLeaseSettings:
        return cls(positive_int(env, "JOBMESH_WORKER_LEASE_TTL", cls.ttl_seconds))


@dataclass(frozen=True)
class LogStoreSettings:
    """Where jobs' output is kept (libs/logstore.py): one directory every service of a mesh shares, and the bound
    on each attempt's log."""

    directory: Path
    max_bytes: int = 10 << 20

    @classmethod
    def from_env(cls, env: Mapping[str, str], data_dir: Path) -> LogStoreSettings:
        directory = Path(env.get("JOBMESH_LOG_DIR") or data_dir / "job-logs")
        return cls(directory, positive_int(env, "JOBMESH_LOG_MAX_BYTES", cls.max_bytes))


# Every JOBMESH_* variable a jobmesh process reads (tests/unit/test_settings_env.py keeps this equal to the code),
# the mTLS families (<prefix>_DIR, _NAME, _CERT, _KEY, _CA, _SERVER_NAME), and the clients' own.
_TLS_PARTS = ("DIR", "NAME", "CERT", "KEY", "CA", "SERVER_NAME")
KNOWN_VARIABLES = frozenset(
    {
        *(f"{prefix}_{part}" for prefix in ("JOBMESH_TLS", "JOBMESH_ETCD_TLS") for part in _TLS_PARTS),
        *"""JOBMESH_CONFIG JOBMESH_DATA_DIR JOBMESH_PORT JOBMESH_HOST JOBMESH_GRACE_SECONDS JOBMESH_REPLICA_ID
        JOBMESH_LOG_LEVEL JOBMESH_METRICS_PORT JOBMESH_METRICS_TARGETS JOBMESH_OTEL_EXPORTER JOBMESH_OTEL_ENDPOINT
        JOBMESH_ETCD_ENDPOINTS JOBMESH_ETCD_PREFIX JOBMESH_QUOTA_ADDRS JOBMESH_QUEUEING_ADDRS JOBMESH_SCHEDULER_ADDRS
        JOBMESH_POOLMANAGER_ADDRS JOBMESH_COST_ADDRS JOBMESH_LEADER_TTL JOBMESH_WORKER_LEASE_TTL JOBMESH_JWT_KEYS
        JOBMESH_RESULT_LINGER_MS JOBMESH_SCHEDULER_MIN_INTERVAL_MS JOBMESH_COST_RESCAN_EVERY
        JOBMESH_COST_RECORD_DELAY_SECONDS JOBMESH_COST_CYCLE_SECONDS JOBMESH_QUEUEING_START_SLACK_SECONDS
        JOBMESH_QUEUEING_SNAPSHOT_INTERVAL_SECONDS JOBMESH_QUEUEING_RETENTION_SWEEP_SECONDS
        JOBMESH_QUEUEING_OFFER_WINDOW_SECONDS JOBMESH_QUEUEING_MAX_BATCH JOBMESH_QUEUEING_BOOST_FRACTION
        JOBMESH_CONSOLE_HOST JOBMESH_CONSOLE_DIR JOBMESH_JOIN_PORT JOBMESH_JOIN_CA JOBMESH_JOIN_ADDR
        JOBMESH_JOIN_DIR JOBMESH_JOIN_TOKEN JOBMESH_JOIN_TOKEN_FILE JOBMESH_JOIN_SERVER_NAME JOBMESH_WORKER_ID
        JOBMESH_POOL_ID JOBMESH_WORKER_CA_DIR JOBMESH_WORKER_CERTS_DIR JOBMESH_WORKER_SPAWN_TIME
        JOBMESH_WORKER_RENEW_CERT JOBMESH_WORKER_SLOTS JOBMESH_WORKER_SANDBOX JOBMESH_WORKER_SANDBOX_STATE_DIR
        JOBMESH_WORKER_NETWORK JOBMESH_WORKER_PIDS_MAX JOBMESH_WORKER_MEMORY_MB JOBMESH_WORKER_CPU_MILLIS
        JOBMESH_WORKER_MAX_OPEN_FILES JOBMESH_WORKER_MAX_FILE_MB JOBMESH_WORKER_LABELS JOBMESH_WORKER_JOB_UIDS
        JOBMESH_WORKER_HEALTH_INTERVAL JOBMESH_WORKER_HEALTH_CHECK JOBMESH_WORKER_MIN_FREE_MB
        JOBMESH_LOG_DIR JOBMESH_LOG_MAX_BYTES JOBMESH_OPENAPI_PATH JOBMESH_TOKEN JOBMESH_URL
        JOBMESH_USAGE_SAMPLE_SECONDS""".split(),
    }
)


def check_variables(env: Mapping[str, str], known: frozenset[str] = KNOWN_VARIABLES) -> list[str]:
    """Unknown JOBMESH_* variables in `env`: an error naming the first that looks like a typo of a known one
    (a misspelt leader TTL would otherwise leave the default in force), the others returned to be logged (a
    variable meant for another tool or a newer version)."""
    others = []
    for name in sorted(n for n in env if n.startswith("JOBMESH_") and n not in known):
        close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.85)
        if close:
            raise SettingsError(f"unknown variable {name}: did you mean {close[0]}?")
        others.append(name)
    return others


@dataclass(frozen=True)
class CommonSettings:
    """What every service reads: its server, etcd, telemetry, its mesh identity (mTLS on every port and every
    channel it opens), the mesh config file and the data dir."""

    server: ServerSettings
    etcd: EtcdSettings
    telemetry: TelemetrySettings
    peers: PeerSettings
    config_path: Path
    data_dir: Path
    tls: TlsSettings

    @classmethod
    def from_env(cls, service_name: str, default_port: int, env: Mapping[str, str] | None = None) -> CommonSettings:
        env = os.environ if env is None else env
        for name in check_variables(env):
            log.warning("ignoring unknown variable %s (no jobmesh setting reads it)", name)
        config_path = Path(_env(env, "JOBMESH_CONFIG", "config/dev.toml"))
        if not config_path.is_file():
            raise SettingsError(f"JOBMESH_CONFIG: no such file {config_path}")
        return cls(
            server=ServerSettings.from_env(env, default_port),
            etcd=EtcdSettings.from_env(env, service_name),
            telemetry=TelemetrySettings.from_env(env, service_name),
            peers=PeerSettings.from_env(env),
            config_path=config_path,
            data_dir=Path(_env(env, "JOBMESH_DATA_DIR", ".jobmesh")),
            tls=TlsSettings.required(env, service_name),
        )


def load_settings(name: str, from_env: Callable[[Mapping[str, str]], T], env: Mapping[str, str] | None = None) -> T:
    """A process's settings from the environment; a bad one stops it at once (exit 2), naming the variable."""
    try:
        return from_env(os.environ if env is None else env)
    except SettingsError as exc:
        print(f"{name}: bad settings: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
