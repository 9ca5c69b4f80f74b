"""The service config of internal channels: retries of UNAVAILABLE, and for an active/standby service, calls that
follow the leader's health and wait for the next leader instead of failing between two."""

from __future__ import annotations

import json

from libs.interceptors import service_config


def test_a_channel_to_an_active_standby_service_balances_by_its_health_and_waits_for_a_leader() -> None:
    config = json.loads(service_config(retry=True, health_service="jobmesh.quota.v1.QuotaService"))

    assert config["healthCheckConfig"] == {"serviceName": "jobmesh.quota.v1.QuotaService"}
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method] = config["methodConfig"]
    assert method["waitForReady"] is True
    assert method["retryPolicy"]["retryableStatusCodes"] == ["UNAVAILABLE"]


def test_a_plain_channel_only_retries_and_a_fail_fast_one_does_nothing_of_the_kind() -> None:
    plain = json.loads(service_config(retry=True))
    assert "healthCheckConfig" not in plain and "waitForReady" not in plain["methodConfig"][0]
    assert json.loads(service_config(retry=False)) == {}
