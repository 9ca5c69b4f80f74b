"""Failover benchmark: how long each replicated service kind is without a leader after its leader is SIGKILLed,
and what submits see meanwhile.

Starts a private stack (leader lease --leader-ttl seconds, 2 as in `make run`) and, for each kind in --kinds,
--rounds times: submits `true` jobs over REST at --rate jobs/s, SIGKILLs the current leader (found from its
leader key in etcd), and measures
  takeover_s       from the kill to a new leader key held by another replica (read every 20 ms);
  serving_s        for a kind whose calls follow its leader's health (quota, queueing, cost): from the kill to another
                   replica answering SERVING for the service, i.e. when clients' calls go there;
  submit errors    submits answered other than 200 in the round, and the longest submit latency.
Then starts the killed replica again (as the launcher's supervisor would) before the next round. Every loop is
bounded by its count and by --timeout-seconds. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import threading
import time
from pathlib import Path

import httpx

from devtools.launcher import Stack
from libs.keys import Keys
from tests.helpers import job_spec, start_stack, token

# kind -> (leader key role, the replicas' process names)
KINDS = {
    "quota": ("quota", ("quota-1", "quota-2")),
    "queueing": ("queueing", ("queueing-1", "queueing-2")),
    "cost": ("cost", ("cost-1", "cost-2")),
    "scheduler": ("scheduler", ("scheduler-1", "scheduler-2")),
    "poolmanager": ("pool-manager", ("poolmanager-1", "poolmanager-2")),
}


def leader_key(stack: Stack, role: str) -> tuple[str, int] | None:
    """(the replica holding the role's leader key, the key's create revision), or None when vacant."""

    async def read() -> tuple[str, int] | None:
        etcd = stack.etcd_client()
        try:
            kv = await etcd.get(Keys("/jobmesh").leader(role))
            return None if kv is None else (kv.value.decode(), kv.create_revision)
        finally:
            await etcd.close()

    return asyncio.run(read())


def submit_steadily(stack: Stack, rate: float, seconds: float, out: list[tuple[int, float]]) -> None:
    headers = {"Authorization": f"Bearer {token(stack, 'acme')}"}
    start = time.monotonic()
    with httpx.Client(base_url=stack.url, headers=headers, timeout=30) as client:
        for n in range(int(rate * seconds)):
            time.sleep(max(0.0, start + n / rate - time.monotonic()))
            sent = time.monotonic()
            status = client.post("/api/v1/jobs", json=job_spec("failover", ["true"])).status_code
            out.append((status, time.monotonic() - sent))


def one_round(stack: Stack, kind: str, args: argparse.Namespace) -> dict[str, object]:
    role, replicas = KINDS[kind]
    held = leader_key(stack, role)
    assert held is not None and held[0] in replicas, held
    leader, revision = held
    answers: list[tuple[int, float]] = []
    submitter = threading.Thread(target=submit_steadily, args=(stack, args.rate, args.round_seconds, answers))
    submitter.start()
    time.sleep(args.round_seconds / 4)
    killed = time.monotonic()
    stack.kill(leader)
    takeover = serving = None
    end = killed + args.timeout_seconds
    while time.monotonic() < end and (takeover is None or (kind in stack.LEADER_SERVED and serving is None)):
        now = time.monotonic() - killed
        if takeover is None:
            new = leader_key(stack, role)
            if new is not None and new[1] != revision:
                takeover = now
        if kind in stack.LEADER_SERVED and serving is None and stack.leader(kind) not in (None, leader):
            serving = now
        time.sleep(0.02)
    submitter.join()
    stack.restart(leader)
    failed = [s for s, _ in answers if s != 200]
    return {
        "killed": leader,
        "takeover_s": None if takeover is None else round(takeover, 2),
        "serving_s": None if serving is None else round(serving, 2),
        "submits": len(answers),
        "submit_errors": len(failed),
        "max_submit_s": round(max((lat for _, lat in answers), default=0.0), 2),
    }


def summary(rounds: list[dict[str, object]], field: str) -> dict[str, float] | None:
    values = [float(r[field]) for r in rounds if r[field] is not None]  # type: ignore[arg-type]
    if not values:
        return None
    return {"median": round(statistics.median(values), 2), "max": round(max(values), 2)}


def measure(args: argparse.Namespace) -> dict[str, object]:
    result: dict[str, object] = {"leader_ttl_s": args.leader_ttl, "rate": args.rate}
    with tempfile.TemporaryDirectory() as tmp:
        env = {"JOBMESH_LEADER_TTL": str(args.leader_ttl), "JOBMESH_LOG_LEVEL": "WARNING"}
        stack = start_stack(Path(tmp) / "stack", env=env)
        try:
            for kind in args.kinds.split(","):
                rounds = [one_round(stack, kind, args) for _ in range(args.rounds)]
                result[kind] = {
                    "takeover_s": summary(rounds, "takeover_s"),
                    "serving_s": summary(rounds, "serving_s"),
                    "submit_errors": sum(int(r["submit_errors"]) for r in rounds),  # type: ignore[call-overload]
                    "max_submit_s": max(float(r["max_submit_s"]) for r in rounds),  # type: ignore[arg-type]
                    "rounds": rounds,
                }
        finally:
            stack.stop()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kinds", default=",".join(KINDS), help=f"comma-separated, of {', '.join(KINDS)}")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rate", type=float, default=10.0, help="submits per second during a round")
    parser.add_argument("--round-seconds", type=float, default=12.0)
    parser.add_argument("--leader-ttl", type=int, default=2)
    parser.add_argument("--timeout-seconds", type=float, default=30.0)
    print(json.dumps(measure(parser.parse_args())))
