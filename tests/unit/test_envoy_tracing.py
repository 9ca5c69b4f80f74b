"""Envoy traces requests only when the services export over OTLP, to the same collector."""

from __future__ import annotations

import json
from typing import Any

import pytest

from libs.config import EdgeLimits
from libs.envoy_admission import EdgeAuth
from libs.envoy_config import EnvoyTls, otlp_collector, render_envoy_config


def render(otlp: tuple[str, int] | None) -> dict[str, Any]:
    tls = EnvoyTls(identity_sds="/tmp/sds/identity.yaml", validation_sds="/tmp/sds/ca.yaml", watched_dir="/tmp/tls")
    text = render_envoy_config(
        listen_host="127.0.0.1",
        listen_port=8080,
        admin_socket="/tmp/admin.sock",
        gateways=[("127.0.0.1", 50051)],
        descriptor_path="jobmesh.pb",
        tls=tls,
        auth=EdgeAuth(issuer="i", audience="a", keys_file="jwks.json"),
        limits=EdgeLimits(),
        otlp=otlp,
    )
    return json.loads(text)  # type: ignore[no-any-return]


def hcm(config: dict[str, Any]) -> dict[str, Any]:
    return config["static_resources"]["listeners"][0]["filter_chains"][0]["filters"][0]["typed_config"]  # type: ignore[no-any-return]


def test_without_a_collector_envoy_does_not_trace() -> None:
    config = render(None)
    assert "tracing" not in hcm(config)
    assert "otel_collector" not in {c["name"] for c in config["static_resources"]["clusters"]}


def test_with_a_collector_envoy_sends_its_spans_there_over_http2() -> None:
    config = render(("collector.example", 4317))
    provider = hcm(config)["tracing"]["provider"]
    assert provider["name"] == "envoy.tracers.opentelemetry"
    assert provider["typed_config"]["grpc_service"]["envoy_grpc"]["cluster_name"] == "otel_collector"
    [cluster] = [c for c in config["static_resources"]["clusters"] if c["name"] == "otel_collector"]
    endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert (endpoint["address"], endpoint["port_value"]) == ("collector.example", 4317)
    options = cluster["typed_extension_protocol_options"]["envoy.extensions.upstreams.http.v3.HttpProtocolOptions"]
    assert "http2_protocol_options" in options["explicit_http_config"]


@pytest.mark.parametrize(
    "env, collector",
    [
        ({}, None),
        ({"JOBMESH_OTEL_EXPORTER": "console"}, None),
        ({"JOBMESH_OTEL_EXPORTER": "otlp"}, ("127.0.0.1", 4317)),
        ({"JOBMESH_OTEL_EXPORTER": "otlp", "JOBMESH_OTEL_ENDPOINT": "10.0.0.5:5317"}, ("10.0.0.5", 5317)),
        ({"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": "http://otel:4317/"}, ("otel", 4317)),
        ({"OTEL_TRACES_EXPORTER": "otlp", "JOBMESH_OTEL_EXPORTER": "none"}, None),
    ],
)
def test_the_collector_is_the_services_one(env: dict[str, str], collector: tuple[str, int] | None) -> None:
    assert otlp_collector(env) == collector
