"""Who is calling: the mesh identity (SPIFFE id) of the peer of an mTLS connection, parsed and typed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from libs.keys import safe_segment
from libs.pki import TRUST_DOMAIN

_PREFIX = f"spiffe://{TRUST_DOMAIN}/"


@dataclass(frozen=True)
class Identity:
    """`spiffe://jobmesh/service/<name>` or `spiffe://jobmesh/worker/<pool>/<worker>`."""

    uri: str
    kind: str  # "service" | "worker"
    name: str  # the service's name, or the worker's id
    pool: str = ""  # a worker's pool

    @property
    def is_worker(self) -> bool:
        return self.kind == "worker"

    def is_service(self, *names: str) -> bool:
        return self.kind == "service" and (not names or self.name in names)


def parse_spiffe(uri: str) -> Identity | None:
    """The identity a SPIFFE id names, or None for anything else (another trust domain, a malformed path)."""
    if not uri.startswith(_PREFIX):
        return None
    parts = uri[len(_PREFIX) :].split("/")
    if len(parts) == 2 and parts[0] == "service" and safe_segment(parts[1]):
        return Identity(uri, "service", parts[1])
    if len(parts) == 3 and parts[0] == "worker" and safe_segment(parts[1]) and safe_segment(parts[2]):
        return Identity(uri, "worker", parts[2], parts[1])
    return None


def peer_identity(context: Any) -> Identity | None:
    """The verified identity of a grpc.aio call's peer; None on a connection without a mesh certificate.
    gRPC sets `peer_spiffe_id` only when the verified certificate carries exactly one spiffe:// URI SAN."""
    values = context.auth_context().get("peer_spiffe_id") or []
    if len(values) != 1:
        return None
    raw = values[0]
    return parse_spiffe(raw.decode() if isinstance(raw, bytes) else str(raw))
