"""Each service's settings object: built from the environment in one call, typed, and a bad value refused at
start-up with an error naming the variable."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import pytest

from libs.settings import SettingsError
from services.console.settings import Settings as ConsoleSettings
from services.cost.settings import Settings as CostSettings
from services.gateway.settings import Settings as GatewaySettings
from services.poolmanager.settings import Settings as PoolManagerSettings
from services.queueing.settings import Settings as QueueingSettings
from services.quota.settings import Settings as QuotaSettings
from services.scheduler.settings import Settings as SchedulerSettings
from services.worker.settings import JoinSettings
from services.worker.settings import Settings as WorkerSettings

REPO = Path(__file__).resolve().parents[2]
BASE = {"JOBMESH_CONFIG": str(REPO / "config" / "dev.toml"), "JOBMESH_TLS_DIR": "/tls"}
POOLMANAGER = {**BASE, "JOBMESH_WORKER_CA_DIR": "/worker-ca"}
Loader = Callable[[Mapping[str, str]], Any]


@pytest.fixture
def gateway_env(tmp_path: Path) -> dict[str, str]:
    keys = tmp_path / "jwt.pub"
    keys.write_text("{}")
    return {**BASE, "JOBMESH_JWT_KEYS": str(keys)}


@pytest.mark.parametrize(
    ("load", "env", "variable"),
    [
        pytest.param(QuotaSettings.from_env, {"JOBMESH_LEADER_TTL": "0"}, "JOBMESH_LEADER_TTL", id="quota lease"),
        pytest.param(QueueingSettings.from_env, {"JOBMESH_LEADER_TTL": "x"}, "JOBMESH_LEADER_TTL", id="queueing lease"),
        pytest.param(
            QueueingSettings.from_env, {"JOBMESH_LOG_MAX_BYTES": "-1"}, "JOBMESH_LOG_MAX_BYTES", id="queueing logs"
        ),
        pytest.param(
            QueueingSettings.from_env, {"JOBMESH_QUEUEING_MAX_BATCH": "65"}, "JOBMESH_QUEUEING_MAX_BATCH", id="batch"
        ),
        pytest.param(
            SchedulerSettings.from_env,
            {"JOBMESH_SCHEDULER_MIN_INTERVAL_MS": "soon"},
            "JOBMESH_SCHEDULER_MIN_INTERVAL_MS",
            id="scheduler interval",
        ),
        pytest.param(
            CostSettings.from_env, {"JOBMESH_COST_RESCAN_EVERY": "0"}, "JOBMESH_COST_RESCAN_EVERY", id="cost rescan"
        ),
        pytest.param(PoolManagerSettings.from_env, {}, "JOBMESH_WORKER_CA_DIR", id="pool-manager without worker CA"),
        pytest.param(
            PoolManagerSettings.from_env,
            {"JOBMESH_WORKER_CA_DIR": "/ca", "JOBMESH_JOIN_PORT": "70000"},
            "JOBMESH_JOIN_PORT",
            id="join port",
        ),
        pytest.param(
            PoolManagerSettings.from_env,
            {"JOBMESH_WORKER_CA_DIR": "/ca", "JOBMESH_WORKER_LEASE_TTL": "0"},
            "JOBMESH_WORKER_LEASE_TTL",
            id="worker lease",
        ),
        pytest.param(
            PoolManagerSettings.from_env,
            {"JOBMESH_WORKER_CA_DIR": "/ca", "JOBMESH_USAGE_SAMPLE_SECONDS": "-1"},
            "JOBMESH_USAGE_SAMPLE_SECONDS",
            id="usage samples",
        ),
        pytest.param(GatewaySettings.from_env, {"JOBMESH_JWT_KEYS": "/nowhere"}, "JOBMESH_JWT_KEYS", id="jwt keys"),
        pytest.param(
            WorkerSettings.from_env, {"JOBMESH_WORKER_LABELS": "[1]"}, "JOBMESH_WORKER_LABELS", id="worker labels"
        ),
        pytest.param(
            WorkerSettings.from_env, {"JOBMESH_WORKER_HEALTH_CHECK": "{"}, "JOBMESH_WORKER_HEALTH_CHECK", id="health"
        ),
        pytest.param(
            WorkerSettings.from_env, {"JOBMESH_WORKER_CPU_MILLIS": "1.5"}, "JOBMESH_WORKER_CPU_MILLIS", id="capacity"
        ),
        pytest.param(
            ConsoleSettings.from_env, {"JOBMESH_CONSOLE_HOST": "0.0.0.0"}, "JOBMESH_CONSOLE_HOST", id="console host"
        ),
        pytest.param(JoinSettings.from_env, {"JOBMESH_JOIN_ADDR": "a:1"}, "JOBMESH_JOIN_CA", id="join"),
    ],
)
def test_a_bad_value_is_refused_at_start_naming_its_variable(load: Loader, env: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError, match=variable):
        load({**BASE, **env})


def test_each_service_reads_its_own_variables_into_typed_fields(gateway_env: dict[str, str]) -> None:
    tuned = {
        "JOBMESH_LEADER_TTL": "3",
        "JOBMESH_WORKER_LEASE_TTL": "9",
        "JOBMESH_RESULT_LINGER_MS": "8",
        "JOBMESH_JOIN_PORT": "50057",
        "JOBMESH_LOG_DIR": "/logs",
        "JOBMESH_LOG_MAX_BYTES": "4096",
        "JOBMESH_REPLICA_ID": "poolmanager-1",
    }

    pools = PoolManagerSettings.from_env({**POOLMANAGER, **tuned})
    queueing = QueueingSettings.from_env({**BASE, "JOBMESH_QUEUEING_BOOST_FRACTION": "0.25"})
    gateway = GatewaySettings.from_env({**gateway_env, "JOBMESH_OPENAPI_PATH": "/api.yaml"})

    assert (pools.leader.ttl_seconds, pools.lease.ttl_seconds, pools.result_linger_seconds) == (3, 9, 0.008)
    assert (pools.join_port, pools.logs.directory, pools.logs.max_bytes) == (50057, Path("/logs"), 4096)
    assert "JOBMESH_REPLICA_ID" not in pools.worker_env and pools.worker_env["JOBMESH_LEADER_TTL"] == "3"
    assert (queueing.queue.boost_fraction, queueing.leader.ttl_seconds) == (0.25, 2)  # the default lease
    assert queueing.logs.directory == Path(".jobmesh") / "job-logs"
    assert gateway.openapi_path == Path("/api.yaml")


def test_a_worker_reads_the_description_its_provider_hands_it() -> None:
    env = {
        **BASE,
        "JOBMESH_WORKER_ID": "gpu-1a2b",
        "JOBMESH_POOL_ID": "gpu",
        "JOBMESH_WORKER_CPU_MILLIS": "4000",
        "JOBMESH_WORKER_LABELS": '{"gpu": "a100"}',
        "JOBMESH_WORKER_SLOTS": "0",
        "JOBMESH_WORKER_HEALTH_CHECK": '["true"]',
        "JOBMESH_WORKER_SANDBOX": "none",
        "JOBMESH_WORKER_RENEW_CERT": "1",
    }

    settings = WorkerSettings.from_env(env)

    worker = settings.worker
    assert (worker.worker_id, worker.pool_id, worker.cpu_millis, worker.memory_mb) == ("gpu-1a2b", "gpu", 4000, 1024)
    assert (dict(worker.labels), worker.slots, worker.spawn_time) == ({"gpu": "a100"}, 1, None)
    assert (settings.health.command, settings.health.interval_seconds) == (("true",), 30.0)
    assert settings.sandbox is not None and settings.sandbox.mode == "none" and settings.renew_certificate
