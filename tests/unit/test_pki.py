"""The mesh CA and identities: issuance, renewal, file modes, SPIFFE parsing."""

from __future__ import annotations

import datetime as dt
import stat
from pathlib import Path

from libs import pki
from libs.identity import parse_spiffe


def test_ca_is_created_once_with_a_private_key(tmp_path: Path) -> None:
    ca = pki.CertificateAuthority.ensure(tmp_path / "pki")
    again = pki.CertificateAuthority.ensure(tmp_path / "pki")
    assert ca.cert_pem == again.cert_pem
    assert stat.S_IMODE((tmp_path / "pki" / "ca.key").stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "pki").stat().st_mode) == 0o700


def test_issued_identity_carries_its_spiffe_id_and_is_reused_until_due(tmp_path: Path) -> None:
    ca = pki.CertificateAuthority.ensure(tmp_path)
    uri = pki.service_id("quota")
    assert pki.ensure_identity(ca, tmp_path, "quota", uri) is True
    cert, key, _ = pki.identity_paths(tmp_path, "quota")
    assert pki.uri_of(cert.read_bytes()) == uri
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert pki.ensure_identity(ca, tmp_path, "quota", uri) is False
    # Another identity under the same name is replaced, not trusted.
    assert pki.ensure_identity(ca, tmp_path, "quota", pki.service_id("cost")) is True


def test_renewal_is_due_in_the_last_third_of_the_lifetime(tmp_path: Path) -> None:
    ca = pki.CertificateAuthority.create()
    bundle = ca.issue(pki.worker_id_uri("static", "w1"), dt.timedelta(hours=3))
    start = bundle.not_after - dt.timedelta(hours=3)
    assert not pki.needs_renewal(bundle.cert_pem, start + dt.timedelta(hours=1))
    assert pki.needs_renewal(bundle.cert_pem, start + dt.timedelta(hours=2, minutes=10))
    assert pki.needs_renewal(bundle.cert_pem, bundle.not_after + dt.timedelta(seconds=1))


def test_a_certificate_from_another_ca_is_reissued(tmp_path: Path) -> None:
    other = pki.CertificateAuthority.create()
    pki.write_bundle(tmp_path, "gateway", other.issue(pki.service_id("gateway"), pki.SERVICE_LIFETIME))
    ca = pki.CertificateAuthority.ensure(tmp_path / "ca")
    assert pki.ensure_identity(ca, tmp_path, "gateway", pki.service_id("gateway")) is True


def test_spiffe_ids_parse_only_in_our_trust_domain() -> None:
    svc = parse_spiffe("spiffe://jobmesh/service/scheduler")
    assert svc is not None and svc.is_service("scheduler") and not svc.is_worker
    w = parse_spiffe("spiffe://jobmesh/worker/static/static-1a2b")
    assert w is not None and w.is_worker and w.name == "static-1a2b" and w.pool == "static"
    for bad in (
        "spiffe://other/service/quota",
        "spiffe://jobmesh/service/../quota",
        "spiffe://jobmesh/worker/static",
        "spiffe://jobmesh/admin/x",
        "https://jobmesh/service/quota",
    ):
        assert parse_spiffe(bad) is None, bad
