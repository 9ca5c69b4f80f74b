"""Quota admission core: exact per-tenant accounting over live jobs plus in-flight reservations. Pure."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field, replace

from libs.clock import Clock
from libs.config import MeshConfig, QuotaLimits
from libs.errors import InvalidArgument, NotFound, ResourceExhausted

RESERVATION_TTL = 30.0  # a reservation whose job never shows up in etcd is dropped after this


@dataclass(frozen=True)
class Usage:
    cpu_millis: int = 0
    memory_mb: int = 0
    concurrent_jobs: int = 0

    def plus(self, cpu: int, mem: int, jobs: int = 1) -> Usage:
        return Usage(self.cpu_millis + cpu, self.memory_mb + mem, self.concurrent_jobs + jobs)


@dataclass(frozen=True)
class Holding:
    tenant_id: str
    cpu_millis: int
    memory_mb: int
    burst_session_id: str = ""


@dataclass(frozen=True)
class BurstPolicy:
    cpu_millis: int = 0
    memory_mb: int = 0
    concurrent_jobs: int = 0
    max_duration_seconds: int = 3600
    max_tenant_share: float = 0.5  # of each of the pool's CPU, memory and jobs, for one tenant's session
    # A burst submit beyond the quota with no session opens one this long (its size: the tenant's cap, or what
    # is left of the pool if less).
    session_at_submit_seconds: int = 900

    def tenant_cap(self) -> Usage:
        """The most one tenant's session may hold: its share of the pool, rounded down."""
        share = self.max_tenant_share
        return Usage(int(self.cpu_millis * share), int(self.memory_mb * share), int(self.concurrent_jobs * share))


@dataclass
class BurstSession:
    session_id: str
    tenant_id: str
    cpu_millis: int
    memory_mb: int
    concurrent_jobs: int
    start: float
    expire: float
    requested_by: str = ""


@dataclass
class TenantState:
    """A tenant's live jobs and in-flight reservations, with their sum kept as they come and go (O(1) per
    admission however many jobs the tenant holds)."""

    live: dict[str, Holding] = field(default_factory=dict)
    # job id -> (holding, expiry); one TTL on a monotonic clock, so insertion order is expiry order.
    reserved: dict[str, tuple[Holding, float]] = field(default_factory=dict)
    cpu_millis: int = 0
    memory_mb: int = 0
    jobs: int = 0

    @property
    def usage(self) -> Usage:
        return Usage(self.cpu_millis, self.memory_mb, self.jobs)

    def add(self, h: Holding, sign: int = 1) -> None:
        self.cpu_millis += sign * h.cpu_millis
        self.memory_mb += sign * h.memory_mb
        self.jobs += sign

    def drop_reservation(self, job_id: str) -> None:
        entry = self.reserved.pop(job_id, None)
        if entry is not None:
            self.add(entry[0], -1)

    def expire(self, now: float) -> None:
        while self.reserved:
            job_id, (_, expiry) = next(iter(self.reserved.items()))
            if expiry >= now:
                return
            self.drop_reservation(job_id)


class QuotaManager:
    def __init__(self, config: MeshConfig, clock: Clock, burst: BurstPolicy | None = None):
        self.config = config
        self.clock = clock
        self.burst_policy = burst or BurstPolicy()
        self.overrides: dict[str, QuotaLimits] = {}
        self.sessions: dict[str, BurstSession] = {}
        # Grants being stored: they hold their share of the burst pool (so two grants never count the same
        # remainder) but admit nothing until they are stored and opened.
        self.claims: dict[str, BurstSession] = {}
        self.audit: list[BurstSession] = []  # the granted sessions the audit keeps (pruned by age, count), oldest first
        self._tenants: dict[str, TenantState] = {}

    def _state(self, tenant_id: str) -> TenantState:
        return self._tenants.setdefault(tenant_id, TenantState())

    def check_tenant(self, tenant_id: str) -> None:
        if tenant_id not in self.config.tenants:
            raise NotFound(f"tenant {tenant_id} not found", reason="TENANT_NOT_FOUND")

    def limits(self, tenant_id: str) -> QuotaLimits:
        return self.overrides.get(tenant_id) or self.config.quota_for(tenant_id)

    def usage(self, tenant_id: str) -> Usage:
        state = self._state(tenant_id)
        state.expire(self.clock.monotonic())
        return state.usage

    def active_session(self, tenant_id: str) -> BurstSession | None:
        now = self.clock.now()
        for session in self.sessions.values():
            if session.tenant_id == tenant_id and session.start <= now < session.expire:
                return session
        return None

    def reserve(
        self, tenant_id: str, job_id: str, cpu_millis: int, memory_mb: int, burst: bool, *, dry: bool = False
    ) -> str:
        """Admits or refuses; holds the resources until the job is seen ending. Returns the burst session used.
        A job more than the tenant could ever hold (quota plus its largest burst) is refused as NEVER_FITS.

        Without burst the tenant's admitted work must fit its quota. With `burst` and an active session it must fit
        the quota plus the session's grant, resource by resource; a job admitted beyond the quota is marked with
        the session so that it is priced at the burst premium.
        """
        too_big = self.never_fits(tenant_id, cpu_millis, memory_mb)
        if too_big is not None:
            raise InvalidArgument(
                f"resources.{too_big}" if too_big != "concurrent_jobs" else "resources",
                "is more than this tenant's quota plus the largest burst could ever admit",
                reason="NEVER_FITS",
            )
        state = self._state(tenant_id)
        state.expire(self.clock.monotonic())
        if job_id in state.live:
            return state.live[job_id].burst_session_id
        if job_id in state.reserved:
            return state.reserved[job_id][0].burst_session_id
        limits = self.limits(tenant_id)
        used = state.usage
        after = used.plus(cpu_millis, memory_mb)
        exceeded = self._exceeded(after, limits)
        session_id = ""
        if exceeded is not None:
            session = self.active_session(tenant_id) if burst else None
            if session is None:
                self._refuse(exceeded, limits, used, burst)
            assert session is not None
            stretched = QuotaLimits(
                limits.cpu_millis + session.cpu_millis,
                limits.memory_mb + session.memory_mb,
                limits.concurrent_jobs + session.concurrent_jobs,
            )
            over = self._exceeded(after, stretched)
            if over is not None:
                self._refuse(over, stretched, used, burst, what="quota plus burst session")
            session_id = session.session_id
        if dry:  # only asked whether it would be admitted
            return session_id
        holding = Holding(tenant_id, cpu_millis, memory_mb, session_id)
        state.reserved[job_id] = (holding, self.clock.monotonic() + RESERVATION_TTL)
        state.add(holding)
        return session_id

    def over_quota(self, tenant_id: str, job_id: str, cpu_millis: int, memory_mb: int) -> bool:
        """Whether admitting this job would take the tenant beyond its own quota (a burst session is needed)."""
        state = self._state(tenant_id)
        if job_id in state.live or job_id in state.reserved:
            return False
        return self._exceeded(state.usage.plus(cpu_millis, memory_mb), self.limits(tenant_id)) is not None

    def needs_session(self, tenant_id: str, job_id: str, cpu_millis: int, memory_mb: int, burst: bool) -> bool:
        """A burst submit beyond the quota, with no active session, that could ever fit: it opens one."""
        return (
            burst
            and self.over_quota(tenant_id, job_id, cpu_millis, memory_mb)
            and self.never_fits(tenant_id, cpu_millis, memory_mb) is None
            and self.active_session(tenant_id) is None
        )

    def session_at_submit(self, tenant_id: str) -> BurstSession:
        """The session a burst submit beyond the quota asks for implicitly: the tenant's cap of the pool, or what
        is left of it if less; BURST_UNAVAILABLE when nothing is left. Claimed, not opened: the caller stores it,
        then opens it."""
        policy = self.burst_policy
        cap, left = policy.tenant_cap(), self.burst_left()
        cpu = min(cap.cpu_millis, left.cpu_millis)
        mem = min(cap.memory_mb, left.memory_mb)
        jobs = min(cap.concurrent_jobs, left.concurrent_jobs)
        if cpu <= 0 or mem <= 0 or jobs <= 0:
            raise ResourceExhausted(
                f"no burst capacity left: {left.cpu_millis}m CPU, {left.memory_mb} MB, {left.concurrent_jobs} jobs",
                reason="BURST_UNAVAILABLE",
                metadata={
                    "cpu_millis_left": str(max(left.cpu_millis, 0)),
                    "memory_mb_left": str(max(left.memory_mb, 0)),
                    "concurrent_jobs_left": str(max(left.concurrent_jobs, 0)),
                    "retry_after_seconds": "30",
                },
            )
        duration = min(policy.session_at_submit_seconds, policy.max_duration_seconds)
        return self.plan_burst(tenant_id, cpu, mem, jobs, duration, "submit")

    def never_fits(self, tenant_id: str, cpu_millis: int, memory_mb: int) -> str | None:
        """The resource a job asks more of than the tenant could ever hold (quota plus its largest burst)."""
        limits = self.limits(tenant_id)
        cap = self.burst_policy.tenant_cap()
        ceiling = QuotaLimits(
            limits.cpu_millis + cap.cpu_millis,
            limits.memory_mb + cap.memory_mb,
            limits.concurrent_jobs + cap.concurrent_jobs,
        )
        return self._exceeded(Usage(cpu_millis, memory_mb, 1), ceiling)

    @staticmethod
    def _exceeded(usage: Usage, limits: QuotaLimits) -> str | None:
        if usage.cpu_millis > limits.cpu_millis:
            return "cpu_millis"
        if usage.memory_mb > limits.memory_mb:
            return "memory_mb"
        if usage.concurrent_jobs > limits.concurrent_jobs:
            return "concurrent_jobs"
        return None

    @staticmethod
    def _refuse(resource: str, limits: QuotaLimits, usage: Usage, burst: bool, what: str = "quota") -> None:
        limit = getattr(limits, resource)
        used = getattr(usage, resource)
        hint = "" if burst else "; ask for a burst session and submit with burst: true"
        raise ResourceExhausted(
            f"{what} exceeded: {resource} limit {limit}, in use {used}{hint}; retry when running jobs finish",
            reason="QUOTA_EXCEEDED",
            metadata={"limit": resource, "limit_value": str(limit), "usage": str(used), "retry_after_seconds": "5"},
        )

    def release(self, tenant_id: str, job_id: str) -> None:
        self._state(tenant_id).drop_reservation(job_id)

    def drop_reservations(self) -> None:
        """Forgets every in-flight reservation: at a change of leadership term, since what one term admitted is
        enqueued only while that term lasts (the jobs that made it are in the store, hence in `live`)."""
        for state in self._tenants.values():
            for job_id in list(state.reserved):
                state.drop_reservation(job_id)

    def observe(self, tenant_id: str, job_id: str, active: bool, holding: Holding | None) -> None:
        """Called for every job change seen in etcd: usage is derived from what is stored, so it cannot drift."""
        state = self._state(tenant_id)
        state.drop_reservation(job_id)
        old = state.live.pop(job_id, None)
        if old is not None:
            state.add(old, -1)
        if active and holding is not None:
            state.live[job_id] = holding
            state.add(holding)

    def set_limits(self, tenant_id: str, cpu: int | None, mem: int | None, jobs: int | None) -> QuotaLimits:
        """`limits_after` applied at once (for callers with nothing to persist first)."""
        updated = self.limits_after(tenant_id, cpu, mem, jobs)
        self.apply_limits(tenant_id, updated)
        return updated

    def apply_limits(self, tenant_id: str, limits: QuotaLimits) -> None:
        self.overrides[tenant_id] = limits

    def limits_after(self, tenant_id: str, cpu: int | None, mem: int | None, jobs: int | None) -> QuotaLimits:
        """The tenant's limits with the given ones changed (None: kept), validated, not applied."""
        self.check_tenant(tenant_id)
        current = self.limits(tenant_id)
        for name, value in (("cpu_millis", cpu), ("memory_mb", mem), ("concurrent_jobs", jobs)):
            if value is not None and value <= 0:
                raise InvalidArgument(f"limits.{name}", "must be greater than 0")
        updated = replace(
            current,
            cpu_millis=current.cpu_millis if cpu is None else cpu,
            memory_mb=current.memory_mb if mem is None else mem,
            concurrent_jobs=current.concurrent_jobs if jobs is None else jobs,
        )
        return updated

    def grant_burst(
        self, tenant_id: str, cpu: int, mem: int, jobs: int, duration: int, requested_by: str
    ) -> BurstSession:
        """`plan_burst` opened at once (for callers with nothing to persist first)."""
        session = self.plan_burst(tenant_id, cpu, mem, jobs, duration, requested_by)
        self.open_session(session)
        return session

    def open_session(self, session: BurstSession) -> None:
        """A claimed session takes effect (after it was stored)."""
        self.claims.pop(session.session_id, None)
        self.sessions[session.session_id] = session

    def drop_claim(self, session: BurstSession) -> None:
        """A claimed session that could not be stored: its share of the pool is free again."""
        self.claims.pop(session.session_id, None)

    def plan_burst(
        self, tenant_id: str, cpu: int, mem: int, jobs: int, duration: int, requested_by: str
    ) -> BurstSession:
        """The session a grant would open, validated against the pool and the tenant's cap, and claimed: it holds
        its share of the pool but admits nothing until `open_session` (after it is stored) or `drop_claim`."""
        self.check_tenant(tenant_id)
        policy = self.burst_policy
        if min(cpu, mem, jobs) < 0 or (cpu == 0 and mem == 0 and jobs == 0):
            raise InvalidArgument("cpu_millis", "ask for a positive amount of cpu_millis, memory_mb or concurrent_jobs")
        if not 0 < duration <= policy.max_duration_seconds:
            raise InvalidArgument("duration_seconds", f"must be between 1 and {policy.max_duration_seconds}")
        if self.active_session(tenant_id) is not None or any(c.tenant_id == tenant_id for c in self.claims.values()):
            raise ResourceExhausted("this tenant already has an active burst session", reason="BURST_UNAVAILABLE")
        now = self.clock.now()
        left = self.burst_left()
        if cpu > left.cpu_millis or mem > left.memory_mb or jobs > left.concurrent_jobs:
            raise ResourceExhausted(
                f"burst pool has {left.cpu_millis}m CPU, {left.memory_mb} MB, {left.concurrent_jobs} jobs left",
                reason="BURST_UNAVAILABLE",
                metadata={
                    "cpu_millis_left": str(left.cpu_millis),
                    "memory_mb_left": str(left.memory_mb),
                    "concurrent_jobs_left": str(left.concurrent_jobs),
                },
            )
        cap = policy.tenant_cap()
        if cpu > cap.cpu_millis or mem > cap.memory_mb or jobs > cap.concurrent_jobs:
            raise ResourceExhausted(
                f"one tenant may hold at most {policy.max_tenant_share:.0%} of the burst pool: "
                f"{cap.cpu_millis}m CPU, {cap.memory_mb} MB, {cap.concurrent_jobs} jobs",
                reason="BURST_UNAVAILABLE",
                metadata={
                    "tenant_cap_cpu_millis": str(cap.cpu_millis),
                    "tenant_cap_memory_mb": str(cap.memory_mb),
                    "tenant_cap_concurrent_jobs": str(cap.concurrent_jobs),
                    "max_tenant_share": f"{policy.max_tenant_share:g}",
                },
            )
        session = BurstSession(uuid.uuid4().hex[:16], tenant_id, cpu, mem, jobs, now, now + duration, requested_by)
        self.claims[session.session_id] = session
        return session

    def audit_for(self, tenant_id: str, limit: int = 20) -> list[BurstSession]:
        return [s for s in reversed(self.audit) if s.tenant_id == tenant_id][:limit]

    def burst_left(self) -> Usage:
        now = self.clock.now()
        granted = Usage()
        for s in {**self.claims, **self.sessions}.values():  # a stored claim may show up in both for a moment
            if s.start <= now < s.expire:
                granted = granted.plus(s.cpu_millis, s.memory_mb, s.concurrent_jobs)
        p = self.burst_policy
        return Usage(
            p.cpu_millis - granted.cpu_millis,
            p.memory_mb - granted.memory_mb,
            p.concurrent_jobs - granted.concurrent_jobs,
        )
