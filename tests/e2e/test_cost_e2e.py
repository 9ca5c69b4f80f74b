"""Cost through the public API on a real stack priced so that a one-second job costs about 1.2 EUR: totals match
a hand computation from the recorded attempt times, running jobs accrue, tenants see only their own costs, and an
enforced budget stops submits."""

from __future__ import annotations

import time
from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import pytest

from devtools import cli_cost
from devtools.launcher import REPO, Stack
from libs.config import MeshConfig, load_config
from tests.helpers import FAST_FAILOVER, Api, job_spec, start_stack, token, wait_for

COST_CONFIG = REPO / "tests" / "fixtures" / "cost.toml"
REPORTS = "/api/v1/cost-optimization/reports"


def start_cost_stack(data_dir: Path) -> Stack:
    """A stack on the cost fixture, publishing cost gauges every second."""
    stack = start_stack(
        data_dir,
        env=dict(FAST_FAILOVER, JOBMESH_COST_CYCLE_SECONDS="1", JOBMESH_COST_RESCAN_EVERY="2"),
        config=COST_CONFIG,
    )
    try:
        api = Api(stack.url, token(stack))
        wait_for(
            lambda: api.call("GET", "/api/v1/pools").json()["pools"][0]["idle_workers"] >= 3,
            what="static workers to register",
        )
    except BaseException:
        stack.stop()
        raise
    return stack


def rfc3339_ns(text: str) -> int:
    """Nanoseconds since the epoch of an RFC 3339 UTC time as the transcoder prints it (up to 9 decimals)."""
    from datetime import UTC, datetime

    whole, _, fraction = text.rstrip("Z").partition(".")
    seconds = int(datetime.fromisoformat(whole).replace(tzinfo=UTC).timestamp())
    return seconds * 10**9 + int((fraction or "0").ljust(9, "0")[:9])


def hand_cost_micros(job: dict[str, Any], config: MeshConfig) -> Fraction:
    """The job's cost, worked out here from its attempts as the API shows them, independently of the service's
    pricing code: per attempt, (cores x core-hour + GiB x GB-hour + worker-hour) x hours, charging the larger of
    requested and used for each resource, times the burst premium for burst jobs."""
    requested = job["spec"]["resources"]
    total = Fraction(0)
    for attempt in job["attempts"]:
        pool = config.pool(attempt["pool_id"])
        assert pool is not None
        seconds = Fraction(rfc3339_ns(attempt["end_time"]) - rfc3339_ns(attempt["start_time"]), 10**9)
        cores = max(Fraction(requested["cpu_millis"], 1000), Fraction(str(attempt["cpu_seconds"])) / seconds)
        gib = Fraction(max(requested["memory_mb"], attempt["max_memory_mb"]), 1024)
        p = pool.pricing
        per_hour = cores * Fraction(str(p.cpu_core_hour)) + gib * Fraction(str(p.memory_gb_hour))
        per_hour += Fraction(str(p.worker_hour))
        cost = per_hour * seconds / 3600 * 10**6
        total += cost * Fraction(str(config.burst_premium)) if job.get("burst_session_id") else cost
    return total


def micros(money: dict[str, Any]) -> int:
    return int(money.get("micros", 0))


@pytest.fixture(scope="module")
def cost_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_cost_stack(tmp_path_factory.mktemp("cost-stack"))
    try:
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="module")
def config() -> MeshConfig:
    return load_config(COST_CONFIG)


@pytest.fixture()
def acme(cost_stack: Stack) -> Api:
    return Api(cost_stack.url, token(cost_stack, "acme"))


@pytest.fixture()
def globex(cost_stack: Stack) -> Api:
    return Api(cost_stack.url, token(cost_stack, "globex"))


@pytest.fixture()
def admin(cost_stack: Stack) -> Api:
    return Api(cost_stack.url, token(cost_stack, "initech", admin=True))


def report_of(api: Api, **params: str) -> dict[str, Any]:
    resp = api.call("GET", REPORTS, params=params)
    assert resp.status_code == 200, resp.text
    return dict(resp.json())


def test_reported_costs_match_a_hand_computation_from_the_recorded_attempt_times(acme: Api, config: MeshConfig) -> None:
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 1))
    # Spins until it has used 0.8 s of CPU (bounded by 20 s of wall time): on a loaded machine a second of wall
    # time can be well under half a second of CPU.
    hog = (
        "b = bytearray(80 * 1024 * 1024); import time; end = time.time() + 20\n"
        "while time.process_time() < 0.8 and time.time() < end: pass"
    )
    specs = [
        job_spec("sleep-small", ["sleep", "1"]),
        job_spec("sleep-bigger", ["sleep", "1"], resources={"cpu_millis": 500, "memory_mb": 512}),
        # Uses its whole core and most of its 128 MB: charged at the larger of requested and used. (A sandboxed
        # job cannot use more than it asked for: memory is a hard limit, CPU a quota.)
        job_spec("busy", ["python3", "-c", hog], resources={"cpu_millis": 1000, "memory_mb": 128}),
    ]
    jobs = [acme.wait_terminal(acme.submit(spec)["job_id"], timeout=60) for spec in specs]
    assert all(j["state"] == "JOB_STATE_SUCCEEDED" for j in jobs), jobs
    busy = jobs[2]["attempts"][0]
    assert busy["max_memory_mb"] > 64 and busy["cpu_seconds"] > 0.5, busy

    hand = {j["job_id"]: hand_cost_micros(j, config) for j in jobs}
    for job in jobs:
        # The cost on the job itself, to the micro (the cent is 10,000 of them).
        assert abs(micros(job["cost"]["total"]) - hand[job["job_id"]]) <= 1, (job["cost"], float(hand[job["job_id"]]))
    assert micros(jobs[0]["cost"]["total"]) > 1_000_000  # a second of this mesh is worth more than a unit

    ids = {j["job_id"] for j in jobs}
    end = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 2))

    def charged() -> dict[str, Any] | None:
        (report,) = report_of(acme, start=since, end=end)["reports"]
        return report if report["jobs"] >= len(ids) else None

    report = wait_for(charged, what="the three jobs in the report")
    assert report["jobs"] == len(ids)  # nothing else of acme's ended in this window
    assert abs(micros(report["total"]) - sum(hand.values(), Fraction(0))) <= len(ids)
    assert [line["key"] for line in report["by_pool"]] == ["static-general"]
    assert micros(report["by_pool"][0]["cost"]) == micros(report["total"])
    assert sum(micros(line["cost"]) for line in report["by_day"]) == micros(report["total"])
    assert micros(report["burst_spend"]) == 0


def test_a_running_job_shows_its_cost_growing_and_in_the_tenant_gauge(acme: Api, admin: Api) -> None:
    job = acme.submit(job_spec("long", ["sleep", "4"]))
    acme.wait_state(job["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)

    first = micros(acme.get(job["job_id"])["cost"]["total"])
    time.sleep(1.0)
    second = micros(acme.get(job["job_id"])["cost"]["total"])

    assert 0 < first < second
    gauge = 'jobmesh_cost_tenant_running_micros{instance="'

    def running_gauge() -> float:
        text = admin.call("GET", "/api/v1/metrics/prometheus").text
        lines = [x for x in text.splitlines() if x.startswith(gauge) and 'tenant="acme"' in x]
        return float(lines[0].rsplit(" ", 1)[1]) if lines else 0.0

    assert wait_for(lambda: running_gauge() > 0, timeout=10, what="the running cost gauge")
    done = acme.wait_terminal(job["job_id"])
    assert micros(done["cost"]["total"]) >= second


def test_tenants_only_ever_see_their_own_costs(acme: Api, globex: Api, admin: Api) -> None:
    theirs = globex.wait_terminal(globex.submit(job_spec("globex-costed", ["sleep", "0.5"]))["job_id"])
    wait_for(lambda: report_of(globex)["reports"][0]["jobs"] > 0, what="globex's report")

    mine = report_of(acme)
    assert [r["tenant_id"] for r in mine["reports"]] == ["acme"]
    assert "idle_cost" not in mine
    assert report_of(acme, tenant_id="acme")["reports"] == mine["reports"]
    forbidden = acme.call("GET", REPORTS, params={"tenant_id": "globex"})
    assert forbidden.status_code == 403
    assert "globex" not in forbidden.text.replace("tenant_id", "")
    assert acme.call("GET", f"/api/v1/jobs/{theirs['job_id']}").status_code == 404
    assert acme.call("GET", "/api/v1/tenants/globex/budget").status_code == 403

    everyone = report_of(admin)
    assert {"acme", "globex", "__idle__"} <= {r["tenant_id"] for r in everyone["reports"]}
    assert micros(everyone["idle_cost"]) > 0  # three static workers cost far more than these few jobs


def test_a_report_over_centuries_is_refused_at_once_and_other_tenants_keep_their_answers(
    acme: Api, globex: Api
) -> None:
    """Was: ~740k day windows built on the cost service's only loop, 504 after 10 s, budgets timed out meanwhile."""
    resp = acme.call("GET", REPORTS, params={"start": "0001-01-01T00:00:00Z"})
    assert resp.status_code == 400, resp.text
    body = resp.json()
    assert "400 days" in body["message"]
    assert body["details"][0]["metadata"]["field"] == "start"
    # The longest allowed period is answered, and another tenant's report and budget answer right after.
    longest = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() - 399 * 86400))
    assert report_of(acme, start=longest)["reports"][0]["tenant_id"] == "acme"
    assert report_of(globex)["reports"][0]["tenant_id"] == "globex"
    assert globex.call("GET", "/api/v1/tenants/globex/budget").status_code == 200


def test_an_admin_budget_is_validated_and_shown_to_its_tenant(acme: Api, globex: Api, admin: Api) -> None:
    path = "/api/v1/tenants/acme/budget"
    try:
        assert acme.call("PUT", path, json={"monthly_limit": "5", "policy": "enforce"}).status_code == 403
        bad = admin.call("PUT", path, json={"monthly_limit": "five", "policy": "enforce"})
        assert bad.status_code == 400
        assert bad.json()["details"][0]["metadata"]["field"] == "monthly_limit"
        bad_policy = admin.call("PUT", path, json={"monthly_limit": "5", "policy": "stop"})
        assert bad_policy.json()["details"][0]["metadata"]["field"] == "policy"
        unknown = admin.call("PUT", "/api/v1/tenants/umbrella/budget", json={"monthly_limit": "5"})
        assert unknown.status_code == 404

        set_ = admin.call("PUT", path, json={"monthly_limit": "250000.00", "policy": "notify"})
        assert set_.status_code == 200, set_.text

        budget = acme.call("GET", path).json()
        assert (budget["monthly_limit"]["amount"], budget["policy"]) == ("250000.000000", "notify")
        assert budget["utilization"] == pytest.approx(micros(budget["spent_this_month"]) / 250_000_000_000)
    finally:
        admin.call("PUT", path, json={"monthly_limit": "0"})
    assert "monthly_limit" not in acme.call("GET", path).json()


def test_an_enforced_budget_refuses_submits_within_seconds_once_it_is_spent(globex: Api, admin: Api) -> None:
    path = "/api/v1/tenants/globex/budget"
    try:
        resp = admin.call("PUT", path, json={"monthly_limit": "0.50", "policy": "enforce"})
        assert resp.status_code == 200, resp.text
        if resp.json()["utilization"] < 1.0:  # globex may already have spent it in an earlier test
            job = globex.submit(job_spec("spends-it", ["sleep", "1"]))
            globex.wait_terminal(job["job_id"])

        def refused() -> dict[str, Any] | None:
            attempt = globex.call("POST", "/api/v1/jobs", json=job_spec("one-more"))
            return attempt.json() if attempt.status_code == 429 else None

        body = wait_for(refused, timeout=10, interval=0.5, what="submits to be refused")
        assert body["details"][0]["reason"] == "BUDGET_EXCEEDED"
    finally:
        admin.call("PUT", path, json={"monthly_limit": "0"})
    wait_for(
        lambda: globex.call("POST", "/api/v1/jobs", json=job_spec("after-budget", ["true"])).status_code == 200,
        timeout=10,
        interval=0.5,
        what="submits to be accepted again without a budget",
    )


def test_the_cli_prints_the_report_as_tables(cost_stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--url", cost_stack.url, "--tenant-token", "acme", "--data-dir", str(cost_stack.data_dir)]
    args = _parse(["cost", "report", *argv, "--config", str(COST_CONFIG)])

    assert cli_cost.cmd_cost_report(args) == 0

    out = capsys.readouterr().out
    assert out.startswith("Cost report (EUR)")
    assert "acme" in out and "static-general" in out and "globex" not in out


def _parse(argv: list[str]) -> Any:
    import argparse

    parser = argparse.ArgumentParser(prog="jobmesh")
    cli_cost.add_cost_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)
