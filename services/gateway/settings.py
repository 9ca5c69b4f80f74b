"""Settings of the gateway, read once from the environment and validated at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from libs.auth import key_paths
from libs.settings import CommonSettings, SettingsError

# The API's OpenAPI document, served at /api/v1/openapi.yaml (JOBMESH_OPENAPI_PATH to serve another file).
OPENAPI = Path(__file__).resolve().parents[2] / "docs" / "openapi.yaml"


@dataclass(frozen=True)
class Settings:
    common: CommonSettings
    jwt_keys: Path  # the public keys tokens are verified with (default: the dev keys in the data dir)
    openapi_path: Path = OPENAPI

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        common = CommonSettings.from_env("gateway", 50051, env)
        jwt_keys = Path(env.get("JOBMESH_JWT_KEYS") or key_paths(common.data_dir)[1])
        if not jwt_keys.is_file():
            raise SettingsError(f"JOBMESH_JWT_KEYS: no verification key at {jwt_keys}")
        return cls(common=common, jwt_keys=jwt_keys, openapi_path=Path(env.get("JOBMESH_OPENAPI_PATH") or OPENAPI))
