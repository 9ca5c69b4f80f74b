"""Unit tests for the mesh configuration parser (libs/config.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from libs.config import ConfigError, Pruning, QuotaLimits, load_config, parse_config
from tests.unit.builders import ConfigBuilder

DEV_CONFIG = Path(__file__).resolve().parents[2] / "config" / "dev.toml"


def test_a_minimal_config_parses_with_defaults() -> None:
    raw = {
        "quota": {"defaults": {"cpu_millis": 1000, "memory_mb": 1024, "concurrent_jobs": 2}},
        "pools": [{"id": "p", "workers": 1}],
    }

    config = parse_config(raw)

    assert (config.issuer, config.audience, config.currency, config.burst_premium) == (
        "jobmesh-dev",
        "jobmesh",
        "USD",
        1.5,
    )
    assert config.tenants == {}
    assert config.burst_pool is None
    assert config.default_quota == QuotaLimits(1000, 1024, 2)
    [pool] = config.pools
    assert (pool.pool_id, pool.kind, pool.min_workers, pool.max_workers) == ("p", "static", 1, 1)
    assert (pool.worker_cpu_millis, pool.worker_memory_mb) == (1000, 1024)
    assert pool.worker_slots == 1  # one job at a time unless a pool says otherwise
    assert config.max_spec_bytes == 64 * 1024
    assert pool.drain_grace_seconds == 30.0
    # Bounded state: roll-up after the finished-job retention, histories pruned, budget checks failing open.
    assert config.cost_rollup_seconds == config.finished_job_retention_seconds == 7 * 86400
    assert (config.burst_audit, config.worker_lifetimes, config.scaling_events) == (
        Pruning(90 * 86400, 10_000),
        Pruning(90 * 86400, 10_000),
        Pruning(30 * 86400, 1_000),
    )
    assert config.budget_check_failure == "open"
    # Sandboxed, without network, unless a pool says otherwise.
    assert (pool.sandbox, pool.network, pool.job_uids, pool.pids_max) == ("bwrap", "none", (200_000, 265_535), 512)


@pytest.mark.parametrize("slots", [0, -1, 65])
def test_worker_slots_out_of_range_are_refused(slots: int) -> None:
    raw = {
        "quota": {"defaults": {"cpu_millis": 1000, "memory_mb": 1024, "concurrent_jobs": 2}},
        "pools": [{"id": "p", "workers": 1, "worker_slots": slots}],
    }
    with pytest.raises(ConfigError, match="worker_slots"):
        parse_config(raw)


@pytest.mark.parametrize("grace", [-1, 3601])
def test_a_drain_grace_out_of_range_is_refused(grace: float) -> None:
    raw = {
        "quota": {"defaults": {"cpu_millis": 1000, "memory_mb": 1024, "concurrent_jobs": 2}},
        "pools": [{"id": "p", "workers": 1, "drain_grace_seconds": grace}],
    }
    with pytest.raises(ConfigError, match="drain_grace_seconds"):
        parse_config(raw)


def test_a_tenant_without_its_own_quota_gets_the_defaults() -> None:
    config = (
        ConfigBuilder().tenant("acme", 2, cpu_millis=500, memory_mb=512, concurrent_jobs=1).tenant("globex").build()
    )

    assert config.quota_for("acme") == QuotaLimits(500, 512, 1)
    assert config.quota_for("globex") == config.default_quota
    assert config.quota_for("stranger") == config.default_quota
    assert config.tenants["acme"].weight == 2.0


def test_pools_are_found_by_id() -> None:
    config = ConfigBuilder().pool("a").pool("b", "dynamic", max_workers=3).build()

    assert config.pool("b") is not None
    assert config.pool("b").max_workers == 3  # type: ignore[union-attr]
    assert config.pool("c") is None


def _spoil(change: Any) -> dict[str, Any]:
    raw = ConfigBuilder().tenant("acme").pool("static-general").raw()
    change(raw)
    return raw


CONFIG_ERRORS = [
    pytest.param(lambda r: r.update(pools=[]), "at least one pool", id="no-pools"),
    pytest.param(lambda r: r.pop("pools"), "at least one pool", id="pools-left-out"),
    pytest.param(lambda r: r["pools"].append(dict(r["pools"][0])), "unique", id="duplicate-pool-ids"),
    pytest.param(lambda r: r["pools"][0].update(kind="spot"), "kind", id="bad-kind"),
    pytest.param(lambda r: r["pools"][0].pop("id"), "needs an id", id="pool-without-id"),
    pytest.param(lambda r: r["pools"][0].update(workers=0), "max_workers", id="static-pool-without-workers"),
    pytest.param(
        lambda r: r["pools"].append({"id": "d", "kind": "dynamic", "min_workers": 3, "max_workers": 2}),
        "min_workers <= max_workers",
        id="dynamic-max-below-min",
    ),
    pytest.param(
        lambda r: r["pools"].append({"id": "d", "kind": "dynamic", "min_workers": -1, "max_workers": 2}),
        "min_workers",
        id="negative-min-workers",
    ),
    pytest.param(
        lambda r: r["pools"].append({"id": "d", "kind": "dynamic", "min_workers": 0, "max_workers": 0}),
        "max_workers > 0",
        id="dynamic-max-zero",
    ),
    pytest.param(lambda r: r["quota"]["defaults"].update(cpu_millis=0), "positive", id="zero-default-cpu"),
    pytest.param(lambda r: r["quota"]["defaults"].update(memory_mb=-5), "positive", id="negative-default-memory"),
    pytest.param(
        lambda r: r["quota"]["defaults"].pop("concurrent_jobs"), "concurrent_jobs", id="default-missing-field"
    ),
    pytest.param(lambda r: r["quota"]["defaults"].update(cpu_millis="lots"), "integer", id="default-not-an-integer"),
    pytest.param(
        lambda r: r["tenants"]["acme"].update(quota={"cpu_millis": 1, "memory_mb": 1, "concurrent_jobs": 0}),
        "tenants.acme.quota",
        id="tenant-zero-jobs",
    ),
    pytest.param(
        lambda r: r.update(burst={"pool": {"cpu_millis": -1, "memory_mb": 1, "concurrent_jobs": 1}}),
        "burst.pool",
        id="negative-burst-pool",
    ),
    pytest.param(lambda r: r.update(retention={"finished_job_seconds": -1}), "retention", id="negative-retention"),
    pytest.param(lambda r: r.update(limits={"max_spec_bytes": 100}), "max_spec_bytes", id="tiny-spec-limit"),
    pytest.param(lambda r: r.update(retention={"cost_rollup_seconds": -1}), "cost_rollup", id="negative-rollup"),
    pytest.param(lambda r: r.update(retention={"burst_audit_max": 0}), "burst_audit", id="audit-keeps-none"),
    pytest.param(lambda r: r.update(retention={"scaling_events_seconds": -5}), "scaling_events", id="negative-age"),
    pytest.param(lambda r: r.update(cost={"budget_check_failure": "shut"}), "budget_check_failure", id="bad-mode"),
    pytest.param(lambda r: r.update(burst={"max_tenant_share": 0}), "max_tenant_share", id="no-burst-share"),
    pytest.param(lambda r: r.update(burst={"max_tenant_share": 1.5}), "max_tenant_share", id="burst-share-over-1"),
    pytest.param(
        lambda r: r.update(limits={"max_spec_bytes": 2**20}), "max_spec_bytes", id="spec-limit-over-etcd-room"
    ),
    pytest.param(
        lambda r: r["pools"][0].update(health_check_command="true"), "health_check_command", id="health-not-a-list"
    ),
    pytest.param(lambda r: r["pools"][0].update(sandbox="off"), "sandbox must be", id="sandbox-typo"),
    pytest.param(lambda r: r["pools"][0].update(network="bridge"), "network must be", id="unknown-network"),
    pytest.param(lambda r: r["pools"][0].update(job_uids=[0, 100]), "job_uids", id="uids-include-root"),
    pytest.param(lambda r: r["pools"][0].update(job_uids=[300000, 200000]), "job_uids", id="uids-empty-range"),
    pytest.param(lambda r: r["pools"][0].update(job_uids="200000-265535"), "job_uids", id="uids-not-a-pair"),
    pytest.param(lambda r: r["pools"][0].update(pids_max=0), "pids_max", id="no-processes"),
    pytest.param(lambda r: r["pools"][0].update(max_open_files="many"), "max_open_files", id="files-not-int"),
]


@pytest.mark.parametrize(("change", "message"), CONFIG_ERRORS)
def test_a_bad_config_is_a_config_error(change: Any, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_config(_spoil(change))


@pytest.mark.parametrize(
    "weight",
    [pytest.param(0, id="zero-weight"), pytest.param(-1, id="negative-weight")],
)
def test_a_non_positive_tenant_weight_is_a_config_error(weight: int) -> None:
    with pytest.raises(ConfigError):
        parse_config(_spoil(lambda r: r["tenants"]["acme"].update(weight=weight)))


def test_the_dev_config_loads_three_weighted_tenants_and_one_pool_of_each_kind() -> None:
    config = load_config(DEV_CONFIG)

    assert {tid: tc.weight for tid, tc in config.tenants.items()} == {"acme": 1.0, "globex": 2.0, "initech": 3.0}
    assert sorted(p.kind for p in config.pools) == ["burst", "dynamic", "static"]
    static = next(p for p in config.pools if p.kind == "static")
    dynamic = next(p for p in config.pools if p.kind == "dynamic")
    assert static.min_workers == static.max_workers > 0
    assert dynamic.min_workers <= dynamic.max_workers and dynamic.max_workers > 0
    assert config.burst_pool is not None
    assert static.pricing.cpu_core_hour > 0
    assert config.finished_job_retention_seconds == 7 * 86400
    burst = next(p for p in config.pools if p.kind == "burst")
    assert burst.min_workers == 0 and burst.pricing.cpu_core_hour > static.pricing.cpu_core_hour


def test_an_unreadable_config_file_is_a_config_error(tmp_path: Path) -> None:
    broken = tmp_path / "mesh.toml"
    broken.write_text("[quota\n")

    with pytest.raises(ConfigError, match="cannot read"):
        load_config(broken)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "missing.toml")


@pytest.mark.parametrize(
    ("spoil", "named"),
    [
        pytest.param(lambda r: r["tenants"]["acme"].update(wieght=2), "tenants.acme.wieght (did you mean weight?)"),
        pytest.param(lambda r: r.update(retension={"x": 1}), "retension."),
        pytest.param(
            lambda r: r["pools"][0].update(drain_grace_second=5),
            "drain_grace_second (did you mean drain_grace_seconds?)",
        ),
        pytest.param(lambda r: r["quota"]["defaults"].update(gpus=1), "quota.defaults.gpus"),
    ],
    ids=["tenant-typo", "section-typo", "pool-typo", "limits-extra"],
)
def test_a_key_no_setting_reads_is_an_error_naming_it(spoil: Any, named: str) -> None:
    """A typo would otherwise load the default without a word (`wieght = 2` gives weight 1)."""
    with pytest.raises(ConfigError, match="unknown key") as caught:
        parse_config(_spoil(spoil))
    assert named in str(caught.value)


def test_free_form_tables_take_any_names_but_their_members_are_checked() -> None:
    raw = _spoil(lambda r: r["tenants"].update(newco={"weight": 1}))
    assert "newco" in parse_config(raw).tenants
    with pytest.raises(ConfigError, match=r"tenants\.newco\.colour"):
        parse_config(_spoil(lambda r: r["tenants"].update(newco={"weight": 1, "colour": "red"})))
