"""A backlog waiting in `default` is the static pool's: its queue depth counts the jobs the routing rule would place
on it, in the pool's metrics (the API) and in Prometheus (the pool-manager leader's gauge)."""

from __future__ import annotations

from pathlib import Path

from tests.helpers import Api, job_spec, start_stack, token, wait_for, without_sandbox

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
BACKLOG = 40


def test_a_backlog_in_default_shows_in_the_static_pools_queue_depth(tmp_path: Path) -> None:
    stack = start_stack(tmp_path / "stack", config=without_sandbox(FIXTURES / "backlog.toml", tmp_path))
    try:
        api = Api(stack.url, token(stack))
        admin = Api(stack.url, token(stack, admin=True))
        holder = api.submit(job_spec("holder", ["sleep", "120"]))
        api.wait_state(holder["job_id"], {"JOB_STATE_RUNNING"})
        waiting = [api.submit(job_spec(f"waiting-{i}", ["true"]))["job_id"] for i in range(BACKLOG)]
        assert {api.get(job_id)["queue"] for job_id in waiting[:3]} == {"default"}

        def depth() -> int:
            return int(api.call("GET", "/api/v1/pools/static-only/metrics").json()["queue_depth"])

        wait_for(lambda: depth() == BACKLOG, timeout=30, what=f"the static pool's queue depth to reach {BACKLOG}")

        def gauge() -> list[float]:
            """The gauge's samples for the pool across the mesh: one, from the leader (a standby shows none)."""
            text = admin.call("GET", "/api/v1/metrics/prometheus").text
            return [
                float(line.rsplit(" ", 1)[1])
                for line in text.splitlines()
                if line.startswith("jobmesh_poolmanager_queue_depth_jobs{") and 'pool="static-only"' in line
            ]

        wait_for(lambda: gauge() == [float(BACKLOG)], timeout=30, what="the pool-manager leader's queue depth gauge")
        api.cancel(holder["job_id"])
        for job_id in waiting:
            api.wait_terminal(job_id)
        wait_for(lambda: depth() == 0, timeout=30, what="the queue depth to fall back to 0")
    finally:
        stack.stop()
