"""Fixtures of the integration tier's mTLS attack tests: a CA, a real etcd, and the mesh stage (mtls_mesh.py)."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from devtools.launcher import Ports, Stack
from libs.etcd.client import Etcd
from libs.pki import CertificateAuthority
from tests.helpers import FIXTURE_CONFIG
from tests.integration.mtls_mesh import Mesh, serve_mesh


@pytest.fixture(scope="module")
def ca() -> CertificateAuthority:
    return CertificateAuthority.create()


@pytest.fixture()
def etcd_stack(tmp_path: Path) -> Iterator[Stack]:
    stack = Stack(data_dir=tmp_path / "stack", config_path=FIXTURE_CONFIG, ports=Ports.free(), env={})
    try:
        stack.start_etcd()
        stack.wait_etcd(30)
        yield stack
    finally:
        stack.stop()


@pytest_asyncio.fixture()
async def etcd(etcd_stack: Stack) -> AsyncIterator[Etcd]:
    client = etcd_stack.etcd_client()
    try:
        yield client
    finally:
        await client.close()


@pytest_asyncio.fixture()
async def mesh(etcd: Etcd, ca: CertificateAuthority) -> AsyncIterator[Mesh]:
    async with serve_mesh(etcd, ca) as served:
        yield served
