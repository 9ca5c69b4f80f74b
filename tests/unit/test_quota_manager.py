"""Unit tests for quota admission (services/quota/manager.py), driven by a FakeClock."""

from __future__ import annotations

import pytest

from libs.clock import FakeClock
from libs.config import QuotaLimits
from libs.errors import InvalidArgument, NotFound, ResourceExhausted
from services.quota.manager import RESERVATION_TTL, BurstPolicy, Holding, QuotaManager, Usage
from tests.unit.builders import ConfigBuilder

# acme: 4 cores, 4 GiB, 4 jobs; globex has the (large) defaults; the burst pool lends 8 cores, 8 GiB, 8 jobs.
ACME = QuotaLimits(cpu_millis=4000, memory_mb=4096, concurrent_jobs=4)
# The pool-accounting tests let one tenant take it all; the per-tenant cap has tests of its own.
POOL = BurstPolicy(cpu_millis=8000, memory_mb=8192, concurrent_jobs=8, max_duration_seconds=600, max_tenant_share=1.0)


class QuotaWorld:
    """A QuotaManager over a parsed config and a FakeClock, with short verbs for the tests."""

    def __init__(self, burst: BurstPolicy = POOL):
        config = (
            ConfigBuilder()
            .tenant(
                "acme", 1, cpu_millis=ACME.cpu_millis, memory_mb=ACME.memory_mb, concurrent_jobs=ACME.concurrent_jobs
            )
            .tenant("globex", 2)
            .build()
        )
        self.clock = FakeClock()
        self.quota = QuotaManager(config, self.clock, burst)
        self._n = 0

    def admit(
        self, tenant: str = "acme", *, cpu: int = 100, mem: int = 64, job_id: str | None = None, burst: bool = False
    ) -> str:
        self._n += 1
        return self.quota.reserve(tenant, job_id or f"job-{self._n}", cpu, mem, burst)

    def usage(self, tenant: str = "acme") -> Usage:
        return self.quota.usage(tenant)


@pytest.fixture
def world() -> QuotaWorld:
    return QuotaWorld()


ADMISSION_CASES = [
    # (resource, per-job cpu, per-job memory, jobs that exactly fill the limit)
    pytest.param("cpu_millis", 1000, 64, 4, str(ACME.cpu_millis), id="cpu"),
    pytest.param("memory_mb", 100, 1024, 4, str(ACME.memory_mb), id="memory"),
    pytest.param("concurrent_jobs", 10, 10, 4, str(ACME.concurrent_jobs), id="concurrent-jobs"),
]


@pytest.mark.parametrize(("resource", "cpu", "mem", "fits", "limit_value"), ADMISSION_CASES)
def test_admission_is_exact_at_the_limit(
    world: QuotaWorld, resource: str, cpu: int, mem: int, fits: int, limit_value: str
) -> None:
    for _ in range(fits):
        assert world.admit(cpu=cpu, mem=mem) == ""
    full = world.usage()

    with pytest.raises(ResourceExhausted) as refused:
        world.admit(cpu=cpu, mem=mem)

    assert getattr(full, resource) == int(limit_value)
    assert refused.value.reason == "QUOTA_EXCEEDED"
    assert refused.value.metadata["limit"] == resource
    assert refused.value.metadata["limit_value"] == limit_value
    assert refused.value.metadata["usage"] == limit_value
    assert world.usage() == full  # the refused job holds nothing


def test_a_refusal_without_burst_hints_at_a_burst_session(world: QuotaWorld) -> None:
    with pytest.raises(ResourceExhausted) as refused:
        world.admit(cpu=ACME.cpu_millis + 1)

    assert "burst" in refused.value.message
    assert refused.value.metadata["usage"] == "0"


def test_reserving_the_same_job_twice_counts_it_once(world: QuotaWorld) -> None:
    world.admit(cpu=1000, mem=512, job_id="same")
    world.admit(cpu=1000, mem=512, job_id="same")

    assert world.usage() == Usage(cpu_millis=1000, memory_mb=512, concurrent_jobs=1)


def test_observing_a_job_active_moves_its_reservation_to_live_without_double_counting(world: QuotaWorld) -> None:
    world.admit(cpu=1000, mem=512, job_id="j1")

    world.quota.observe("acme", "j1", True, Holding("acme", 1000, 512))
    world.clock.advance(RESERVATION_TTL * 10)  # a live job does not expire like a reservation

    assert world.usage() == Usage(1000, 512, 1)


def test_observing_a_job_ended_releases_it_exactly_once(world: QuotaWorld) -> None:
    world.admit(cpu=1000, mem=512, job_id="j1")
    world.admit(cpu=500, mem=256, job_id="j2")
    world.quota.observe("acme", "j1", True, Holding("acme", 1000, 512))

    world.quota.observe("acme", "j1", False, None)
    world.quota.observe("acme", "j1", False, None)

    assert world.usage() == Usage(500, 256, 1)


def test_release_drops_a_reservation(world: QuotaWorld) -> None:
    world.admit(cpu=4000, mem=512, job_id="j1")

    world.quota.release("acme", "j1")

    assert world.usage() == Usage()
    assert world.admit(cpu=4000) == ""  # the freed CPU is admissible again


def test_a_reservation_expires_after_its_ttl(world: QuotaWorld) -> None:
    world.admit(cpu=4000, mem=512, job_id="j1")

    world.clock.advance(RESERVATION_TTL)
    assert world.usage().cpu_millis == 4000  # still held at exactly the TTL

    world.clock.advance(0.001)
    assert world.usage() == Usage()
    assert world.admit(cpu=4000) == ""


def test_repeating_an_expired_reservation_holds_the_resources_again(world: QuotaWorld) -> None:
    world.admit(cpu=4000, mem=512, job_id="j1")
    world.clock.advance(RESERVATION_TTL + 1)

    world.admit(cpu=4000, mem=512, job_id="j1")

    assert world.usage() == Usage(4000, 512, 1)


def test_set_limits_keeps_the_fields_left_out(world: QuotaWorld) -> None:
    updated = world.quota.set_limits("acme", 8000, None, None)

    assert updated == QuotaLimits(cpu_millis=8000, memory_mb=ACME.memory_mb, concurrent_jobs=ACME.concurrent_jobs)
    assert world.quota.limits("acme") == updated
    assert world.quota.set_limits("acme", None, None, 9) == QuotaLimits(8000, ACME.memory_mb, 9)


def test_raised_limits_take_effect_for_admission(world: QuotaWorld) -> None:
    world.admit(cpu=4000)
    world.quota.set_limits("acme", 5000, None, None)

    assert world.admit(cpu=1000) == ""
    with pytest.raises(ResourceExhausted):
        world.admit(cpu=1)


@pytest.mark.parametrize(
    ("cpu", "mem", "jobs", "field"),
    [
        pytest.param(0, None, None, "limits.cpu_millis", id="zero-cpu"),
        pytest.param(None, -1, None, "limits.memory_mb", id="negative-memory"),
        pytest.param(None, None, 0, "limits.concurrent_jobs", id="zero-jobs"),
    ],
)
def test_set_limits_refuses_non_positive_values(
    world: QuotaWorld, cpu: int | None, mem: int | None, jobs: int | None, field: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        world.quota.set_limits("acme", cpu, mem, jobs)

    assert refused.value.field == field
    assert world.quota.limits("acme") == ACME


@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda q: q.set_limits("nobody", 1000, None, None), id="set-limits"),
        pytest.param(lambda q: q.grant_burst("nobody", 1000, 1024, 1, 60, "me"), id="grant-burst"),
        pytest.param(lambda q: q.check_tenant("nobody"), id="check-tenant"),
    ],
)
def test_an_unknown_tenant_is_not_found(world: QuotaWorld, call: object) -> None:
    with pytest.raises(NotFound) as missing:
        call(world.quota)  # type: ignore[operator]

    assert missing.value.reason == "TENANT_NOT_FOUND"


def test_a_burst_within_the_pool_is_granted_for_its_duration(world: QuotaWorld) -> None:
    session = world.quota.grant_burst("acme", 4000, 4096, 4, 600, "ops@acme")

    assert (session.cpu_millis, session.memory_mb, session.concurrent_jobs) == (4000, 4096, 4)
    assert session.expire - session.start == 600
    assert world.quota.active_session("acme") == session
    assert world.quota.burst_left() == Usage(4000, 4096, 4)


def test_a_burst_larger_than_what_is_left_is_refused(world: QuotaWorld) -> None:
    with pytest.raises(ResourceExhausted) as refused:
        world.quota.grant_burst("acme", POOL.cpu_millis + 1, 1024, 1, 60, "me")

    assert refused.value.reason == "BURST_UNAVAILABLE"
    assert refused.value.metadata["cpu_millis_left"] == str(POOL.cpu_millis)


def test_two_tenants_cannot_together_exceed_the_burst_pool(world: QuotaWorld) -> None:
    world.quota.grant_burst("acme", 6000, 4096, 4, 600, "me")

    with pytest.raises(ResourceExhausted) as refused:
        world.quota.grant_burst("globex", 2001, 1024, 1, 600, "me")
    granted = world.quota.grant_burst("globex", 2000, 4096, 4, 600, "me")

    assert refused.value.reason == "BURST_UNAVAILABLE"
    assert refused.value.metadata["cpu_millis_left"] == "2000"
    assert granted.tenant_id == "globex"
    assert world.quota.burst_left() == Usage(0, 0, 0)


def test_one_tenant_may_take_only_its_share_of_the_burst_pool_and_the_error_names_the_cap() -> None:
    world = QuotaWorld(BurstPolicy(8000, 8192, 8, 600, max_tenant_share=0.5))

    with pytest.raises(ResourceExhausted) as refused:
        world.quota.grant_burst("acme", 4001, 1024, 1, 600, "me")
    granted = world.quota.grant_burst("acme", 4000, 4096, 4, 600, "me")

    assert refused.value.reason == "BURST_UNAVAILABLE"
    assert refused.value.metadata["tenant_cap_cpu_millis"] == "4000"
    assert "50% of the burst pool" in str(refused.value)
    assert granted.cpu_millis == 4000
    # The other half stays for the others.
    assert world.quota.burst_left() == Usage(4000, 4096, 4)
    assert world.quota.grant_burst("globex", 4000, 4096, 4, 600, "me").tenant_id == "globex"


def test_a_second_burst_for_the_same_tenant_is_refused_while_one_is_active(world: QuotaWorld) -> None:
    world.quota.grant_burst("acme", 1000, 1024, 1, 60, "me")

    with pytest.raises(ResourceExhausted) as refused:
        world.quota.grant_burst("acme", 1000, 1024, 1, 60, "me")

    assert refused.value.reason == "BURST_UNAVAILABLE"
    world.clock.advance(60)
    assert world.quota.grant_burst("acme", 1000, 1024, 1, 60, "me").tenant_id == "acme"


def test_a_burst_session_ends_at_exactly_its_expire_time(world: QuotaWorld) -> None:
    session = world.quota.grant_burst("acme", 8000, 8192, 8, 60, "me")

    world.clock.advance(59.999)
    assert world.quota.active_session("acme") == session
    assert world.quota.burst_left() == Usage(0, 0, 0)

    world.clock.advance(0.001)
    assert world.clock.now() == session.expire
    assert world.quota.active_session("acme") is None
    assert world.quota.burst_left() == Usage(POOL.cpu_millis, POOL.memory_mb, POOL.concurrent_jobs)


@pytest.mark.parametrize(
    ("cpu", "mem", "jobs", "duration", "field"),
    [
        pytest.param(0, 0, 0, 60, "cpu_millis", id="nothing-asked"),
        pytest.param(-1, 1024, 1, 60, "cpu_millis", id="negative-amount"),
        pytest.param(1000, 1024, 1, 0, "duration_seconds", id="zero-duration"),
        pytest.param(1000, 1024, 1, POOL.max_duration_seconds + 1, "duration_seconds", id="too-long"),
    ],
)
def test_a_malformed_burst_request_is_invalid(
    world: QuotaWorld, cpu: int, mem: int, jobs: int, duration: int, field: str
) -> None:
    with pytest.raises(InvalidArgument) as refused:
        world.quota.grant_burst("acme", cpu, mem, jobs, duration, "me")

    assert refused.value.field == field
    assert world.quota.sessions == {}


def test_a_burst_job_beyond_base_quota_is_admitted_against_the_session(world: QuotaWorld) -> None:
    world.admit(cpu=4000, mem=1024)  # base CPU now full
    session = world.quota.grant_burst("acme", 2000, 2048, 2, 60, "me")

    used = world.admit(cpu=2000, mem=1024, burst=True)

    assert used == session.session_id
    assert world.usage() == Usage(6000, 2048, 2)


def test_a_burst_job_beyond_what_the_session_grants_is_refused(world: QuotaWorld) -> None:
    world.admit(cpu=4000, mem=1024)
    world.quota.grant_burst("acme", 2000, 2048, 2, 60, "me")
    world.admit(cpu=1500, mem=512, burst=True)

    with pytest.raises(ResourceExhausted) as refused:
        world.admit(cpu=501, mem=512, burst=True)

    assert refused.value.reason == "QUOTA_EXCEEDED"
    assert refused.value.metadata["limit"] == "cpu_millis"
    # The ceiling is the quota plus the session's grant; usage counts everything the tenant holds.
    assert refused.value.metadata["limit_value"] == "6000"
    assert refused.value.metadata["usage"] == "5500"


def test_a_job_beyond_base_quota_without_the_burst_flag_is_refused_even_with_a_session(world: QuotaWorld) -> None:
    world.admit(cpu=4000)
    world.quota.grant_burst("acme", 2000, 2048, 2, 60, "me")

    with pytest.raises(ResourceExhausted):
        world.admit(cpu=1000, burst=False)


def test_a_burst_job_is_refused_once_the_session_expired(world: QuotaWorld) -> None:
    world.admit(cpu=4000, mem=1024)
    world.quota.observe("acme", "job-1", True, Holding("acme", 4000, 1024))
    world.quota.grant_burst("acme", 2000, 2048, 2, 60, "me")
    world.clock.advance(60)

    with pytest.raises(ResourceExhausted) as refused:
        world.admit(cpu=1000, burst=True)

    assert refused.value.reason == "QUOTA_EXCEEDED"
    assert refused.value.metadata["limit"] == "cpu_millis"


def test_a_cpu_only_burst_session_admits_a_job_that_only_needs_more_cpu(world: QuotaWorld) -> None:
    world.admit(cpu=4000, mem=1024)
    session = world.quota.grant_burst("acme", 2000, 0, 0, 60, "me")

    assert world.admit(cpu=1000, mem=64, burst=True) == session.session_id


def test_running_usage_always_equals_the_sum_of_what_is_held() -> None:
    """Reserve, observe (running, ended, changed), release and expiry in a seeded random order: the kept
    totals never drift from a recount of the holdings."""
    import random

    world = QuotaWorld()
    rng = random.Random(7)
    state = world.quota._state("globex")
    for step in range(3000):
        job_id = f"j{rng.randrange(200)}"
        action = rng.random()
        if action < 0.4:
            try:
                world.quota.reserve("globex", job_id, rng.choice((100, 250)), rng.choice((64, 128)), False)
            except ResourceExhausted:
                pass
        elif action < 0.7:
            holding = Holding("globex", rng.choice((100, 500)), rng.choice((64, 256)))
            world.quota.observe("globex", job_id, rng.random() < 0.6, holding)
        elif action < 0.85:
            world.quota.release("globex", job_id)
        else:
            world.clock.advance(rng.choice((1.0, RESERVATION_TTL / 2)))
        kept = world.usage("globex")  # drops expired reservations first
        held = [*state.live.values(), *(h for h, _ in state.reserved.values())]
        recount = Usage(sum(h.cpu_millis for h in held), sum(h.memory_mb for h in held), len(held))
        assert kept == recount, f"drift at step {step}"


def test_a_session_at_submit_takes_the_tenants_share_when_the_pool_has_it() -> None:
    world = QuotaWorld(BurstPolicy(8000, 8192, 8, 600, max_tenant_share=0.5, session_at_submit_seconds=300))

    session = world.quota.session_at_submit("acme")

    assert (session.cpu_millis, session.memory_mb, session.concurrent_jobs) == (4000, 4096, 4)
    assert session.expire - session.start == 300 and session.requested_by == "submit"
    assert world.quota.active_session("acme") is None  # planned: the servicer stores it before it opens it
    world.quota.open_session(session)
    assert world.quota.active_session("acme") == session


def test_a_claimed_grant_holds_its_share_of_the_pool_but_admits_nothing_until_it_is_opened() -> None:
    world = QuotaWorld(BurstPolicy(8000, 8192, 8, 600, max_tenant_share=1.0))

    claimed = world.quota.plan_burst("acme", 8000, 8192, 8, 600, "me")

    assert world.quota.active_session("acme") is None
    assert world.quota.burst_left() == Usage(0, 0, 0)  # a concurrent grant cannot count the same remainder
    with pytest.raises(ResourceExhausted):
        world.quota.plan_burst("globex", 1000, 1024, 1, 600, "me")
    world.quota.open_session(claimed)
    assert world.quota.active_session("acme") == claimed


def test_a_claim_that_could_not_be_stored_frees_its_share() -> None:
    world = QuotaWorld(BurstPolicy(8000, 8192, 8, 600, max_tenant_share=1.0))

    world.quota.drop_claim(world.quota.plan_burst("acme", 8000, 8192, 8, 600, "me"))

    assert world.quota.burst_left() == Usage(8000, 8192, 8)
    assert world.quota.active_session("acme") is None


def test_limits_after_are_validated_but_not_applied(world: QuotaWorld) -> None:
    before = world.quota.limits("acme")
    after = world.quota.limits_after("acme", 1000, None, None)
    assert world.quota.limits("acme") == before and after.cpu_millis == 1000
    world.quota.apply_limits("acme", after)
    assert world.quota.limits("acme") == after


def test_a_job_no_quota_and_burst_could_ever_hold_is_refused_as_never_fits_by_the_core(world: QuotaWorld) -> None:
    with pytest.raises(InvalidArgument) as refused:
        world.quota.reserve("acme", "j-huge", 10**9, 1, burst=True)
    assert (refused.value.reason, refused.value.field) == ("NEVER_FITS", "resources.cpu_millis")


def test_a_session_at_submit_takes_what_is_left_when_that_is_less() -> None:
    world = QuotaWorld(BurstPolicy(8000, 8192, 8, 600, max_tenant_share=0.75))
    world.quota.grant_burst("globex", 6000, 6144, 6, 600, "me")

    session = world.quota.session_at_submit("acme")

    assert (session.cpu_millis, session.memory_mb, session.concurrent_jobs) == (2000, 2048, 2)


def test_no_session_at_submit_when_the_pool_is_gone() -> None:
    world = QuotaWorld(BurstPolicy(8000, 8192, 8, 600, max_tenant_share=1.0))
    world.quota.grant_burst("globex", 8000, 8192, 8, 600, "me")

    with pytest.raises(ResourceExhausted) as refused:
        world.quota.session_at_submit("acme")

    assert refused.value.reason == "BURST_UNAVAILABLE"
    assert refused.value.metadata["cpu_millis_left"] == "0"
    assert world.quota.active_session("acme") is None


def test_over_quota_tells_when_a_burst_session_is_needed(world: QuotaWorld) -> None:
    assert not world.quota.over_quota("acme", "j-new", 100, 64)
    limits = world.quota.limits("acme")
    assert world.quota.over_quota("acme", "j-new", limits.cpu_millis + 1, 64)
