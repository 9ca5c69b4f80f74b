"""mTLS on every internal port and on etcd, against the real stack: plaintext, no certificate, another CA's
certificate and an expired one are refused at the handshake (nothing is written); renewed certificates are
picked up without a restart and without a failed call, on the server side and on the client side."""

from __future__ import annotations

import asyncio
import datetime as dt
import http.client
import os
import socket
import ssl
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from etcd3aio import _protobuf as pb
from grpc_health.v1 import health_pb2, health_pb2_grpc

from devtools.launcher import Stack, admin_get
from jobmesh.common.v1 import quota_pb2 as common_quota
from jobmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from libs.etcd.client import Etcd
from libs.meshpki import WorkerIssuer, write_identity
from libs.pki import Bundle, CertificateAuthority, service_id
from libs.settings import TlsSettings
from libs.tls import RETIRE_AFTER_SECONDS, RenewingChannel, sync_channel
from tests.helpers import Api, job_spec, start_stack, token, wait_for

INTERNAL = (
    "gateway-1",
    "gateway-2",
    "quota-1",
    "quota-2",
    "queueing-1",
    "queueing-2",
    "scheduler-1",
    "poolmanager-1",
    "cost-1",
    "cost-2",
)


@pytest.fixture(scope="module")
def mstack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = start_stack(tmp_path_factory.mktemp("mtls-stack"))
    try:
        yield stack
    finally:
        stack.stop()


def bundle_files(directory: Path, name: str, bundle: Bundle, ca_pem: bytes | None = None) -> TlsSettings:
    """Writes a certificate, its key and a CA file for a caller made up by the test."""
    directory.mkdir(parents=True, exist_ok=True)
    tls = TlsSettings(directory / f"{name}.crt", directory / f"{name}.key", directory / f"{name}-ca.crt")
    write_identity(tls, bundle)
    tls.ca.write_bytes(ca_pem or bundle.ca_pem)
    return tls


def health_check(channel: grpc.Channel, timeout: float = 3.0) -> grpc.StatusCode:
    try:
        health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=timeout)
    except grpc.RpcError as exc:
        return exc.code()  # type: ignore[no-any-return]
    return grpc.StatusCode.OK


def callers(stack: Stack, tmp: Path) -> dict[str, grpc.ChannelCredentials | None]:
    """Every kind of caller that must be refused, as the credentials its channel is built with."""
    mesh_ca = stack.pki.mesh_ca_path.read_bytes()
    stranger = CertificateAuthority.create()
    expired = stack.pki.ca.issue(service_id("gateway"), dt.timedelta(minutes=-1))
    foreign = stranger.issue(service_id("gateway"), dt.timedelta(hours=1))
    return {
        "plaintext": None,
        "no certificate": grpc.ssl_channel_credentials(root_certificates=mesh_ca),
        "another CA": grpc.ssl_channel_credentials(mesh_ca, foreign.key_pem, foreign.cert_pem),
        "expired": grpc.ssl_channel_credentials(mesh_ca, expired.key_pem, expired.cert_pem),
    }


def dial(port: int, creds: grpc.ChannelCredentials | None) -> grpc.Channel:
    target = f"127.0.0.1:{port}"
    return grpc.insecure_channel(target) if creds is None else grpc.secure_channel(target, creds)


@pytest.mark.parametrize("name", INTERNAL)
def test_each_internal_port_refuses_every_caller_without_a_valid_mesh_certificate(
    mstack: Stack, name: str, tmp_path: Path
) -> None:
    port = mstack.procs[name].port
    for kind, creds in callers(mstack, tmp_path).items():
        with dial(port, creds) as ch:
            assert health_check(ch) == grpc.StatusCode.UNAVAILABLE, f"{name} accepted a caller with {kind}"
    with mstack.channel(port, "gateway") as ch:
        assert health_check(ch) == grpc.StatusCode.OK


def test_a_refused_caller_writes_nothing_and_the_refusal_is_logged(mstack: Stack, tmp_path: Path) -> None:
    quota = mstack.procs["quota-1"]
    request = quota_pb2.UpdateQuotaRequest(
        tenant_id="acme", limits=common_quota.QuotaLimits(cpu_millis=1, memory_mb=1, concurrent_jobs=1)
    )
    for kind, creds in callers(mstack, tmp_path).items():
        with dial(quota.port, creds) as ch:
            with pytest.raises(grpc.RpcError) as caught:
                quota_pb2_grpc.QuotaServiceStub(ch).UpdateQuota(request, timeout=3)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, kind

    async def overrides() -> int:
        etcd = mstack.etcd_client()
        try:
            kvs, _, _ = await etcd.get_prefix("/jobmesh/")
            return sum(1 for kv in kvs if "quota" in kv.key and "acme" in kv.key)
        finally:
            await etcd.close()

    assert asyncio.run(overrides()) == 0
    log = quota.log.read_text(errors="replace")
    assert "Handshake failed" in log
    assert "CERTIFICATE_VERIFY_FAILED" in log or "certificate" in log.lower()


def test_a_worker_certificate_opens_the_pool_manager_and_nothing_else(mstack: Stack) -> None:
    issuer = WorkerIssuer(mstack.pki.worker_ca_dir, mstack.pki.workers_dir)
    tls = issuer.issue("static-general", "w-test")
    try:
        with sync_channel(f"127.0.0.1:{mstack.procs['poolmanager-1'].port}", tls) as ch:
            assert health_check(ch) == grpc.StatusCode.OK
        for name in ("gateway-1", "quota-1", "queueing-1", "scheduler-1", "cost-1"):
            with sync_channel(f"127.0.0.1:{mstack.procs[name].port}", tls) as ch:
                assert health_check(ch) == grpc.StatusCode.UNAVAILABLE, name
    finally:
        issuer.forget("w-test")


# etcd ------------------------------------------------------------------------------------------------------


def etcd_ready(make: Callable[[], Etcd]) -> bool:
    async def probe() -> bool:
        etcd = make()  # a grpc.aio channel belongs to the loop it is made in
        try:
            await etcd.wait_ready(deadline=2.0)
            return True
        except grpc.aio.AioRpcError:
            return False
        finally:
            await etcd.close()

    return asyncio.run(probe())


def test_etcd_refuses_clients_without_an_etcd_client_certificate(mstack: Stack, tmp_path: Path) -> None:
    endpoint = [f"127.0.0.1:{mstack.ports.etcd}"]
    etcd_ca = mstack.pki.etcd_ca_path.read_bytes()
    stranger = CertificateAuthority.create().issue(service_id("queueing"), dt.timedelta(hours=1))
    # A service's mesh certificate (the gateway's) is not an etcd client certificate.
    gateway = mstack.identity("gateway")
    refused = {
        "no certificate": grpc.ssl_channel_credentials(root_certificates=etcd_ca),
        "another CA": grpc.ssl_channel_credentials(etcd_ca, stranger.key_pem, stranger.cert_pem),
        "the mesh CA": grpc.ssl_channel_credentials(etcd_ca, gateway.key.read_bytes(), gateway.cert.read_bytes()),
        "plaintext": None,
    }
    for kind, creds in refused.items():
        with dial(mstack.ports.etcd, creds) as ch:
            with pytest.raises(grpc.RpcError) as caught:
                pb.KVStub(ch).Range(pb.RangeRequest(key=b"/", count_only=True), timeout=3)
            assert caught.value.code() == grpc.StatusCode.UNAVAILABLE, kind
    assert etcd_ready(lambda: mstack.etcd_client("queueing"))
    # The etcd client itself, given a certificate etcd does not trust, cannot connect either.
    stranger_files = bundle_files(tmp_path, "stranger", stranger, etcd_ca)
    assert not etcd_ready(lambda: Etcd(endpoint, stranger_files))


# Renewal ---------------------------------------------------------------------------------------------------


def served_certificate(port: int, client: TlsSettings) -> bytes:
    """The certificate a server presents to a new connection (DER)."""
    context = ssl.create_default_context(cafile=str(client.ca))
    context.load_cert_chain(str(client.cert), str(client.key))
    context.set_alpn_protocols(["h2"])
    with socket.create_connection(("127.0.0.1", port), timeout=3) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            der = tls.getpeercert(binary_form=True)
    assert der is not None
    return der


def der(pem: bytes) -> bytes:
    from cryptography.hazmat.primitives.serialization import Encoding

    return x509.load_pem_x509_certificate(pem).public_bytes(Encoding.DER)


def test_a_renewed_service_certificate_is_served_without_a_restart_and_no_call_fails(mstack: Stack) -> None:
    leader = mstack.wait_leader("quota")  # the replica the gateway's public calls below reach
    quota = mstack.procs[leader]
    pid = quota.pid
    files = mstack.pki.service(leader, "quota")
    client = mstack.identity("gateway")
    api = Api(mstack.url, token(mstack, "globex"))
    failures: list[str] = []
    done = threading.Event()
    calls = 0

    def stream_of_calls() -> None:
        nonlocal calls
        # New connections (a fresh channel every call) and a long-lived one, both across the renewals.
        with mstack.channel(quota.port, "gateway") as kept:
            for _ in range(400):
                if done.is_set() and calls >= 60:
                    return
                with sync_channel(f"127.0.0.1:{quota.port}", client) as fresh:
                    for ch in (fresh, kept):
                        code = health_check(ch)
                        calls += 1
                        if code != grpc.StatusCode.OK:
                            failures.append(code.name)

    worker = threading.Thread(target=stream_of_calls)
    worker.start()
    try:
        for _ in range(3):
            time.sleep(0.3)
            write_identity(files, mstack.pki.ca.issue(service_id("quota"), dt.timedelta(days=3)))
            # The gateway's own channel to quota carries public calls meanwhile.
            assert api.call("GET", "/api/v1/tenants/globex/quotas").status_code == 200
        time.sleep(0.3)
    finally:
        done.set()
        worker.join(60)
    assert failures == [] and calls >= 60, (failures, calls)
    assert served_certificate(quota.port, client) == der(files.cert.read_bytes())
    assert quota.pid == pid and quota.alive()


def test_an_expired_service_certificate_is_renewed_by_the_launcher_without_a_restart(mstack: Stack) -> None:
    cost = mstack.procs["cost-1"]
    pid = cost.pid
    files = mstack.pki.service("cost-1", "cost")
    mstack.stop_renewal()
    try:
        write_identity(files, mstack.pki.ca.issue(service_id("cost"), dt.timedelta(minutes=-1)))
        with mstack.channel(cost.port, "gateway") as ch:
            assert health_check(ch) == grpc.StatusCode.UNAVAILABLE  # clients refuse an expired server certificate
    finally:
        mstack.start_renewal(interval=0.2)  # the launcher's timer thread, looking more often than it does
    wait_for(lambda: health_check(mstack.channel(cost.port, "gateway")) == grpc.StatusCode.OK, 10, what="renewal")
    assert cost.pid == pid and cost.alive()


@pytest.mark.asyncio
async def test_a_client_channel_presents_renewed_files_to_new_calls_without_failing_one(
    mstack: Stack, tmp_path: Path
) -> None:
    ca = mstack.pki.ca
    tls = bundle_files(tmp_path, "client", ca.issue(service_id("gateway"), dt.timedelta(hours=1)))
    channel = RenewingChannel(f"127.0.0.1:{mstack.ports.queueing[0]}", tls, check_interval=0.05)
    stub = health_pb2_grpc.HealthStub(channel)
    failures = 0
    try:
        for i in range(120):
            if i in (30, 60):
                write_identity(tls, ca.issue(service_id("gateway"), dt.timedelta(hours=1)))
            try:
                await stub.Check(health_pb2.HealthCheckRequest(), timeout=3)
            except grpc.aio.AioRpcError:
                failures += 1
            await asyncio.sleep(0.005)
        assert failures == 0
        assert channel._current.number == 2  # two renewals, each a new secure channel
        # The replaced channels are closed once idle for a while (looked at on a later call).
        await asyncio.sleep(RETIRE_AFTER_SECONDS + 0.2)
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert channel._retired == []
        # Proof that the new files are what new calls present: a certificate the server does not trust.
        write_identity(tls, CertificateAuthority.create().issue(service_id("gateway"), dt.timedelta(hours=1)))
        await asyncio.sleep(0.1)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await stub.Check(health_pb2.HealthCheckRequest(), timeout=3)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    finally:
        await channel.close()


def test_envoy_picks_up_its_renewed_certificate_without_a_restart(mstack: Stack) -> None:
    envoy = mstack.procs["envoy"]
    pid = envoy.pid
    files = mstack.pki.service("envoy", "envoy")
    renewed = mstack.pki.ca.issue(service_id("envoy"), dt.timedelta(days=3))
    write_identity(files, renewed)
    serial = format(x509.load_pem_x509_certificate(renewed.cert_pem).serial_number, "x")
    wait_for(lambda: serial in admin_get(mstack.envoy_admin_socket, "/certs")[1], 15, what="Envoy's renewed cert")
    api = Api(mstack.url, token(mstack))
    assert api.call("GET", "/api/v1/tenants/acme/quotas").status_code == 200
    assert envoy.pid == pid and envoy.alive()


def test_envoy_admin_is_a_socket_only_its_owner_may_open(mstack: Stack) -> None:
    assert os.stat(mstack.envoy_admin_socket).st_mode & 0o777 == 0o600
    assert admin_get(mstack.envoy_admin_socket, "/ready")[0] == 200


def test_keys_are_private_and_the_ca_is_reused_after_a_restart(mstack: Stack) -> None:
    root = mstack.pki.root
    assert os.stat(root).st_mode & 0o777 == 0o700
    for key in [root / "ca" / "ca.key", *sorted((root / "services").glob("*.key"))]:
        assert os.stat(key).st_mode & 0o777 == 0o600, key
    worker_dirs = [p for p in mstack.pki.workers_dir.iterdir() if p.is_dir()]
    assert worker_dirs, "the pool-managers issued their workers certificates"
    for directory in worker_dirs:
        assert os.stat(directory).st_mode & 0o777 == 0o700
        assert os.stat(directory / "worker.key").st_mode & 0o777 == 0o600
    again = Stack(data_dir=mstack.data_dir, config_path=mstack.config_path)
    assert again.pki.ca.cert_pem == mstack.pki.ca.cert_pem


def test_jobs_still_run_end_to_end(mstack: Stack) -> None:
    api = Api(mstack.url, token(mstack))
    job = api.submit(job_spec("mtls"))
    assert api.wait_terminal(job["job_id"], timeout=60)["state"] == "JOB_STATE_SUCCEEDED"


def _console_get(port: int, context: ssl.SSLContext | None) -> int:
    scheme = "http" if context is None else "https"
    with urllib.request.urlopen(f"{scheme}://127.0.0.1:{port}/console/", timeout=3, context=context) as resp:
        return int(resp.status)


def test_the_console_port_serves_only_envoy_and_the_launcher_over_mtls(mstack: Stack, tmp_path: Path) -> None:
    port = mstack.procs["console"].port
    mesh_ca = str(mstack.pki.mesh_ca_path)

    def client(tls: TlsSettings | None) -> ssl.SSLContext:
        context = ssl.create_default_context(cafile=mesh_ca)
        if tls is not None:
            context.load_cert_chain(str(tls.cert), str(tls.key))
        return context

    stranger = CertificateAuthority.create()
    foreign = bundle_files(tmp_path, "foreign", stranger.issue(service_id("envoy"), dt.timedelta(hours=1)))
    refused = {
        "plaintext": None,
        "no certificate": client(None),
        "another CA": client(TlsSettings(foreign.cert, foreign.key, Path(mesh_ca))),
        "a mesh service that is not Envoy": client(mstack.identity("quota")),
    }
    for kind, context in refused.items():
        with pytest.raises((OSError, http.client.HTTPException)):
            _console_get(port, context)
            pytest.fail(f"the console answered a caller with {kind}")
    assert _console_get(port, client(mstack.identity("envoy"))) == 200
    assert "refused caller=spiffe://jobmesh/service/quota" in (mstack.log_dir / "console.log").read_text()
