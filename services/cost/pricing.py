"""Pricing of job attempts in integer micro-units of the mesh currency. Pure."""

from __future__ import annotations

import math
from dataclasses import dataclass
from decimal import ROUND_HALF_EVEN, Decimal

from libs.config import Pricing

MICROS = 1_000_000


@dataclass(frozen=True)
class AttemptUsage:
    run_seconds: float
    requested_cpu_millis: int
    requested_memory_mb: int
    used_cpu_seconds: float = 0.0
    used_max_memory_mb: int = 0
    burst: bool = False


def measured(value: float) -> float:
    """A usage figure as a worker reported it, or 0 (not measured) when it cannot be true: NaN, infinite or
    negative. The pool-manager refuses such results; this keeps a record stored before that (or by a bug) from
    breaking the arithmetic of every later cycle."""
    return value if math.isfinite(value) and value >= 0 else 0.0


@dataclass(frozen=True)
class UsageSoFar:
    """What a running attempt had used when its worker last measured it, `elapsed_seconds` into its run."""

    elapsed_seconds: float
    cpu_seconds: float
    max_memory_mb: int


def used_so_far(run_seconds: float, sample: UsageSoFar | None) -> tuple[float, int]:
    """A running attempt's use over its `run_seconds` so far, as `price_attempt` takes it (used CPU seconds, peak
    MB): the CPU rate of its latest sample carried over the whole run so far, and its peak memory so far, so that
    it is charged max(requested, used) as its final charge will be. Without a sample (or one taken at its start),
    nothing used: it is priced at what it requested."""
    if sample is None:
        return 0.0, 0
    memory_mb = max(sample.max_memory_mb, 0)
    elapsed = measured(sample.elapsed_seconds)
    if elapsed <= 0:
        return 0.0, memory_mb
    return measured(sample.cpu_seconds) / elapsed * measured(run_seconds), memory_mb


def charged_resources(u: AttemptUsage) -> tuple[Decimal, Decimal]:
    """Cores and GiB charged: the larger of what was requested and what was used (OpenCost's rule)."""
    cores_requested = Decimal(u.requested_cpu_millis) / 1000
    run_seconds = measured(u.run_seconds)
    cpu_seconds = measured(u.used_cpu_seconds)
    cores_used = Decimal(str(cpu_seconds)) / Decimal(str(run_seconds)) if run_seconds > 0 else Decimal(0)
    gib = Decimal(max(u.requested_memory_mb, u.used_max_memory_mb)) / 1024
    return max(cores_requested, cores_used), gib


def price_attempt(u: AttemptUsage, pricing: Pricing, burst_premium: float) -> int:
    """(cores x core-hour + GiB x GiB-hour + worker-hour) x hours, times the premium for burst; in micros."""
    cores, gib = charged_resources(u)
    hours = Decimal(str(measured(u.run_seconds))) / 3600
    per_hour = (
        cores * Decimal(str(pricing.cpu_core_hour))
        + gib * Decimal(str(pricing.memory_gb_hour))
        + Decimal(str(pricing.worker_hour))
    )
    amount = per_hour * hours
    if u.burst:
        amount *= Decimal(str(burst_premium))
    return int((amount * MICROS).quantize(Decimal(1), rounding=ROUND_HALF_EVEN))


def format_micros(micros: int) -> str:
    return f"{Decimal(micros) / MICROS:.6f}"
