"""The mesh configuration file (tenants, quotas, pools, prices), parsed and validated once."""

from __future__ import annotations

import difflib
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    pass


@dataclass(frozen=True)
class QuotaLimits:
    cpu_millis: int
    memory_mb: int
    concurrent_jobs: int


@dataclass(frozen=True)
class Pruning:
    """Entries older than `max_age_seconds` (0: no age limit) or beyond the newest `max_count` are deleted."""

    max_age_seconds: float
    max_count: int


@dataclass(frozen=True)
class TenantConfig:
    tenant_id: str
    weight: float = 1.0
    quota: QuotaLimits | None = None
    # Monthly budget in the mesh currency (None: no budget) and what happens at 100%: "notify" or "enforce".
    monthly_budget: float | None = None
    budget_policy: str = "notify"

    @property
    def budget_enforced(self) -> bool:
        """A configured budget (a 0 limit is none) whose policy is enforce."""
        return bool(self.monthly_budget) and self.budget_policy == "enforce"


@dataclass(frozen=True)
class SlaTier:
    name: str
    target_wait_seconds: float


@dataclass(frozen=True)
class Pricing:
    """Prices in the mesh currency."""

    cpu_core_hour: float = 0.0
    memory_gb_hour: float = 0.0
    worker_hour: float = 0.0


@dataclass(frozen=True)
class PoolConfig:
    pool_id: str
    kind: str  # "static" | "dynamic" | "burst"
    worker_cpu_millis: int
    worker_memory_mb: int
    min_workers: int = 0
    max_workers: int = 0
    labels: dict[str, str] = field(default_factory=dict)
    pricing: Pricing = field(default_factory=Pricing)
    provider: str = "local"
    max_jobs_per_worker: int = 0  # 0: unlimited reuse
    # Jobs a worker runs at once, packed by CPU and memory within the worker's size (as pods on a node).
    # 1: a worker runs one job at a time, whatever its size.
    worker_slots: int = 1
    scale_up_cooldown_seconds: float = 5.0
    scale_down_cooldown_seconds: float = 30.0
    scale_down_idle_seconds: float = 30.0
    scale_up_step: int = 4
    scale_down_step: int = 1
    # Scale-up triggers of dynamic and burst pools: this many waiting jobs; a waiting job older than this
    # (0: off); this share of the active workers busy, which adds one worker of headroom (0: off).
    scale_up_queue_depth: int = 1
    scale_up_queue_wait_seconds: float = 0.0
    scale_up_utilization: float = 0.0
    # Run on each worker every interval (and after a job once the interval has passed); a non-zero exit
    # marks the worker unhealthy: it takes no more jobs and is replaced. Empty: built-in checks only.
    health_check_command: tuple[str, ...] = ()
    health_check_interval_seconds: float = 30.0
    # A worker told to stop (SIGTERM: a rollout, a drain, a scale-down) takes no new job and lets the ones it
    # runs go on this long; then it stops them and reports them interrupted, to be retried elsewhere.
    drain_grace_seconds: float = 30.0
    # The job sandbox of the pool's local workers (docs/security.md, "Job sandbox"). "bwrap": each job under its
    # own uid from job_uids, in its own namespaces and cgroup; "none": jobs run as the agent's user with its view
    # of the host (a developer laptop only; the worker says so loudly at start).
    sandbox: str = "bwrap"
    network: str = "none"  # "none": the job has only its own loopback; "host": the host's network
    job_uids: tuple[int, int] = (200_000, 265_535)  # first and last uid, both included
    pids_max: int = 512  # processes and threads of one job
    max_file_mb: int = 4096  # RLIMIT_FSIZE of a job's processes
    max_open_files: int = 4096  # RLIMIT_NOFILE


@dataclass(frozen=True)
class EdgeLimits:
    """What the public edge (Envoy, and the gateway behind it) admits before any work is done: per-tenant
    request rates, the bound on submits in flight, the queueing write latency beyond which submits are shed, and
    Envoy's own memory and connection limits. Every refusal is a 429 with Retry-After (docs/api.md)."""

    # Per tenant (the token's tenant claim), token buckets: a sustained rate (below 1: one request every 1/rate
    # seconds) and the bucket's size, the most requests at once after a quiet spell. Submits (JobService/SubmitJob)
    # and every other call ("reads") have buckets of their own.
    submit_rate_per_second: float = 1000.0
    submit_burst: int = 2000
    read_rate_per_second: float = 1000.0
    read_burst: int = 2000
    # Submits in flight to the gateway (all tenants): one more is answered 429 OVERLOADED by Envoy at once.
    max_inflight_submits: int = 32
    # With this > 0, the gateway's own bound on submits in flight adapts to how long an admitted submit waits for
    # its write in queueing: each one over this lowers it by a tenth (down to min_inflight_submits), each quicker
    # one raises it again (up to max_inflight_submits). Off by default: its refusals cost the gateway's CPU and,
    # on a saturated machine, are far slower than Envoy's (docs/benchmarks.md, "Overload").
    max_submit_latency_ms: float = 0.0
    min_inflight_submits: int = 8
    # The Retry-After (seconds) of an OVERLOADED answer.
    overloaded_retry_after_seconds: int = 1
    # Envoy's heap: beyond 90% it returns memory to the system, beyond 98% it refuses new requests (429).
    max_heap_mb: int = 192
    max_connections: int = 10_000
    # Bytes Envoy buffers per connection (each direction) before it stops reading from it.
    per_connection_buffer_kb: int = 1024


@dataclass(frozen=True)
class RetryBackoff:
    """How long a retried job waits before its next attempt: `initial_seconds` before the first retry, each
    further retry `multiplier` times longer, never more than `max_seconds` (the `[retries]` table)."""

    initial_seconds: float = 1.0
    max_seconds: float = 300.0
    multiplier: float = 2.0

    def delay(self, retry: int) -> float:
        """Seconds before retry number `retry` (1 for the first) may start."""
        if retry < 1 or self.initial_seconds <= 0:
            return 0.0
        # Past the cap the exponent no longer matters; bounding it keeps the float finite for any retry count.
        exponent = min(retry - 1, 64)
        return min(self.initial_seconds * self.multiplier**exponent, self.max_seconds)


@dataclass(frozen=True)
class MeshConfig:
    issuer: str
    audience: str
    tenants: dict[str, TenantConfig]
    default_quota: QuotaLimits
    pools: tuple[PoolConfig, ...]
    currency: str = "USD"
    burst_premium: float = 1.5
    burst_pool: QuotaLimits | None = None
    burst_max_duration_seconds: int = 3600
    # The largest share of the burst pool (each of CPU, memory, jobs) one tenant's session may hold.
    burst_max_tenant_share: float = 0.5
    # How long the session opened by a burst submit beyond the quota lasts.
    burst_session_at_submit_seconds: int = 900
    sla_tiers: dict[str, SlaTier] = field(default_factory=dict)
    default_sla_tier: str = "standard"
    # How long a finished job's record is kept before it is deleted (its cost records stay); 0: for ever.
    finished_job_retention_seconds: float = 7 * 86400.0
    # A job's cost records are rolled up into daily aggregates once its record is deleted and its last attempt
    # ended this long ago (services/cost/daily.py); 0: never.
    cost_rollup_seconds: float = 7 * 86400.0
    # Audit trails pruned by age and count (docs/operations.md, "Bounded state"); an age of 0 keeps them for ever.
    burst_audit: Pruning = field(default_factory=lambda: Pruning(90 * 86400.0, 10_000))
    worker_lifetimes: Pruning = field(default_factory=lambda: Pruning(90 * 86400.0, 10_000))
    scaling_events: Pruning = field(default_factory=lambda: Pruning(30 * 86400.0, 1_000))  # count: per pool
    # When the gateway cannot ask the cost service about a budget: "open" admits the submit (budgets are checked
    # again shortly); "closed" refuses submits of tenants whose budget is enforced with 503 BUDGET_CHECK_UNAVAILABLE.
    budget_check_failure: str = "open"
    # The largest job spec accepted, in bytes of its protobuf encoding (argv, env, labels and all).
    max_spec_bytes: int = 64 * 1024
    # The most job records one tenant may keep stored (pending, running and finished within retention).
    max_jobs_per_tenant: int = 250_000
    edge: EdgeLimits = field(default_factory=EdgeLimits)
    retries: RetryBackoff = field(default_factory=RetryBackoff)

    def pool(self, pool_id: str) -> PoolConfig | None:
        return next((p for p in self.pools if p.pool_id == pool_id), None)

    def quota_for(self, tenant_id: str) -> QuotaLimits:
        tenant = self.tenants.get(tenant_id)
        return tenant.quota if tenant and tenant.quota else self.default_quota


def _limits(raw: dict[str, object], where: str) -> QuotaLimits:
    try:
        limits = QuotaLimits(
            cpu_millis=int(raw["cpu_millis"]),  # type: ignore[call-overload]
            memory_mb=int(raw["memory_mb"]),  # type: ignore[call-overload]
            concurrent_jobs=int(raw["concurrent_jobs"]),  # type: ignore[call-overload]
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: needs integer cpu_millis, memory_mb, concurrent_jobs ({exc})") from exc
    if min(limits.cpu_millis, limits.memory_mb, limits.concurrent_jobs) <= 0:
        raise ConfigError(f"{where}: limits must be positive")
    return limits


# Placement tries them in this order: static pools, then dynamic ones (scaling up within their max), then burst
# capacity, which only jobs admitted against a burst session may use.
POOL_KINDS = ("static", "dynamic", "burst")
# A drain longer than an hour is a job that should have been checkpointed, not a stop.
MAX_DRAIN_GRACE_SECONDS = 3600
# Jobs one worker may run at once (a pool's worker_slots).
MAX_WORKER_SLOTS = 64


def _pool(raw: dict[str, object]) -> PoolConfig:
    pool_id = str(raw.get("id", ""))
    if not pool_id:
        raise ConfigError("pools: every pool needs an id")
    kind = str(raw.get("kind", "static"))
    if kind not in POOL_KINDS:
        raise ConfigError(f"pool {pool_id}: kind must be one of {', '.join(POOL_KINDS)}")
    workers = int(raw.get("workers", 0))  # type: ignore[call-overload]
    min_w = int(raw.get("min_workers", workers))  # type: ignore[call-overload]
    max_w = int(raw.get("max_workers", workers))  # type: ignore[call-overload]
    if kind == "static":
        min_w = max_w = workers
    if min_w < 0 or max_w < min_w or max_w == 0:
        raise ConfigError(f"pool {pool_id}: need 0 <= min_workers <= max_workers and max_workers > 0")
    depth = int(raw.get("scale_up_queue_depth", 1))  # type: ignore[call-overload]
    wait = float(raw.get("scale_up_queue_wait_seconds", 0.0))  # type: ignore[arg-type]
    utilization = float(raw.get("scale_up_utilization", 0.0))  # type: ignore[arg-type]
    health_raw = raw.get("health_check_command", [])
    if not isinstance(health_raw, list) or not all(isinstance(a, str) for a in health_raw):
        raise ConfigError(f"pool {pool_id}: health_check_command must be a list of strings")
    health_command = tuple(health_raw)
    health_interval = float(raw.get("health_check_interval_seconds", 30.0))  # type: ignore[arg-type]
    if health_interval <= 0:
        raise ConfigError(f"pool {pool_id}: health_check_interval_seconds must be positive")
    drain_grace = float(raw.get("drain_grace_seconds", 30.0))  # type: ignore[arg-type]
    if not 0 <= drain_grace <= MAX_DRAIN_GRACE_SECONDS:
        raise ConfigError(f"pool {pool_id}: drain_grace_seconds must be between 0 and {MAX_DRAIN_GRACE_SECONDS}")
    slots = int(raw.get("worker_slots", 1))  # type: ignore[call-overload]
    if not 1 <= slots <= MAX_WORKER_SLOTS:
        raise ConfigError(f"pool {pool_id}: worker_slots must be between 1 and {MAX_WORKER_SLOTS}")
    if depth < 1 or wait < 0 or not 0 <= utilization <= 1:
        raise ConfigError(
            f"pool {pool_id}: need scale_up_queue_depth >= 1, scale_up_queue_wait_seconds >= 0 and "
            "0 <= scale_up_utilization <= 1"
        )
    sandbox = _sandbox(raw, pool_id)
    pricing_raw = raw.get("pricing", {})
    assert isinstance(pricing_raw, dict)
    labels_raw = raw.get("labels", {})
    assert isinstance(labels_raw, dict)
    return PoolConfig(
        pool_id=pool_id,
        kind=kind,
        worker_cpu_millis=int(raw.get("worker_cpu_millis", 1000)),  # type: ignore[call-overload]
        worker_memory_mb=int(raw.get("worker_memory_mb", 1024)),  # type: ignore[call-overload]
        min_workers=min_w,
        max_workers=max_w,
        labels={str(k): str(v) for k, v in labels_raw.items()},
        pricing=Pricing(**{k: float(v) for k, v in pricing_raw.items()}),
        provider=str(raw.get("provider", "local")),
        max_jobs_per_worker=int(raw.get("max_jobs_per_worker", 0)),  # type: ignore[call-overload]
        worker_slots=slots,
        scale_up_cooldown_seconds=float(raw.get("scale_up_cooldown_seconds", 5.0)),  # type: ignore[arg-type]
        scale_down_cooldown_seconds=float(raw.get("scale_down_cooldown_seconds", 30.0)),  # type: ignore[arg-type]
        scale_down_idle_seconds=float(raw.get("scale_down_idle_seconds", 30.0)),  # type: ignore[arg-type]
        scale_up_step=int(raw.get("scale_up_step", 4)),  # type: ignore[call-overload]
        scale_down_step=int(raw.get("scale_down_step", 1)),  # type: ignore[call-overload]
        scale_up_queue_depth=depth,
        scale_up_queue_wait_seconds=wait,
        scale_up_utilization=utilization,
        health_check_command=health_command,
        health_check_interval_seconds=health_interval,
        drain_grace_seconds=drain_grace,
        **sandbox,
    )


SANDBOX_MODES = ("bwrap", "none")
NETWORK_MODES = ("none", "host")


def _sandbox(raw: dict[str, object], pool_id: str) -> dict[str, Any]:
    """The pool's job sandbox settings, checked: a typo must not quietly weaken isolation."""
    mode = str(raw.get("sandbox", "bwrap"))
    if mode not in SANDBOX_MODES:
        raise ConfigError(f"pool {pool_id}: sandbox must be one of {', '.join(SANDBOX_MODES)}")
    network = str(raw.get("network", "none"))
    if network not in NETWORK_MODES:
        raise ConfigError(f"pool {pool_id}: network must be one of {', '.join(NETWORK_MODES)}")
    uids = raw.get("job_uids", [200_000, 265_535])
    if not (isinstance(uids, list) and len(uids) == 2 and all(isinstance(u, int) for u in uids)):
        raise ConfigError(f"pool {pool_id}: job_uids must be [first, last], e.g. [200000, 265535]")
    first, last = uids
    if not 1000 <= first <= last < 2**32 - 2:
        raise ConfigError(f"pool {pool_id}: job_uids must be a non-empty range of uids from 1000 up")
    limits = {}
    for key, default in (("pids_max", 512), ("max_file_mb", 4096), ("max_open_files", 4096)):
        value = raw.get(key, default)
        if not isinstance(value, int) or value < 16:
            raise ConfigError(f"pool {pool_id}: {key} must be an integer of at least 16")
        limits[key] = value
    return {"sandbox": mode, "network": network, "job_uids": (first, last), **limits}


def _tenant(tenant_id: str, t: dict[str, Any]) -> TenantConfig:
    weight = float(t.get("weight", 1.0))
    if weight <= 0:
        raise ConfigError(f"tenants.{tenant_id}.weight must be greater than 0")
    policy = str(t.get("budget_policy", "notify"))
    if policy not in ("notify", "enforce"):
        raise ConfigError(f"tenants.{tenant_id}.budget_policy must be notify or enforce")
    budget = t.get("monthly_budget")
    if budget is not None and float(budget) < 0:
        raise ConfigError(f"tenants.{tenant_id}.monthly_budget must not be negative")
    return TenantConfig(
        tenant_id=tenant_id,
        weight=weight,
        quota=_limits(t["quota"], f"tenants.{tenant_id}.quota") if "quota" in t else None,
        monthly_budget=float(budget) if budget is not None else None,
        budget_policy=policy,
    )


def _sla(sla_raw: dict[str, Any]) -> tuple[dict[str, SlaTier], str]:
    tiers_raw = sla_raw.get("tiers", {"gold": 30.0, "standard": 300.0, "batch": 3600.0})
    sla_tiers = {}
    for name, target in tiers_raw.items():
        if float(target) <= 0:
            raise ConfigError(f"sla.tiers.{name} must be a positive number of seconds")
        sla_tiers[name] = SlaTier(name, float(target))
    default_tier = str(sla_raw.get("default_tier", "standard"))
    if default_tier not in sla_tiers:
        raise ConfigError(f"sla.default_tier {default_tier!r} is not one of the tiers")
    return sla_tiers, default_tier


def _edge(raw: object) -> EdgeLimits:
    """The [edge] table: every key optional, each a positive number (a latency bound of 0 turns it off)."""
    if not isinstance(raw, dict):
        raise ConfigError("edge must be a table")
    defaults = EdgeLimits()
    known = EdgeLimits.__dataclass_fields__
    unknown = set(raw) - set(known)
    if unknown:
        raise ConfigError(f"edge: unknown keys {', '.join(sorted(unknown))}")
    values: dict[str, Any] = {}
    for name in known:
        default = getattr(defaults, name)
        value = raw.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"edge.{name} must be a number")
        if isinstance(default, int) and not isinstance(value, int):
            raise ConfigError(f"edge.{name} must be an integer")
        may_be_zero = name == "max_submit_latency_ms"
        if value < 0 or (value == 0 and not may_be_zero):
            raise ConfigError(f"edge.{name} must be positive" + (" (or 0: off)" if may_be_zero else ""))
        values[name] = value
    if (
        values["submit_burst"] < values["submit_rate_per_second"]
        or values["read_burst"] < values["read_rate_per_second"]
    ):
        raise ConfigError("edge: a burst must be at least its rate per second")
    floats = {k: float(v) for k, v in values.items() if isinstance(getattr(defaults, k), float)}
    return EdgeLimits(**{**values, **floats})


def _retries(raw: object) -> RetryBackoff:
    """The [retries] table: the backoff between a failed attempt and the next (initial 0: no backoff)."""
    if not isinstance(raw, dict):
        raise ConfigError("retries must be a table")
    values: dict[str, float] = {}
    for name, default in (("initial", 1.0), ("max", 300.0), ("multiplier", 2.0)):
        key = f"backoff_{name}_seconds" if name != "multiplier" else "backoff_multiplier"
        value = raw.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
            raise ConfigError(f"retries.{key} must be a number of at least 0")
        values[name] = float(value)
    if values["multiplier"] < 1:
        raise ConfigError("retries.backoff_multiplier must be at least 1")
    if values["max"] < values["initial"]:
        raise ConfigError("retries.backoff_max_seconds must be at least retries.backoff_initial_seconds")
    return RetryBackoff(values["initial"], values["max"], values["multiplier"])


def _pruning(retention: dict[str, Any], name: str, age: float, count: int) -> Pruning:
    pruning = Pruning(float(retention.get(f"{name}_seconds", age)), int(retention.get(f"{name}_max", count)))
    if pruning.max_age_seconds < 0 or pruning.max_count < 1:
        raise ConfigError(f"retention.{name}_seconds must be >= 0 (0: no age limit) and retention.{name}_max >= 1")
    return pruning


class _Table(dict[str, Any]):
    """A TOML table that remembers the keys the parser asked for, so a key nobody reads (a typo such as
    `wieght = 2`, which would quietly load the default) is an error naming it. Iterating a table (tenants, labels,
    prices: names the operator chooses) reads all of its keys."""

    def __init__(self, data: dict[str, Any], where: str):
        super().__init__({k: _tracked(v, f"{where}{k}") for k, v in data.items()})
        self.where = where
        self.asked: set[str] = set()
        self.iterated = False

    def get(self, key: str, default: Any = None) -> Any:
        self.asked.add(key)
        return super().get(key, default)

    def __getitem__(self, key: str) -> Any:
        self.asked.add(key)
        return super().__getitem__(key)

    def __contains__(self, key: object) -> bool:
        if isinstance(key, str):
            self.asked.add(key)
        return super().__contains__(key)

    def __iter__(self) -> Iterator[str]:
        self.iterated = True
        return super().__iter__()

    def items(self) -> Any:
        self.iterated = True
        return super().items()

    def keys(self) -> Any:
        self.iterated = True
        return super().keys()

    def values(self) -> Any:
        self.iterated = True
        return super().values()

    def unread(self) -> Iterator[str]:
        """Each key never asked for, with the closest one that was, here and in the tables inside."""
        if not self.iterated:
            for key in dict.keys(self):
                if key not in self.asked:
                    close = difflib.get_close_matches(key, sorted(self.asked), n=1)
                    yield f"{self.where}{key}" + (f" (did you mean {close[0]}?)" if close else "")
        for value in dict.values(self):
            for table in value if isinstance(value, list) else [value]:
                if isinstance(table, _Table):
                    yield from table.unread()


def _tracked(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return _Table(value, f"{where}.")
    if isinstance(value, list):
        return [_tracked(v, f"{where}[{v.get('id', i) if isinstance(v, dict) else i}]") for i, v in enumerate(value)]
    return value


def parse_config(data: dict[str, object]) -> MeshConfig:
    """The mesh config from its TOML tables, checked: a bad value or a key no setting reads is a ConfigError."""
    raw = _Table(data, "")
    config = _parse(raw)
    unknown = list(raw.unread())
    if unknown:
        raise ConfigError("unknown key(s) in the mesh config: " + ", ".join(unknown))
    return config


def _parse(raw: dict[str, object]) -> MeshConfig:
    auth = raw.get("auth", {})
    assert isinstance(auth, dict)
    quota = raw.get("quota", {})
    assert isinstance(quota, dict)
    default_quota = _limits(quota.get("defaults", {}), "quota.defaults")
    tenants_raw = raw.get("tenants", {})
    assert isinstance(tenants_raw, dict)
    tenants = {tenant_id: _tenant(tenant_id, t) for tenant_id, t in tenants_raw.items()}
    pools_raw = raw.get("pools", [])
    assert isinstance(pools_raw, list)
    pools = tuple(_pool(p) for p in pools_raw)
    if not pools:
        raise ConfigError("at least one pool is needed")
    if len({p.pool_id for p in pools}) != len(pools):
        raise ConfigError("pool ids must be unique")
    cost = raw.get("cost", {})
    assert isinstance(cost, dict)
    sla_raw = raw.get("sla", {})
    assert isinstance(sla_raw, dict)
    sla_tiers, default_tier = _sla(sla_raw)
    burst = raw.get("burst", {})
    assert isinstance(burst, dict)
    burst_pool = _limits(burst["pool"], "burst.pool") if "pool" in burst else None
    burst_share = float(burst.get("max_tenant_share", 0.5))
    if not 0 < burst_share <= 1:
        raise ConfigError("burst.max_tenant_share must be more than 0 and at most 1")
    at_submit = int(burst.get("session_at_submit_seconds", 900))
    if at_submit <= 0:
        raise ConfigError("burst.session_at_submit_seconds must be positive")
    retention = raw.get("retention", {})
    assert isinstance(retention, dict)
    finished_retention = float(retention.get("finished_job_seconds", 7 * 86400))
    if finished_retention < 0:
        raise ConfigError("retention.finished_job_seconds must be 0 (keep for ever) or positive")
    rollup = float(retention.get("cost_rollup_seconds", finished_retention))
    if rollup < 0:
        raise ConfigError("retention.cost_rollup_seconds must be 0 (never roll up) or positive")
    prunings = {
        name: _pruning(retention, name, age, count)
        for name, age, count in (
            ("burst_audit", 90 * 86400, 10_000),
            ("worker_lifetimes", 90 * 86400, 10_000),
            ("scaling_events", 30 * 86400, 1_000),
        )
    }
    budget_failure = str(cost.get("budget_check_failure", "open"))
    if budget_failure not in ("open", "closed"):
        raise ConfigError("cost.budget_check_failure must be open or closed")
    limits = raw.get("limits", {})
    assert isinstance(limits, dict)
    max_spec_bytes = int(limits.get("max_spec_bytes", 64 * 1024))
    if not 1024 <= max_spec_bytes <= 512 * 1024:
        raise ConfigError("limits.max_spec_bytes must be between 1024 and 524288")
    max_jobs = int(limits.get("max_jobs_per_tenant", 250_000))
    if max_jobs < 1:
        raise ConfigError("limits.max_jobs_per_tenant must be at least 1")
    return MeshConfig(
        edge=_edge(raw.get("edge", {})),
        retries=_retries(raw.get("retries", {})),
        max_spec_bytes=max_spec_bytes,
        max_jobs_per_tenant=max_jobs,
        finished_job_retention_seconds=finished_retention,
        cost_rollup_seconds=rollup,
        budget_check_failure=budget_failure,
        **prunings,
        sla_tiers=sla_tiers,
        default_sla_tier=default_tier,
        burst_pool=burst_pool,
        burst_max_duration_seconds=int(burst.get("max_duration_seconds", 3600)),
        burst_max_tenant_share=burst_share,
        burst_session_at_submit_seconds=at_submit,
        issuer=str(auth.get("issuer", "jobmesh-dev")),
        audience=str(auth.get("audience", "jobmesh")),
        tenants=tenants,
        default_quota=default_quota,
        pools=pools,
        currency=str(cost.get("currency", "USD")),
        burst_premium=float(cost.get("burst_premium", 1.5)),
    )


def load_config(path: str | Path) -> MeshConfig:
    try:
        with open(path, "rb") as fh:
            return parse_config(tomllib.load(fh))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"cannot read mesh config {path}: {exc}") from exc
