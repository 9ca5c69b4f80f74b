"""The cost ledger across crashes: killing the cost service while jobs run loses no cost record and charges
nothing twice; a record that etcd refused is written once etcd is back."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from devtools.launcher import Ports, Stack
from libs.clock import SystemClock
from libs.config import load_config
from libs.etcd.client import KeyValue
from libs.keys import Keys
from services.cost.idle import WorkerInterval
from services.cost.ledger import CostLedger
from services.cost.metrics import CostMetrics
from services.cost.records import CostRecord
from tests.e2e.test_cost_e2e import COST_CONFIG, hand_cost_micros, start_cost_stack
from tests.helpers import Api, job_spec, token, wait_for
from tests.unit.cost_builders import JobBuilder

KEYS = Keys("/jobmesh")
REPLICAS = ("cost-1", "cost-2")


def stored(stack: Stack, prefix: str) -> dict[str, KeyValue]:
    async def read() -> dict[str, KeyValue]:
        etcd = stack.etcd_client()
        try:
            kvs, _, _ = await etcd.get_prefix(prefix)
            return {kv.key: kv for kv in kvs}
        finally:
            await etcd.close()

    return asyncio.run(read())


def records_of(stack: Stack) -> dict[tuple[str, int], KeyValue]:
    """(job id, attempt) -> its stored record; a second record for an attempt would need a second key."""
    out: dict[tuple[str, int], KeyValue] = {}
    for kv in stored(stack, KEYS.cost_records).values():
        record = CostRecord.from_json(kv.value)
        assert (record.job_id, record.attempt) not in out, f"{record.job_id}/{record.attempt} charged twice"
        out[(record.job_id, record.attempt)] = kv
    return out


@pytest.fixture()
def cost_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = start_cost_stack(tmp_path / "stack")
    try:
        yield stack
    finally:
        stack.stop()


def test_killing_the_cost_service_mid_run_loses_no_record_and_charges_nothing_twice(cost_stack: Stack) -> None:
    acme = Api(cost_stack.url, token(cost_stack, "acme"))
    config = load_config(COST_CONFIG)
    early = [acme.submit(job_spec(f"early-{i}", ["sleep", "0.3"], pool="static-general")) for i in range(3)]
    for job in early:
        acme.wait_terminal(job["job_id"])
    wait_for(lambda: len(records_of(cost_stack)) == 3, what="the first three records")
    before = records_of(cost_stack)

    # Jobs that are running, and that end, while cost is down; and one that ends after it is back. All on the
    # three static workers, so no scale-up slows the test down.
    static = {"pool": "static-general"}
    during = [acme.submit(job_spec(f"during-{i}", ["sleep", "1"], **static)) for i in range(2)]
    acme.wait_state(during[0]["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)
    for name in REPLICAS:  # the whole cost service down, not failing over
        cost_stack.kill(name, signal.SIGKILL)
    late = acme.submit(job_spec("late", ["sleep", "3"], **static))
    ended = [acme.wait_terminal(j["job_id"], timeout=60) for j in during]
    time.sleep(0.5)
    for name in REPLICAS:
        cost_stack.restart(name)
    ended += [acme.wait_terminal(j["job_id"], timeout=60) for j in (*early, late)]

    attempts = {(j["job_id"], a["attempt"]) for j in ended for a in j["attempts"]}

    def all_recorded() -> dict[tuple[str, int], KeyValue] | None:
        records = records_of(cost_stack)
        return records if set(records) == attempts else None

    after = wait_for(all_recorded, what="a record of every attempt")
    # The records written before the crash were not written again.
    assert {k: (kv.value, kv.mod_revision) for k, kv in after.items() if k in before} == {
        k: (kv.value, kv.mod_revision) for k, kv in before.items()
    }
    # Each job's record is what the hand computation gives, and the report adds each attempt once.
    for job in ended:
        (record,) = [CostRecord.from_json(after[(job["job_id"], 1)].value)]
        assert abs(record.cost_micros - hand_cost_micros(job, config)) <= 1
    resp = acme.call("GET", "/api/v1/cost-optimization/reports")
    assert resp.status_code == 200, resp.text
    (report,) = resp.json()["reports"]
    assert report["jobs"] == len(ended)
    assert int(report["total"]["micros"]) == sum(CostRecord.from_json(kv.value).cost_micros for kv in after.values())


def test_worker_lifetimes_survive_a_failover_and_a_restart_of_the_cost_service(cost_stack: Stack) -> None:
    prefix = "/jobmesh/cost/workers/"

    def three_static_workers() -> dict[str, KeyValue] | None:
        lifetimes = stored(cost_stack, prefix)
        return lifetimes if len(lifetimes) >= 3 else None

    def stored_starts() -> dict[str, float]:
        return {k: WorkerInterval.from_json(kv.value).start for k, kv in stored(cost_stack, prefix).items()}

    lifetimes = wait_for(three_static_workers, what="the static workers' lifetimes")
    starts = {k: WorkerInterval.from_json(kv.value).start for k, kv in lifetimes.items()}

    # The leader dies: the standby, which followed the workers from its own start, takes over from what is stored.
    leader = cost_stack.wait_leader("cost")
    cost_stack.kill(leader, signal.SIGKILL)
    wait_for(lambda: cost_stack.leader("cost") not in (None, leader), timeout=30, what="the standby to take over")
    time.sleep(1.0)
    assert {k: v for k, v in stored_starts().items() if k in starts} == starts
    cost_stack.restart(leader)

    # Both die and start again.
    for name in REPLICAS:
        cost_stack.kill(name, signal.SIGKILL)
    for name in REPLICAS:
        cost_stack.restart(name)
    cost_stack.wait_leader("cost")
    time.sleep(1.0)
    assert {k: v for k, v in stored_starts().items() if k in starts} == starts


@pytest.mark.asyncio
async def test_a_record_etcd_refused_is_counted_and_written_once_etcd_is_back(tmp_path: Path) -> None:
    stack = Stack(data_dir=tmp_path / "etcd-only", config_path=COST_CONFIG, ports=Ports.free())
    stack.start_etcd()
    stack.wait_etcd(30)
    etcd = stack.etcd_client(timeout=2.0)
    try:
        registry = CollectorRegistry()
        ledger = CostLedger(etcd, KEYS, load_config(COST_CONFIG), SystemClock(), CostMetrics(registry))
        job = JobBuilder("job-1").ended(time.time() - 10, time.time() - 5).build()
        stack.kill("etcd")

        ledger.observe(KEYS.job("acme", "job-1"), job)
        assert await ledger.flush() == 1
        assert registry.get_sample_value("jobmesh_cost_record_write_failures_total", {"record": "attempt"}) == 1

        stack.restart("etcd")
        await etcd.wait_ready()
        assert await ledger.flush() == 0
        assert await ledger.flush() == 0  # and nothing more to do
        kvs, _, _ = await etcd.get_prefix(KEYS.cost_records)
        assert [kv.key for kv in kvs] == [KEYS.cost_record("acme", "job-1", 1)]
        assert registry.get_sample_value("jobmesh_cost_records_total") == 1
    finally:
        await etcd.close()
        stack.stop()
