#!/usr/bin/env python3
"""Fairness of the queue for a configurable mix: per-tenant dispatch shares against weight shares, Jain's index,
and SLA compliance per tier, from a simulation of N workers draining the real fair queue on a fake clock.

Arrivals are either a backlog (every job queued at t=0) or Poisson streams whose combined rate is --load times
what the workers can run (--load above 1 keeps the queue growing). Shares are of the service dispatched (job
cost, the quantity weights divide) over the first --window dispatches; by default, for a backlog, until the
first tenant runs out of jobs (every tenant backlogged throughout), for Poisson arrivals half of all jobs.

Examples:
    .venv/bin/python bench/fairness.py
    .venv/bin/python bench/fairness.py --weights a=1,b=2,c=3 --workers 4 --jobs 2000 --costs a=1,b=1,c=2
    .venv/bin/python bench/fairness.py --arrival poisson --load 1.3 --tiers gold=0.05,standard=0.65,batch=0.3
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from collections import defaultdict
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # normally on the venv's path already (jobmesh-dev.pth)
    sys.path.insert(0, str(REPO))

from services.queueing.simulation import SimJob, Simulation, jain_index  # noqa: E402
from services.queueing.sla import SlaPolicy  # noqa: E402


def mapping(text: str) -> dict[str, float]:
    pairs = [item.split("=", 1) for item in text.split(",") if item]
    return {name.strip(): float(value) for name, value in pairs}


def workload(args: argparse.Namespace, weights: dict[str, float], rng: random.Random) -> list[SimJob]:
    costs = mapping(args.costs) if args.costs else {}
    tiers = mapping(args.tiers)
    tier_names, tier_odds = list(tiers), list(tiers.values())
    capacity = args.workers / args.run_seconds  # jobs per second the workers can start
    jobs = []
    for tenant in weights:
        at = 0.0
        for n in range(args.jobs):
            if args.arrival == "poisson":
                at += rng.expovariate(capacity * args.load / len(weights))
            tier = rng.choices(tier_names, tier_odds)[0]
            deadline = at + args.deadline_seconds if rng.random() < args.deadline_share else None
            jobs.append(
                SimJob(f"{tenant}-{n}", tenant, at, args.run_seconds, costs.get(tenant, 1.0), tier, 0, deadline)
            )
    return jobs


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(pct / 100 * (len(ordered) - 1)))] if ordered else 0.0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="acme=1,globex=2,initech=3", help="tenant=weight,...")
    parser.add_argument("--costs", default="", help="tenant=job cost (dominant resource; default 1 each)")
    parser.add_argument("--workers", type=int, default=4)
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per tenant")
    parser.add_argument("--run-seconds", type=float, default=1.0, help="each job's run time")
    parser.add_argument("--arrival", choices=("backlog", "poisson"), default="backlog")
    parser.add_argument("--load", type=float, default=1.5, help="poisson: offered load over capacity")
    parser.add_argument("--tiers", default="standard=1", help="tier=share of jobs,...")
    parser.add_argument("--targets", default="gold=30,standard=300,batch=3600", help="tier=target wait seconds")
    parser.add_argument("--default-tier", default="standard")
    parser.add_argument("--boost-fraction", type=float, default=0.5)
    parser.add_argument("--start-slack", type=float, default=2.0)
    parser.add_argument("--deadline-share", type=float, default=0.0, help="share of jobs with a deadline")
    parser.add_argument("--deadline-seconds", type=float, default=60.0, help="deadline after submission")
    parser.add_argument("--window", type=int, default=0, help="dispatches to count shares over (0: half)")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()

    weights = mapping(args.weights)
    policy = SlaPolicy(mapping(args.targets), args.default_tier, args.boost_fraction, args.start_slack)
    jobs = workload(args, weights, random.Random(args.seed))
    result = Simulation(weights, args.workers, policy).run(jobs)
    window = args.window or (result.backlogged_prefix() if args.arrival == "backlog" else len(jobs) // 2)

    shares = result.service_shares(window)
    total_weight = sum(weights.values())
    waits: dict[str, list[float]] = defaultdict(list)
    for start in result.starts:
        waits[policy.tier(start.job.tier)].append(start.at - start.job.submit_at)
    compliance = result.compliance(policy)

    print(f"{len(result.starts)} jobs on {args.workers} workers; service shares over the first {window} dispatches")
    print(f"{'tenant':<12}{'weight share':>14}{'service share':>16}{'ratio':>8}")
    for tenant, w in weights.items():
        share = shares.get(tenant, 0.0)
        expected = w / total_weight
        print(f"{tenant:<12}{expected:>14.4f}{share:>16.4f}{share / expected:>8.3f}")
    jain = jain_index({t: shares.get(t, 0.0) for t in weights}, weights)
    print(f"Jain's index of weight-normalised shares: {jain:.5f}")
    print(f"{'tier':<12}{'jobs':>8}{'compliance':>12}{'wait p50 s':>12}{'wait p99 s':>12}")
    for tier in sorted(waits):
        print(
            f"{tier:<12}{len(waits[tier]):>8}{compliance[tier]:>12.4f}"
            f"{percentile(waits[tier], 50):>12.1f}{percentile(waits[tier], 99):>12.1f}"
        )
    summary = {
        "weights": weights,
        "workers": args.workers,
        "jobs": len(result.starts),
        "window": window,
        "shares": {t: round(s, 4) for t, s in shares.items()},
        "jain": round(jain, 5),
        "sla_compliance": {t: round(c, 4) for t, c in compliance.items()},
    }
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
