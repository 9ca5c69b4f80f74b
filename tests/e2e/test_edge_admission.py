"""The edge refuses before Python: bad tokens are 401 from Envoy, each tenant has its own rate limits (429
RATE_LIMITED with Retry-After), and submits beyond the in-flight bound are shed (429 OVERLOADED) at once."""

from __future__ import annotations

import concurrent.futures
import os
import re
import signal
from collections.abc import Iterator

import grpc
import httpx
import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from devtools.launcher import Stack, admin_get
from jobmesh.common.v1 import types_pb2 as t
from jobmesh.gateway.v1 import gateway_pb2 as g
from jobmesh.gateway.v1 import gateway_pb2_grpc
from tests.helpers import FIXTURE_CONFIG, Api, job_spec, start_stack, token, wait_for

# acme and globex share nothing but the rules: a bucket of SUBMIT_BURST submits each that does not refill within
# the test (one token every 1000 s); reads have a roomy bucket of their own. At most INFLIGHT submits in flight.
SUBMIT_BURST = 4
INFLIGHT = 2
EDGE = f"""
[edge]
submit_rate_per_second = 0.001
submit_burst = {SUBMIT_BURST}
read_rate_per_second = 50
read_burst = 500
max_inflight_submits = {INFLIGHT}
"""


@pytest.fixture(scope="module")
def edge_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    root = tmp_path_factory.mktemp("edge")
    config = root / "edge.toml"
    # The fixture's own [edge] table gives way to this test's.
    config.write_text(re.sub(r"\n\[edge\]\n(?:[^\[\n].*\n|\n)*", "\n", FIXTURE_CONFIG.read_text()) + EDGE)
    stack = start_stack(root / "stack", config=config)
    try:
        yield stack
    finally:
        stack.stop()


def upstream_requests(stack: Stack) -> int:
    """Requests Envoy has sent to the gateway so far (both of its clusters)."""
    status, body = admin_get(stack.envoy_admin_socket, "/stats?filter=upstream_rq_total$")
    assert status == 200, body
    return sum(int(line.rsplit(":", 1)[1]) for line in body.splitlines() if line.startswith("cluster.jobmesh_gateway"))


def foreign_token(stack: Stack) -> str:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    claims = jwt.decode(token(stack), options={"verify_signature": False})
    return jwt.encode(claims, pem, algorithm="RS256")


def error_info(body: dict[str, object]) -> dict[str, object]:
    details = body["details"]
    assert isinstance(details, list)
    [info] = [d for d in details if d["@type"] == "type.googleapis.com/google.rpc.ErrorInfo"]
    return dict(info)


def grpc_refusal(stack: Stack, bearer: str | None) -> tuple[grpc.StatusCode, dict[str, str], int | None]:
    """A native gRPC submit that is refused: its code, ErrorInfo (reason and metadata) and RetryInfo seconds."""
    metadata = [("authorization", f"Bearer {bearer}")] if bearer else []
    spec = t.JobSpec(name="native", command=["true"], resources=t.Resources(cpu_millis=100, memory_mb=64))
    with grpc.insecure_channel(stack.grpc_target) as channel:
        stub = gateway_pb2_grpc.JobServiceStub(channel)
        with pytest.raises(grpc.RpcError) as refused:
            stub.SubmitJob(g.SubmitJobRequest(spec=spec), metadata=metadata, timeout=10)
    status = rpc_status.from_call(refused.value)  # type: ignore[arg-type]
    assert status is not None, refused.value
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    found: dict[str, str] = {}
    retry_seconds = None
    for detail in status.details:
        if detail.Unpack(info):
            found = {"reason": info.reason, **info.metadata}
        elif detail.Unpack(retry):
            retry_seconds = retry.retry_delay.seconds
    return refused.value.code(), found, retry_seconds  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("bearer", "reason"),
    [
        pytest.param(None, "TOKEN_MISSING", id="no token"),
        pytest.param("not.a.jwt", "TOKEN_INVALID", id="malformed"),
        pytest.param("foreign", "TOKEN_INVALID", id="signed by another key"),
        pytest.param("expired", "TOKEN_EXPIRED", id="expired"),
    ],
)
def test_a_bad_token_is_401_from_envoy_and_never_reaches_the_gateway(
    edge_stack: Stack, bearer: str | None, reason: str
) -> None:
    tokens = {"foreign": foreign_token(edge_stack), "expired": token(edge_stack, ttl=-120)}
    bearer = tokens.get(bearer or "", bearer)
    headers = {"Authorization": f"Bearer {bearer}"} if bearer else {}
    before = upstream_requests(edge_stack)
    with httpx.Client(base_url=edge_stack.url, timeout=10) as client:
        for method, path in (("POST", "/api/v1/jobs"), ("GET", "/api/v1/jobs"), ("GET", "/api/v1/pools")):
            resp = client.request(method, path, headers=headers, json=job_spec() if method == "POST" else None)
            assert resp.status_code == 401, resp.text
            body = resp.json()
            assert body["code"] == 16 and error_info(body)["reason"] == reason, body
    code, info, _ = grpc_refusal(edge_stack, bearer)
    assert code == grpc.StatusCode.UNAUTHENTICATED and info["reason"] == reason
    assert upstream_requests(edge_stack) == before


def test_the_console_and_a_valid_token_still_pass(edge_stack: Stack) -> None:
    with httpx.Client(base_url=edge_stack.url, timeout=10) as client:
        assert client.get("/console/").status_code != 401
    assert Api(edge_stack.url, token(edge_stack, "initech")).call("GET", "/api/v1/pools").status_code == 200


def test_a_tenant_over_its_submit_rate_gets_429_while_another_tenant_and_its_reads_go_on(edge_stack: Stack) -> None:
    acme = Api(edge_stack.url, token(edge_stack, "acme"))
    globex = Api(edge_stack.url, token(edge_stack, "globex"))
    answers = [acme.call("POST", "/api/v1/jobs", json=job_spec(f"rate-{i}", ["true"])) for i in range(SUBMIT_BURST + 2)]
    statuses = [a.status_code for a in answers]
    assert statuses[:SUBMIT_BURST] == [200] * SUBMIT_BURST, [a.text for a in answers]
    assert statuses[SUBMIT_BURST:] == [429, 429]
    refused = answers[-1]
    assert int(refused.headers["retry-after"]) >= 1
    body = refused.json()
    assert body["code"] == 8 and error_info(body)["reason"] == "RATE_LIMITED", body
    # Native gRPC shares the bucket: RESOURCE_EXHAUSTED with the reason and when to retry.
    code, info, retry = grpc_refusal(edge_stack, token(edge_stack, "acme"))
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and info["reason"] == "RATE_LIMITED" and retry
    # Another tenant's submits, and acme's own reads, are not touched.
    assert globex.call("POST", "/api/v1/jobs", json=job_spec("other-tenant", ["true"])).status_code == 200
    assert acme.call("GET", "/api/v1/jobs").status_code == 200


def test_a_submit_beyond_the_in_flight_bound_is_shed_with_429_overloaded(edge_stack: Stack) -> None:
    initech = Api(edge_stack.url, token(edge_stack, "initech"))
    # Both queueing replicas stopped (the standby would otherwise take over within the lease).
    queueing = [edge_stack.procs[n].pid for n in ("queueing-1", "queueing-2")]
    stats = "/stats?filter=jobmesh_gateway_submits.upstream_rq_active$"
    before = upstream_requests(edge_stack)
    # Queueing stopped: the bound's worth of submits wait in the gateway for their write.
    for pid in queueing:
        os.kill(pid, signal.SIGSTOP)
    try:
        with concurrent.futures.ThreadPoolExecutor(INFLIGHT) as pool:
            held = [
                pool.submit(initech.call, "POST", "/api/v1/jobs", json=job_spec(f"held-{i}", ["true"]))
                for i in range(INFLIGHT)
            ]
            wait_for(
                lambda: f": {INFLIGHT}" in admin_get(edge_stack.envoy_admin_socket, stats)[1],
                what="submits in flight",
            )
            shed = initech.call("POST", "/api/v1/jobs", json=job_spec("one-too-many", ["true"]))
            code, info, retry = grpc_refusal(edge_stack, token(edge_stack, "initech"))
            for pid in queueing:
                os.kill(pid, signal.SIGCONT)
            held_statuses = [f.result(timeout=30).status_code for f in held]
    finally:
        for pid in queueing:
            os.kill(pid, signal.SIGCONT)
    assert shed.status_code == 429, shed.text
    assert int(shed.headers["retry-after"]) >= 1
    assert error_info(shed.json())["reason"] == "OVERLOADED"
    assert code == grpc.StatusCode.RESOURCE_EXHAUSTED and info["reason"] == "OVERLOADED" and retry
    # The shed ones never reached the gateway; the held ones were answered once queueing was back.
    assert upstream_requests(edge_stack) == before + INFLIGHT
    assert all(s in (200, 503, 504) for s in held_statuses), held_statuses
    names = {j["spec"]["name"] for j in initech.call("GET", "/api/v1/jobs", params={"page_size": 500}).json()["jobs"]}
    assert "one-too-many" not in names
