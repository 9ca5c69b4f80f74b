"""Who issues which certificate, and where the files live: the dev mesh's PKI under `<data dir>/pki` (made and
renewed by the launcher) and the worker issuer the pool-manager uses for the workers it starts.

Three roots, so that a certificate can only open the doors meant for it:

    pki/ca/          mesh CA: services and Envoy. Key held by the launcher only.
    pki/worker-ca/   worker CA: workers. Key held by the launcher and the pool-manager (which issues workers);
                     only the pool-manager's port trusts it, so a worker's certificate opens nothing else.
    pki/etcd-ca/     etcd CA: etcd's server certificate and the client certificates of the services that use
                     etcd (not the gateway, Envoy or workers). Key held by the launcher only.

Identities: `pki/services/<process>.crt|.key` (mesh), `pki/etcd/<process>.crt|.key` (etcd clients and server),
`pki/workers/<worker id>/worker.crt|.key` (one directory per worker, 0700). Keys are 0600, directories 0700.
"""

from __future__ import annotations

import datetime as dt
import logging
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509

from libs.pki import (
    SERVICE_LIFETIME,
    WORKER_LIFETIME,
    Bundle,
    CertificateAuthority,
    needs_renewal,
    uri_of,
    write_private,
    write_public,
)
from libs.settings import TlsSettings

log = logging.getLogger(__name__)

LOOPBACK_DNS = ("localhost",)
LOOPBACK_IPS = ("127.0.0.1",)


@dataclass(frozen=True)
class Issued:
    """One identity the issuer keeps fresh."""

    tls: TlsSettings
    uri: str
    ca: CertificateAuthority
    lifetime: dt.timedelta
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]


def _signed_by(cert_pem: bytes, ca: CertificateAuthority) -> bool:
    try:
        x509.load_pem_x509_certificate(cert_pem).verify_directly_issued_by(ca.cert)
    except Exception:  # a malformed or foreign certificate: issue a new one
        return False
    return True


def write_identity(tls: TlsSettings, bundle: Bundle) -> None:
    """Key first, then certificate, each replaced atomically; readers take the pair only once they match."""
    write_private(tls.key, bundle.key_pem)
    write_public(tls.cert, bundle.cert_pem)


def ensure(item: Issued, now: dt.datetime | None = None) -> bool:
    """Issues the identity if its files are missing, for another id or CA, or due for renewal. True if it did."""
    if item.tls.cert.exists() and item.tls.key.exists():
        current = item.tls.cert.read_bytes()
        if not needs_renewal(current, now) and uri_of(current) == item.uri and _signed_by(current, item.ca):
            return False
    bundle = item.ca.issue(item.uri, item.lifetime, dns_names=item.dns_names, ip_addresses=item.ip_addresses)
    write_identity(item.tls, bundle)
    return True


def _private_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


class MeshPki:
    """The launcher's PKI: creates the three CAs on first start, reuses them after, issues every process its
    identity and renews them before they expire (`renew_due`, run by the launcher's timer thread)."""

    def __init__(self, root: Path, dns_names: tuple[str, ...] = ()):
        self.root = _private_dir(root)
        self.ca = CertificateAuthority.ensure(_private_dir(root / "ca"))
        self.worker_ca = CertificateAuthority.ensure(_private_dir(root / "worker-ca"))
        self.etcd_ca = CertificateAuthority.ensure(_private_dir(root / "etcd-ca"))
        self.dns_names = (*LOOPBACK_DNS, *dns_names)
        self.mesh_ca_path = root / "ca" / "ca.crt"
        self.etcd_ca_path = root / "etcd-ca" / "ca.crt"
        # The pool-manager verifies workers too; what workers verify the pool-manager with.
        self.poolmanager_trust = root / "poolmanager-trust.crt"
        write_public(self.poolmanager_trust, self.ca.cert_pem + self.worker_ca.cert_pem)
        write_public(root / "worker-ca" / "mesh-ca.crt", self.ca.cert_pem)
        self._issued: dict[str, Issued] = {}
        self._lock = threading.Lock()

    def _ensure(self, key: str, item: Issued) -> TlsSettings:
        with self._lock:
            self._issued[key] = item
            ensure(item)
        return item.tls

    def service(self, process: str, service: str, *, trust_workers: bool = False) -> TlsSettings:
        """The mesh identity `spiffe://jobmesh/service/<service>` of one process (e.g. `scheduler-2`)."""
        directory = _private_dir(self.root / "services")
        ca = self.poolmanager_trust if trust_workers else self.mesh_ca_path
        tls = TlsSettings(directory / f"{process}.crt", directory / f"{process}.key", ca)
        uri = f"spiffe://jobmesh/service/{service}"
        return self._ensure(
            f"service:{process}", Issued(tls, uri, self.ca, SERVICE_LIFETIME, self.dns_names, LOOPBACK_IPS)
        )

    def etcd(self, process: str, service: str) -> TlsSettings:
        """An etcd certificate from the etcd CA: etcd's own (server and peer), or a client's."""
        directory = _private_dir(self.root / "etcd")
        tls = TlsSettings(directory / f"{process}.crt", directory / f"{process}.key", self.etcd_ca_path)
        uri = f"spiffe://jobmesh/service/{service}"
        return self._ensure(
            f"etcd:{process}", Issued(tls, uri, self.etcd_ca, SERVICE_LIFETIME, self.dns_names, LOOPBACK_IPS)
        )

    @property
    def worker_ca_dir(self) -> Path:
        return self.root / "worker-ca"

    @property
    def workers_dir(self) -> Path:
        return self.root / "workers"

    def renew_due(self, now: dt.datetime | None = None) -> list[str]:
        """Renews every identity issued so far that is due; the names of those it renewed."""
        renewed = []
        with self._lock:
            for key, item in self._issued.items():
                if ensure(item, now):
                    renewed.append(key)
        if renewed:
            log.info("renewed %s", ", ".join(renewed))
        return renewed


class WorkerIssuer:
    """The pool-manager's half: issues each worker it starts `spiffe://jobmesh/worker/<pool>/<worker>` (hours,
    no DNS or IP names: a worker is never a server) in a directory of its own, and renews them."""

    def __init__(self, ca_dir: Path, workers_dir: Path, lifetime: dt.timedelta = WORKER_LIFETIME):
        self.ca = CertificateAuthority.load(ca_dir)
        self.mesh_ca = ca_dir / "mesh-ca.crt"  # what a worker verifies the pool-manager's certificate with
        if not self.mesh_ca.is_file():
            raise FileNotFoundError(f"{self.mesh_ca}: the mesh CA workers trust is missing")
        self.workers_dir = _private_dir(workers_dir)
        self.lifetime = lifetime

    def tls_for(self, worker_id: str) -> TlsSettings:
        directory = self.workers_dir / worker_id
        return TlsSettings(directory / "worker.crt", directory / "worker.key", self.mesh_ca)

    def issue(self, pool_id: str, worker_id: str) -> TlsSettings:
        tls = self.tls_for(worker_id)
        _private_dir(tls.cert.parent)
        item = Issued(tls, f"spiffe://jobmesh/worker/{pool_id}/{worker_id}", self.ca, self.lifetime, (), ())
        ensure(item)
        return tls

    def renew_due(self, now: dt.datetime | None = None) -> list[str]:
        """Renews the due certificates of every worker directory; a directory whose certificate already
        expired belongs to a worker that is gone (or useless): it is removed."""
        now = now or dt.datetime.now(dt.UTC)
        renewed: list[str] = []
        for directory in sorted(p for p in self.workers_dir.iterdir() if p.is_dir())[:10_000]:
            tls = self.tls_for(directory.name)
            try:
                cert_pem = tls.cert.read_bytes()
                cert = x509.load_pem_x509_certificate(cert_pem)
            except (OSError, ValueError):
                continue
            uri = uri_of(cert_pem)
            if cert.not_valid_after_utc <= now or uri is None:
                self.forget(directory.name)
                continue
            item = Issued(tls, uri, self.ca, self.lifetime, (), ())
            if ensure(item, now):
                renewed.append(directory.name)
        return renewed

    def forget(self, worker_id: str) -> None:
        shutil.rmtree(self.workers_dir / worker_id, ignore_errors=True)
