"""The mesh's own certificate authority and the X.509 identities it issues (SPIFFE URI SANs).

Every service replica and every worker proves who it is with a short-lived certificate signed by this CA:
`spiffe://jobmesh/service/<name>` for a service, `spiffe://jobmesh/worker/<pool>/<worker>` for a worker. The
files live in a directory (the data dir's `pki/` for `make run`, a mounted Secret on Kubernetes); keys are
written 0600. Nothing here is hand-rolled crypto: keys, signatures and certificates come from `cryptography`.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

TRUST_DOMAIN = "jobmesh"
CA_LIFETIME = dt.timedelta(days=365)
SERVICE_LIFETIME = dt.timedelta(days=3)
WORKER_LIFETIME = dt.timedelta(hours=6)
# A certificate is renewed once less than this share of its lifetime is left.
RENEW_FRACTION = 1 / 3
_BACKDATE = dt.timedelta(minutes=5)  # tolerates small clock skew between hosts


def service_id(name: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/service/{name}"


def worker_id_uri(pool_id: str, worker_id: str) -> str:
    return f"spiffe://{TRUST_DOMAIN}/worker/{pool_id}/{worker_id}"


@dataclass(frozen=True)
class Bundle:
    """One identity's PEM files, as handed to gRPC: the chain, the private key and the CA to verify peers with."""

    cert_pem: bytes
    key_pem: bytes
    ca_pem: bytes

    @property
    def not_after(self) -> dt.datetime:
        return x509.load_pem_x509_certificate(self.cert_pem).not_valid_after_utc


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _new_key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def write_private(path: Path, data: bytes) -> None:
    """Writes a secret file readable by its owner only, atomically (a reader never sees half a key)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, data)
        os.fchmod(fd, 0o600)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def write_public(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


class CertificateAuthority:
    """Signs identities. Only what provisions identities holds it: the launcher (dev) or the bootstrap Job (k8s),
    and the pool-manager for the workers it starts or admits with a join token."""

    def __init__(self, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey):
        self.cert = cert
        self.key = key

    @property
    def cert_pem(self) -> bytes:
        return self.cert.public_bytes(serialization.Encoding.PEM)

    @classmethod
    def create(cls, lifetime: dt.timedelta = CA_LIFETIME) -> CertificateAuthority:
        key = _new_key()
        name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "jobmesh mesh CA")])
        now = _now()
        cert = (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(now + lifetime)
            .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
            .add_extension(
                x509.KeyUsage(
                    digital_signature=False,
                    content_commitment=False,
                    key_encipherment=False,
                    data_encipherment=False,
                    key_agreement=False,
                    key_cert_sign=True,
                    crl_sign=True,
                    encipher_only=False,
                    decipher_only=False,
                ),
                critical=True,
            )
            .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
            .sign(key, hashes.SHA256())
        )
        return cls(cert, key)

    @classmethod
    def load(cls, directory: Path) -> CertificateAuthority:
        cert = x509.load_pem_x509_certificate((directory / "ca.crt").read_bytes())
        key = serialization.load_pem_private_key((directory / "ca.key").read_bytes(), password=None)
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise ValueError("the CA key must be an EC key")
        return cls(cert, key)

    @classmethod
    def ensure(cls, directory: Path) -> CertificateAuthority:
        """Loads the CA in `directory`, or creates it there (key 0600) on first use."""
        if (directory / "ca.key").exists() and (directory / "ca.crt").exists():
            return cls.load(directory)
        ca = cls.create()
        write_private(directory / "ca.key", _key_pem(ca.key))
        write_public(directory / "ca.crt", ca.cert_pem)
        return ca

    def issue(
        self,
        uri: str,
        lifetime: dt.timedelta,
        *,
        dns_names: tuple[str, ...] = ("localhost",),
        ip_addresses: tuple[str, ...] = ("127.0.0.1",),
    ) -> Bundle:
        """A fresh key and a certificate for `uri`, good as both a TLS server and a TLS client."""
        key = _new_key()
        now = _now()
        not_after = min(now + lifetime, self.cert.not_valid_after_utc)
        sans: list[x509.GeneralName] = [x509.UniformResourceIdentifier(uri)]
        sans += [x509.DNSName(d) for d in dns_names]
        sans += [x509.IPAddress(ipaddress.ip_address(ip)) for ip in ip_addresses]
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, uri.rsplit("/", 1)[-1][:64])]))
            .issuer_name(self.cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - _BACKDATE)
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]),
                critical=False,
            )
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(self.key.public_key()), critical=False)
            .sign(self.key, hashes.SHA256())
        )
        return Bundle(cert.public_bytes(serialization.Encoding.PEM), _key_pem(key), self.cert_pem)


def needs_renewal(cert_pem: bytes, now: dt.datetime | None = None, fraction: float = RENEW_FRACTION) -> bool:
    """True when less than `fraction` of the certificate's lifetime is left (or it is already expired)."""
    cert = x509.load_pem_x509_certificate(cert_pem)
    now = now or _now()
    start, end = cert.not_valid_before_utc, cert.not_valid_after_utc
    return now >= end - (end - start) * fraction


def identity_paths(directory: Path, name: str) -> tuple[Path, Path, Path]:
    return directory / f"{name}.crt", directory / f"{name}.key", directory / "ca.crt"


def write_bundle(directory: Path, name: str, bundle: Bundle) -> None:
    cert, key, ca = identity_paths(directory, name)
    write_private(key, bundle.key_pem)
    write_public(cert, bundle.cert_pem)
    if not ca.exists() or ca.read_bytes() != bundle.ca_pem:
        write_public(ca, bundle.ca_pem)


def read_bundle(directory: Path, name: str) -> Bundle:
    cert, key, ca = identity_paths(directory, name)
    return Bundle(cert.read_bytes(), key.read_bytes(), ca.read_bytes())


def ensure_identity(
    ca: CertificateAuthority, directory: Path, name: str, uri: str, lifetime: dt.timedelta = SERVICE_LIFETIME
) -> bool:
    """Issues `name`'s certificate in `directory` if it is missing, for another identity, or due for renewal.
    True when it wrote a new one."""
    cert, key, _ = identity_paths(directory, name)
    if cert.exists() and key.exists():
        current = cert.read_bytes()
        if not needs_renewal(current) and uri_of(current) == uri and _signed_by(current, ca):
            return False
    write_bundle(directory, name, ca.issue(uri, lifetime))
    return True


def uri_of(cert_pem: bytes) -> str | None:
    """The certificate's SPIFFE id: its single `spiffe://` URI SAN."""
    return spiffe_from_cert(x509.load_pem_x509_certificate(cert_pem))


def spiffe_from_cert(cert: x509.Certificate) -> str | None:
    try:
        ext = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return None
    uris = [u for u in ext.value.get_values_for_type(x509.UniformResourceIdentifier) if u.startswith("spiffe://")]
    return uris[0] if len(uris) == 1 else None


def _signed_by(cert_pem: bytes, ca: CertificateAuthority) -> bool:
    cert = x509.load_pem_x509_certificate(cert_pem)
    try:
        cert.verify_directly_issued_by(ca.cert)
    except (ValueError, TypeError, Exception):
        return False
    return True
