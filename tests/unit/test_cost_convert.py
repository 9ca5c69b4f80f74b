"""Between the cost core and its protos (services/cost/convert.py), and the report window the API defaults to."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from libs.errors import InvalidArgument
from services.cost import convert
from services.cost.budgets import BudgetSetting, BudgetStatus
from services.cost.recommendations import Recommendation
from services.cost.reports import Report, Reports

MARCH_1 = datetime(2026, 3, 1, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        pytest.param("2026-03-01T00:00:00Z", MARCH_1, id="zulu"),
        pytest.param("2026-03-01T01:00:00+01:00", MARCH_1, id="offset"),
        pytest.param("2026-03-01T00:00:00", MARCH_1, id="no-offset-is-utc"),
        pytest.param("2026-03-01", MARCH_1, id="date-alone-is-utc-midnight"),
        pytest.param("2026-03-01T00:00:00.250Z", MARCH_1 + 0.25, id="fraction"),
    ],
)
def test_report_bounds_are_rfc_3339_times_in_utc_unless_stated(text: str, seconds: float) -> None:
    assert convert.parse_time("start", text) == seconds


def test_an_empty_bound_means_the_default_and_a_bad_one_names_its_field() -> None:
    assert convert.parse_time("end", "") is None
    with pytest.raises(InvalidArgument) as err:
        convert.parse_time("end", "yesterday")
    assert err.value.field == "end"


def test_a_report_keeps_its_lines_in_order_with_exact_micros() -> None:
    report = Report(
        "acme",
        total_micros=1_234_567,
        by_pool={"a": 1_000_000, "b": 234_567},
        by_day={"2026-03-01": 1_234_567},
        burst_micros=7,
        jobs=2,
        recommendations=[Recommendation("RIGHTSIZE_CPU", "why", 42)],
    )

    out = convert.reports(Reports([report], idle_micros=-5), "EUR")

    (proto,) = out.reports
    assert (proto.total.micros, proto.total.amount, proto.total.currency) == (1_234_567, "1.234567", "EUR")
    assert [(x.key, x.cost.micros) for x in proto.by_pool] == [("a", 1_000_000), ("b", 234_567)]
    assert proto.burst_spend.amount == "0.000007"
    assert proto.recommendations[0].estimated_savings.micros == 42
    assert out.idle_cost.micros == -5


def test_a_budget_without_a_limit_has_no_monthly_limit_and_no_policy() -> None:
    none = convert.budget(BudgetStatus("acme", None, 10), "EUR")
    some = convert.budget(BudgetStatus("acme", BudgetSetting(40, "enforce"), 10), "EUR")

    assert (none.HasField("monthly_limit"), none.policy, none.spent_this_month.micros) == (False, "", 10)
    assert (some.monthly_limit.micros, some.policy, some.utilization) == (40, "enforce", 0.25)
