"""Retries over the whole stack through Envoy: a failing command is retried up to max_retries with backoff, each
attempt listed with its reason and charged once; retry_on limits what is retried; a job backing off shows it,
holds up no other tenant's job, and is still backing off after the queueing service is SIGKILLed."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from google.protobuf.timestamp_pb2 import Timestamp

import jobmesh
from devtools.launcher import REPO, Stack
from jobmesh.common.v1 import types_pb2 as t
from tests.e2e.test_client import cli
from tests.helpers import FAST_FAILOVER, Api, job_spec, start_stack, token, wait_for

RETRIES_CONFIG = REPO / "tests" / "fixtures" / "retries.toml"
# tests/fixtures/mesh.toml's [retries]: 0.5 s before the first retry, doubling.
FIRST_BACKOFF = 0.5


def at(stamp: str) -> float:
    parsed = Timestamp()
    parsed.FromJsonString(stamp)
    return float(parsed.ToNanoseconds() / 1e9)


def charged_attempts(api: Api, job_id: str, count: int) -> list[dict[str, Any]]:
    def charged() -> list[dict[str, Any]] | None:
        attempts = api.get(job_id).get("cost", {}).get("attempts", [])
        return attempts if len(attempts) >= count else None

    return wait_for(charged, timeout=30, what=f"{count} charged attempts")  # type: ignore[no-any-return]


def test_a_failing_command_with_two_retries_runs_three_times_with_backoff_and_fails(acme: Api) -> None:
    job = acme.submit(job_spec("fails-thrice", ["sh", "-c", "exit 1"], max_retries=2))

    done = acme.wait_terminal(job["job_id"], timeout=60)

    assert (done["state"], done["reason"], done["exit_code"]) == ("JOB_STATE_FAILED", "EXIT_CODE", 1), done
    assert (done["attempt"], done["retries"]) == (3, 2)
    attempts = done["attempts"]
    assert [(a["attempt"], a["reason"], a["exit_code"]) for a in attempts] == [
        (1, "EXIT_CODE", 1),
        (2, "EXIT_CODE", 1),
        (3, "EXIT_CODE", 1),
    ]
    # Each retry started no earlier than its backoff after the attempt before ended (0.5 s, then 1 s).
    for n, backoff in ((1, FIRST_BACKOFF), (2, 2 * FIRST_BACKOFF)):
        gap = at(attempts[n]["start_time"]) - at(attempts[n - 1]["end_time"])
        assert gap >= backoff - 1e-3, (n, gap, attempts)
    assert "next_attempt_time" not in done
    # Charged per attempt that ran, each once.
    charged = charged_attempts(acme, job["job_id"], 3)
    assert sorted(c["attempt"] for c in charged) == [1, 2, 3]


def test_retry_on_worker_lost_only_leaves_a_failing_command_with_one_attempt(acme: Api) -> None:
    job = acme.submit(job_spec("no-retry", ["sh", "-c", "exit 1"], max_retries=2, retry_on=["WORKER_LOST"]))

    done = acme.wait_terminal(job["job_id"])

    assert (done["state"], done["reason"], done["attempt"]) == ("JOB_STATE_FAILED", "EXIT_CODE", 1), done
    assert done.get("retries", 0) == 0
    assert done["spec"]["retry_on"] == ["WORKER_LOST"]


def test_a_retry_on_value_that_is_not_a_retryable_reason_is_a_400_naming_it(acme: Api) -> None:
    resp = acme.call("POST", "/api/v1/jobs", json=job_spec("bad", max_retries=1, retry_on=["EXIT_CODE", "OOPS"]))

    assert resp.status_code == 400, resp.text
    details = resp.json()["details"]
    info = next(d for d in details if d.get("reason"))
    assert (info["reason"], info["metadata"]["field"]) == ("INVALID_ARGUMENT", "retry_on[1]")


@pytest.fixture()
def slow_backoff(tmp_path: Path) -> Iterator[Stack]:
    """A one-worker stack whose first retry waits 12 s (tests/fixtures/retries.toml)."""
    stack = start_stack(tmp_path / "retries", env=dict(FAST_FAILOVER), config=RETRIES_CONFIG)
    try:
        api = Api(stack.url, token(stack, "acme"))
        wait_for(lambda: api.call("GET", "/api/v1/pools").json()["pools"][0]["idle_workers"] >= 1, what="worker")
        yield stack
    finally:
        stack.stop()


def test_a_backing_off_job_holds_up_no_one_and_survives_a_queueing_restart(slow_backoff: Stack) -> None:
    acme = Api(slow_backoff.url, token(slow_backoff, "acme"))
    globex = Api(slow_backoff.url, token(slow_backoff, "globex"))
    job = acme.submit(job_spec("fails-once", ["sh", "-c", "exit 1"], max_retries=1))

    waiting = wait_for(
        lambda: (j := acme.get(job["job_id"]))["state"] == "JOB_STATE_PENDING" and j.get("retries") == 1 and j,
        what="the first attempt to fail",
    )
    assert waiting["waiting_reason"] == "BACKING_OFF", waiting
    failed_at = at(waiting["attempts"][0]["end_time"])
    assert at(waiting["next_attempt_time"]) == pytest.approx(failed_at + 12, abs=1e-3)
    assert "retry 1 of 1" in waiting["message"]

    # The only worker is free while acme's job backs off: another tenant's job runs meanwhile.
    theirs = globex.submit(job_spec("meanwhile", ["true"]))
    assert globex.wait_terminal(theirs["job_id"], timeout=10)["state"] == "JOB_STATE_SUCCEEDED"

    # Its backoff is in its record: the queueing service, both replicas SIGKILLed, comes back knowing it.
    replicas = ("queueing-1", "queueing-2")
    for name in replicas:
        slow_backoff.kill(name)
    for name in replicas:
        slow_backoff.restart(name)
    slow_backoff.wait_leader("queueing")
    again = acme.get(job["job_id"])
    assert (again["state"], again["waiting_reason"], again["attempt"]) == ("JOB_STATE_PENDING", "BACKING_OFF", 1)

    done = acme.wait_terminal(job["job_id"], timeout=40)
    assert (done["state"], done["attempt"], done["retries"]) == ("JOB_STATE_FAILED", 2, 1)
    assert at(done["attempts"][1]["start_time"]) >= failed_at + 12 - 1e-3


def test_the_cli_and_the_sdk_pass_retry_on(stack: Stack) -> None:
    failed = cli(stack, "-o", "json", "submit", "--max-retries", "1", "--retry-on", "WORKER_LOST", "--wait", "--",
                 "sh", "-c", "exit 1")  # fmt: skip
    assert failed.returncode == 1, failed.stderr
    job = json.loads(failed.stdout)
    assert (job["spec"]["retry_on"], job["attempt"]) == (["WORKER_LOST"], 1)

    refused = cli(stack, "submit", "--retry-on", "SOMETIMES", "--", "true")
    assert refused.returncode == 2 and "retry_on[0]" in refused.stderr

    with jobmesh.Client(stack.url, token(stack, "acme")) as client:
        submitted = client.submit(
            ["sh", "-c", "exit 4"],
            name="sdk-retry",
            cpu_millis=100,
            memory_mb=64,
            max_retries=1,
            retry_on=["EXIT_CODE"],
        )
        done = client.wait(submitted.job_id, timeout=60)
    assert (done.state, done.attempt, list(done.spec.retry_on)) == (t.JOB_STATE_FAILED, 2, ["EXIT_CODE"])
    assert [(a.reason, a.exit_code) for a in done.attempts] == [("EXIT_CODE", 4), ("EXIT_CODE", 4)]
