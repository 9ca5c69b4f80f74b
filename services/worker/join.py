"""Join a pool with a join token: `python -m services.worker.join` (a Kubernetes init container, before the agent).

Makes a private key here (it never leaves this process's output directory), sends a certificate signing request
and the token to the pool-manager's join port over server-only TLS (the pool-manager is verified against the
mesh CA bundle), and writes what the agent starts with: `worker.key` (0600), `worker.crt` and `ca.crt` (the
bundle the agent verifies the pool-manager with) in `JOBMESH_JOIN_DIR`. The worker id and pool are in the
certificate; the agent reads them from there (`identity_of`).

Environment: JOBMESH_JOIN_TOKEN, or JOBMESH_JOIN_TOKEN_FILE (one token a line: the pods of a Deployment share
the file and each takes one that is still unused, trying them in random order), JOBMESH_JOIN_ADDR (host:port of
the join port), JOBMESH_JOIN_CA (the mesh CA bundle), JOBMESH_JOIN_DIR, optionally JOBMESH_JOIN_SERVER_NAME (the
name in the pool-manager's certificate).

A joined agent (JOBMESH_WORKER_RENEW_CERT=1) renews its certificate itself while it runs (`renew_forever`).
"""

from __future__ import annotations

import asyncio
import logging
import random
import sys
from dataclasses import dataclass
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from libs.identity import parse_spiffe
from libs.interceptors import channel
from libs.pki import needs_renewal, uri_of, write_private, write_public
from libs.settings import TlsSettings, load_settings
from services.worker.settings import JoinSettings

log = logging.getLogger(__name__)

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


def bind_to_certificate(worker: t.Worker, cert: Path, declared_id: str) -> None:
    """A worker's id and pool are the ones its certificate names: taken from it when the environment gives no
    id (a joined worker), and checked against it otherwise (the pool-manager would refuse a mismatch anyway)."""
    named = identity_of(cert.read_bytes())
    if named is None:
        raise SystemExit(f"{cert} is not a worker certificate")
    pool_id, worker_id = named
    if not declared_id:
        worker.worker_id, worker.pool_id = worker_id, pool_id
    elif (worker.worker_id, worker.pool_id or pool_id) != (worker_id, pool_id):
        raise SystemExit(
            f"{cert} names worker {worker_id} of pool {pool_id}, not {worker.worker_id} of {worker.pool_id}"
        )
    worker.pool_id = pool_id


async def renew_forever(targets: tuple[str, ...], tls: TlsSettings, stop: asyncio.Event, every: float = 300.0) -> None:
    """Renews the certificate through the pool-manager once it is due (a third of its lifetime left), until
    `stop`; a failed renewal is tried again at the next look, hours before the certificate expires."""
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), every)
            return
        except TimeoutError:
            pass
        if not needs_renewal(tls.cert.read_bytes()):
            continue
        for target in targets:
            try:
                async with channel(target, tls, propagate=False) as ch:
                    await renew_certificate(ch, tls.cert, tls.key)
                log.info("renewed the worker certificate through %s", target)
                break
            except grpc.aio.AioRpcError as exc:
                log.warning("renewing the worker certificate through %s failed: %s", target, exc.code().name)


def _tokens(settings: JoinSettings) -> list[str]:
    if settings.token:
        return [settings.token]
    if settings.token_file is not None:
        tokens = settings.token_file.read_text().split()[:1000]
        random.shuffle(tokens)  # pods starting together mostly try different ones
        return tokens
    return []


def main() -> int:
    settings = load_settings("join", JoinSettings.from_env)
    tokens = _tokens(settings)
    if not tokens:
        print("JOBMESH_JOIN_TOKEN or JOBMESH_JOIN_TOKEN_FILE must be set", file=sys.stderr)
        return 2
    ca_pem = settings.ca.read_bytes()
    last = ""
    for token in tokens:
        try:
            joined = asyncio.run(join_pool(settings.address, token, ca_pem, settings.directory, settings.server_name))
        except grpc.aio.AioRpcError as exc:
            last = f"{exc.code().name}: {exc.details()}"
            if exc.code() == grpc.StatusCode.PERMISSION_DENIED:
                continue  # used (by another pod), expired or unknown: the next one may still be good
            break
        print(f"joined pool {joined.pool_id} as worker {joined.worker_id}; identity in {joined.cert.parent}")
        return 0
    print(f"join refused ({len(tokens)} token(s) tried): {last}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
