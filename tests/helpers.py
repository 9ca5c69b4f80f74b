"""Test helpers: a REST client for the public API, tokens, and waiting for job states."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from libs.auth import issue_token
from libs.config import load_config
from libs.launcher import REPO, Ports, Stack

FIXTURE_CONFIG = REPO / "tests" / "fixtures" / "mesh.toml"
TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}
FAST_FAILOVER = {"JOBMESH_WORKER_LEASE_TTL": "3", "JOBMESH_LEADER_TTL": "3"}


def start_stack(data_dir: Path, env: dict[str, str] | None = None, config: Path = FIXTURE_CONFIG) -> Stack:
    """A whole stack on free ports; a second try on fresh ports if a port was taken in between."""
    for attempt in range(2):
        stack = Stack(data_dir=data_dir, config_path=config, ports=Ports.free(), env=dict(env or FAST_FAILOVER))
        try:
            stack.start()
            return stack
        except (RuntimeError, TimeoutError):
            stack.stop()
            if attempt == 1:
                raise
    raise AssertionError("unreachable")


def without_sandbox(config: Path, dest: Path) -> Path:
    """A copy of `config` whose pools run jobs unsandboxed: for tests whose jobs leave marks on the host's file
    system as the witness of how often they ran, which a sandboxed job cannot reach (docs/security.md)."""
    text = config.read_text().replace("[[pools]]\n", '[[pools]]\nsandbox = "none"\n')
    path = dest / f"{config.stem}-unsandboxed.toml"
    path.write_text(text)
    return path


def token(stack: Stack, tenant: str = "acme", admin: bool = False, ttl: int = 3600) -> str:
    config = load_config(stack.config_path)
    return issue_token(
        stack.data_dir, tenant=tenant, issuer=config.issuer, audience=config.audience, admin=admin, ttl=ttl
    )


def job_spec(name: str = "job", command: list[str] | None = None, **extra: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "name": name,
        "command": command or ["sh", "-c", "echo hi"],
        "resources": {"cpu_millis": 100, "memory_mb": 64},
    }
    spec.update(extra)
    return spec


@dataclass
class Api:
    """The public REST API as a tenant sees it."""

    base: str
    token: str

    def _client(self) -> httpx.Client:
        return httpx.Client(base_url=self.base, headers={"Authorization": f"Bearer {self.token}"}, timeout=30.0)

    def call(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        with self._client() as client:
            return client.request(method, path, **kwargs)

    def submit(self, spec: dict[str, Any]) -> dict[str, Any]:
        resp = self.call("POST", "/api/v1/jobs", json=spec)
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def get(self, job_id: str) -> dict[str, Any]:
        resp = self.call("GET", f"/api/v1/jobs/{job_id}")
        assert resp.status_code == 200, resp.text
        return resp.json()  # type: ignore[no-any-return]

    def cancel(self, job_id: str) -> httpx.Response:
        return self.call("POST", f"/api/v1/jobs/{job_id}:cancel", json={})

    def wait_state(self, job_id: str, states: set[str], timeout: float = 60.0) -> dict[str, Any]:
        end = time.monotonic() + timeout
        while True:
            job = self.get(job_id)
            if job["state"] in states:
                return job
            if time.monotonic() > end:
                raise AssertionError(f"job {job_id} stayed {job['state']}: {job}")
            time.sleep(0.1)

    def wait_terminal(self, job_id: str, timeout: float = 60.0) -> dict[str, Any]:
        return self.wait_state(job_id, TERMINAL, timeout)


def wait_for(predicate: Any, timeout: float = 30.0, interval: float = 0.2, what: str = "condition") -> Any:
    end = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


def pool_view(api: Api, pool_id: str) -> dict[str, Any]:
    """One pool as `GET /api/v1/pools` shows it."""
    return next(p for p in api.call("GET", "/api/v1/pools").json()["pools"] if p["pool_id"] == pool_id)


def stack_with_idle_worker(data_dir: Path, config: Path, pool_id: str) -> Iterator[Stack]:
    """A module fixture's body: a stack on `config`, yielded once `pool_id` has an idle worker, then stopped."""
    stack = start_stack(data_dir, config=config)
    try:
        api = Api(stack.url, token(stack))
        wait_for(lambda: pool_view(api, pool_id)["idle_workers"] >= 1, what=f"an idle worker in {pool_id}")
        yield stack
    finally:
        stack.stop()
