"""Structural checks of the Kubernetes manifests (k8s/) and the image recipe (Dockerfile), without a cluster."""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from libs.config import load_config
from libs.envoy_config import render_cluster_defaults, sds_files
from libs.settings import TlsSettings
from services.worker.agent import STOP_MARGIN_SECONDS
from tests.tools import require_tool

REPO = Path(__file__).resolve().parents[2]
K8S = REPO / "k8s"
BASE = K8S / "base"
OVERLAYS = ("dev", "prod")
WORKLOAD_KINDS = ("Deployment", "StatefulSet")
LEADER_ELECTED = ("scheduler", "pool-manager")
# Two replicas, the leader alone serves (libs/leadergate.py), a disruption budget of one.
ACTIVE_STANDBY = ("quota", "queueing", "cost")
# Created by the operator, not by the manifests (docs/kubernetes.md): the identity provider's keys.
EXTERNAL_SECRETS = {"jobmesh-jwt-keys", "jobmesh-join-static-general"}
# The mesh's certificates: made by the cert-manager component or by `jobmesh pki k8s-secrets` (docs/kubernetes.md,
# "Certificates"), which also makes the ConfigMap with the mesh CA's certificate.
CERT_SECRETS = {
    *(f"jobmesh-tls-{n}" for n in ("gateway", "quota", "queueing", "cost", "scheduler", "pool-manager", "envoy")),
    *(f"jobmesh-etcd-client-{n}" for n in ("quota", "queueing", "cost", "scheduler", "pool-manager")),
    "jobmesh-etcd-server",
    "jobmesh-worker-ca",
}
EXTERNAL_CONFIGMAPS = {"jobmesh-mesh-ca"}
ETCD_USERS = {"quota", "queueing", "cost", "scheduler", "pool-manager"}
JOIN_PORT = 50057
JOBMESH_VAR = re.compile(r"\bJOBMESH_[A-Z0-9_]+\b")

Doc = dict[str, Any]


# Loading ---------------------------------------------------------------------------------------------------


def yaml_files() -> list[Path]:
    return sorted(K8S.rglob("*.yaml"))


def load_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def base_resources() -> list[Doc]:
    kustomization = load_docs(BASE / "kustomization.yaml")[0]
    # A listed file that is missing is test_every_kustomization_lists_files_that_exist's to report.
    files = [BASE / name for name in kustomization["resources"]]
    return [doc for path in files if path.is_file() for doc in load_docs(path)]


def workloads(docs: list[Doc]) -> list[Doc]:
    return [d for d in docs if d.get("kind") in WORKLOAD_KINDS]


def by_name(docs: list[Doc], kind: str, name: str) -> Doc:
    [doc] = [d for d in docs if d.get("kind") == kind and d["metadata"]["name"] == name]
    return doc


def pod_spec(workload: Doc) -> Doc:
    spec: Doc = workload["spec"]["template"]["spec"]
    return spec


def containers(workload: Doc, *, init: bool = True) -> Iterator[Doc]:
    spec = pod_spec(workload)
    yield from spec["containers"]
    if init:
        yield from spec.get("initContainers", [])


def env_of(container: Doc) -> dict[str, Doc]:
    return {e["name"]: e for e in container.get("env", [])}


def is_worker(workload: Doc) -> bool:
    return bool(workload["metadata"]["labels"].get("app.kubernetes.io/component") == "worker")


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


def configmap_literals() -> dict[str, str]:
    kustomization = load_docs(BASE / "kustomization.yaml")[0]
    env = next(g for g in kustomization["configMapGenerator"] if g["name"] == "jobmesh-env")
    return dict(literal.split("=", 1) for literal in env["literals"])


def variables_the_code_reads() -> set[str]:
    names: set[str] = set()
    for folder in ("libs", "services"):
        for source in (REPO / folder).rglob("*.py"):
            names |= set(JOBMESH_VAR.findall(source.read_text()))
    return names


def millicores(quantity: str) -> int:
    return int(quantity[:-1]) if quantity.endswith("m") else int(float(quantity) * 1000)


def mebibytes(quantity: str) -> int:
    number, unit = re.fullmatch(r"(\d+)(Mi|Gi)", quantity).groups()  # type: ignore[union-attr]
    return int(number) * (1024 if unit == "Gi" else 1)


def kustomize_build(overlay: str) -> list[Doc]:
    kubectl = require_tool("kubectl", "make tools installs it into the venv from requirements-tools.txt")
    out = subprocess.run(
        [kubectl, "kustomize", str(K8S / "overlays" / overlay)], check=True, capture_output=True, text=True
    ).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc is not None]


# Files -----------------------------------------------------------------------------------------------------


# Custom resources the manifests use, from operators the docs ask for (docs/kubernetes.md); no schema ships for them.
CUSTOM_KINDS = {
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}
KUBERNETES_VERSION = "1.37"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_rendered_object_is_valid_for_the_kubernetes_api(overlay: str) -> None:
    """Strict schema validation (unknown fields are errors) of everything an overlay renders, offline."""
    try:
        import kubernetes_validate
    except ImportError:
        require_tool("kubernetes-validate", "make tools installs it into the venv from requirements-tools.txt")
        raise
    errors = []
    for doc in kustomize_build(overlay):
        kind = (doc["apiVersion"], doc["kind"])
        if kind in CUSTOM_KINDS:
            continue
        try:
            kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
        except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
            errors.append(f"{doc['kind']}/{doc['metadata']['name']}: {exc}")
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("path", yaml_files(), ids=lambda p: str(p.relative_to(K8S)))
def test_every_yaml_document_parses(path: Path) -> None:
    docs = load_docs(path)

    assert docs, f"{path} holds no document"
    for doc in docs:
        assert isinstance(doc, (dict, list)), f"{path}: a document is {type(doc).__name__}"


def _listed_files(kustomization: Doc) -> Iterator[str]:
    yield from kustomization.get("resources", [])
    yield from kustomization.get("components", [])
    for patch in kustomization.get("patches", []):
        if "path" in patch:
            yield patch["path"]
    for generator in (*kustomization.get("configMapGenerator", []), *kustomization.get("secretGenerator", [])):
        for entry in generator.get("files", []):
            yield entry.split("=", 1)[-1]


@pytest.mark.parametrize("path", kustomizations(), ids=lambda p: str(p.parent.relative_to(K8S)))
def test_every_kustomization_lists_files_that_exist(path: Path) -> None:
    kustomization = load_docs(path)[0]

    listed = list(_listed_files(kustomization))

    assert listed
    for name in listed:
        target = path.parent / name
        assert target.exists(), f"{path.relative_to(REPO)} lists {name}, which does not exist"
        if target.is_dir():
            assert (target / "kustomization.yaml").is_file(), f"{name} is a folder without a kustomization"


def test_every_file_in_k8s_is_used_by_a_kustomization() -> None:
    used = {(path.parent / name).resolve() for path in kustomizations() for name in _listed_files(load_docs(path)[0])}
    files = {p.resolve() for p in K8S.rglob("*") if p.is_file() and p.name != "kustomization.yaml"}

    assert sorted(str(p.relative_to(K8S)) for p in files - used) == []


def test_the_mesh_config_for_kubernetes_loads() -> None:
    config = load_config(BASE / "mesh.toml")

    assert config.tenants and config.pools


def test_the_envoy_bootstrap_is_the_renderer_output_for_the_cluster() -> None:
    expected = render_cluster_defaults()

    assert (BASE / "envoy.json").read_text() == expected, "re-render k8s/base/envoy.json (docs/kubernetes.md)"
    assert json.loads(expected)["admin"]["address"] == {"pipe": {"path": "/tmp/envoy-admin.sock", "mode": 0o600}}


# Workloads -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("workload", workloads(base_resources()), ids=lambda w: w["metadata"]["name"])
def test_every_container_has_resources_and_a_locked_down_security_context(workload: Doc) -> None:
    pod = pod_spec(workload).get("securityContext", {})

    assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault"
    assert pod_spec(workload).get("automountServiceAccountToken") is False
    for container in containers(workload):
        name = f"{workload['metadata']['name']}/{container['name']}"
        resources = container.get("resources", {})
        for bound in ("requests", "limits"):
            assert {"cpu", "memory"} <= set(resources.get(bound, {})), f"{name}: {bound} needs cpu and memory"
        security = container.get("securityContext", {})
        assert security.get("runAsNonRoot", pod.get("runAsNonRoot")) is True, name
        assert security.get("readOnlyRootFilesystem") is True, name
        assert security.get("allowPrivilegeEscalation") is False, name
        assert security.get("capabilities", {}).get("drop") == ["ALL"], name


@pytest.mark.parametrize("workload", workloads(base_resources()), ids=lambda w: w["metadata"]["name"])
def test_every_server_has_readiness_and_liveness_probes(workload: Doc) -> None:
    # Workers are exempt: they serve no port and no Service routes to them; the pool-manager's lease is
    # their liveness check (k8s/base/worker-static-general.yaml says more).
    if is_worker(workload):
        for container in containers(workload, init=False):
            assert "readinessProbe" not in container and "livenessProbe" not in container
        return
    for container in containers(workload, init=False):
        assert "readinessProbe" in container, container["name"]
        assert "livenessProbe" in container, container["name"]


@pytest.mark.parametrize(
    "workload",
    [w for w in workloads(base_resources()) if w["metadata"]["labels"]["app.kubernetes.io/component"] == "server"],
    ids=lambda w: w["metadata"]["name"],
)
def test_every_service_probes_its_own_grpc_port_and_runs_its_module(workload: Doc) -> None:
    [server] = containers(workload, init=False)
    port = int(env_of(server)["JOBMESH_PORT"]["value"])

    # The kubelet's gRPC probe speaks plaintext, which an mTLS-only port refuses: the pod checks itself over mTLS.
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["exec"]["command"] == ["python", "-m", "libs.healthcheck"], probe
    expected = {port, int(configmap_literals()["JOBMESH_METRICS_PORT"])}
    if "JOBMESH_JOIN_PORT" in env_of(server):
        expected.add(int(env_of(server)["JOBMESH_JOIN_PORT"]["value"]))
    assert {p["containerPort"] for p in server["ports"]} == expected
    python, flag, module = server["command"]
    assert (python, flag) == ("python", "-m")
    assert (REPO / module.replace(".", "/") / "__main__.py").is_file(), module
    annotations = workload["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/port"] == configmap_literals()["JOBMESH_METRICS_PORT"]


def test_the_services_listen_on_every_interface() -> None:
    # The settings default to 127.0.0.1, which nothing outside the pod (probes included) can reach.
    assert configmap_literals()["JOBMESH_HOST"] == "0.0.0.0"


def test_etcd_is_three_members_of_a_pinned_current_3_5_release() -> None:
    docs = base_resources()
    etcd = by_name(docs, "StatefulSet", "etcd")

    assert etcd["spec"]["replicas"] == 3
    assert etcd["spec"]["podManagementPolicy"] == "Parallel"
    [container] = containers(etcd, init=False)
    match = re.fullmatch(r"quay\.io/coreos/etcd:v3\.5\.(\d+)", container["image"])
    assert match and int(match.group(1)) >= 17, container["image"]
    assert by_name(docs, "PodDisruptionBudget", "etcd")["spec"]["minAvailable"] == 2
    assert by_name(docs, "Service", "etcd")["spec"]["clusterIP"] == "None"
    assert etcd["spec"]["volumeClaimTemplates"]


@pytest.mark.parametrize("name", LEADER_ELECTED)
def test_leader_elected_services_run_several_replicas_named_after_their_pod(name: str) -> None:
    deployment = by_name(base_resources(), "Deployment", name)

    assert deployment["spec"]["replicas"] >= 2
    [server] = containers(deployment, init=False)
    source = env_of(server)["JOBMESH_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"]
    assert source == "metadata.name"


@pytest.mark.parametrize("name", ACTIVE_STANDBY)
def test_active_standby_services_run_two_replicas_behind_a_budget_found_by_their_health(name: str) -> None:
    docs = base_resources()
    deployment = by_name(docs, "Deployment", name)

    assert deployment["spec"]["replicas"] == 2
    assert deployment["spec"]["strategy"]["type"] == "RollingUpdate"
    assert by_name(docs, "PodDisruptionBudget", name)["spec"]["minAvailable"] == 1
    # Clients resolve every replica and follow the leader's health, so the Service is headless.
    assert by_name(docs, "Service", name)["spec"]["clusterIP"] == "None"
    [server] = containers(deployment, init=False)
    assert env_of(server)["JOBMESH_REPLICA_ID"]["valueFrom"]["fieldRef"]["fieldPath"] == "metadata.name"


def test_no_service_is_a_single_writer_stopped_for_its_rollouts() -> None:
    for workload in workloads(base_resources()):
        strategy = workload["spec"].get("strategy", {}).get("type", "RollingUpdate")
        assert strategy == "RollingUpdate", workload["metadata"]["name"]


def test_two_gateways_behind_envoy_and_a_budget_that_keeps_one() -> None:
    docs = base_resources()

    assert by_name(docs, "Deployment", "gateway")["spec"]["replicas"] == 2
    assert by_name(docs, "PodDisruptionBudget", "gateway")["spec"]["minAvailable"] == 1
    # Envoy resolves every gateway pod through the headless Service, and health-checks each.
    assert by_name(docs, "Service", "gateway")["spec"]["clusterIP"] == "None"
    cluster = json.loads((BASE / "envoy.json").read_text())["static_resources"]["clusters"][0]
    assert cluster["type"] == "STRICT_DNS" and cluster["health_checks"]


def test_static_pool_workers_match_the_mesh_config() -> None:
    config = load_config(BASE / "mesh.toml")
    docs = base_resources()

    # Dynamic pools need the Kubernetes worker provider: until then their workers would be local processes
    # of the pool-manager's pod.
    assert [p.pool_id for p in config.pools if p.kind != "static"] == []
    for pool in config.pools:
        deployment = by_name(docs, "Deployment", f"worker-{pool.pool_id}")
        [worker] = containers(deployment, init=False)
        env = env_of(worker)
        assert deployment["spec"]["replicas"] == pool.max_workers
        assert env["JOBMESH_POOL_ID"]["value"] == pool.pool_id
        assert int(env["JOBMESH_WORKER_CPU_MILLIS"]["value"]) == pool.worker_cpu_millis
        assert int(env["JOBMESH_WORKER_MEMORY_MB"]["value"]) == pool.worker_memory_mb
        assert json.loads(env["JOBMESH_WORKER_LABELS"]["value"]) == pool.labels
        # Its id is the one its certificate names, got with a join token for this pool.
        assert "JOBMESH_WORKER_ID" not in env
        [join] = pod_spec(deployment)["initContainers"]
        assert join["command"] == ["python", "-m", "services.worker.join"]
        assert env_of(join)["JOBMESH_JOIN_ADDR"]["value"] == f"pool-manager:{JOIN_PORT}"
        identity = env_of(join)["JOBMESH_JOIN_DIR"]["value"]
        assert env["JOBMESH_TLS_CERT"]["value"] == f"{identity}/worker.crt"
        assert env["JOBMESH_TLS_KEY"]["value"] == f"{identity}/worker.key"
        assert env["JOBMESH_WORKER_RENEW_CERT"]["value"] == "1"
        assert env["JOBMESH_WORKER_SANDBOX"]["value"] == pool.sandbox  # "none": a restricted pod cannot sandbox
        if "arch" in pool.labels:
            node_arch = pod_spec(deployment)["nodeSelector"]["kubernetes.io/arch"]
            assert {"x86_64": "amd64", "aarch64": "arm64"}.get(pool.labels["arch"], pool.labels["arch"]) == node_arch
        # Jobs may use all the capacity the worker advertises, and the agent needs a little on top.
        limits = worker["resources"]["limits"]
        assert millicores(limits["cpu"]) >= pool.worker_cpu_millis
        assert mebibytes(limits["memory"]) > pool.worker_memory_mb


def test_worker_pods_get_their_pools_drain_grace_to_stop_and_drain_one_at_a_time() -> None:
    config = load_config(BASE / "mesh.toml")
    docs = base_resources()

    for pool in config.pools:
        deployment = by_name(docs, "Deployment", f"worker-{pool.pool_id}")
        # SIGTERM, the drain grace for the jobs, then the time to stop and report them before the SIGKILL.
        grace = pod_spec(deployment)["terminationGracePeriodSeconds"]
        assert grace == pool.drain_grace_seconds + STOP_MARGIN_SECONDS
        budget = by_name(docs, "PodDisruptionBudget", f"worker-{pool.pool_id}")
        assert budget["spec"]["selector"]["matchLabels"] == deployment["spec"]["selector"]["matchLabels"]
        # One at a time, and never 0, which would block every node drain.
        assert budget["spec"]["maxUnavailable"] == 1


def test_every_jobmesh_variable_in_the_manifests_is_one_the_code_reads() -> None:
    # TlsSettings reads its variables by prefix (JOBMESH_TLS_CERT, ...): take their names from it.
    read = variables_the_code_reads() | set(TlsSettings(Path("c"), Path("k"), Path("a")).env())
    named = set(configmap_literals())
    for path in yaml_files():
        named |= set(JOBMESH_VAR.findall(path.read_text()))

    assert "JOBMESH_PORT" in read  # the scan found the settings module
    assert sorted(named - read) == []


def test_the_workloads_only_mount_config_that_the_base_provides() -> None:
    kustomization = load_docs(BASE / "kustomization.yaml")[0]
    generated = {g["name"] for g in kustomization["configMapGenerator"]}

    for workload in workloads(base_resources()):
        for volume in pod_spec(workload).get("volumes", []):
            sources = [volume, *volume.get("projected", {}).get("sources", [])]
            for source in sources:
                if "configMap" in source:
                    name = source["configMap"]["name"]
                    assert name in generated | EXTERNAL_CONFIGMAPS, volume
                if "secret" in source:
                    name = source["secret"].get("secretName") or source["secret"]["name"]
                    assert name in EXTERNAL_SECRETS | CERT_SECRETS, volume
        for container in containers(workload):
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in generated


def test_the_envoy_pod_gets_its_descriptor_set_from_the_jobmesh_image() -> None:
    envoy = by_name(base_resources(), "Deployment", "envoy")
    [init] = pod_spec(envoy)["initContainers"]
    [proxy] = containers(envoy, init=False)
    descriptor = json.loads((BASE / "envoy.json").read_text())
    transcoder = json.dumps(descriptor)

    assert init["image"] == "jobmesh"
    assert init["command"][-2:] == ["/app/build/jobmesh.pb", "/descriptors/jobmesh.pb"]
    assert proxy["image"].startswith("envoyproxy/envoy:v1.40")
    assert '"/etc/envoy/descriptors/jobmesh.pb"' in transcoder
    mounts = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}
    assert mounts["descriptors"] == "/etc/envoy/descriptors"
    assert proxy["args"][proxy["args"].index("-c") + 1] == mounts["bootstrap"] + "/envoy.json"


# The image -------------------------------------------------------------------------------------------------


def test_the_image_generates_code_the_way_make_proto_does() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    makefile = (REPO / "Makefile").read_text()

    for flags in (
        "--python_out=gen --pyi_out=gen --grpc_python_out=gen",
        "--include_imports --include_source_info --descriptor_set_out=build/jobmesh.pb",
        "google/api/{annotations,http,httpbody}.proto",
        "google/rpc/{status,error_details}.proto",
    ):
        assert flags in makefile, f"the Makefile changed ({flags}): update the Dockerfile to match"
        assert flags in dockerfile, flags
    assert re.search(r"^FROM python:3\.11-slim|^ARG PYTHON_IMAGE=python:3\.11-slim", dockerfile, re.M)
    assert re.search(r"^USER \d+:\d+$", dockerfile, re.M), "a numeric user, so runAsNonRoot can verify it"
    assert "PYTHONPATH=/app:/app/gen" in dockerfile
    assert not re.search(r"^(CMD|ENTRYPOINT)\b", dockerfile, re.M), "each workload names its own command"


# Rendered overlays (kubectl's built-in kustomize) ----------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_builds_into_the_jobmesh_namespace_with_three_etcd_members(overlay: str) -> None:
    docs = kustomize_build(overlay)

    for doc in docs:
        if doc["kind"] != "Namespace":
            assert doc["metadata"].get("namespace") == "jobmesh", f"{doc['kind']}/{doc['metadata']['name']}"
    assert by_name(docs, "StatefulSet", "etcd")["spec"]["replicas"] == 3
    for name in LEADER_ELECTED:
        assert by_name(docs, "Deployment", name)["spec"]["replicas"] >= 2
    for name in ACTIVE_STANDBY:
        assert by_name(docs, "Deployment", name)["spec"]["replicas"] == 2
    for workload in workloads(docs):
        for container in containers(workload):
            assert container["image"] != "jobmesh", "the images transformer did not tag the jobmesh image"


def test_the_prod_overlay_adds_replicas_budgets_tracing_and_network_policies() -> None:
    docs = kustomize_build("prod")

    for name in LEADER_ELECTED:
        assert by_name(docs, "Deployment", name)["spec"]["replicas"] == 3
        assert by_name(docs, "PodDisruptionBudget", name)["spec"]["minAvailable"] == 2
    assert any(d["kind"] == "NetworkPolicy" and d["metadata"]["name"] == "default-deny" for d in docs)
    for workload in workloads(docs):
        if workload["metadata"]["name"] in ("envoy", "etcd"):
            continue
        env = env_of(next(containers(workload, init=False)))
        assert env["JOBMESH_OTEL_EXPORTER"]["value"] == "otlp", workload["metadata"]["name"]
        assert "JOBMESH_OTEL_ENDPOINT" in env


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_image_is_pinned_to_a_version(overlay: str) -> None:
    for workload in workloads(kustomize_build(overlay)):
        for container in containers(workload):
            image = container["image"]
            name, _, tag = image.rpartition(":") if "@" not in image else (image, "", "digest")
            assert name and tag and "/" not in tag, f"{image} has no tag"
            assert tag != "latest" and not tag.endswith("-latest"), f"{image} floats"


def test_prod_scales_the_stateless_front_with_cpu_and_nothing_else() -> None:
    docs = kustomize_build("prod")
    scalers = {d["spec"]["scaleTargetRef"]["name"]: d for d in docs if d["kind"] == "HorizontalPodAutoscaler"}

    assert set(scalers) == {"gateway", "envoy"}
    for name, hpa in scalers.items():
        target = by_name(docs, "Deployment", hpa["spec"]["scaleTargetRef"]["name"])
        # Never below two: a drain (PodDisruptionBudget) must leave one serving.
        assert hpa["spec"]["minReplicas"] >= 2
        assert target["spec"]["replicas"] >= hpa["spec"]["minReplicas"]
        assert hpa["spec"]["maxReplicas"] > hpa["spec"]["minReplicas"]
        # Utilization is a share of the request: without one the autoscaler cannot act.
        for container in containers(target, init=False):
            assert container["resources"]["requests"]["cpu"], f"{name}/{container['name']} has no CPU request"


def test_the_monitoring_objects_are_generated_from_the_repositorys_rules_and_dashboards() -> None:
    from libs import k8s_observability

    expected = k8s_observability.render()
    on_disk = {p.name: p.read_text() for p in k8s_observability.GENERATED.glob("*.yaml")}

    assert on_disk == expected, "k8s/components/observability/generated is stale: run `make k8s-observability`"
    rules = {d["metadata"]["name"] for d in kustomize_build("prod") if d["kind"] == "PrometheusRule"}
    assert rules == {
        "jobmesh-" + p.name.removesuffix(".rules.yml") for p in k8s_observability.RULES.glob("*.rules.yml")
    }


def test_the_service_monitor_scrapes_every_service_with_a_metrics_port() -> None:
    docs = kustomize_build("prod")
    [monitor] = [d for d in docs if d["kind"] == "ServiceMonitor"]
    with_metrics = {
        d["metadata"]["name"]: d["metadata"]["labels"]
        for d in docs
        if d["kind"] == "Service" and any(p["name"] == "metrics" for p in d["spec"]["ports"])
    }

    assert with_metrics
    for name, labels in with_metrics.items():
        assert selects(monitor["spec"]["selector"], labels), f"the ServiceMonitor misses {name}"
    assert [e["port"] for e in monitor["spec"]["endpoints"]] == ["metrics"]


# Network policies ------------------------------------------------------------------------------------------

POLICIES = K8S / "components" / "network-policies"
WORKER_POD = {"app.kubernetes.io/name": "worker", "app.kubernetes.io/component": "worker", "jobmesh.dev/pool": "x"}
# What a worker pod (and so every job it runs) must reach: the pool-manager's registry and join ports.
WORKER_PORTS = {50055, 50057}


def policies() -> list[Doc]:
    return [d for path in sorted(POLICIES.glob("*.yaml")) for d in load_docs(path) if d.get("kind") == "NetworkPolicy"]


def selects(selector: Doc | None, labels: dict[str, str]) -> bool:
    """A label selector as Kubernetes evaluates it (an empty one selects every pod)."""
    selector = selector or {}
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        value, operator = labels.get(expr["key"]), expr["operator"]
        if operator == "In" and value not in expr["values"]:
            return False
        if operator == "NotIn" and value in expr["values"]:
            return False
        if operator == "Exists" and value is None:
            return False
        if operator == "DoesNotExist" and value is not None:
            return False
    return True


def pod_labels(workload: Doc) -> dict[str, str]:
    return dict(workload["spec"]["template"]["metadata"]["labels"])


def test_the_selector_reader_reads_selectors() -> None:
    assert selects({}, WORKER_POD)
    assert selects({"matchLabels": {"app.kubernetes.io/name": "worker"}}, WORKER_POD)
    assert not selects(
        {"matchExpressions": [{"key": "app.kubernetes.io/component", "operator": "NotIn", "values": ["worker"]}]},
        WORKER_POD,
    )
    assert selects(
        {"matchExpressions": [{"key": "app.kubernetes.io/name", "operator": "In", "values": ["worker", "gateway"]}]},
        WORKER_POD,
    )


def test_worker_pods_reach_only_the_pool_managers_worker_ports_and_dns() -> None:
    manifests = base_resources()
    pool_manager = pod_labels(by_name(manifests, "Deployment", "pool-manager"))
    for policy in policies():
        if not selects(policy["spec"]["podSelector"], WORKER_POD) or "Egress" not in policy["spec"]["policyTypes"]:
            continue
        for rule in policy["spec"].get("egress", []):
            ports = {p["port"] for p in rule.get("ports", [])}
            peers = rule.get("to", [])
            assert peers and ports, f"{policy['metadata']['name']}: a rule open to every peer or port"
            for peer in peers:
                if "namespaceSelector" in peer:  # the cluster DNS, in kube-system
                    assert peer["namespaceSelector"]["matchLabels"] == {"kubernetes.io/metadata.name": "kube-system"}
                    assert ports == {53}
                    continue
                assert "ipBlock" not in peer, policy["metadata"]["name"]
                assert selects(peer["podSelector"], pool_manager) and ports <= WORKER_PORTS, policy["metadata"]["name"]
                for workload in workloads(manifests):  # the selector picks the pool-manager and nothing else
                    if selects(peer["podSelector"], pod_labels(workload)):
                        assert workload["metadata"]["name"] == "pool-manager"


def test_nothing_connects_to_a_worker_pod_and_no_control_plane_port_admits_one() -> None:
    manifests = base_resources()
    worker = pod_labels(by_name(manifests, "Deployment", "worker-static-general"))
    assert selects({"matchLabels": {"app.kubernetes.io/name": "worker"}}, worker)
    isolated = [
        p for p in policies() if selects(p["spec"]["podSelector"], worker) and "Ingress" in p["spec"]["policyTypes"]
    ]
    assert isolated, "no policy isolates the worker pods' ingress"
    for policy in policies():
        if selects(policy["spec"]["podSelector"], worker):
            assert not policy["spec"].get("ingress"), f"{policy['metadata']['name']} lets something reach worker pods"
    for policy in policies():
        for rule in policy["spec"].get("ingress", []):
            peers = rule.get("from")
            admits_workers = peers is None or any(
                selects(peer.get("podSelector"), worker)
                for peer in peers
                if "ipBlock" not in peer and "namespaceSelector" not in peer
            )
            if not admits_workers:
                continue
            if peers is None:  # from anywhere: only the public edge may be open so
                assert policy["metadata"]["name"] == "envoy", policy["metadata"]["name"]
                continue
            assert not selects(policy["spec"]["podSelector"], worker), "an ingress rule into worker pods"
            assert policy["metadata"]["name"] == "pool-manager"
            assert {p["port"] for p in rule["ports"]} <= WORKER_PORTS


# Certificates ----------------------------------------------------------------------------------------------


def secrets_of(workload: Doc) -> set[str]:
    names = set()
    for volume in pod_spec(workload).get("volumes", []):
        for source in [volume, *volume.get("projected", {}).get("sources", [])]:
            if "secret" in source:
                names.add(source["secret"].get("secretName") or source["secret"]["name"])
    return names


def test_each_workload_holds_its_own_identity_and_no_other() -> None:
    for workload in workloads(base_resources()):
        name = workload["metadata"]["name"]
        held = secrets_of(workload) & CERT_SECRETS
        if is_worker(workload):
            assert held == set(), "a worker pod (tenant jobs) holds no mesh Secret: it joins with a token"
            continue
        if name == "etcd":
            assert held == {"jobmesh-etcd-server"}
            continue
        expected = {f"jobmesh-tls-{name}"}
        if name in ETCD_USERS:
            expected.add(f"jobmesh-etcd-client-{name}")
        if name == "pool-manager":
            expected.add("jobmesh-worker-ca")  # it signs joining workers' certificates
        assert held == expected, name


def test_the_services_find_their_certificates_where_the_secret_is_mounted() -> None:
    literals = configmap_literals()
    for workload in workloads(base_resources()):
        name = workload["metadata"]["name"]
        if is_worker(workload) or name in ("etcd", "envoy"):
            continue
        [server] = containers(workload, init=False)
        mounts = {m["name"]: m["mountPath"] for m in server["volumeMounts"]}
        env = {**literals, **{k: v.get("value", "") for k, v in env_of(server).items()}}
        assert env["JOBMESH_TLS_CERT"] == f"{mounts['tls']}/tls.crt", name
        assert env["JOBMESH_TLS_KEY"] == f"{mounts['tls']}/tls.key", name
        if name in ETCD_USERS:
            assert env["JOBMESH_ETCD_TLS_CERT"] == f"{mounts['etcd-tls']}/tls.crt", name
        else:
            assert "JOBMESH_ETCD_TLS_CERT" not in env, name


def test_envoys_sds_files_point_at_its_mounted_secret() -> None:
    envoy = by_name(base_resources(), "Deployment", "envoy")
    [proxy] = containers(envoy, init=False)
    tls = {m["name"]: m["mountPath"] for m in proxy["volumeMounts"]}["tls"]
    identity, validation = sds_files(f"{tls}/tls.crt", f"{tls}/tls.key", f"{tls}/ca.crt")

    assert (BASE / "envoy-identity-sds.json").read_text() == identity
    assert (BASE / "envoy-validation-sds.json").read_text() == validation
    assert f'"path": "{tls}"' in (BASE / "envoy.json").read_text()  # the directory Envoy watches for renewals
