"""Signing a joining worker's request (services/poolmanager/join.py): the certificate names what the token grants,
whatever the request asks for, and only well-formed requests for a strong key are signed."""

from __future__ import annotations

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from libs.errors import InvalidArgument
from libs.pki import CertificateAuthority, spiffe_from_cert
from services.poolmanager.join import sign_worker_csr, token_digest
from services.worker.join import identity_of

CA = CertificateAuthority.create()


def csr_for(key: ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey, uri: str = "") -> bytes:
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "me")])
    )
    if uri:
        builder = builder.add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False)
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


def test_the_certificate_names_the_granted_worker_not_what_the_request_asks() -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    greedy = csr_for(key, "spiffe://jobmesh/service/gateway")

    cert = sign_worker_csr(CA, greedy, "static-general", "static-general-j01")

    assert spiffe_from_cert(cert) == "spiffe://jobmesh/worker/static-general/static-general-j01"
    assert cert.public_key().public_numbers() == key.public_key().public_numbers()  # type: ignore[union-attr]
    usage = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert list(usage) == [ExtendedKeyUsageOID.CLIENT_AUTH]
    cert.verify_directly_issued_by(CA.cert)
    pem = cert.public_bytes(serialization.Encoding.PEM)
    assert identity_of(pem) == ("static-general", "static-general-j01")


@pytest.mark.parametrize(
    "csr",
    [
        b"not a csr",
        csr_for(rsa.generate_private_key(65537, 1024)),
        b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"A" * 20_000 + b"\n-----END CERTIFICATE REQUEST-----\n",
    ],
    ids=["garbage", "weak-rsa", "oversized"],
)
def test_a_malformed_request_or_a_weak_key_is_refused(csr: bytes) -> None:
    with pytest.raises(InvalidArgument):
        sign_worker_csr(CA, csr, "static-general", "w")


def test_a_service_certificate_names_no_worker() -> None:
    bundle = CA.issue("spiffe://jobmesh/service/gateway", CA.cert.not_valid_after_utc - CA.cert.not_valid_before_utc)
    assert identity_of(bundle.cert_pem) is None


def test_tokens_are_stored_by_digest() -> None:
    assert token_digest("abc") == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
