"""SLA tiers as queueing rules: when a job becomes urgent, when it is due, and whether it missed; pure."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

from libs.config import MeshConfig

MET = ""
MISSED_TARGET_WAIT = "target_wait"
MISSED_DEADLINE = "deadline"


@dataclass(frozen=True, slots=True)
class SlaWindow:
    """A job's SLA in clock seconds: urgent from `urgent_at` (the boost), must start by `due`."""

    tier: str
    urgent_at: float
    due: float


@dataclass(frozen=True)
class SlaPolicy:
    """The boost rule (docs/queueing.md, "SLA boost"):

    due       = min(submitted + tier target wait, deadline)
    urgent_at = min(submitted + boost_fraction * (due - submitted), due - start_slack)

    Urgent jobs go before all others, earliest due first. A job misses its SLA when it starts after
    submitted + target wait, or after its deadline (known early when the deadline passes while it waits).
    """

    targets: Mapping[str, float]  # tier -> target wait in seconds
    default_tier: str
    boost_fraction: float = 0.5
    start_slack_seconds: float = 2.0

    def __post_init__(self) -> None:
        if self.default_tier not in self.targets:
            raise ValueError(f"default tier {self.default_tier!r} is not one of the tiers")
        if not 0.0 <= self.boost_fraction <= 1.0:
            raise ValueError("boost_fraction must be between 0 and 1")
        if self.start_slack_seconds < 0:
            raise ValueError("start_slack_seconds must not be negative")

    @classmethod
    def from_config(
        cls, config: MeshConfig, boost_fraction: float = 0.5, start_slack_seconds: float = 2.0
    ) -> SlaPolicy:
        targets = {name: tier.target_wait_seconds for name, tier in config.sla_tiers.items()}
        if not targets:
            targets = {config.default_sla_tier: math.inf}
        return cls(targets, config.default_sla_tier, boost_fraction, start_slack_seconds)

    def tier(self, name: str) -> str:
        """The tier a job is held to: its own when known, else the default."""
        return name if name in self.targets else self.default_tier

    def target(self, tier: str) -> float:
        return self.targets[self.tier(tier)]

    def window(self, tier: str, submitted: float, deadline: float | None = None) -> SlaWindow:
        tier = self.tier(tier)
        due = submitted + self.targets[tier]
        if deadline is not None:
            due = min(due, deadline)
        urgent_at = min(submitted + self.boost_fraction * (due - submitted), due - self.start_slack_seconds)
        return SlaWindow(tier, urgent_at, due)

    def outcome(self, tier: str, submitted: float, started: float, deadline: float | None = None) -> str:
        """MET, or why the start was too late (the deadline first: it is the stricter promise)."""
        if deadline is not None and started > deadline:
            return MISSED_DEADLINE
        if started - submitted > self.target(tier):
            return MISSED_TARGET_WAIT
        return MET
