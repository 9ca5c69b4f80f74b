"""A new user's first jobs over REST through Envoy: submit, watch, list, cancel."""

from __future__ import annotations

import time

import httpx

from devtools.launcher import Stack
from tests.helpers import Api, job_spec, wait_for


def test_a_submitted_job_is_pending_then_runs_and_succeeds_with_its_cost(acme: Api) -> None:
    job = acme.submit(job_spec("hello", ["sh", "-c", "echo hi"]))
    assert job["state"] == "JOB_STATE_PENDING"
    assert job["tenant_id"] == "acme"
    assert job["job_id"]
    done = acme.wait_terminal(job["job_id"])
    assert done["state"] == "JOB_STATE_SUCCEEDED", done
    assert done["exit_code"] == 0
    assert done["pool_id"] in {"static-general", "static-recycled"}  # a static pool hit
    assert done["worker_id"].startswith(done["pool_id"] + "-")
    assert done["attempt"] == 1
    assert done["start_time"] >= done["create_time"]
    assert done["end_time"] >= done["start_time"]
    assert done["cost"]["total"]["currency"] == "USD"
    assert len(done["cost"]["attempts"]) == 1


def test_a_running_job_is_shown_as_running(acme: Api) -> None:
    job = acme.submit(job_spec("sleeper", ["sleep", "2"]))
    running = acme.wait_state(job["job_id"], {"JOB_STATE_RUNNING"}, timeout=20)
    assert running["worker_id"]
    assert acme.wait_terminal(job["job_id"])["state"] == "JOB_STATE_SUCCEEDED"


def test_a_failing_command_fails_with_its_exit_code(acme: Api) -> None:
    job = acme.submit(job_spec("fails", ["sh", "-c", "exit 3"]))
    done = acme.wait_terminal(job["job_id"])
    assert done["state"] == "JOB_STATE_FAILED"
    assert done["exit_code"] == 3
    assert done["reason"] == "EXIT_CODE"


def test_env_and_max_runtime_reach_the_worker(acme: Api) -> None:
    ok = acme.submit(job_spec("env", ["sh", "-c", 'test "$GREETING" = hello'], env={"GREETING": "hello"}))
    slow = acme.submit(job_spec("slow", ["sleep", "30"], max_runtime_seconds=1))
    assert acme.wait_terminal(ok["job_id"])["state"] == "JOB_STATE_SUCCEEDED"
    timed_out = acme.wait_terminal(slow["job_id"], timeout=30)
    assert timed_out["state"] == "JOB_STATE_FAILED"
    assert timed_out["reason"] == "TIMEOUT"


def test_listing_pages_through_only_the_callers_jobs(acme: Api, globex: Api) -> None:
    theirs = globex.submit(job_spec("globex-job"))
    mine = {acme.submit(job_spec(f"list-{i}"))["job_id"] for i in range(5)}
    seen: list[str] = []
    token = ""
    pages = 0
    while True:
        resp = acme.call(
            "GET", "/api/v1/jobs", params={"page_size": 2, "page_token": token} if token else {"page_size": 2}
        )
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert len(body["jobs"]) <= 2
        seen += [j["job_id"] for j in body["jobs"]]
        assert all(j["tenant_id"] == "acme" for j in body["jobs"])
        pages += 1
        token = body["next_page_token"]
        if not token:
            break
    assert mine <= set(seen)
    assert theirs["job_id"] not in seen
    assert len(seen) == len(set(seen))
    assert pages >= 3


def test_listing_filters_by_state(acme: Api) -> None:
    job = acme.submit(job_spec("filtered", ["sh", "-c", "exit 1"]))
    acme.wait_terminal(job["job_id"])
    resp = acme.call("GET", "/api/v1/jobs", params={"state": "JOB_STATE_FAILED", "page_size": 500})
    states = {j["state"] for j in resp.json()["jobs"]}
    assert states == {"JOB_STATE_FAILED"}


def test_cancel_kills_a_running_job_and_cancels_a_pending_one(acme: Api, stack: Stack) -> None:
    # Fill every static worker so the last job has to wait.
    blockers = [acme.submit(job_spec(f"block-{i}", ["sleep", "60"], pool="static-general")) for i in range(3)]
    for b in blockers:
        acme.wait_state(b["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)
    waiting = acme.submit(job_spec("waits", ["true"], pool="static-general"))
    time.sleep(0.5)
    assert acme.get(waiting["job_id"])["state"] == "JOB_STATE_PENDING"

    resp = acme.cancel(waiting["job_id"])
    assert resp.status_code == 200, resp.text
    assert resp.json()["state"] == "JOB_STATE_CANCELLED"

    started = time.monotonic()
    for b in blockers:
        resp = acme.cancel(b["job_id"])
        assert resp.status_code == 200, resp.text
        assert resp.json()["state"] == "JOB_STATE_CANCELLED"
    # Killed for real: the workers are free again long before the 60 s sleeps would end.
    after = acme.submit(job_spec("after-cancel", ["true"], pool="static-general"))
    assert acme.wait_terminal(after["job_id"], timeout=30)["state"] == "JOB_STATE_SUCCEEDED"
    assert time.monotonic() - started < 30
    assert acme.get(waiting["job_id"])["state"] == "JOB_STATE_CANCELLED"
    assert all(acme.get(b["job_id"])["state"] == "JOB_STATE_CANCELLED" for b in blockers)


def cancels_sent(admin: Api) -> float:
    """Cancels the pool-manager replicas sent to workers, summed."""
    text = admin.call("GET", "/api/v1/metrics/prometheus").text
    return sum(
        float(x.rsplit(" ", 1)[1]) for x in text.splitlines() if x.startswith("jobmesh_poolmanager_cancels_sent_total")
    )


def test_workers_hear_of_cancelled_jobs_only_not_of_jobs_that_ended(acme: Api, admin: Api) -> None:
    before = cancels_sent(admin)
    for job in [acme.submit(job_spec(f"ends-{i}", ["true"])) for i in range(4)]:
        assert acme.wait_terminal(job["job_id"])["state"] == "JOB_STATE_SUCCEEDED"
    time.sleep(0.5)  # the assignments' deletes have reached both replicas
    assert cancels_sent(admin) == before

    sleeper = acme.submit(job_spec("cancelled-while-running", ["sleep", "60"]))
    acme.wait_state(sleeper["job_id"], {"JOB_STATE_RUNNING"}, timeout=30)
    assert acme.cancel(sleeper["job_id"]).status_code == 200
    assert wait_for(lambda: cancels_sent(admin) == before + 1, timeout=10, what="one cancel sent to the worker")


def test_cancelling_a_finished_job_is_refused_and_changes_nothing(acme: Api) -> None:
    job = acme.submit(job_spec("quick", ["true"]))
    acme.wait_terminal(job["job_id"])
    resp = acme.cancel(job["job_id"])
    assert resp.status_code == 400
    assert resp.json()["details"][0]["reason"] == "JOB_FINISHED"
    assert acme.get(job["job_id"])["state"] == "JOB_STATE_SUCCEEDED"


def test_an_idempotency_key_returns_the_first_job(acme: Api) -> None:
    first = acme.submit(job_spec("idem", ["true"], idempotency_key="nightly-2026-11-28"))
    again = acme.submit(job_spec("idem", ["true"], idempotency_key="nightly-2026-11-28"))
    assert again["job_id"] == first["job_id"]


def test_a_job_that_needs_the_large_pool_scales_it_up_and_runs_there(acme: Api) -> None:
    job = acme.submit(
        job_spec(
            "large",
            ["true"],
            required_capabilities={"class": "large"},
            resources={"cpu_millis": 1500, "memory_mb": 1500},
        )
    )
    done = acme.wait_terminal(job["job_id"], timeout=60)
    assert done["state"] == "JOB_STATE_SUCCEEDED", done
    assert done["pool_id"] == "dynamic-large"
    history = acme.call("GET", "/api/v1/pools/dynamic-large/scaling/history").json()
    ups = [e for e in history["events"] if e["direction"] == "up" and e["executed"]]
    assert ups and ups[0]["from_workers"] == 0 and ups[0]["to_workers"] >= 1
    assert ups[0]["trigger"] == "queue_depth"


def test_pools_and_pool_metrics_show_live_workers(acme: Api) -> None:
    pools = {p["pool_id"]: p for p in acme.call("GET", "/api/v1/pools").json()["pools"]}
    assert pools["static-general"]["kind"] == "POOL_KIND_STATIC"
    assert pools["dynamic-large"]["kind"] == "POOL_KIND_DYNAMIC"
    assert pools["static-general"]["workers"] == 3
    metrics = wait_for(
        lambda: (m := acme.call("GET", "/api/v1/pools/static-general/metrics").json())["jobs_succeeded"] > 0 and m,
        what="pool metrics",
    )
    assert sum(metrics["workers_by_state"].values()) == 3
    assert 0.0 <= metrics["success_rate"] <= 1.0
    assert acme.call("GET", "/api/v1/pools/nope/metrics").status_code == 404


def test_cost_report_covers_only_the_callers_jobs(acme: Api, globex: Api, admin: Api) -> None:
    job = acme.submit(job_spec("costed", ["sleep", "0.3"]))
    acme.wait_terminal(job["job_id"])
    body = wait_for(
        lambda: (b := acme.call("GET", "/api/v1/cost-optimization/reports").json())["reports"][0]["jobs"] > 0 and b,
        what="cost records",
    )
    assert [r["tenant_id"] for r in body["reports"]] == ["acme"]
    assert int(body["reports"][0]["total"]["micros"]) > 0
    assert globex.call("GET", "/api/v1/cost-optimization/reports", params={"tenant_id": "acme"}).status_code == 403
    everyone = admin.call("GET", "/api/v1/cost-optimization/reports").json()
    assert "acme" in {r["tenant_id"] for r in everyone["reports"]}


def test_prometheus_endpoint_serves_the_whole_mesh_to_admins_only(stack: Stack, acme: Api, admin: Api) -> None:
    assert acme.call("GET", "/api/v1/metrics/prometheus").status_code == 403
    resp = admin.call("GET", "/api/v1/metrics/prometheus")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    text = resp.text
    for name in (
        "jobmesh_gateway_rpc_duration_seconds",
        "jobmesh_quota_decisions_total",
        "jobmesh_queueing_enqueued_total",
        "jobmesh_scheduler_dispatched_total",
        "jobmesh_poolmanager_results_total",
        "jobmesh_cost_records_total",
    ):
        assert name in text, name
    # Both gateways are in it, each by its address, whichever of them answered.
    for name in ("gateway-1", "gateway-2"):
        assert f'jobmesh_up{{instance="127.0.0.1:{stack.metrics_port(name)}"}} 1' in text, name


def test_only_the_leaders_of_quota_and_queueing_show_their_state_gauges(stack: Stack, acme: Api) -> None:
    # A pending-free queue still has a depth sample per queue and every tenant a usage sample, on the leader only:
    # a standby holds the same state, and dashboards add these gauges over instances.
    acme.wait_terminal(acme.submit(job_spec("gauges", ["true"]))["job_id"])
    for kind, gauge in (("quota", "jobmesh_quota_usage{"), ("queueing", "jobmesh_queueing_tenant_weight{")):
        leader = stack.wait_leader(kind)
        standby = next(n for n in stack.LEADER_SERVED[kind][1] if n != leader)

        def shown(name: str, gauge: str = gauge) -> bool:
            text = httpx.get(f"http://127.0.0.1:{stack.metrics_port(name)}/metrics", timeout=5).text
            return any(line.startswith(gauge) for line in text.splitlines())

        wait_for(lambda leader=leader: shown(leader), timeout=10, what=f"{kind} leader's gauges")
        wait_for(lambda standby=standby: not shown(standby), timeout=10, what=f"{kind} standby without gauges")


def test_every_service_watching_the_jobs_counts_the_events_its_informers_received(stack: Stack, acme: Api) -> None:
    # The fan-out of etcd's writes (what much of a job's cost is, docs/benchmarks.md) is visible per process:
    # leader and standby of each service that keeps the job records receive every change of one.
    def events(name: str) -> float:
        text = httpx.get(f"http://127.0.0.1:{stack.metrics_port(name)}/metrics", timeout=5).text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith('jobmesh_informer_events_total{informer="jobs"}')
        )

    watchers = [name for kind in ("quota", "queueing", "cost") for name in stack.LEADER_SERVED[kind][1]]
    before = {name: events(name) for name in watchers}
    acme.wait_terminal(acme.submit(job_spec("watched", ["true"]))["job_id"])
    for name in watchers:  # created, started and ended: at least three changes of the record
        wait_for(lambda name=name: events(name) >= before[name] + 3, timeout=10, what=f"{name}'s jobs informer")


def test_every_replicated_service_counts_its_leader_terms(stack: Stack) -> None:
    # A flapping leadership shows in jobmesh_leader_losses_total (alert LeaderFlapping); each election has begun at
    # least one term on one of its replicas, and every replica exposes the loss counter.
    replicas = {
        "quota": ("quota-1", "quota-2"),
        "queueing": ("queueing-1", "queueing-2"),
        "cost": ("cost-1", "cost-2"),
        "scheduler": ("scheduler-1", "scheduler-2"),
        "pool-manager": ("poolmanager-1", "poolmanager-2"),
    }
    for election, names in replicas.items():
        texts = [httpx.get(f"http://127.0.0.1:{stack.metrics_port(n)}/metrics", timeout=5).text for n in names]
        begun = sum(
            float(line.rsplit(" ", 1)[1])
            for text in texts
            for line in text.splitlines()
            if line.startswith(f'jobmesh_leader_terms_total{{election="{election}"}}')
        )
        assert begun >= 1, election
        assert all("# TYPE jobmesh_leader_losses_total counter" in text for text in texts), election
