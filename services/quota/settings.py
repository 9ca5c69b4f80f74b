"""Settings of the quota service, read once from the environment and validated at start-up."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass

from libs.settings import CommonSettings, LeaderSettings


@dataclass(frozen=True)
class Settings:
    common: CommonSettings
    leader: LeaderSettings

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        return cls(common=CommonSettings.from_env("quota", 50052, env), leader=LeaderSettings.from_env(env))
