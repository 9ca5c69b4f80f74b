"""The committed Envoy config is what the renderer produces for the dev defaults."""

from __future__ import annotations

import json

from devtools.launcher import REPO
from libs.envoy_config import PUBLIC_SERVICES, render_dev_defaults


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
