"""The client package against the real stack through Envoy: the `jobmesh` command, and the SDK sync and async."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import jobmesh
import jobmesh.aio
from devtools.launcher import Stack
from jobmesh import errors
from jobmesh.common.v1 import types_pb2 as t
from tests.helpers import token

JOBMESH = str(Path(sys.executable).parent / "jobmesh")


def cli(stack: Stack, *args: str, tenant: str = "acme", tok: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "JOBMESH_URL": stack.url, "JOBMESH_TOKEN": tok or token(stack, tenant)}
    return subprocess.run([JOBMESH, *args], env=env, capture_output=True, text=True, timeout=120, check=False)


def test_cli_submit_wait_logs_list_and_cancel(stack: Stack) -> None:
    ok = cli(stack, "-o", "json", "submit", "--name", "cli-ok", "--wait", "--", "sh", "-c", "echo hello-from-cli")
    assert ok.returncode == 0, ok.stderr
    job = json.loads(ok.stdout)
    assert job["state"] == "JOB_STATE_SUCCEEDED"
    assert cli(stack, "logs", job["job_id"]).stdout == "hello-from-cli\n"

    failed = cli(stack, "submit", "--wait", "--env", "WHO=cli", "--", "sh", "-c", 'echo "no $WHO" >&2; exit 7')
    assert failed.returncode == 1
    assert "FAILED" in failed.stdout and "no cli" in failed.stdout  # the message ends with stderr's tail

    listed = cli(stack, "-o", "json", "list", "--limit", "500")
    assert job["job_id"] in {j["job_id"] for j in json.loads(listed.stdout)}
    assert job["job_id"] in cli(stack, "list").stdout

    sleeper = cli(stack, "submit", "--", "sleep", "60").stdout.strip()
    cancelled = cli(stack, "cancel", sleeper)
    assert cancelled.returncode == 0 and "CANCELLED" in cancelled.stdout
    assert cli(stack, "-o", "yaml", "get", sleeper).stdout.count("JOB_STATE_CANCELLED") == 1


def test_cli_dry_run_creates_nothing(stack: Stack) -> None:
    before = cli(stack, "-o", "json", "list", "--limit", "500", tenant="initech").stdout
    answer = cli(stack, "-o", "json", "submit", "--dry-run", "--max-runtime", "60", "--", "true", tenant="initech")
    assert answer.returncode == 0, answer.stderr
    body = json.loads(answer.stdout)
    assert body["admission"]["admitted"] is True and body["cost"]["low"]["currency"] == "USD"
    table = cli(stack, "submit", "--dry-run", "--", "true", tenant="initech").stdout
    assert "admitted" in table and "nothing was created" in table
    assert cli(stack, "-o", "json", "list", "--limit", "500", tenant="initech").stdout == before


@pytest.mark.parametrize(
    "args, code, says",
    [
        (["frobnicate"], 2, "No such command"),
        (["submit", "--name", "x"], 2, "no command"),
        (["submit", "--env", "NOEQUALS", "--", "true"], 2, "KEY=VALUE"),
        (["submit", "-f", "/nonexistent/spec.yaml", "--", "true"], 2, "cannot read"),
        (["get", "0000000000nosuchjob0000"], 4, "JOB_NOT_FOUND: "),
        (["submit", "--cpu", "900000", "--", "true"], 2, "UNSCHEDULABLE: "),
    ],
)
def test_cli_bad_input_is_one_line_and_an_exit_code(stack: Stack, args: list[str], code: int, says: str) -> None:
    result = cli(stack, *args)
    assert result.returncode == code, (result.stdout, result.stderr)
    assert says in result.stderr
    assert "Traceback" not in result.stderr


def test_cli_without_a_valid_token_exits_3(stack: Stack) -> None:
    result = cli(stack, "list", tok="not-a-jwt")
    assert result.returncode == 3
    assert result.stderr.startswith("TOKEN_INVALID: ")


def test_cli_help_version_and_the_dev_verbs_still_work(stack: Stack) -> None:
    for verb in ("submit", "get", "list", "cancel", "logs", "watch", "quota", "burst", "pools", "cost"):
        assert cli(stack, verb, "--help").returncode == 0
    assert "0.1.0" in cli(stack, "--version").stdout
    minted = subprocess.run(
        [JOBMESH, "--data-dir", str(stack.data_dir), "--config", str(stack.config_path), "token", "--tenant", "acme"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    assert cli(stack, "quota", tok=minted).returncode == 0
    assert "static-general" in cli(stack, "pools").stdout


def test_sdk_submit_wait_watch_logs_and_errors(stack: Stack) -> None:
    with jobmesh.Client(stack.url, token(stack, "globex")) as client:
        job = client.submit(["sh", "-c", "echo sdk-out; sleep 1"], name="sdk", cpu_millis=100, memory_mb=64)
        states = [j.state for j in client.watch(job.job_id)]
        assert states[-1] == t.JOB_STATE_SUCCEEDED and t.JOB_STATE_RUNNING in states
        assert client.wait(job.job_id, timeout=30).state == t.JOB_STATE_SUCCEEDED
        assert "".join(client.logs(job.job_id)) == "sdk-out\n"
        assert job.job_id in {j.job_id for j in client.list()}
        first = client.submit(["true"], name="same", cpu_millis=100, memory_mb=64, idempotency_key="sdk-key-1")
        again = client.submit(["true"], name="same", cpu_millis=100, memory_mb=64, idempotency_key="sdk-key-1")
        assert again.job_id == first.job_id  # the same key answers the first job
        with pytest.raises(errors.JobNotFound) as missing:
            client.get("0000000000nosuchjob0000")
        assert isinstance(missing.value, errors.NotFound) and missing.value.reason == "JOB_NOT_FOUND"
        with pytest.raises(errors.InvalidArgument) as bad:
            client.submit([], name="", cpu_millis=100, memory_mb=64)
        assert bad.value.field
        assert client.quota().tenant_id == "globex"
        with pytest.raises(errors.TenantForbidden):
            client.quota("acme")
        dry = client.dry_run(["true"], name="d", cpu_millis=100, memory_mb=64, max_runtime_seconds=60)
        assert dry.admission.admitted and dry.start.position >= 1
    with jobmesh.Client(stack.url, "not-a-jwt") as anonymous, pytest.raises(errors.Unauthenticated):
        anonymous.get(job.job_id)


def test_sdk_async_submit_wait_watch_and_follow_logs(stack: Stack) -> None:
    async def scenario() -> None:
        async with jobmesh.aio.Client(stack.url, token(stack, "globex")) as client:
            script = "for i in 1 2 3; do echo async-$i; sleep 0.4; done"
            job = await client.submit(["sh", "-c", script], name="async", cpu_millis=100, memory_mb=64)
            followed = "".join([chunk async for chunk in client.logs(job.job_id, follow=True)])
            assert followed == "async-1\nasync-2\nasync-3\n"
            states = [j.state async for j in client.watch(job.job_id)]
            assert states == [t.JOB_STATE_SUCCEEDED]  # already over: the job as it ended
            assert (await client.wait(job.job_id)).exit_code == 0
            assert job.job_id in [j.job_id async for j in client.list(state="SUCCEEDED")]
            with pytest.raises(errors.JobNotFound):
                await client.cancel("0000000000nosuchjob0000")

    asyncio.run(scenario())
