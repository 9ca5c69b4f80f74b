"""The committed Envoy config is what the renderer produces for the dev defaults."""

from __future__ import annotations

import json

from libs.envoy_config import PUBLIC_SERVICES, render_envoy_config
from libs.launcher import REPO


def dev_defaults() -> str:
    return render_envoy_config(
        listen_host="127.0.0.1",
        listen_port=8080,
        admin_port=9901,
        gateway_host="127.0.0.1",
        gateway_port=50051,
        descriptor_path="build/jobmesh.pb",
    )


def test_the_committed_envoy_config_is_current() -> None:
    assert (REPO / "envoy" / "envoy.json").read_text() == dev_defaults(), "run `make envoy-config`"


def test_the_transcoder_serves_exactly_the_public_services() -> None:
    text = dev_defaults()
    config = json.loads(text)
    assert config["admin"]["address"]["socket_address"]["address"] == "127.0.0.1"
    for service in PUBLIC_SERVICES:
        assert service in text
    assert "jobmesh.quota.v1" not in text
