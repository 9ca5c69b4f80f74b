"""The cost alerting rules (observability/alerts/cost.rules.yml): promtool accepts them, and its rule unit tests
show each alert firing when it should and staying quiet otherwise. Needs promtool (Debian: apt-get install
prometheus); skipped without it."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest

from devtools.launcher import REPO

RULES = REPO / "observability" / "alerts" / "cost.rules.yml"
PROMTOOL = shutil.which("promtool")

pytestmark = pytest.mark.skipif(PROMTOOL is None, reason="promtool not installed (apt-get install prometheus)")


def without_annotations(text: str) -> str:
    """The rules minus their annotations, so the unit tests below check expressions, durations and labels only."""
    out: list[str] = []
    skipping = False
    for line in text.splitlines():
        indent = len(line) - len(line.lstrip())
        if line.strip() == "annotations:":
            skipping, depth = True, indent
            continue
        if skipping and (not line.strip() or indent > depth):
            continue
        skipping = False
        out.append(line)
    return "\n".join(out) + "\n"


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    assert PROMTOOL is not None
    return subprocess.run([PROMTOOL, *args], capture_output=True, text=True, timeout=60, check=False)


def alert(name: str, at: str, *expected: dict[str, str]) -> dict[str, Any]:
    return {"eval_time": at, "alertname": name, "exp_alerts": [{"exp_labels": labels} for labels in expected]}


# Minutes of a day at a steady 100 micros/s, then a jump to 10,000 micros/s (36 a currency unit an hour).
STEADY_DAY_THEN_SPIKE = "0+6000x1440 9240000+600000x60"

CASES: list[dict[str, Any]] = [
    {
        "interval": "1m",
        "input_series": [
            {"series": 'jobmesh_cost_budget_utilization_ratio{tenant="acme"}', "values": "0.5 0.85 0.85 0.85 1.2 1.2"},
            {"series": 'jobmesh_cost_budget_utilization_ratio{tenant="globex"}', "values": "0.1x6"},
        ],
        "alert_rule_test": [
            alert("BudgetWarning", "1m"),  # just crossed 80%: pending for a minute first
            alert("BudgetWarning", "3m", {"tenant": "acme", "severity": "warning"}),
            alert("BudgetExceeded", "3m"),
            alert("BudgetWarning", "5m"),  # past 100%: the warning gives way to BudgetExceeded
            alert("BudgetExceeded", "4m", {"tenant": "acme", "severity": "critical"}),
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": 'jobmesh_cost_charged_micros_total{tenant="acme",pool="p"}', "values": STEADY_DAY_THEN_SPIKE},
            {"series": 'jobmesh_cost_charged_micros_total{tenant="globex",pool="p"}', "values": "0+600000x1500"},
        ],
        "alert_rule_test": [
            alert("CostSpike", "1440m"),
            alert("CostSpike", "1480m", {"tenant": "acme", "severity": "warning"}),
        ],
    },
    {
        "interval": "1m",
        "input_series": [
            {"series": 'jobmesh_cost_record_write_failures_total{record="attempt"}', "values": "0 0 1 1 1x30"},
            {"series": "jobmesh_cost_unrecorded_attempts", "values": "0 1x15 0x5"},
        ],
        "alert_rule_test": [
            alert("CostRecordWriteFailures", "1m"),
            alert("CostRecordWriteFailures", "3m", {"record": "attempt", "severity": "warning"}),
            alert("CostRecordWriteFailures", "20m"),  # nothing failed in the last 10 minutes
            alert("CostRecordsStuck", "5m"),
            alert("CostRecordsStuck", "12m", {"severity": "critical"}),
            alert("CostRecordsStuck", "19m"),
        ],
    },
    {
        "interval": "1m",
        # Roll-ups succeed for 20 minutes, then only fail for the next 80.
        "input_series": [
            {"series": 'jobmesh_cost_rollup_transactions_total{outcome="done"}', "values": "0+1x20 20x80"},
            {"series": 'jobmesh_cost_rollup_transactions_total{outcome="failed"}', "values": "0x20 0+1x80"},
        ],
        "alert_rule_test": [
            alert("CostRollupStuck", "15m"),
            alert("CostRollupStuck", "60m"),  # nothing done for 30 minutes only since 50m: pending
            alert("CostRollupStuck", "90m", {"severity": "warning"}),
        ],
    },
]


def test_promtool_accepts_the_cost_rules() -> None:
    result = promtool("check", "rules", str(RULES))

    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 6 rules found" in result.stdout


def test_every_cost_alert_fires_when_it_should_and_only_then(tmp_path: Path) -> None:
    rules = tmp_path / "cost.rules.yml"
    rules.write_text(without_annotations(RULES.read_text()))
    assert "annotations" not in rules.read_text() and rules.read_text().count("- alert:") == 6
    tests = tmp_path / "cost.rules.test.json"  # JSON is YAML, and needs no YAML library here
    tests.write_text(json.dumps({"rule_files": [str(rules)], "evaluation_interval": "1m", "tests": CASES}))

    result = promtool("test", "rules", str(tests))

    assert result.returncode == 0, result.stdout + result.stderr
