"""The two Kubernetes certificate bootstraps (k8s/components/cert-manager and `jobmesh pki k8s-secrets`) make the
same Secrets, each holding the identity its name says."""

from __future__ import annotations

import base64
from pathlib import Path

import yaml
from cryptography import x509

from devtools.k8s_secrets import build_secrets, render
from libs.identity import parse_spiffe
from libs.pki import uri_of

COMPONENT = Path(__file__).resolve().parents[2] / "k8s" / "components" / "cert-manager"


def cert_manager_secrets() -> dict[str, dict[str, object]]:
    docs = [
        d
        for p in sorted(COMPONENT.glob("*.yaml"))
        if p.name != "kustomization.yaml"
        for d in yaml.safe_load_all(p.read_text())
        if d
    ]
    return {d["spec"]["secretName"]: d["spec"] for d in docs if d["kind"] == "Certificate"}


def test_both_bootstraps_make_the_same_secrets_with_the_same_identities(tmp_path: Path) -> None:
    built = build_secrets(tmp_path / "cas")
    made = {s["metadata"]["name"]: s for s in built if s["kind"] == "Secret"}  # type: ignore[index]
    [ca_map] = [s for s in built if s["kind"] == "ConfigMap"]
    assert ca_map["metadata"]["name"] == "jobmesh-mesh-ca"  # type: ignore[index]
    certified = cert_manager_secrets()

    cas = {"jobmesh-mesh-ca", "jobmesh-etcd-ca"}  # cert-manager keeps these in the cluster; the command does not
    assert set(made) == set(certified) - cas
    for name, spec in certified.items():
        if name in cas or name == "jobmesh-worker-ca":
            continue
        data = made[name]["data"]  # type: ignore[index]
        cert = base64.b64decode(data["tls.crt"])
        if spec.get("uris"):
            assert [uri_of(cert)] == spec["uris"], name
            assert parse_spiffe(spec["uris"][0]) is not None
        names = x509.load_pem_x509_certificate(cert).extensions.get_extension_for_class(x509.SubjectAlternativeName)
        dns = set(names.value.get_values_for_type(x509.DNSName))
        assert set(spec.get("dnsNames", [])) <= dns | {"*.etcd.jobmesh.svc.cluster.local"}, name


def test_the_command_keeps_the_cas_and_reuses_them(tmp_path: Path) -> None:
    first = build_secrets(tmp_path / "cas")
    second = build_secrets(tmp_path / "cas")

    ca_of = {s["metadata"]["name"]: s["data"]["ca.crt"] for s in first}  # type: ignore[index]
    assert all(ca_of[s["metadata"]["name"]] == s["data"]["ca.crt"] for s in second)  # type: ignore[index]
    assert (tmp_path / "cas" / "mesh" / "ca.key").stat().st_mode & 0o777 == 0o600
    assert [d["kind"] for d in yaml.safe_load_all(render(first)) if d] == [s["kind"] for s in first]
