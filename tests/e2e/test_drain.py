"""SIGTERM to a worker agent mid-job (a rollout, a drain, a scale-down): the job is stopped after the pool's drain
grace, retried once elsewhere without using a retry, never runs twice at once, and each attempt is charged only
for the time it ran."""

from __future__ import annotations

import signal
import time
import uuid
from pathlib import Path

import psutil

from devtools.launcher import Stack
from tests.helpers import Api, Copies, job_spec, start_stack, token, wait_for, worker_pid


def test_sigterm_to_a_busy_worker_interrupts_its_job_and_retries_it_once_elsewhere(tmp_path: Path) -> None:
    # tests/fixtures/mesh.toml gives static-general a drain grace of 2 s.
    stack: Stack = start_stack(tmp_path / "stack")
    try:
        api = Api(stack.url, token(stack))
        wait_for(lambda: api.call("GET", "/api/v1/pools").json()["pools"][0]["idle_workers"] >= 3, what="workers")
        marker = f"drain-{uuid.uuid4().hex}"
        copies = Copies(marker)
        watcher = copies.watch(90)
        job = api.submit(
            job_spec("drained", ["sh", "-c", f"sleep 10; : {marker}"], max_retries=1, pool="static-general")
        )
        running = api.wait_state(job["job_id"], {"JOB_STATE_RUNNING"}, timeout=20)
        wait_for(lambda: copies.seen, interval=0.05, what="the job's process")
        time.sleep(1.0)
        psutil.Process(worker_pid(running["worker_id"])).send_signal(signal.SIGTERM)

        done = api.wait_terminal(job["job_id"], timeout=60)
        copies.stop()
        watcher.join(5)

        # Sampled every ~50 ms (less often on a loaded machine, never a second apart): never two copies at one
        # sample, and none started (by the kernel's clock) before the one before it was last seen.
        assert copies.longest_gap < 1.0, copies.longest_gap
        assert copies.most_at_once == 1, copies.seen
        assert not copies.overlapped(), copies.seen
        assert done["state"] == "JOB_STATE_SUCCEEDED", done
        first, second = done["attempts"]
        assert first["reason"] == "INTERRUPTED" and first["worker_id"] == running["worker_id"]
        assert second["reason"] == "COMPLETED" and second["worker_id"] != running["worker_id"]
        assert done.get("retries", 0) == 0  # an interruption does not use up max_retries
        assert done.get("interruptions") == 1
        ran = copies.lifetimes()
        assert len(ran) == 2, copies.seen
        # Stopped after the pool's 2 s drain grace (plus the second before the signal), not run to its end.
        assert 2.0 < ran[0] < 6.0, ran
        assert 9.0 < ran[1] < 11.5, ran

        def charged() -> list[dict[str, object]] | None:
            attempts = api.get(job["job_id"]).get("cost", {}).get("attempts", [])
            return attempts if len(attempts) == 2 else None

        costs = sorted(wait_for(charged, what="both attempts charged"), key=lambda a: int(a["attempt"]))  # type: ignore[arg-type]
        # Each attempt is charged for the seconds it ran (dispatch to recorded end), within what reporting adds.
        for cost, seconds in zip(costs, ran, strict=True):
            assert seconds - 0.2 < float(cost["run_seconds"]) < seconds + 2.0, (costs, ran)  # type: ignore[arg-type]
    finally:
        stack.stop()
