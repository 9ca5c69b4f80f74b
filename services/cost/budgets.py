"""Monthly budgets: parsing an update, the calendar month (UTC), utilization, thresholds and admission. Pure."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from libs.config import TenantConfig
from libs.errors import InvalidArgument, ResourceExhausted
from services.cost.pricing import MICROS, format_micros

POLICIES = ("notify", "enforce")
# Utilization ratios that raise a warning log (once per tenant and month) and the matching alerts.
THRESHOLDS = (0.8, 1.0)
MAX_LIMIT_MICROS = 10**12 * MICROS  # a trillion currency units; keeps micros well inside int64
_AMOUNT = re.compile(r"^\d{1,13}(\.\d{1,6})?$")


@dataclass(frozen=True)
class BudgetSetting:
    """A tenant's monthly limit and what happens at 100%. A limit of 0 means no budget (it overrides config)."""

    limit_micros: int
    policy: str = "notify"

    @property
    def active(self) -> bool:
        return self.limit_micros > 0

    def to_json(self) -> bytes:
        return json.dumps({"limit_micros": self.limit_micros, "policy": self.policy}).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> BudgetSetting:
        data = json.loads(raw)
        return cls(int(data["limit_micros"]), str(data.get("policy", "notify")))


def from_config(tenant: TenantConfig | None) -> BudgetSetting | None:
    if tenant is None or tenant.monthly_budget is None:
        return None
    micros = int(Decimal(str(tenant.monthly_budget)) * MICROS)
    return BudgetSetting(micros, tenant.budget_policy)


def parse_limit(text: str) -> int:
    """A decimal amount such as "250.00" in micros; raises InvalidArgument naming `monthly_limit`."""
    text = text.strip()
    if not text:
        raise InvalidArgument("monthly_limit", 'is required: a decimal amount such as "250.00", or "0" to remove')
    if not _AMOUNT.match(text):
        raise InvalidArgument("monthly_limit", "must be a non-negative decimal amount with at most 6 decimals")
    micros = int(Decimal(text) * MICROS)
    if micros > MAX_LIMIT_MICROS:
        raise InvalidArgument("monthly_limit", "is too large")
    return micros


def parse_update(limit: str, policy: str, current: BudgetSetting | None) -> BudgetSetting:
    """The setting an UpdateBudget asks for; an empty policy keeps the current one (or notify)."""
    micros = parse_limit(limit)
    policy = policy.strip().lower()
    if policy and policy not in POLICIES:
        raise InvalidArgument("policy", f"must be one of {', '.join(POLICIES)}")
    return BudgetSetting(micros, policy or (current.policy if current else "notify"))


def month_window(now: float) -> tuple[float, float]:
    """The calendar month (UTC) containing `now`: [first instant, first instant of the next month)."""
    day = datetime.fromtimestamp(now, tz=UTC)
    first = day.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    nxt = first.replace(year=first.year + 1, month=1) if first.month == 12 else first.replace(month=first.month + 1)
    return first.timestamp(), nxt.timestamp()


@dataclass(frozen=True)
class BudgetStatus:
    tenant_id: str
    setting: BudgetSetting | None
    spent_micros: int

    @property
    def limited(self) -> bool:
        return self.setting is not None and self.setting.active

    @property
    def enforced(self) -> bool:
        return self.limited and self.setting is not None and self.setting.policy == "enforce"

    @property
    def limit_micros(self) -> int:
        """The monthly limit; 0 without a budget."""
        return self.setting.limit_micros if self.setting is not None and self.setting.active else 0

    @property
    def utilization(self) -> float:
        if self.setting is None or not self.setting.active:
            return 0.0
        return self.spent_micros / self.setting.limit_micros

    def crossed(self) -> tuple[float, ...]:
        """The thresholds this month's spend has reached."""
        return tuple(th for th in THRESHOLDS if self.limited and self.utilization >= th)

    def refusal(self, currency: str) -> ResourceExhausted | None:
        """Why a submit must be refused: an enforced budget that is spent. None means the tenant may submit."""
        if self.setting is None or not self.setting.active or self.setting.policy != "enforce":
            return None
        if self.spent_micros < self.setting.limit_micros:
            return None
        limit, spent = format_micros(self.setting.limit_micros), format_micros(self.spent_micros)
        return ResourceExhausted(
            f"the monthly budget of {limit} {currency} is spent ({spent} {currency} this month); "
            "submits are refused until next month or until an admin raises the budget",
            reason="BUDGET_EXCEEDED",
            metadata={"tenant_id": self.tenant_id, "limit": limit, "spent": spent, "currency": currency},
        )
