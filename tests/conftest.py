"""Shared fixtures: one real stack (etcd, services, workers, Envoy) per test session for the e2e tier."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from devtools.launcher import Stack
from tests.helpers import Api, start_stack, token, wait_for


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    s = start_stack(tmp_path_factory.mktemp("stack"))
    try:
        api = Api(s.url, token(s))
        wait_for(
            lambda: api.call("GET", "/api/v1/pools").json()["pools"][0]["idle_workers"] >= 3,
            what="static workers to register",
        )
        yield s
    finally:
        s.stop()


@pytest.fixture()
def acme(stack: Stack) -> Api:
    return Api(stack.url, token(stack, "acme"))


@pytest.fixture()
def globex(stack: Stack) -> Api:
    return Api(stack.url, token(stack, "globex"))


@pytest.fixture()
def admin(stack: Stack) -> Api:
    return Api(stack.url, token(stack, "initech", admin=True))


@pytest.fixture()
def fresh_stack(tmp_path: Path) -> Iterator[Stack]:
    """A stack of its own, for tests that kill processes."""
    s = start_stack(tmp_path / "stack")
    try:
        yield s
    finally:
        s.stop()
