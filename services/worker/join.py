"""Join a pool with a join token: `python -m services.worker.join` (a Kubernetes init container, before the agent).

Makes a private key here (it never leaves this process's output directory), sends a certificate signing request
and the token to the pool-manager's join port over server-only TLS (the pool-manager is verified against the
mesh CA bundle), and writes what the agent starts with: `worker.key` (0600), `worker.crt` and `ca.crt` (the
bundle the agent verifies the pool-manager with) in `JOBMESH_JOIN_DIR`. The worker id and pool are in the
certificate; the agent reads them from there (`identity_of`).

Environment: JOBMESH_JOIN_TOKEN, JOBMESH_JOIN_ADDR (host:port of the join port), JOBMESH_JOIN_CA (the mesh CA
bundle), JOBMESH_JOIN_DIR, optionally JOBMESH_JOIN_SERVER_NAME (the name in the pool-manager's certificate).
"""

from __future__ import annotations

import asyncio
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from libs.identity import parse_spiffe
from libs.pki import uri_of, write_private, write_public

CERT_NAME = "worker"


@dataclass(frozen=True)
class Joined:
    worker_id: str
    pool_id: str
    cert: Path
    key: Path
    ca: Path


def _request() -> tuple[bytes, bytes]:
    """(the private key PEM, a CSR for it)."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jobmesh worker")]))
        .sign(key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return key_pem, csr.public_bytes(serialization.Encoding.PEM)


async def join_pool(
    addr: str, token: str, ca_pem: bytes, directory: Path, server_name: str = "", timeout: float = 10.0
) -> Joined:
    """Exchanges `token` for a worker certificate and writes the identity's files into `directory`."""
    key_pem, csr_pem = _request()
    options = [("grpc.ssl_target_name_override", server_name)] if server_name else []
    creds = grpc.ssl_channel_credentials(root_certificates=ca_pem)
    async with grpc.aio.secure_channel(addr, creds, options=options) as ch:
        stub = poolmanager_pb2_grpc.WorkerJoinServiceStub(ch)
        resp: pm.JoinResponse = await stub.Join(pm.JoinRequest(token=token, csr_pem=csr_pem), timeout=timeout)
    joined = Joined(
        resp.worker_id,
        resp.pool_id,
        directory / f"{CERT_NAME}.crt",
        directory / f"{CERT_NAME}.key",
        directory / "ca.crt",
    )
    write_private(joined.key, key_pem)
    write_public(joined.cert, resp.certificate_pem)
    write_public(joined.ca, ca_pem)
    return joined


async def renew_certificate(channel: grpc.aio.Channel, cert: Path, key: Path, timeout: float = 10.0) -> float:
    """Asks for a fresh certificate for a new key, as the identity `channel` presents, and replaces the files
    (key first: a reader takes the pair only once they match). Returns the new certificate's expiry (epoch s)."""
    key_pem, csr_pem = _request()
    stub = poolmanager_pb2_grpc.WorkerCertificateServiceStub(channel)
    resp = await stub.RenewCertificate(pm.RenewCertificateRequest(csr_pem=csr_pem), timeout=timeout)
    write_private(key, key_pem)
    write_public(cert, resp.certificate_pem)
    return resp.expire_time.ToNanoseconds() / 1e9


def identity_of(cert_pem: bytes) -> tuple[str, str] | None:
    """(pool id, worker id) that a worker certificate names; None for any other certificate."""
    uri = uri_of(cert_pem)
    identity = parse_spiffe(uri) if uri else None
    if identity is None or not identity.is_worker:
        return None
    return identity.pool, identity.name


def main() -> int:
    env = os.environ
    missing = [
        n for n in ("JOBMESH_JOIN_TOKEN", "JOBMESH_JOIN_ADDR", "JOBMESH_JOIN_CA", "JOBMESH_JOIN_DIR") if not env.get(n)
    ]
    if missing:
        print(f"{', '.join(missing)} must be set", file=sys.stderr)
        return 2
    try:
        joined = asyncio.run(
            join_pool(
                env["JOBMESH_JOIN_ADDR"],
                env["JOBMESH_JOIN_TOKEN"],
                Path(env["JOBMESH_JOIN_CA"]).read_bytes(),
                Path(env["JOBMESH_JOIN_DIR"]),
                env.get("JOBMESH_JOIN_SERVER_NAME", ""),
            )
        )
    except grpc.aio.AioRpcError as exc:
        print(f"join refused: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print(f"joined pool {joined.pool_id} as worker {joined.worker_id}; identity in {joined.cert.parent}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
