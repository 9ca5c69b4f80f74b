"""Job output, watching a job and dry runs, over REST through Envoy as a user would call them."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from devtools.launcher import Stack
from tests.helpers import Api, job_spec

REPO = Path(__file__).resolve().parents[2]
TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}


@contextmanager
def _stream(api: Api, path: str, params: dict[str, str] | None = None) -> Iterator[httpx.Response]:
    with (
        httpx.Client(base_url=api.base, headers={"Authorization": f"Bearer {api.token}"}, timeout=60.0) as client,
        client.stream("GET", path, params=params) as resp,
    ):
        yield resp


def test_the_log_holds_stdout_and_stderr_and_a_failed_job_says_why(acme: Api) -> None:
    script = "echo to-stdout; echo to-stderr >&2; echo 'fatal: config missing' >&2; exit 3"
    job = acme.submit(job_spec("logged", ["sh", "-c", script]))
    done = acme.wait_terminal(job["job_id"])
    assert done["state"] == "JOB_STATE_FAILED"
    assert "fatal: config missing" in done["message"], done["message"]
    assert "to-stdout" not in done["message"]  # only stderr goes into the message
    resp = acme.call("GET", f"/api/v1/jobs/{job['job_id']}/logs")
    assert resp.status_code == 200, resp.text
    assert resp.headers["content-type"].startswith("text/plain")
    assert resp.text.splitlines() == ["to-stdout", "to-stderr", "fatal: config missing"]


def test_another_tenant_cannot_read_the_log(acme: Api, globex: Api) -> None:
    job = acme.submit(job_spec("secret-output", ["sh", "-c", "echo acme-secret-4711"]))
    acme.wait_terminal(job["job_id"])
    assert "acme-secret-4711" in acme.call("GET", f"/api/v1/jobs/{job['job_id']}/logs").text
    for path in (f"/api/v1/jobs/{job['job_id']}/logs", f"/api/v1/jobs/{job['job_id']}:watch"):
        resp = globex.call("GET", path, params={"follow": "true"} if path.endswith("logs") else None)
        assert resp.status_code == 404, resp.text
        assert "acme-secret-4711" not in resp.text
        assert resp.json()["details"][0]["reason"] == "JOB_NOT_FOUND"


def test_following_the_log_shows_lines_while_the_job_prints(acme: Api) -> None:
    # Long enough that its first lines come while it runs even on a loaded machine.
    script = "for i in 1 2 3 4 5 6 7 8 9 10; do echo line-$i; sleep 0.5; done"
    job = acme.submit(job_spec("printer", ["sh", "-c", script]))
    acme.wait_state(job["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)
    seen: list[tuple[str, str]] = []
    with _stream(acme, f"/api/v1/jobs/{job['job_id']}/logs", {"follow": "true"}) as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line:
                seen.append((line, acme.get(job["job_id"])["state"]))
    assert [line for line, _ in seen] == [f"line-{i}" for i in range(1, 11)]
    assert seen[0][1] == "JOB_STATE_RUNNING"  # the first line came while the job still ran
    assert acme.get(job["job_id"])["state"] == "JOB_STATE_SUCCEEDED"  # the stream ended with the job


def test_watch_streams_each_state_until_the_job_ends(acme: Api) -> None:
    job = acme.submit(job_spec("watched", ["sh", "-c", "sleep 4; exit 0"]))
    states: list[str] = []
    with _stream(acme, f"/api/v1/jobs/{job['job_id']}:watch") as resp:
        assert resp.status_code == 200
        for line in resp.iter_lines():
            if line.strip():
                states.append(json.loads(line)["state"])
    assert states[-1] == "JOB_STATE_SUCCEEDED"
    assert "JOB_STATE_RUNNING" in states
    order = ["JOB_STATE_PENDING", "JOB_STATE_RUNNING", "JOB_STATE_SUCCEEDED"]
    assert [order.index(s) for s in states] == sorted(order.index(s) for s in states)


def test_watch_of_a_cancelled_job_ends_with_cancelled(acme: Api) -> None:
    job = acme.submit(job_spec("to-cancel", ["sleep", "30"]))
    acme.wait_state(job["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)
    states: list[str] = []

    def watch() -> None:
        with _stream(acme, f"/api/v1/jobs/{job['job_id']}:watch") as resp:
            for line in resp.iter_lines():
                if line.strip():
                    states.append(json.loads(line)["state"])

    watcher = threading.Thread(target=watch)
    watcher.start()
    time.sleep(0.5)
    assert acme.cancel(job["job_id"]).status_code == 200
    watcher.join(timeout=30)
    assert not watcher.is_alive()
    assert states[0] == "JOB_STATE_RUNNING" and states[-1] == "JOB_STATE_CANCELLED"


def _job_count(api: Api) -> int:
    return len(api.call("GET", "/api/v1/jobs", params={"page_size": 500}).json()["jobs"])


def test_a_dry_run_answers_admission_start_and_cost_and_creates_nothing(globex: Api) -> None:
    before = _job_count(globex)
    spec = job_spec("dry", ["sleep", "1"], max_runtime_seconds=600)
    resp = globex.call("POST", "/api/v1/jobs:dryRun", json=spec)
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["valid"] is True and answer["violations"] == []
    assert answer["admission"]["admitted"] is True
    assert answer["start"]["queue"] == "default"
    assert answer["start"]["position"] >= 1
    assert answer["start"]["basis"]
    cost = answer["cost"]
    assert cost["runtime_seconds"] == 600
    assert set(cost["pool_ids"]) >= {"static-general"}
    # 600 s of 0.1 core and 64 MB on static-general, the cheapest: (0.1 x 0.04 + 0.0625 x 0.005 + 0.01) / 6
    assert int(cost["low"]["micros"]) == 2_385
    assert int(cost["high"]["micros"]) > 2_385  # dynamic-large costs more
    assert cost["low"]["currency"] == "USD"
    assert _job_count(globex) == before


def test_a_dry_run_names_the_blocking_limit_with_its_numbers(globex: Api) -> None:
    spec = job_spec("too-big", ["true"], resources={"cpu_millis": 65000, "memory_mb": 64})
    answer = globex.call("POST", "/api/v1/jobs:dryRun", json=spec).json()
    assert answer["valid"] is False
    assert answer["violations"][0]["reason"] == "UNSCHEDULABLE"
    admission = answer["admission"]
    assert admission["admitted"] is False
    assert admission["reason"] == "QUOTA_EXCEEDED"
    assert admission["metadata"]["limit"] == "cpu_millis"
    assert admission["metadata"]["limit_value"] == "64000"
    bad = globex.call("POST", "/api/v1/jobs:dryRun", json={"name": "", "command": []}).json()
    assert bad["valid"] is False and bad["violations"][0]["field"]


def test_the_openapi_document_is_served_without_a_token(stack: Stack) -> None:
    resp = httpx.get(f"{stack.url}/api/v1/openapi.yaml", timeout=30)
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("application/yaml")
    assert resp.text == (REPO / "docs" / "openapi.yaml").read_text()
