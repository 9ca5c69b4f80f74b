"""Join tokens for static workers started elsewhere, on real grpc.aio servers (the pool-manager's mTLS port and
its server-only TLS join port) and a real etcd: a token admits exactly one worker once, to the pool it names, and
the certificate it buys speaks for that worker only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest
import pytest_asyncio
from prometheus_client import CollectorRegistry

from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from libs.authz import AuthorizationInterceptor
from libs.clock import SystemClock
from libs.config import load_config
from libs.etcd.client import Etcd
from libs.interceptors import ServerInterceptor
from libs.pki import SERVICE_LIFETIME, Bundle, service_id
from services.poolmanager.join import JoinTokens, WorkerJoinServicer, start_join_server
from services.poolmanager.pools import PoolsServicer
from services.worker.join import identity_of, join_pool, renew_certificate
from tests.helpers import FIXTURE_CONFIG
from tests.integration.mtls_mesh import KEYS, Mesh, connect_request, reason_of, refused, register


@dataclass
class JoinPort:
    """The join port, and the pool-manager's PoolManagerService (CreateJoinToken) on an mTLS port of its own."""

    port: int
    admin_port: int
    ca_pem: bytes
    operator: Bundle


@pytest_asyncio.fixture()
async def join_port(mesh: Mesh, etcd: Etcd) -> AsyncIterator[JoinPort]:
    config = load_config(FIXTURE_CONFIG)
    tokens = JoinTokens(etcd, KEYS, config, SystemClock())
    metrics = CollectorRegistry()
    pools = PoolsServicer(etcd, KEYS, config, None, None, None, None, tokens)  # type: ignore[arg-type]
    admin = grpc.aio.server(
        interceptors=[AuthorizationInterceptor("poolmanager", metrics), ServerInterceptor("poolmanager", metrics)]
    )
    poolmanager_pb2_grpc.add_PoolManagerServiceServicer_to_server(pools, admin)
    own = mesh.ca.issue(service_id("poolmanager"), SERVICE_LIFETIME)
    admin_port = admin.add_secure_port(
        "127.0.0.1:0", grpc.ssl_server_credentials([(own.key_pem, own.cert_pem)], mesh.ca.cert_pem, True)
    )
    await admin.start()
    join_metrics = CollectorRegistry()
    server, port = await start_join_server(
        "127.0.0.1",
        0,
        grpc.ssl_server_credentials([(own.key_pem, own.cert_pem)]),
        WorkerJoinServicer(tokens, mesh.ca),
        [AuthorizationInterceptor("poolmanager", join_metrics), ServerInterceptor("poolmanager", join_metrics)],
    )
    try:
        yield JoinPort(port, admin_port, mesh.ca.cert_pem, mesh.service("operator"))
    finally:
        await server.stop(0)
        await admin.stop(0)


async def create_token(join: JoinPort, caller: Bundle, pool_id: str = "static-general") -> str:
    creds = grpc.ssl_channel_credentials(join.ca_pem, caller.key_pem, caller.cert_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{join.admin_port}", creds) as ch:
        stub = poolmanager_pb2_grpc.PoolManagerServiceStub(ch)
        resp = await stub.CreateJoinToken(pm.CreateJoinTokenRequest(pool_id=pool_id, ttl_seconds=60))
    return resp.token


def bundle_of(directory: Path) -> Bundle:
    return Bundle(
        (directory / "worker.crt").read_bytes(),
        (directory / "worker.key").read_bytes(),
        (directory / "ca.crt").read_bytes(),
    )


@pytest.mark.asyncio
async def test_a_join_token_admits_one_worker_once_and_its_certificate_speaks_for_that_worker_only(
    mesh: Mesh,
    etcd: Etcd,
    join_port: JoinPort,
    tmp_path: Path,
) -> None:
    token = await create_token(join_port, join_port.operator)
    stored, _, _ = await etcd.get_prefix("/jobmesh/join-tokens/")
    assert len(stored) == 1 and token.encode() not in stored[0].key.encode() + stored[0].value  # only its hash

    joined = await join_pool(f"127.0.0.1:{join_port.port}", token, join_port.ca_pem, tmp_path / "w")

    assert joined.pool_id == "static-general"
    assert identity_of(joined.cert.read_bytes()) == ("static-general", joined.worker_id)
    assert (joined.key.stat().st_mode & 0o777) == 0o600
    assert (await etcd.get_prefix("/jobmesh/join-tokens/"))[0] == []  # consumed
    # It registers under the id it was given, and under no other.
    async with mesh.channel(bundle_of(tmp_path / "w")) as ch:
        session = await register(mesh, ch, connect_request(joined.worker_id))
        assert session.worker.worker_id == joined.worker_id
        session.call.cancel()
        stub = poolmanager_pb2_grpc.WorkerRegistryServiceStub(ch)
        err = await refused(stub.Connect(connect_request("static-general-other")).read())
        assert reason_of(err) == "WORKER_IDENTITY_MISMATCH"
    # The token is spent.
    with pytest.raises(grpc.aio.AioRpcError) as again:
        await join_pool(f"127.0.0.1:{join_port.port}", token, join_port.ca_pem, tmp_path / "again")
    assert again.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert reason_of(again.value) == "JOIN_TOKEN_INVALID"
    assert not (tmp_path / "again" / "worker.crt").exists()


@pytest.mark.asyncio
async def test_two_joins_racing_with_one_token_admit_one_worker(
    mesh: Mesh,
    join_port: JoinPort,
    tmp_path: Path,
) -> None:
    token = await create_token(join_port, join_port.operator)
    addr = f"127.0.0.1:{join_port.port}"

    outcomes = await asyncio.gather(
        *(join_pool(addr, token, join_port.ca_pem, tmp_path / f"w{i}") for i in range(4)), return_exceptions=True
    )

    assert sum(not isinstance(o, BaseException) for o in outcomes) == 1
    for failed in (o for o in outcomes if isinstance(o, grpc.aio.AioRpcError)):
        assert reason_of(failed) == "JOIN_TOKEN_INVALID"


@pytest.mark.asyncio
async def test_a_made_up_token_or_a_non_operator_gets_nothing(
    mesh: Mesh,
    join_port: JoinPort,
    tmp_path: Path,
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as made_up:
        await join_pool(f"127.0.0.1:{join_port.port}", "not-a-token", join_port.ca_pem, tmp_path / "w")
    assert reason_of(made_up.value) == "JOIN_TOKEN_INVALID"
    for caller in (mesh.service("gateway"), mesh.worker("w-1")):
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await create_token(join_port, caller)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    # Nothing but Join answers on the join port.
    creds = grpc.ssl_channel_credentials(join_port.ca_pem)
    async with grpc.aio.secure_channel(f"127.0.0.1:{join_port.port}", creds) as ch:
        err = await refused(poolmanager_pb2_grpc.WorkerRegistryServiceStub(ch).Heartbeat(pm.HeartbeatRequest()))
        assert err.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.mark.asyncio
async def test_a_joined_worker_renews_its_own_certificate_and_no_one_elses(
    mesh: Mesh,
    join_port: JoinPort,
    tmp_path: Path,
) -> None:
    token = await create_token(join_port, join_port.operator)
    joined = await join_pool(f"127.0.0.1:{join_port.port}", token, join_port.ca_pem, tmp_path / "w")
    old_key = joined.key.read_bytes()

    async with mesh.channel(bundle_of(tmp_path / "w")) as ch:
        await renew_certificate(ch, joined.cert, joined.key)

    assert joined.key.read_bytes() != old_key
    assert identity_of(joined.cert.read_bytes()) == ("static-general", joined.worker_id)
    async with mesh.channel(bundle_of(tmp_path / "w")) as ch:  # the new pair works
        session = await register(mesh, ch, connect_request(joined.worker_id))
        session.call.cancel()
    async with mesh.channel(mesh.service("gateway")) as ch:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await renew_certificate(ch, tmp_path / "g.crt", tmp_path / "g.key")
    assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
    assert not (tmp_path / "g.crt").exists()
