"""The cost roll-up in the running mesh, through Envoy: jobs run, their records are deleted with them and rolled up
into daily aggregates, and the tenant's report for the day is the same before, after, and after a SIGKILL and
restart of the cost service."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from devtools.launcher import Stack
from libs.keys import Keys
from services.cost.keys import CostKeys
from tests.e2e.test_cost_e2e import COST_CONFIG, REPORTS
from tests.helpers import FAST_FAILOVER, Api, job_spec, start_stack, token, wait_for

KEYS = CostKeys("/jobmesh")
RECORDS = Keys("/jobmesh").cost_records


@pytest.fixture()
def stack(tmp_path: Path) -> Iterator[Stack]:
    # Finished jobs go after 1 s; their records roll up 8 s after their last attempt ended.
    config = tmp_path / "cost-rollup.toml"
    config.write_text(COST_CONFIG.read_text() + "\n[retention]\nfinished_job_seconds = 1\ncost_rollup_seconds = 8\n")
    env = dict(FAST_FAILOVER, JOBMESH_COST_CYCLE_SECONDS="1", JOBMESH_QUEUEING_RETENTION_SWEEP_SECONDS="0.5")
    stack = start_stack(tmp_path / "stack", env=env, config=config)
    try:
        yield stack
    finally:
        stack.stop()


def count(stack: Stack, prefix: str) -> int:
    async def read() -> int:
        etcd = stack.etcd_client()
        try:
            kvs, _, _ = await etcd.get_prefix(prefix, keys_only=True)
            return len(kvs)
        finally:
            await etcd.close()

    return asyncio.run(read())


def the_day() -> str:
    """Today's UTC date; with less than 30 s of it left, tomorrow's, once it has begun: the test's jobs all run (and
    are charged) within the day its reports cover."""
    left = 86400 - time.time() % 86400
    if left < 30:
        time.sleep(left + 1)
    return time.strftime("%Y-%m-%d", time.gmtime())


def report_of(api: Api, day: str) -> dict[str, Any]:
    """The tenant's report over one whole UTC day, without the recommendations' wording (it says how busy the
    tenant was over the part of the day that has passed, which grows)."""
    first = datetime.strptime(day, "%Y-%m-%d").replace(tzinfo=UTC)
    start, end = (t.strftime("%Y-%m-%dT%H:%M:%SZ") for t in (first, first + timedelta(days=1)))
    resp = api.call("GET", REPORTS, params={"start": start, "end": end})
    assert resp.status_code == 200, resp.text
    (report,) = resp.json()["reports"]
    for rec in report.get("recommendations", []):
        rec.pop("description", None)
    return dict(report)


def test_a_day_s_report_is_the_same_once_its_records_rolled_up_and_after_a_cost_restart(stack: Stack) -> None:
    day = the_day()
    acme = Api(stack.url, token(stack, "acme"))
    jobs = [acme.submit(job_spec(f"r{i}", ["sleep", "0.2"], pool="static-general")) for i in range(4)]
    wait_for(lambda: count(stack, RECORDS) == 4, timeout=60, what="the four cost records")
    before = report_of(acme, day)
    assert before["jobs"] == 4 and int(before["total"]["micros"]) > 0, before

    wait_for(lambda: count(stack, RECORDS) == 0, timeout=60, what="the records to roll up")
    assert count(stack, KEYS.daily) >= 1
    assert all(acme.call("GET", f"/api/v1/jobs/{j['job_id']}").status_code == 404 for j in jobs)
    assert report_of(acme, day) == before

    leader = stack.wait_leader("cost")  # the standby takes over; the killed leader comes back as the standby
    stack.kill(leader, signal.SIGKILL)
    stack.restart(leader)
    wait_for(lambda: acme.call("GET", REPORTS).status_code == 200, timeout=60, what="cost to answer again")
    assert report_of(acme, day) == before
