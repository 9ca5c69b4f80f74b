"""Join tokens: how a static worker started elsewhere (a Kubernetes pod) gets a worker certificate of its own.

An operator mints a token for one pool (`CreateJoinToken`, operator identity only). It is stored only as its
SHA-256 under a lease of its lifetime, so etcd forgets it when it expires and a reader of etcd cannot use it.
A worker presents it once, with a certificate signing request (its private key never leaves it), on the join
port: the token is consumed in one etcd transaction (compare-and-delete), so of two concurrent uses exactly
one wins, and the worker gets a short-lived certificate for `spiffe://jobmesh/worker/<pool>/<id>` with an id
the pool-manager chose. From then on the worker is bound to that identity like any other (binding.py).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import secrets
from collections.abc import Sequence
from dataclasses import dataclass

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from libs.clock import Clock
from libs.config import MeshConfig
from libs.errors import InvalidArgument, NotFound, PermissionDenied
from libs.etcd.client import Etcd, cmp_mod, op_delete
from libs.identity import peer_identity
from libs.jobs import ts
from libs.keys import Keys
from libs.pki import WORKER_LIFETIME, CertificateAuthority, worker_id_uri
from libs.settings import TlsSettings
from libs.tls import IdentityFiles, Pem

log = logging.getLogger(__name__)

DEFAULT_TTL_SECONDS = 600
MAX_TTL_SECONDS = 3600
_TOKEN_BYTES = 32
_MAX_CSR_BYTES = 16 * 1024
_BACKDATE = dt.timedelta(minutes=5)


class JoinTokenInvalid(PermissionDenied):
    """Unknown, expired or already used: the three are not told apart (no oracle for a token's history)."""

    reason = "JOIN_TOKEN_INVALID"


@dataclass(frozen=True)
class JoinGrant:
    pool_id: str
    expire: float


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


class JoinTokens:
    """Creates and consumes join tokens in etcd."""

    def __init__(self, etcd: Etcd, keys: Keys, config: MeshConfig, clock: Clock):
        self.etcd = etcd
        self.keys = keys
        self.config = config
        self.clock = clock

    async def create(self, pool_id: str, ttl_seconds: int = 0) -> tuple[str, float]:
        """A new token for `pool_id` and when it expires."""
        if self.config.pool(pool_id) is None:
            raise NotFound(f"no pool {pool_id!r}", reason="POOL_NOT_FOUND")
        ttl = ttl_seconds or DEFAULT_TTL_SECONDS
        if not 0 < ttl <= MAX_TTL_SECONDS:
            raise InvalidArgument("ttl_seconds", f"must be between 1 and {MAX_TTL_SECONDS}")
        token = secrets.token_urlsafe(_TOKEN_BYTES)
        expire = self.clock.now() + ttl
        lease = await self.etcd.grant(ttl)
        grant = json.dumps({"pool_id": pool_id, "expire": expire}).encode()
        await self.etcd.put(self.keys.join_token(token_digest(token)), grant, lease=lease)
        log.info("join token created for pool %s, valid %d s", pool_id, ttl, extra={"pool_id": pool_id})
        return token, expire

    async def consume(self, token: str) -> JoinGrant:
        """What the token grants, once: it is deleted in the same step that reads it."""
        if not token or len(token) > 256:
            raise JoinTokenInvalid("invalid join token")
        key = self.keys.join_token(token_digest(token))
        kv = await self.etcd.get(key)
        if kv is None:
            raise JoinTokenInvalid("invalid join token")
        if not (await self.etcd.txn([cmp_mod(key, kv.mod_revision)], [op_delete(key)])).succeeded:
            raise JoinTokenInvalid("invalid join token")  # used by a concurrent join
        data = json.loads(kv.value)
        grant = JoinGrant(str(data["pool_id"]), float(data["expire"]))
        if grant.expire <= self.clock.now():  # its lease had not run out yet
            raise JoinTokenInvalid("invalid join token")
        return grant


def sign_worker_csr(
    ca: CertificateAuthority, csr_pem: bytes, pool_id: str, worker_id: str, lifetime: dt.timedelta = WORKER_LIFETIME
) -> x509.Certificate:
    """A client certificate for the worker's own key: the identity is ours to name, whatever the request asks."""
    if len(csr_pem) > _MAX_CSR_BYTES:
        raise InvalidArgument("csr_pem", "is too large")
    try:
        csr = x509.load_pem_x509_csr(csr_pem)
    except ValueError as exc:
        raise InvalidArgument("csr_pem", "is not a PEM certificate signing request") from exc
    if not csr.is_signature_valid:
        raise InvalidArgument("csr_pem", "is not signed by its own key")
    key = csr.public_key()
    if not (isinstance(key, ec.EllipticCurvePublicKey) or (isinstance(key, rsa.RSAPublicKey) and key.key_size >= 2048)):
        raise InvalidArgument("csr_pem", "must carry an EC or an RSA (2048 bits or more) public key")
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, worker_id[:64])]))
        .issuer_name(ca.cert.subject)
        .public_key(key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _BACKDATE)
        .not_valid_after(min(now + lifetime, ca.cert.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(worker_id_uri(pool_id, worker_id))]),
            critical=False,
        )
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .sign(ca.key, hashes.SHA256())
    )


class WorkerJoinServicer(poolmanager_pb2_grpc.WorkerJoinServiceServicer):
    """The join port's one method. The token is consumed before the request is checked further, so a token
    spent on a malformed request is gone: an operator mints another (it works once, whatever happens)."""

    def __init__(self, tokens: JoinTokens, ca: CertificateAuthority):
        self.tokens = tokens
        self.ca = ca

    async def Join(self, request: pm.JoinRequest, context: grpc.aio.ServicerContext) -> pm.JoinResponse:
        grant = await self.tokens.consume(request.token)
        worker_id = f"{grant.pool_id}-j{secrets.token_hex(5)}"
        cert = sign_worker_csr(self.ca, request.csr_pem, grant.pool_id, worker_id)
        log.info(
            "worker %s joined pool %s with a join token", worker_id, grant.pool_id, extra={"pool_id": grant.pool_id}
        )
        return pm.JoinResponse(
            worker_id=worker_id,
            pool_id=grant.pool_id,
            certificate_pem=cert.public_bytes(Encoding.PEM),
            ca_pem=self.ca.cert_pem,
            expire_time=ts(cert.not_valid_after_utc.timestamp()),
        )


class WorkerCertificateServicer(poolmanager_pb2_grpc.WorkerCertificateServiceServicer):
    """A worker renews its own certificate as itself (mTLS port): the new one names the caller's identity, never
    another, and only while its pool is still configured."""

    def __init__(self, ca: CertificateAuthority, config: MeshConfig):
        self.ca = ca
        self.config = config

    async def RenewCertificate(
        self, request: pm.RenewCertificateRequest, context: grpc.aio.ServicerContext
    ) -> pm.RenewCertificateResponse:
        identity = peer_identity(context)
        if identity is None or not identity.is_worker:
            raise PermissionDenied("only a worker renews a worker certificate", reason="CALLER_NOT_ALLOWED")
        if self.config.pool(identity.pool) is None:
            raise PermissionDenied(f"pool {identity.pool!r} is no longer configured", reason="POOL_NOT_FOUND")
        cert = sign_worker_csr(self.ca, request.csr_pem, identity.pool, identity.name)
        return pm.RenewCertificateResponse(
            certificate_pem=cert.public_bytes(Encoding.PEM), expire_time=ts(cert.not_valid_after_utc.timestamp())
        )


def server_only_credentials(tls: TlsSettings) -> grpc.ServerCredentials:
    """The service's own certificate, re-read when it is renewed, asking callers for none."""
    files = IdentityFiles(tls)

    def configuration(pem: Pem) -> grpc.ServerCertificateConfiguration:
        return grpc.ssl_server_certificate_configuration([(pem.key, pem.cert)])

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        fresh = files.refresh()
        return configuration(fresh) if fresh is not None else None

    return grpc.dynamic_ssl_server_credentials(configuration(files.current), fetch, require_client_authentication=False)


async def start_join_server(
    host: str,
    port: int,
    credentials: grpc.ServerCredentials,
    servicer: WorkerJoinServicer,
    interceptors: Sequence[grpc.aio.ServerInterceptor],
) -> tuple[grpc.aio.Server, int]:
    """The join port: server-only TLS (a joining worker has no certificate yet) and WorkerJoinService alone, so
    the one door without a client certificate opens onto nothing else; the authorization interceptor allows
    only Join there, should anything else ever be registered on it."""
    server = grpc.aio.server(interceptors=list(interceptors), options=[("grpc.max_receive_message_length", 64 * 1024)])
    poolmanager_pb2_grpc.add_WorkerJoinServiceServicer_to_server(servicer, server)
    bound = server.add_secure_port(f"{host}:{port}", credentials)
    if bound == 0:
        raise RuntimeError(f"join port: cannot listen on {host}:{port}")
    await server.start()
    log.info("join port listening on %s:%d (server-only TLS, WorkerJoinService only)", host, bound)
    return server, bound
