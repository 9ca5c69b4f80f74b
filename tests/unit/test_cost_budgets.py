"""Monthly budgets (services/cost/budgets.py): parsing updates, the UTC month, utilization and admission."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from libs.config import TenantConfig
from libs.errors import InvalidArgument, ResourceExhausted
from services.cost.budgets import BudgetSetting, BudgetStatus, from_config, month_window, parse_limit, parse_update


@pytest.mark.parametrize(
    ("text", "micros"),
    [
        pytest.param("250.00", 250_000_000, id="two-decimals"),
        pytest.param("0.000001", 1, id="one-micro"),
        pytest.param("0", 0, id="zero-removes"),
        pytest.param(" 12 ", 12_000_000, id="surrounding-space"),
    ],
)
def test_a_limit_is_parsed_to_exact_micros(text: str, micros: int) -> None:
    assert parse_limit(text) == micros


@pytest.mark.parametrize(
    "text",
    [
        pytest.param("", id="empty"),
        pytest.param("-5", id="negative"),
        pytest.param("abc", id="not-a-number"),
        pytest.param("1e3", id="exponent"),
        pytest.param("NaN", id="nan"),
        pytest.param("0.0000001", id="below-a-micro"),
        pytest.param("12,50", id="comma"),
        pytest.param("9999999999999.5", id="too-large"),
    ],
)
def test_an_invalid_limit_is_refused_naming_monthly_limit(text: str) -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_limit(text)

    assert err.value.field == "monthly_limit"


def test_an_unknown_policy_is_refused_naming_policy() -> None:
    with pytest.raises(InvalidArgument) as err:
        parse_update("10", "block", None)

    assert err.value.field == "policy"


@pytest.mark.parametrize(
    ("policy", "current", "expected"),
    [
        pytest.param("enforce", None, "enforce", id="given"),
        pytest.param("NOTIFY", BudgetSetting(1, "enforce"), "notify", id="case-insensitive"),
        pytest.param("", BudgetSetting(1, "enforce"), "enforce", id="empty-keeps-current"),
        pytest.param("", None, "notify", id="empty-without-current-is-notify"),
    ],
)
def test_the_policy_of_an_update(policy: str, current: BudgetSetting | None, expected: str) -> None:
    assert parse_update("1", policy, current).policy == expected


def test_a_configured_budget_becomes_micros_with_its_policy() -> None:
    tenant = TenantConfig("acme", monthly_budget=250.5, budget_policy="enforce")

    assert from_config(tenant) == BudgetSetting(250_500_000, "enforce")
    assert from_config(TenantConfig("globex")) is None


@pytest.mark.parametrize(
    ("now", "first", "next_first"),
    [
        pytest.param(datetime(2026, 3, 10, 12, tzinfo=UTC), datetime(2026, 3, 1), datetime(2026, 4, 1), id="march"),
        pytest.param(datetime(2026, 12, 31, 23, 59, tzinfo=UTC), datetime(2026, 12, 1), datetime(2027, 1, 1), id="dec"),
        pytest.param(datetime(2028, 2, 29, tzinfo=UTC), datetime(2028, 2, 1), datetime(2028, 3, 1), id="leap-feb"),
    ],
)
def test_the_month_is_the_calendar_month_in_utc(now: datetime, first: datetime, next_first: datetime) -> None:
    assert month_window(now.timestamp()) == (
        first.replace(tzinfo=UTC).timestamp(),
        next_first.replace(tzinfo=UTC).timestamp(),
    )


@pytest.mark.parametrize(
    ("spent", "crossed"),
    [
        pytest.param(79_999_999, (), id="just-below-80"),
        pytest.param(80_000_000, (0.8,), id="at-80"),
        pytest.param(100_000_000, (0.8, 1.0), id="at-100"),
        pytest.param(250_000_000, (0.8, 1.0), id="far-above"),
    ],
)
def test_thresholds_are_crossed_at_80_and_100_percent(spent: int, crossed: tuple[float, ...]) -> None:
    status = BudgetStatus("acme", BudgetSetting(100_000_000, "notify"), spent)

    assert status.crossed() == crossed


def test_without_a_budget_nothing_is_crossed_or_refused() -> None:
    for setting in (None, BudgetSetting(0, "enforce")):
        status = BudgetStatus("acme", setting, 10**12)
        assert (status.utilization, status.crossed(), status.refusal("EUR")) == (0.0, (), None)


def test_an_enforced_budget_that_is_spent_refuses_with_budget_exceeded_and_the_amounts() -> None:
    status = BudgetStatus("acme", BudgetSetting(10_000, "enforce"), 12_345)

    refusal = status.refusal("EUR")

    assert isinstance(refusal, ResourceExhausted)
    assert refusal.reason == "BUDGET_EXCEEDED"
    assert refusal.metadata == {"tenant_id": "acme", "limit": "0.010000", "spent": "0.012345", "currency": "EUR"}


@pytest.mark.parametrize(
    ("policy", "spent", "refused"),
    [
        pytest.param("enforce", 9_999, False, id="enforce-below"),
        pytest.param("enforce", 10_000, True, id="enforce-exactly-spent"),
        pytest.param("notify", 50_000, False, id="notify-never-refuses"),
    ],
)
def test_only_an_enforced_and_spent_budget_refuses(policy: str, spent: int, refused: bool) -> None:
    status = BudgetStatus("acme", BudgetSetting(10_000, policy), spent)

    assert (status.refusal("EUR") is not None) == refused


def test_a_setting_survives_its_json_form() -> None:
    setting = BudgetSetting(123_456, "enforce")

    assert BudgetSetting.from_json(setting.to_json()) == setting
