"""Envoy routes /console/ to the console's static-file service, past the transcoder, only when asked to."""

from __future__ import annotations

from typing import Any

from tests.unit.builders import edge_config


def render(console_port: int | None) -> dict[str, Any]:
    return edge_config(console_port=console_port)


def routes(config: dict[str, Any]) -> list[dict[str, Any]]:
    listener = config["static_resources"]["listeners"][0]
    hcm = listener["filter_chains"][0]["filters"][0]["typed_config"]
    return hcm["route_config"]["virtual_hosts"][0]["routes"]  # type: ignore[no-any-return]


def test_the_console_prefix_goes_to_a_loopback_cluster_without_transcoding() -> None:
    config = render(50057)
    by_name = {r["name"]: r for r in routes(config)}
    console = by_name["console"]
    assert console["match"] == {"prefix": "/console/"}
    assert console["route"]["cluster"] == "jobmesh_console"
    off = console["typed_per_filter_config"]["envoy.filters.http.grpc_json_transcoder"]
    assert off["disabled"] is True
    assert by_name["console_redirect"]["redirect"] == {"path_redirect": "/console/"}
    cluster = next(c for c in config["static_resources"]["clusters"] if c["name"] == "jobmesh_console")
    address = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]["address"]["socket_address"]
    assert address == {"address": "127.0.0.1", "port_value": 50057}


def test_the_console_routes_come_before_the_catch_all_404() -> None:
    names = [r["name"] for r in routes(render(50057))]
    assert names.index("console") < names.index("not_found") == len(names) - 1


def test_without_a_console_port_nothing_changes() -> None:
    config = render(None)
    assert all(not r["name"].startswith("console") for r in routes(config))
    assert [c["name"] for c in config["static_resources"]["clusters"]] == ["jobmesh_gateway", "jobmesh_gateway_submits"]
