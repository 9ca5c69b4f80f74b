"""The Kubernetes bootstrap without cert-manager: the mesh's CAs and every identity's certificate as Secrets.

`jobmesh pki k8s-secrets --ca-dir DIR | kubectl apply -f -` writes the same Secrets that the cert-manager
component makes (k8s/components/cert-manager): `jobmesh-tls-<name>` (tls.crt, tls.key, ca.crt) for each
workload and for operators, `jobmesh-worker-ca` (the pool-manager signs workers with it), the etcd server's and
the etcd clients'. The CAs' keys stay in DIR (0600), on the operator's machine: rerun the command before the
certificates expire (three days) to renew them; only the worker CA's key goes into the cluster.
"""

from __future__ import annotations

import base64
import json
from pathlib import Path

from libs.pki import SERVICE_LIFETIME, Bundle, CertificateAuthority, service_id

# Secret suffix -> (SPIFFE service name, Service DNS name or "" for none).
SERVICES = {
    "gateway": ("gateway", "gateway"),
    "quota": ("quota", "quota"),
    "queueing": ("queueing", "queueing"),
    "cost": ("cost", "cost"),
    "scheduler": ("scheduler", "scheduler"),
    "pool-manager": ("poolmanager", "pool-manager"),
    "envoy": ("envoy", "envoy"),
    "operator": ("operator", ""),
}
ETCD_CLIENTS = ("quota", "queueing", "cost", "scheduler", "pool-manager")
_LABELS = {"app.kubernetes.io/part-of": "jobmesh"}


def _dns(name: str, namespace: str) -> tuple[str, ...]:
    return (name, f"{name}.{namespace}.svc", f"{name}.{namespace}.svc.cluster.local") if name else ()


def _server_names(name: str, namespace: str) -> dict[str, tuple[str, ...]]:
    """A server's names: its Service's, and localhost / 127.0.0.1 for the pod's probe of itself."""
    if not name:
        return {"dns_names": (), "ip_addresses": ()}
    return {"dns_names": (*_dns(name, namespace), "localhost"), "ip_addresses": ("127.0.0.1",)}


def _secret(name: str, namespace: str, bundle: Bundle, kind: str = "kubernetes.io/tls") -> dict[str, object]:
    data = {"tls.crt": bundle.cert_pem, "tls.key": bundle.key_pem, "ca.crt": bundle.ca_pem}
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "labels": _LABELS},
        "type": kind,
        "data": {k: base64.b64encode(v).decode() for k, v in data.items()},
    }


def _ca(directory: Path, name: str) -> CertificateAuthority:
    return CertificateAuthority.ensure(directory / name)


def build_secrets(ca_dir: Path, namespace: str = "jobmesh") -> list[dict[str, object]]:
    """Every Secret of the bootstrap (and the ConfigMap with the mesh CA's certificate), issued from the CAs in
    `ca_dir` (made there on first use)."""
    mesh, workers, etcd = _ca(ca_dir, "mesh"), _ca(ca_dir, "worker"), _ca(ca_dir, "etcd")
    out = []
    for secret, (name, dns) in SERVICES.items():
        bundle = mesh.issue(service_id(name), SERVICE_LIFETIME, **_server_names(dns, namespace))
        out.append(_secret(f"jobmesh-tls-{secret}", namespace, bundle))
    etcd_names = (*_dns("etcd-client", namespace), "*.etcd", f"*.etcd.{namespace}.svc", "localhost")
    out.append(
        _secret(
            "jobmesh-etcd-server",
            namespace,
            etcd.issue("spiffe://jobmesh/service/etcd", SERVICE_LIFETIME, dns_names=etcd_names),
        )
    )
    for client in ETCD_CLIENTS:
        bundle = etcd.issue(f"spiffe://jobmesh/service/{client}", SERVICE_LIFETIME, dns_names=(), ip_addresses=())
        out.append(_secret(f"jobmesh-etcd-client-{client}", namespace, bundle))
    # The worker CA itself: the pool-manager signs joining workers' requests with it.
    worker_ca = Bundle(workers.cert_pem, _key_pem(ca_dir / "worker"), workers.cert_pem)
    out.append(_secret("jobmesh-worker-ca", namespace, worker_ca))
    # The mesh CA's certificate alone (public), for the worker pods to verify the pool-manager with.
    out.append(
        {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": "jobmesh-mesh-ca",
                "namespace": namespace,
                "labels": {"app.kubernetes.io/part-of": "jobmesh"},
            },
            "data": {"ca.crt": mesh.cert_pem.decode()},
        }
    )
    return out


def _key_pem(directory: Path) -> bytes:
    return (directory / "ca.key").read_bytes()


def render(secrets: list[dict[str, object]]) -> str:
    """A YAML stream `kubectl apply -f -` takes (JSON is YAML; one document per Secret)."""
    return "".join(f"---\n{json.dumps(s, indent=2)}\n" for s in secrets)
