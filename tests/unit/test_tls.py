"""Mesh TLS settings, the files an identity reads (renewals taken only as a matching pair), and who issues what."""

from __future__ import annotations

import datetime as dt
import os
from pathlib import Path

import pytest
from cryptography import x509

from libs.etcd.client import grpc_target
from libs.meshpki import MeshPki, WorkerIssuer, write_identity
from libs.pki import CertificateAuthority, service_id, uri_of
from libs.settings import CommonSettings, SettingsError, TlsSettings
from libs.tls import IdentityFiles, target_name

CONFIG = Path(__file__).resolve().parent.parent / "fixtures" / "mesh.toml"


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        pytest.param({}, None, id="nothing set: no identity"),
        pytest.param(
            {"JOBMESH_TLS_CERT": "/a.crt", "JOBMESH_TLS_KEY": "/a.key", "JOBMESH_TLS_CA": "/ca.crt"},
            TlsSettings(Path("/a.crt"), Path("/a.key"), Path("/ca.crt")),
            id="three paths",
        ),
        pytest.param(
            {"JOBMESH_TLS_DIR": "/tls"},
            TlsSettings(Path("/tls/quota.crt"), Path("/tls/quota.key"), Path("/tls/ca.crt")),
            id="a directory and the service's name",
        ),
        pytest.param(
            {"JOBMESH_TLS_DIR": "/tls", "JOBMESH_TLS_NAME": "tls", "JOBMESH_TLS_SERVER_NAME": "quota.jobmesh"},
            TlsSettings(Path("/tls/tls.crt"), Path("/tls/tls.key"), Path("/tls/ca.crt"), "quota.jobmesh"),
            id="a directory with a file name and a server name",
        ),
    ],
)
def test_tls_settings_come_from_paths_or_a_directory(env: dict[str, str], expected: TlsSettings | None) -> None:
    assert TlsSettings.from_env(env, "quota") == expected


def test_half_a_tls_setting_is_an_error_and_none_at_all_refuses_to_start() -> None:
    with pytest.raises(SettingsError, match="JOBMESH_TLS_KEY"):
        TlsSettings.from_env({"JOBMESH_TLS_CERT": "/a.crt", "JOBMESH_TLS_CA": "/ca.crt"}, "quota")
    with pytest.raises(SettingsError, match="mTLS is not optional"):
        CommonSettings.from_env("quota", 50052, {"JOBMESH_CONFIG": str(CONFIG)})


def test_a_service_needs_its_etcd_client_certificate_only_to_open_etcd() -> None:
    env = {"JOBMESH_CONFIG": str(CONFIG), "JOBMESH_TLS_DIR": "/tls"}
    settings = CommonSettings.from_env("gateway", 50051, env)
    assert settings.etcd.tls is None
    with pytest.raises(SettingsError, match="JOBMESH_ETCD_TLS_CERT"):
        settings.etcd.client_tls()
    with_etcd = CommonSettings.from_env("quota", 50052, {**env, "JOBMESH_ETCD_TLS_DIR": "/etcd"})
    assert with_etcd.etcd.client_tls().cert == Path("/etcd/quota-etcd.crt")


@pytest.mark.parametrize(
    ("endpoints", "target"),
    [
        pytest.param(["127.0.0.1:2379"], "127.0.0.1:2379", id="one address"),
        pytest.param(["https://etcd-client:2379"], "etcd-client:2379", id="one DNS name, scheme dropped"),
        pytest.param(["10.0.0.1:2379", "10.0.0.2:2379"], "ipv4:10.0.0.1:2379,10.0.0.2:2379", id="several IPs"),
    ],
)
def test_etcd_endpoints_make_one_grpc_target(endpoints: list[str], target: str) -> None:
    assert grpc_target(endpoints) == target


def test_several_etcd_dns_names_are_refused_with_a_hint() -> None:
    with pytest.raises(SettingsError, match="one DNS name"):
        grpc_target(["etcd-0:2379", "etcd-1:2379"])


def test_a_list_of_addresses_is_verified_against_its_first_host() -> None:
    tls = TlsSettings(Path("c"), Path("k"), Path("ca"))
    assert target_name("ipv4:127.0.0.1:1,127.0.0.1:2", tls) == "127.0.0.1"
    assert target_name("127.0.0.1:1", tls) == ""  # gRPC checks the target's own host
    assert target_name("ipv4:127.0.0.1:1,127.0.0.1:2", TlsSettings(Path("c"), Path("k"), Path("ca"), "q")) == "q"


def test_a_renewal_is_taken_only_once_key_and_certificate_match(tmp_path: Path) -> None:
    ca = CertificateAuthority.create()
    tls = TlsSettings(tmp_path / "s.crt", tmp_path / "s.key", tmp_path / "ca.crt")
    tls.ca.write_bytes(ca.cert_pem)
    first = ca.issue(service_id("quota"), dt.timedelta(days=1))
    write_identity(tls, first)
    files = IdentityFiles(tls)
    assert files.refresh() is None  # unchanged

    second = ca.issue(service_id("quota"), dt.timedelta(days=1))
    tls.key.write_bytes(second.key_pem)  # caught between the two renames
    assert files.refresh() is None
    assert files.current.cert == first.cert_pem
    tls.cert.write_bytes(second.cert_pem)
    fresh = files.refresh()
    assert fresh is not None and fresh.cert == second.cert_pem


def test_the_mesh_pki_keeps_keys_private_reuses_its_cas_and_renews_what_is_due(tmp_path: Path) -> None:
    pki = MeshPki(tmp_path / "pki")
    quota = pki.service("quota", "quota")
    etcd = pki.etcd("quota", "quota")
    for path in (tmp_path / "pki", tmp_path / "pki" / "ca", tmp_path / "pki" / "services"):
        assert os.stat(path).st_mode & 0o777 == 0o700
    for key in (tmp_path / "pki" / "ca" / "ca.key", quota.key, etcd.key):
        assert os.stat(key).st_mode & 0o777 == 0o600
    assert uri_of(quota.cert.read_bytes()) == "spiffe://jobmesh/service/quota"
    assert quota.ca == pki.mesh_ca_path and etcd.ca == pki.etcd_ca_path
    assert pki.service("poolmanager-1", "poolmanager", trust_workers=True).ca == pki.poolmanager_trust

    again = MeshPki(tmp_path / "pki")
    assert again.ca.cert_pem == pki.ca.cert_pem
    assert again.service("quota", "quota").cert.read_bytes() == quota.cert.read_bytes()  # not due: kept
    before = quota.cert.read_bytes()
    assert pki.renew_due() == []
    assert set(pki.renew_due(now=dt.datetime.now(dt.UTC) + dt.timedelta(days=2, hours=12))) >= {"service:quota"}
    assert quota.cert.read_bytes() != before


def test_workers_get_a_worker_identity_without_server_names_renewed_then_dropped(tmp_path: Path) -> None:
    pki = MeshPki(tmp_path / "pki")
    issuer = WorkerIssuer(pki.worker_ca_dir, pki.workers_dir)
    tls = issuer.issue("static-general", "w-1")
    cert = x509.load_pem_x509_certificate(tls.cert.read_bytes())
    sans = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(u) for u in sans.get_values_for_type(x509.UniformResourceIdentifier)] == [
        "spiffe://jobmesh/worker/static-general/w-1"
    ]
    assert sans.get_values_for_type(x509.DNSName) == [] and sans.get_values_for_type(x509.IPAddress) == []
    assert cert.not_valid_after_utc - cert.not_valid_before_utc <= dt.timedelta(hours=6, minutes=5)
    cert.verify_directly_issued_by(pki.worker_ca.cert)
    assert tls.ca.read_bytes() == pki.ca.cert_pem  # workers trust the mesh CA, not each other
    assert os.stat(tls.cert.parent).st_mode & 0o777 == 0o700

    assert issuer.renew_due(now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=5)) == ["w-1"]
    assert issuer.renew_due(now=dt.datetime.now(dt.UTC) + dt.timedelta(hours=24)) == []
    assert not tls.cert.parent.exists()  # expired: its worker is gone
