"""Observability config (observability/): dashboards and alert rules use only metrics the code defines, every
alert is routable and explained, and promtool accepts the rules, their unit tests and the Prometheus configs."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.tools import require_tool

REPO = Path(__file__).resolve().parents[2]
OBS = REPO / "observability"
ALERTS = OBS / "alerts"
DASHBOARDS = sorted((OBS / "grafana" / "dashboards").glob("*.json"))
RULE_FILES = sorted(ALERTS.glob("*.rules.yml"))
RULE_TESTS = sorted((ALERTS / "tests").glob("*.test.yml"))
SEVERITIES = {"critical", "warning", "info"}  # the seed's routing: PagerDuty, Slack, e-mail
RUNBOOK_ELSEWHERE = {"cost.rules.yml"}  # the cost service's alerts are explained in docs/cost.md
PROMETHEUS_OWN = {"up"}  # the series Prometheus writes for every scrape

# --------------------------------------------------------------------------------------- metric catalogue

_CONSTRUCTOR = re.compile(
    r"\b(Counter|Gauge|Histogram|Summary|GaugeMetricFamily|CounterMetricFamily|HistogramMetricFamily)"
    r"\(\s*\"(jobmesh_\w+)\""
)
_SUFFIXES = {
    "Counter": ("",),
    "CounterMetricFamily": ("",),
    "Gauge": ("",),
    "GaugeMetricFamily": ("",),
    "Histogram": ("_bucket", "_sum", "_count"),
    "HistogramMetricFamily": ("_bucket", "_sum", "_count"),
    "Summary": ("_sum", "_count"),
}


def defined_metrics() -> set[str]:
    """Every series name the mesh can expose, read from libs/, services/ and devtools/ (the launcher) source."""
    names: set[str] = set()
    sources = {p: p.read_text() for d in ("libs", "services", "devtools") for p in (REPO / d).rglob("*.py")}
    for text in sources.values():
        for kind, name in _CONSTRUCTOR.findall(text):
            if kind.startswith("Counter") and not name.endswith("_total"):
                name += "_total"  # prometheus_client appends it
            names.update(name + suffix for suffix in _SUFFIXES[kind])
        names.update(re.findall(r"# TYPE (jobmesh_\w+) ", text))  # written by hand, e.g. the gateway's jobmesh_up
    # The shared server interceptor names its metrics after the service that run_service() was given.
    interceptor = (REPO / "libs" / "interceptors.py").read_text()
    templates = dict(re.findall(r"(Histogram|Counter)\(\s*f\"jobmesh_\{metric\}_(\w+)\"", interceptor))
    services = {m.replace("-", "_") for t in sources.values() for m in re.findall(r"run_service\(\s*\"([\w-]+)\"", t)}
    for service in services:
        for kind, rest in templates.items():
            names.update(f"jobmesh_{service}_{rest}{suffix}" for suffix in _SUFFIXES[kind])
    return names


def recorded_metrics() -> set[str]:
    return {rule["record"] for path in RULE_FILES for rule in rules_of(path) if "record" in rule}


# ------------------------------------------------------------------------------------- PromQL metric names

_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "offset", "bool"}
_KEYWORDS |= {"inf", "nan", "Inf", "NaN"}


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects (Grafana variables allowed inside braces and ranges)."""
    e = re.sub(r'"(?:\\.|[^"\\])*"|\'(?:\\.|[^\'\\])*\'', '""', expr)
    if "__name__" in e:
        raise ValueError(f"name matchers are not checked, select metrics by name: {expr}")
    e = re.sub(r"\{[^{}]*\}", " ", e)  # label matchers
    e = re.sub(r"\[[^\]]*\]", " ", e)  # ranges and subqueries
    e = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", e)
    names = set()
    for m in re.finditer(r"(?<![\w.$])[A-Za-z_:][\w:]*", e):
        if m.group() in _KEYWORDS or e[m.end() :].lstrip().startswith("("):
            continue  # a keyword, or a function or aggregation being called
        names.add(m.group())
    return names


@pytest.mark.parametrize(
    "expr, names",
    [
        ("up", {"up"}),
        ('sum by (pool) (rate(a_total{pool=~"$pool"}[$__rate_interval])) > on (pool) b', {"a_total", "b"}),
        ("histogram_quantile(0.9, sum by (le) (rate(h_bucket[5m]))) > 1e6", {"h_bucket"}),
        ("x unless x offset 15m or vector(0)", {"x"}),
        ("max(g * on (instance) group_left () leader) and on () jobmesh:rec", {"g", "leader", "jobmesh:rec"}),
        ('label_replace(vector(1), "dst", "v", "", "")', set()),
    ],
)
def test_metric_names_are_read_from_promql(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_the_catalogue_holds_the_metrics_of_every_service() -> None:
    known = defined_metrics()
    for name in (
        "jobmesh_gateway_rpc_duration_seconds_bucket",
        "jobmesh_cost_rpc_errors_total",
        "jobmesh_quota_utilization_ratio",
        "jobmesh_queueing_depth_jobs",  # a scrape-time GaugeMetricFamily
        "jobmesh_queueing_wait_seconds_count",
        "jobmesh_scheduler_is_leader",
        "jobmesh_poolmanager_workers_lost_total",
        "jobmesh_up",
    ):
        assert name in known


# ------------------------------------------------------------------- a YAML subset reader (no PyYAML in .venv)


class _Yaml:
    """Block mappings and sequences, flow {}/[] of scalars, quoted and block (| >) scalars: what our files use."""

    def __init__(self, text: str):
        self.lines = text.splitlines()
        self.i = 0

    def _skip(self) -> None:
        while self.i < len(self.lines):
            text = self.lines[self.i].strip()
            if text and text != "---" and not text.startswith("#"):
                return
            self.i += 1

    def _peek(self) -> tuple[int, str] | None:
        self._skip()
        if self.i >= len(self.lines):
            return None
        line = self.lines[self.i]
        return len(line) - len(line.lstrip(" ")), line.strip()

    def node(self, min_indent: int) -> Any:
        head = self._peek()
        if head is None or head[0] < min_indent:
            return None
        return self.seq(head[0]) if head[1] == "-" or head[1].startswith("- ") else self.map(head[0])

    def seq(self, indent: int) -> list[Any]:
        items = []
        while (head := self._peek()) and head[0] == indent and (head[1] == "-" or head[1].startswith("- ")):
            rest = head[1][1:].strip()
            if not rest:
                self.i += 1
                items.append(self.node(indent + 1))
            elif re.match(r"[\w.-]+:(\s|$)", rest):
                self.lines[self.i] = " " * (indent + 2) + rest  # "- key: v" opens a mapping two columns in
                items.append(self.map(indent + 2))
            else:
                self.i += 1
                items.append(self.scalar(rest))
        return items

    def map(self, indent: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        while (head := self._peek()) and head[0] == indent and not head[1].startswith("- "):
            key, _, rest = head[1].partition(":")
            rest = rest.strip()
            self.i += 1
            if rest[:1] in ("|", ">"):
                out[key] = self.block(indent, rest)
            elif rest and not rest.startswith("#"):
                out[key] = self.scalar(rest)
            else:
                nxt = self._peek()
                same_level_seq = nxt is not None and nxt[0] == indent and nxt[1].startswith("- ")
                out[key] = self.seq(indent) if same_level_seq else self.node(indent + 1)
        return out

    def block(self, indent: int, style: str) -> str:
        body: list[str] = []
        while self.i < len(self.lines):
            line = self.lines[self.i]
            if line.strip() and len(line) - len(line.lstrip(" ")) <= indent:
                break
            body.append(line)
            self.i += 1
        while body and not body[-1].strip():
            body.pop()
        cut = min((len(s) - len(s.lstrip(" ")) for s in body if s.strip()), default=0)
        lines = [s[cut:] for s in body]
        text = " ".join(s.strip() for s in lines) if style.startswith(">") else "\n".join(lines)
        return text if style.endswith("-") else text + "\n"

    @classmethod
    def scalar(cls, s: str) -> Any:
        if s.startswith('"'):
            return json.loads(s[: s.rindex('"') + 1])
        if s.startswith("'"):
            return s[1 : s.rindex("'")].replace("''", "'")
        if s.startswith("{"):
            pairs = (p.partition(":") for p in s.strip("{} ").split(",") if p.strip())
            return {k.strip(): cls.scalar(v.strip()) for k, _, v in pairs}
        if s.startswith("["):
            return [cls.scalar(p.strip()) for p in s.strip("[] ").split(",") if p.strip()]
        return re.split(r"\s+#", s, maxsplit=1)[0].strip()


def load_yaml(path: Path) -> Any:
    return _Yaml(path.read_text()).node(0)


def rules_of(path: Path) -> list[dict[str, Any]]:
    return [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]


def test_the_yaml_reader_reads_a_rule() -> None:
    text = (
        "groups:\n  - name: g\n    # a comment\n    rules:\n      - alert: A\n        expr: |\n          up\n"
        "            == 0\n        labels: {severity: info}\n        annotations:\n"
        '          summary: "s: {{ $value }}"\n          runbook: >-\n            one\n            two\n'
    )
    assert _Yaml(text).node(0) == {
        "groups": [
            {
                "name": "g",
                "rules": [
                    {
                        "alert": "A",
                        "expr": "up\n  == 0\n",
                        "labels": {"severity": "info"},
                        "annotations": {"summary": "s: {{ $value }}", "runbook": "one two"},
                    }
                ],
            }
        ]
    }


# ------------------------------------------------------------------------------------------------- dashboards


def dashboard_exprs(dashboard: dict[str, Any]) -> list[str]:
    """Panel queries plus the metrics of label_values() template variables."""
    exprs = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for var in dashboard["templating"]["list"]:
        query = var.get("query")
        query = query.get("query", "") if isinstance(query, dict) else ""
        if m := re.fullmatch(r"label_values\((.+),\s*\w+\)", query):
            exprs.append(m.group(1))
    return exprs


def test_the_four_seed_dashboards_exist() -> None:
    titles = {json.loads(p.read_text())["title"] for p in DASHBOARDS}
    assert titles == {f"jobmesh / {t}" for t in ("Pool Overview", "Tenant Metrics", "Cost Analysis", "SLA Dashboard")}


@pytest.mark.parametrize(
    "dashboard, metric",
    [
        ("sla.json", "jobmesh_queueing_sla_compliance_ratio"),
        ("tenant-metrics.json", "jobmesh_cost_used_cpu_seconds_total"),
        ("tenant-metrics.json", "jobmesh_cost_used_memory_byte_seconds_total"),
        ("tenant-metrics.json", "jobmesh_job_execution_seconds_bucket"),
        ("tenant-metrics.json", "jobmesh_cost_tenant_running_micros"),
        ("pool-overview.json", "jobmesh_poolmanager_queue_depth_jobs"),
    ],
)
def test_the_metrics_issue_19_asked_for_are_on_their_dashboards(dashboard: str, metric: str) -> None:
    exprs = dashboard_exprs(json.loads((OBS / "grafana" / "dashboards" / dashboard).read_text()))
    assert any(metric in metric_names(expr) for expr in exprs), f"{dashboard} has no panel of {metric}"


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_a_dashboard_is_well_formed(path: Path) -> None:
    dashboard = json.loads(path.read_text())
    assert dashboard["uid"].startswith("jobmesh-") and dashboard["schemaVersion"] >= 39
    variables = {v["name"] for v in dashboard["templating"]["list"]}
    assert "datasource" in variables and variables & {"tenant", "pool"}
    panels = dashboard["panels"]
    assert len({p["id"] for p in panels}) == len(panels)
    for panel in panels:
        assert panel["type"] in {"row", "stat", "timeseries"}
        if panel["type"] != "row":
            assert panel["targets"] and panel["datasource"]["uid"] == "${datasource}", panel["title"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(set(refs)) == len(refs), panel["title"]


@pytest.mark.parametrize("path", DASHBOARDS, ids=lambda p: p.name)
def test_a_dashboard_queries_only_defined_metrics(path: Path) -> None:
    known = defined_metrics() | recorded_metrics()
    for expr in dashboard_exprs(json.loads(path.read_text())):
        assert metric_names(expr) <= known, f"{expr}: {metric_names(expr) - known} not defined in libs/ or services/"


# ------------------------------------------------------------------------------------------------ alert rules


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_a_rule_file_queries_only_defined_metrics(path: Path) -> None:
    known = defined_metrics() | recorded_metrics() | PROMETHEUS_OWN
    for rule in rules_of(path):
        names = metric_names(rule["expr"])
        assert names or "record" in rule, f"{rule['alert']}: its expression selects no metric"
        assert names <= known, f"{rule.get('alert') or rule['record']}: {names - known} not defined"


@pytest.mark.parametrize("path", RULE_FILES, ids=lambda p: p.name)
def test_every_alert_says_how_bad_and_what_happened(path: Path) -> None:
    alerts = [r for r in rules_of(path) if "alert" in r]
    assert alerts
    for alert in alerts:
        labels, notes = alert.get("labels") or {}, alert.get("annotations") or {}
        assert labels.get("severity") in SEVERITIES, alert["alert"]
        assert notes.get("summary") and notes.get("description"), alert["alert"]
        if path.name not in RUNBOOK_ELSEWHERE:
            assert notes.get("runbook"), alert["alert"]


def test_alert_names_are_unique_across_files() -> None:
    names = [r["alert"] for p in RULE_FILES for r in rules_of(p) if "alert" in r]
    assert len(names) == len(set(names))


def test_every_rule_file_of_ours_has_promtool_tests() -> None:
    tested = {t.name.removesuffix(".test.yml") for t in RULE_TESTS}
    ours = {p.name.removesuffix(".rules.yml") for p in RULE_FILES if p.name not in RUNBOOK_ELSEWHERE}
    assert ours <= tested


# -------------------------------------------------------------------------------------------------- promtool


def promtool() -> str:
    return require_tool("promtool", "Debian package `prometheus`; .ci/run installs it")


def run(*argv: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(a) for a in argv], capture_output=True, text=True, cwd=REPO, timeout=120)


def test_promtool_accepts_the_rules() -> None:
    result = run(promtool(), "check", "rules", *RULE_FILES)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_rules_pass_their_promtool_unit_tests() -> None:
    result = run(promtool(), "test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_accepts_the_prometheus_configs() -> None:
    result = run(promtool(), "check", "config", OBS / "prometheus" / "prometheus.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    # The aggregated scrape reads an admin token file that exists only where someone wrote one.
    result = run(promtool(), "check", "config", "--syntax-only", OBS / "prometheus" / "prometheus-gateway.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_parses_every_dashboard_query(tmp_path: Path) -> None:
    """Each panel query, with Grafana's variables filled in, as a recording rule that promtool must parse."""
    fill = {"$__rate_interval": "1m", "$__interval": "1m", "$__range": "1h"}
    lines = ["groups:", "  - name: dashboards", "    rules:"]
    for path in DASHBOARDS:
        for expr in dashboard_exprs(json.loads(path.read_text())):
            for var, value in fill.items():
                expr = expr.replace(var, value)
            expr = re.sub(r"\$\{?\w+\}?", ".*", expr)
            lines += ["      - record: dashboard:query", f"        expr: {json.dumps(expr)}"]
    rules = tmp_path / "dashboards.rules.yml"
    rules.write_text("\n".join(lines) + "\n")
    result = run(promtool(), "check", "rules", "--lint=none", rules)
    assert result.returncode == 0, result.stdout + result.stderr


def test_amtool_accepts_the_alertmanager_config() -> None:
    amtool = require_tool("amtool", "Debian package `prometheus-alertmanager`; .ci/run installs it")
    result = run(amtool, "check-config", OBS / "alertmanager" / "alertmanager.yml")
    assert result.returncode == 0, result.stdout + result.stderr
