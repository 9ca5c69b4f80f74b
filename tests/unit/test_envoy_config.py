"""The committed Envoy config is what the renderer produces for the dev defaults: mTLS to every gateway, each
health-checked, and only requests that are safe to repeat sent again."""

from __future__ import annotations

import json
from typing import Any

from devtools.launcher import REPO
from libs.envoy_config import PUBLIC_SERVICES, read_methods, render_dev_defaults


def dev_defaults() -> str:
    return render_dev_defaults()


def test_the_committed_envoy_config_is_current() -> None:
    assert (REPO / "envoy" / "envoy.json").read_text() == dev_defaults(), "run `make envoy-config`"


def test_the_transcoder_serves_exactly_the_public_services() -> None:
    text = dev_defaults()
    config = json.loads(text)
    assert config["admin"]["address"] == {"pipe": {"path": ".jobmesh/envoy-admin.sock", "mode": 0o600}}
    for service in PUBLIC_SERVICES:
        assert service in text
    assert "jobmesh.quota.v1" not in text


def test_the_hop_to_the_gateway_is_mtls_pinned_to_the_gateway_identity() -> None:
    cluster = json.loads(dev_defaults())["static_resources"]["clusters"][0]
    context = cluster["transport_socket"]["typed_config"]["common_tls_context"]
    assert context["tls_certificate_sds_secret_configs"][0]["name"] == "envoy_identity"
    validation = context["combined_validation_context"]
    assert validation["default_validation_context"]["match_typed_subject_alt_names"] == [
        {"san_type": "URI", "matcher": {"exact": "spiffe://jobmesh/service/gateway"}}
    ]
    assert validation["validation_context_sds_secret_config"]["name"] == "mesh_ca"


def routes_by_path(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    hcm = config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]
    routes = hcm["route_config"]["virtual_hosts"][0]["routes"]
    return {r["match"].get("path") or r["match"]["prefix"]: r for r in routes if "route" in r}


def retried_on(route: dict[str, Any]) -> set[str]:
    return set(route["route"]["retry_policy"]["retry_on"].split(","))


def test_both_gateways_are_health_checked_and_one_whose_connections_fail_is_ejected() -> None:
    config = json.loads(dev_defaults())
    for cluster in config["static_resources"]["clusters"][:2]:
        endpoints = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"]
        ports = [e["endpoint"]["address"]["socket_address"]["port_value"] for e in endpoints]
        assert ports == [50051, 50061]
        [check] = cluster["health_checks"]
        assert check["grpc_health_check"]["service_name"] == "jobmesh.gateway.v1.JobService"
        outliers = cluster["outlier_detection"]
        # Envoy's own failures to reach a gateway eject it; a gateway's error answers never do.
        assert outliers["split_external_local_origin_errors"] is True
        assert outliers["consecutive_local_origin_failure"] == 1
        assert outliers["enforcing_consecutive_5xx"] == 0


def test_a_write_a_gateway_may_have_received_is_never_sent_again_and_a_read_is() -> None:
    routes = routes_by_path(json.loads(dev_defaults()))
    never_received = {"connect-failure", "refused-stream", "reset-before-request"}
    writes = [
        "/jobmesh.gateway.v1.JobService/SubmitJob",  # its own route
        "/jobmesh.gateway.v1.JobService/",  # CancelJob, DryRunJob
        "/jobmesh.gateway.v1.TenantService/",  # UpdateQuota, RequestBurst, UpdateBudget, UpdateFairShare
    ]
    for path in writes:
        assert retried_on(routes[path]) == never_received, path
    for read in read_methods():
        assert retried_on(routes[read]) == never_received | {"reset"}, read
    assert "/jobmesh.gateway.v1.JobService/GetJob" in read_methods()
    assert "/jobmesh.gateway.v1.JobService/SubmitJob" not in read_methods()
    # Each retry goes to a gateway not tried yet for the request.
    policy = routes[writes[0]]["route"]["retry_policy"]
    assert policy["retry_host_predicate"][0]["name"] == "envoy.retry_host_predicates.previous_hosts"
