"""Settings of the console service, read once from the environment and validated at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from libs.settings import SettingsError, TlsSettings, int_var

REPO = Path(__file__).resolve().parent.parent.parent


@dataclass(frozen=True)
class Settings:
    tls: TlsSettings
    port: int = 50057
    host: str = "127.0.0.1"
    assets_dir: Path = REPO / "console" / "dist"
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        port = int_var(env, "JOBMESH_PORT", cls.port)
        if not 0 <= port < 65536:
            raise SettingsError("JOBMESH_PORT out of range")
        host = env.get("JOBMESH_CONSOLE_HOST") or "127.0.0.1"
        if host not in ("127.0.0.1", "::1", "localhost"):
            # Only Envoy, on this host, may reach it: the public port is Envoy's.
            raise SettingsError("JOBMESH_CONSOLE_HOST must be a loopback address")
        return cls(
            tls=TlsSettings.required(env, "console"),
            port=port,
            host=host,
            assets_dir=Path(env.get("JOBMESH_CONSOLE_DIR") or cls.assets_dir),
            log_level=(env.get("JOBMESH_LOG_LEVEL") or "INFO").upper(),
        )
