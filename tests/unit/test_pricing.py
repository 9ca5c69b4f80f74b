"""Unit tests for attempt pricing (services/cost/pricing.py): exact integer micros, hand-computed."""

from __future__ import annotations

from dataclasses import replace

import pytest

from libs.config import Pricing
from services.cost.pricing import (
    AttemptUsage,
    UsageSoFar,
    charged_resources,
    format_micros,
    price_attempt,
    used_so_far,
)
from services.cost.records import pricing_of
from tests.unit.builders import ConfigBuilder

GENERAL = Pricing(cpu_core_hour=0.040, memory_gb_hour=0.005, worker_hour=0.010)
HOUR = 3600.0

# 2 cores, 1 GiB for an hour: 2 x 0.040 + 1 x 0.005 + 0.010 = 0.095 per hour -> 95,000 micros.
TWO_CORES_ONE_GIB_ONE_HOUR = AttemptUsage(run_seconds=HOUR, requested_cpu_millis=2000, requested_memory_mb=1024)


def test_a_known_attempt_costs_exactly_95000_micros() -> None:
    assert price_attempt(TWO_CORES_ONE_GIB_ONE_HOUR, GENERAL, burst_premium=1.5) == 95_000


@pytest.mark.parametrize(
    ("usage", "micros"),
    [
        pytest.param(replace(TWO_CORES_ONE_GIB_ONE_HOUR, run_seconds=1800), 47_500, id="half-an-hour"),
        pytest.param(
            # used 3 cores on average: 10,800 CPU-seconds in an hour -> 3 x 0.040 + 0.005 + 0.010 = 0.135
            replace(TWO_CORES_ONE_GIB_ONE_HOUR, used_cpu_seconds=10_800),
            135_000,
            id="cpu-used-above-request-is-charged",
        ),
        pytest.param(
            replace(TWO_CORES_ONE_GIB_ONE_HOUR, used_cpu_seconds=360),
            95_000,
            id="cpu-used-below-request-charges-the-request",
        ),
        pytest.param(
            # peak 3 GiB: 0.080 + 3 x 0.005 + 0.010 = 0.105
            replace(TWO_CORES_ONE_GIB_ONE_HOUR, used_max_memory_mb=3072),
            105_000,
            id="memory-peak-above-request-is-charged",
        ),
        pytest.param(
            replace(TWO_CORES_ONE_GIB_ONE_HOUR, used_max_memory_mb=100),
            95_000,
            id="memory-peak-below-request-charges-the-request",
        ),
        pytest.param(replace(TWO_CORES_ONE_GIB_ONE_HOUR, burst=True), 142_500, id="burst-premium-1-5x"),
        pytest.param(replace(TWO_CORES_ONE_GIB_ONE_HOUR, run_seconds=0.0, used_cpu_seconds=5), 0, id="zero-runtime"),
        pytest.param(replace(TWO_CORES_ONE_GIB_ONE_HOUR, run_seconds=-5.0), 0, id="negative-runtime"),
        pytest.param(
            # 1 second of 0.095/h = 26.3888... micros -> 26
            replace(TWO_CORES_ONE_GIB_ONE_HOUR, run_seconds=1.0),
            26,
            id="rounds-to-the-nearest-micro",
        ),
    ],
)
def test_price_attempt(usage: AttemptUsage, micros: int) -> None:
    assert price_attempt(usage, GENERAL, burst_premium=1.5) == micros


@pytest.mark.parametrize(
    ("worker_hour", "micros"),
    [
        pytest.param(0.0000025, 2, id="half-rounds-down-to-even"),
        pytest.param(0.0000035, 4, id="half-rounds-up-to-even"),
    ],
)
def test_half_micros_round_to_even(worker_hour: float, micros: int) -> None:
    usage = AttemptUsage(run_seconds=HOUR, requested_cpu_millis=1000, requested_memory_mb=1024)

    assert price_attempt(usage, Pricing(worker_hour=worker_hour), burst_premium=1.0) == micros


def running_price(run_seconds: float, sample: UsageSoFar | None) -> int:
    """What a running attempt of TWO_CORES_ONE_GIB_ONE_HOUR's request has cost after `run_seconds`."""
    used_cpu, used_memory = used_so_far(run_seconds, sample)
    usage = replace(
        TWO_CORES_ONE_GIB_ONE_HOUR, run_seconds=run_seconds, used_cpu_seconds=used_cpu, used_max_memory_mb=used_memory
    )
    return price_attempt(usage, GENERAL, burst_premium=1.5)


@pytest.mark.parametrize(
    ("sample", "micros"),
    [
        # Half an hour at the request (2 cores, 1 GiB): 0.095 / 2.
        pytest.param(None, 47_500, id="no-sample-yet-charges-the-request"),
        pytest.param(
            # 1,800 CPU-seconds in the first 600 s: 3 cores so far -> (0.120 + 0.005 + 0.010) / 2
            UsageSoFar(elapsed_seconds=600, cpu_seconds=1800, max_memory_mb=512),
            67_500,
            id="cpu-rate-above-request-is-charged-over-the-whole-run",
        ),
        pytest.param(
            UsageSoFar(elapsed_seconds=600, cpu_seconds=300, max_memory_mb=100),
            47_500,
            id="cpu-rate-below-request-charges-the-request",
        ),
        pytest.param(
            # peak 3 GiB so far: (0.080 + 0.015 + 0.010) / 2
            UsageSoFar(elapsed_seconds=600, cpu_seconds=600, max_memory_mb=3072),
            52_500,
            id="memory-peak-above-request-is-charged",
        ),
        pytest.param(
            UsageSoFar(elapsed_seconds=0, cpu_seconds=5, max_memory_mb=0),
            47_500,
            id="a-sample-at-its-start-has-no-rate",
        ),
        pytest.param(
            UsageSoFar(elapsed_seconds=600, cpu_seconds=float("nan"), max_memory_mb=-3),
            47_500,
            id="an-impossible-sample-is-not-measured",
        ),
    ],
)
def test_a_running_attempt_is_priced_at_the_larger_of_its_request_and_its_latest_sample(
    sample: UsageSoFar | None, micros: int
) -> None:
    assert running_price(1800, sample) == micros


def test_a_running_attempt_that_keeps_its_rate_costs_what_its_final_charge_will_be() -> None:
    # 3 cores and a 3 GiB peak throughout: at the moment it ends, the running price is the final one.
    final = replace(TWO_CORES_ONE_GIB_ONE_HOUR, used_cpu_seconds=3 * HOUR, used_max_memory_mb=3072)
    sample = UsageSoFar(elapsed_seconds=HOUR / 4, cpu_seconds=3 * HOUR / 4, max_memory_mb=3072)

    assert running_price(HOUR, sample) == price_attempt(final, GENERAL, burst_premium=1.5) == 145_000


def test_the_burst_premium_multiplies_the_whole_price() -> None:
    burst = replace(TWO_CORES_ONE_GIB_ONE_HOUR, burst=True)

    assert price_attempt(burst, GENERAL, burst_premium=2.0) == 190_000
    assert price_attempt(burst, GENERAL, burst_premium=1.0) == 95_000


def test_charged_resources_take_the_larger_of_requested_and_used() -> None:
    usage = AttemptUsage(
        run_seconds=100,
        requested_cpu_millis=500,
        requested_memory_mb=2048,
        used_cpu_seconds=150,
        used_max_memory_mb=512,
    )

    cores, gib = charged_resources(usage)

    assert (float(cores), float(gib)) == (1.5, 2.0)


@pytest.mark.parametrize(
    ("micros", "text"),
    [
        pytest.param(95_000, "0.095000", id="sub-unit"),
        pytest.param(1, "0.000001", id="one-micro"),
        pytest.param(0, "0.000000", id="zero"),
        pytest.param(12_345_678, "12.345678", id="several-units"),
    ],
)
def test_format_micros(micros: int, text: str) -> None:
    assert format_micros(micros) == text


def test_jobs_sharing_a_worker_with_slots_share_its_worker_hour() -> None:
    prices = {"cpu_core_hour": 0.04, "memory_gb_hour": 0.005, "worker_hour": 0.01}
    config = (
        ConfigBuilder()
        .pool("single", "static", pricing=prices)
        .pool("shared", "static", worker_slots=4, pricing=prices)
        .build()
    )

    assert pricing_of(config, "single") == Pricing(**prices)
    assert pricing_of(config, "shared") == Pricing(cpu_core_hour=0.04, memory_gb_hour=0.005, worker_hour=0.0025)
    # Four one-hour jobs filling the shared worker pay its worker-hour once between them.
    alone = AttemptUsage(3600.0, 0, 0)
    assert 4 * price_attempt(alone, pricing_of(config, "shared"), 1.0) == price_attempt(alone, Pricing(**prices), 1.0)
