"""The edge's admission config: JWT first, a bucket per tenant (submits apart from reads), the in-flight bound on
submits, Envoy's overload manager, and the shape of Envoy's own refusals; the [edge] table that drives them."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from libs.config import ConfigError, EdgeLimits, parse_config
from libs.envoy_admission import retry_after_for, status_details_bin
from tests.unit.builders import edge_config

LIMITS = EdgeLimits(
    submit_rate_per_second=5, submit_burst=10, read_rate_per_second=0.5, read_burst=20, max_inflight_submits=7
)
RATE_LIMIT = "envoy.filters.http.local_ratelimit"


def render(limits: EdgeLimits = LIMITS, console: bool = True) -> dict[str, Any]:
    return edge_config(limits, console_port=50057 if console else None)


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]  # type: ignore[no-any-return]


def routes(config: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {r["name"]: r for r in hcm(config)["route_config"]["virtual_hosts"][0]["routes"]}


def cluster(config: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in config["static_resources"]["clusters"] if c["name"] == name)


def test_the_token_is_checked_first_against_the_gateways_keys_and_forwarded() -> None:
    filters = hcm(render())["http_filters"]
    assert filters[0]["name"] == "envoy.filters.http.jwt_authn"
    provider = filters[0]["typed_config"]["providers"]["jobmesh"]
    assert provider["issuer"] == "jobmesh-dev" and provider["audiences"] == ["jobmesh"]
    assert provider["local_jwks"] == {"filename": ".jobmesh/keys/edge-jwks.json"}
    assert provider["forward"] is True  # the gateway verifies it again
    assert provider["from_headers"] == [{"name": "authorization", "value_prefix": "Bearer "}]


def test_every_path_needs_a_token_but_the_consoles_static_files_and_the_openapi_document() -> None:
    rules = hcm(render())["http_filters"][0]["typed_config"]["rules"]
    assert rules[-1] == {"match": {"prefix": "/"}, "requires": {"provider_name": "jobmesh"}}
    exempt = [r["match"] for r in rules if "requires" not in r]
    openapi = [{"path": "/api/v1/openapi.yaml"}, {"path": "/jobmesh.gateway.v1.ApiService/GetOpenApiDocument"}]
    assert exempt == [{"prefix": "/console/"}, *openapi, {"path": "/console"}]
    no_console = hcm(render(console=False))["http_filters"][0]["typed_config"]["rules"]
    assert [r["match"] for r in no_console if "requires" not in r] == openapi
    assert no_console[-1] == rules[-1]


def test_rate_limits_run_after_the_transcoder_and_before_the_router() -> None:
    names = [f["name"] for f in hcm(render())["http_filters"]]
    assert names.index("envoy.filters.http.grpc_json_transcoder") < names.index(RATE_LIMIT) == len(names) - 2


def test_each_tenant_has_its_own_bucket_keyed_by_the_verified_tenant_claim() -> None:
    reads = next(f for f in hcm(render())["http_filters"] if f["name"] == RATE_LIMIT)["typed_config"]
    [descriptor] = reads["descriptors"]
    assert descriptor["entries"] == [{"key": "tenant", "value": ""}]  # a bucket per value seen
    assert reads["always_consume_default_token_bucket"] is False  # never a bucket shared across tenants
    [action] = reads["rate_limits"][0]["actions"]
    assert action["metadata"]["metadata_key"] == {
        "key": "envoy.filters.http.jwt_authn",
        "path": [{"key": "jwt_payload"}, {"key": "tenant"}],
    }
    assert reads["rate_limited_as_resource_exhausted"] is True
    # 0.5/s: one token every 2 s, 20 at most.
    assert descriptor["token_bucket"] == {"max_tokens": 20, "tokens_per_fill": 1, "fill_interval": "2.000s"}


def test_submits_have_their_own_route_bucket_and_cluster() -> None:
    submit = routes(render())["submit"]
    assert submit["match"] == {"path": "/jobmesh.gateway.v1.JobService/SubmitJob", "grpc": {}}
    assert submit["route"]["cluster"] == "jobmesh_gateway_submits"
    bucket = submit["typed_per_filter_config"][RATE_LIMIT]["descriptors"][0]["token_bucket"]
    assert bucket == {"max_tokens": 10, "tokens_per_fill": 5, "fill_interval": "1.000s"}
    names = list(routes(render()))
    assert names.index("submit") < names.index("jobmesh.gateway.v1.JobService")
    assert routes(render())["console"]["typed_per_filter_config"][RATE_LIMIT]["disabled"] is True


def test_submits_in_flight_are_bounded_on_their_cluster_only() -> None:
    config = render()
    [threshold] = cluster(config, "jobmesh_gateway_submits")["circuit_breakers"]["thresholds"]
    assert (threshold["max_requests"], threshold["max_pending_requests"]) == (7, 7)
    assert "circuit_breakers" not in cluster(config, "jobmesh_gateway")


def test_envoy_bounds_its_heap_connections_and_buffers() -> None:
    config = render(EdgeLimits(max_heap_mb=100, max_connections=50, per_connection_buffer_kb=32))
    monitors = {m["name"]: m["typed_config"] for m in config["overload_manager"]["resource_monitors"]}
    assert monitors["envoy.resource_monitors.fixed_heap"]["max_heap_size_bytes"] == 100 * 1024 * 1024
    assert (
        monitors["envoy.resource_monitors.global_downstream_max_connections"]["max_active_downstream_connections"] == 50
    )
    actions = {a["name"]: a["triggers"][0]["threshold"]["value"] for a in config["overload_manager"]["actions"]}
    assert actions == {
        "envoy.overload_actions.shrink_heap": 0.9,
        "envoy.overload_actions.stop_accepting_requests": 0.98,
    }
    assert config["static_resources"]["listeners"][0]["per_connection_buffer_limit_bytes"] == 32 * 1024
    assert cluster(config, "jobmesh_gateway")["per_connection_buffer_limit_bytes"] == 32 * 1024


def _mappers(config: dict[str, Any]) -> list[dict[str, Any]]:
    return hcm(config)["local_reply_config"]["mappers"]  # type: ignore[no-any-return]


def test_refusals_are_429_with_retry_after_and_a_status_body_to_rest_callers() -> None:
    by_reason: dict[str, dict[str, Any]] = {}
    for mapper in _mappers(render()):
        body = mapper.get("body_format_override", {}).get("json_format")
        if body:
            by_reason.setdefault(body["details"][0]["reason"], mapper)
    for reason, status, code in (("RATE_LIMITED", 429, 8), ("OVERLOADED", 429, 8), ("TOKEN_EXPIRED", 401, 16)):
        mapper = by_reason[reason]
        assert mapper["status_code"] == status
        assert mapper["body_format_override"]["json_format"]["code"] == code
    retry = {h["header"]["key"]: h["header"]["value"] for h in by_reason["RATE_LIMITED"]["headers_to_add"]}
    assert retry == {"retry-after": "1"}  # submits refill 5 a second


def test_native_grpc_callers_get_resource_exhausted_with_error_info_and_retry_info() -> None:
    headers = [
        {h["header"]["key"]: h["header"]["value"] for h in m["headers_to_add"]}
        for m in _mappers(render())
        if "text_format_source" in m.get("body_format_override", {})
    ]
    statuses = [(h["grpc-status"], _decoded(h["grpc-status-details-bin"])) for h in headers]
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    code, status = next((c, s) for c, s in statuses if s.details[0].Unpack(info) and info.reason == "RATE_LIMITED")
    assert code == str(code_pb2.RESOURCE_EXHAUSTED) and info.domain == "jobmesh.dev"
    assert status.details[1].Unpack(retry) and retry.retry_delay.seconds == 1


def _decoded(value: str) -> status_pb2.Status:
    return status_pb2.Status.FromString(base64.b64decode(value + "=" * (-len(value) % 4)))


def test_a_status_without_a_retry_hint_has_no_retry_info() -> None:
    status = _decoded(status_details_bin(16, "token expired", "TOKEN_EXPIRED", 0))
    assert len(status.details) == 1 and status.message == "token expired"


@pytest.mark.parametrize(("rate", "seconds"), [(200, 1), (0.5, 2), (0.001, 1000), (2.5, 2)])
def test_retry_after_is_when_a_token_is_back(rate: float, seconds: int) -> None:
    assert retry_after_for(rate) == seconds


MINIMAL: dict[str, Any] = {
    "quota": {"defaults": {"cpu_millis": 1000, "memory_mb": 1024, "concurrent_jobs": 2}},
    "pools": [{"id": "p", "workers": 1}],
}


def test_the_edge_table_is_optional_and_read_when_present() -> None:
    assert parse_config(MINIMAL).edge == EdgeLimits()
    edge = parse_config(
        {**MINIMAL, "edge": {"submit_rate_per_second": 0.01, "submit_burst": 3, "max_inflight_submits": 2}}
    ).edge
    assert (edge.submit_rate_per_second, edge.submit_burst, edge.max_inflight_submits) == (0.01, 3, 2)
    assert isinstance(edge.submit_rate_per_second, float)


@pytest.mark.parametrize(
    "edge",
    [
        pytest.param({"submit_rate": 5}, id="unknown key"),
        pytest.param({"read_burst": 0}, id="zero burst"),
        pytest.param({"max_inflight_submits": -1}, id="negative bound"),
        pytest.param({"max_inflight_submits": 2.5}, id="fractional bound"),
        pytest.param({"submit_rate_per_second": "fast"}, id="not a number"),
        pytest.param({"submit_rate_per_second": 500, "submit_burst": 100}, id="burst below the rate"),
    ],
)
def test_a_bad_edge_table_is_refused(edge: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="edge"):
        parse_config({**MINIMAL, "edge": edge})


def test_the_enqueue_latency_bound_may_be_turned_off() -> None:
    assert parse_config({**MINIMAL, "edge": {"max_submit_latency_ms": 0}}).edge.max_submit_latency_ms == 0
