"""Test helpers: a REST client for the public API, tokens, and waiting for job states."""

from __future__ import annotations

import asyncio
import itertools
import os
import shutil
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import psutil

from devtools.launcher import REPO, Ports, Stack
from libs.auth import issue_token
from libs.config import load_config
from libs.etcd.client import Etcd, cmp_missing, op_put
from libs.keys import Keys

FIXTURE_CONFIG = REPO / "tests" / "fixtures" / "mesh.toml"
TERMINAL = {"JOB_STATE_SUCCEEDED", "JOB_STATE_FAILED", "JOB_STATE_CANCELLED"}
FAST_FAILOVER = {"JOBMESH_WORKER_LEASE_TTL": "3", "JOBMESH_LEADER_TTL": "3"}


def start_stack(
    data_dir: Path, env: dict[str, str] | None = None, config: Path = FIXTURE_CONFIG, etcd_members: int = 1
) -> Stack:
    """A whole stack on free ports; a second try on fresh ports if a port was taken in between."""
    for attempt in range(2):
        ports = Ports.free(etcd_members)
        stack = Stack(data_dir=data_dir, config_path=config, ports=ports, env=dict(env or FAST_FAILOVER))
        try:
            stack.start()
            return stack
        except (RuntimeError, TimeoutError):
            stack.stop()
            if attempt == 1:
                raise
            for name in stack.etcd_names():  # its members remember the ports they were made with
                shutil.rmtree(data_dir / name, ignore_errors=True)
    raise AssertionError("unreachable")


def start_replicas(data_dir: Path, names: tuple[str, ...], kinds: tuple[str, ...], ttl: int = 2) -> Stack:
    """etcd and the named processes only (e.g. the two replicas of an active/standby service), each healthy and
    each of `kinds` with a leader; a short lease (`ttl` s) for failover tests."""
    stack = Stack(
        data_dir=data_dir, config_path=FIXTURE_CONFIG, ports=Ports.free(), env={"JOBMESH_LEADER_TTL": str(ttl)}
    )
    try:
        stack.start_etcd()
        stack.wait_etcd(30)
        for name in names:
            stack.start_named(name)
        for name in names:
            stack.wait_healthy(name, 30)
        for kind in kinds:
            stack.wait_leader(kind, 30)
    except BaseException:
        stack.stop()
        raise
    return stack


def resume_and_stop(stack: Stack) -> None:
    """Stops a stack of `start_replicas`, SIGCONT first to any process a test left stopped."""
    for proc in stack.procs.values():
        if proc.alive():
            os.kill(proc.pid, signal.SIGCONT)
    stack.stop()


def without_sandbox(config: Path, dest: Path) -> Path:
    """A copy of `config` whose pools run jobs unsandboxed: for tests whose jobs leave marks on the host's file
    system as the witness of how often they ran, which a sandboxed job cannot reach (docs/security.md)."""
    text = config.read_text().replace("[[pools]]\n", '[[pools]]\nsandbox = "none"\n')
    path = dest / f"{config.stem}-unsandboxed.toml"
    path.write_text(text)
    return path


def stored_value(stack: Stack, key: str) -> bytes | None:
    """The value of one etcd key of a stack, as stored now (None: absent)."""

    async def read() -> bytes | None:
        etcd = stack.etcd_client()
        try:
            kv = await etcd.get(key)
            return None if kv is None else kv.value
        finally:
            await etcd.close()

    return asyncio.run(read())


async def stand_in_quota_term(etcd: Etcd, prefix: str = "/jobmesh") -> int:
    """For a test or bench that plays the gateway without a quota service: a quota leader key (no lease: it stays)
    whose create revision is the admission fence its enqueues carry (the current key's, if one exists)."""
    key = Keys(prefix).leader("quota")
    await etcd.txn([cmp_missing(key)], [op_put(key, b"stand-in")])
    kv = await etcd.get(key)
    assert kv is not None
    return kv.create_revision


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


def worker_pid(worker_id: str) -> int:
    """The pid of a local worker agent, found by the id its provider gave it."""
    for proc in psutil.process_iter(["pid"]):
        try:
            if proc.environ().get("JOBMESH_WORKER_ID") == worker_id:
                return int(proc.info["pid"])
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    raise AssertionError(f"no process for worker {worker_id}")


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


@dataclass
class Copies:
    """Samples the host's process table every ~50 ms for the processes whose command line holds `marker`: how
    many were alive at each sample and, for each pid, when it started (the kernel's start time), when it was last
    seen and the first sample that no longer saw it. Times are wall-clock seconds (time.time())."""

    marker: str
    most_at_once: int = 0
    seen: dict[int, list[float]] = field(default_factory=dict)  # pid: [started, last seen]
    gone: dict[int, float] = field(default_factory=dict)  # pid: the first sample without it
    samples: int = 0
    longest_gap: float = 0.0  # seconds between two samples, at most
    _last_sample: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def sample(self) -> None:
        alive: dict[int, float] = {}
        for proc in psutil.process_iter(["cmdline"]):
            cmdline = proc.info["cmdline"] or []
            # The job's shell (not its `sleep`, which shares nothing with it but the process group).
            if cmdline[:2] == ["sh", "-c"] and self.marker in cmdline[2]:
                started = _started_at(proc.pid)
                if started is not None:
                    alive[proc.pid] = started
        now = time.time()
        for pid, started in alive.items():
            self.seen.setdefault(pid, [started, now])[1] = now
        for pid in self.seen.keys() - alive.keys() - self.gone.keys():
            self.gone[pid] = now
        self.most_at_once = max(self.most_at_once, len(alive))
        if self.samples:
            self.longest_gap = max(self.longest_gap, now - self._last_sample)
        self._last_sample = now
        self.samples += 1

    def overlapped(self) -> bool:
        """Whether a copy started (by the kernel's clock) before an earlier one was last seen alive."""
        spans = sorted(self.seen.values())
        return any(later[0] < earlier[1] for earlier, later in itertools.pairwise(spans))

    def watch(self, seconds: float) -> threading.Thread:
        def run() -> None:
            end = time.monotonic() + seconds
            while not self._stop.is_set() and time.monotonic() < end:
                self.sample()
                time.sleep(0.05)

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        self._stop.set()

    def lifetimes(self) -> list[float]:
        """Seconds each copy ran (from its start to the last sample that saw it), in the order they started."""
        return [last - started for started, last in sorted(self.seen.values())]

    def first_gone_at(self) -> float | None:
        """The first sample that no longer saw the first copy: it had died by then."""
        if not self.seen:
            return None
        first = min(self.seen, key=lambda pid: self.seen[pid][0])
        return self.gone.get(first)


def _started_at(pid: int) -> float | None:
    """When a process started, on the wall clock, to the kernel's tick (psutil's create_time adds an uptime to a
    boot time rounded to the second, so it can be a second off time.time())."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
    except OSError:
        return None
    ticks_after_boot = int(fields[19]) / os.sysconf("SC_CLK_TCK")
    return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - ticks_after_boot)
