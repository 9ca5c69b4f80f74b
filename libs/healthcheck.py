"""`python -m libs.healthcheck`: a Kubernetes exec probe. grpc.health.v1 over mTLS on this pod's own port, as its
own identity: the kubelet's built-in gRPC probe speaks plaintext, which an mTLS-only port refuses at the
handshake. Exit 0 when the server answers SERVING, 1 otherwise (2: misconfigured)."""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.settings import SettingsError, TlsSettings, load_settings
from libs.tls import sync_channel


@dataclass(frozen=True)
class ProbeSettings:
    """The pod's own port and the identity the probe calls it as (the pod's own certificate)."""

    tls: TlsSettings
    port: int

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> ProbeSettings:
        tls = TlsSettings.required(env, "probe")
        port = env.get("JOBMESH_PORT", "")
        if not port.isdigit():
            raise SettingsError("JOBMESH_PORT must be set")
        return cls(tls, int(port))


def main() -> int:
    settings = load_settings("healthcheck", ProbeSettings.from_env)
    try:
        with sync_channel(f"127.0.0.1:{settings.port}", settings.tls) as ch:
            answer = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
    except grpc.RpcError as exc:
        print(f"health check failed: {exc.code().name}", file=sys.stderr)  # type: ignore[attr-defined]
        return 1
    return 0 if answer.status == health_pb2.HealthCheckResponse.SERVING else 1


if __name__ == "__main__":
    raise SystemExit(main())
