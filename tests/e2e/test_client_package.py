"""The client package on its own: its wheel builds from clients/python alone, installs into a fresh venv with
nothing else from the repository, and that venv's `jobmesh` and SDK work against the real stack."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.launcher import Stack
from tests.helpers import token

REPO = Path(__file__).resolve().parents[2]


def run(*args: str | Path, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    return subprocess.run(
        [str(a) for a in args], cwd=cwd, env={**clean, **(env or {})}, capture_output=True, text=True, timeout=600
    )


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    work = tmp_path_factory.mktemp("client-package")
    # Only the package's own directory, copied: nothing else of the repository is reachable from the build.
    src = shutil.copytree(
        REPO / "clients" / "python", work / "src", ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__")
    )
    built = run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-w", "dist", src, cwd=work)
    assert built.returncode == 0, built.stderr
    wheels = list((work / "dist").glob("jobmesh_client-*.whl"))
    assert len(wheels) == 1
    base = getattr(sys, "_base_executable", sys.executable)
    assert run(base, "-m", "venv", "venv", cwd=work).returncode == 0
    # pip's download cache (~/.cache/pip) is kept between runs: a second run installs without downloading.
    installed = run(work / "venv" / "bin" / "pip", "install", "-q", wheels[0], cwd=work)
    assert installed.returncode == 0, installed.stderr
    return work


def test_the_wheel_ships_typed_stubs_and_nothing_of_the_mesh(fresh_venv: Path) -> None:
    python = fresh_venv / "venv" / "bin" / "python"
    probe = (
        "import importlib.util as u, jobmesh, pathlib;"
        "root = pathlib.Path(jobmesh.__file__).parent;"
        "print((root / 'py.typed').exists(), (root / 'gateway/v1/gateway_pb2_grpc.pyi').exists(),"
        " u.find_spec('libs') is None, u.find_spec('services') is None)"
    )
    result = run(python, "-c", probe, cwd=fresh_venv)
    assert result.stdout.split() == ["True", "True", "True", "True"], result.stderr


def test_the_fresh_venv_runs_a_job_with_the_cli_and_the_sdk(fresh_venv: Path, stack: Stack) -> None:
    env = {"JOBMESH_URL": stack.url, "JOBMESH_TOKEN": token(stack, "acme")}
    jobmesh = fresh_venv / "venv" / "bin" / "jobmesh"
    command = ["sh", "-c", "echo from-a-fresh-venv"]
    submitted = run(jobmesh, "submit", "--name", "fresh", "--wait", "--", *command, cwd=fresh_venv, env=env)
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stderr.split()[1]  # "submitted <id>"
    assert run(jobmesh, "logs", job_id, cwd=fresh_venv, env=env).stdout == "from-a-fresh-venv\n"
    sync = (
        "import jobmesh\n"
        "c = jobmesh.Client()\n"
        "j = c.submit(['sh', '-c', 'exit 5'], name='sdk-fresh', cpu_millis=100, memory_mb=64)\n"
        "print(c.wait(j.job_id, timeout=60).exit_code)\n"
    )
    # `jobmesh.aio` after a plain `import jobmesh`, as the docs write it.
    aio = (
        "import asyncio, jobmesh\n"
        "async def main():\n"
        "    async with jobmesh.aio.Client() as c:\n"
        "        j = await c.submit(['true'], name='aio-fresh', cpu_millis=100, memory_mb=64)\n"
        "        states = [jobmesh.JobState.Name(x.state) async for x in c.watch(j.job_id)]\n"
        "    print(states[-1])\n"
        "asyncio.run(main())\n"
    )
    for script, printed in ((sync, "5"), (aio, "JOB_STATE_SUCCEEDED")):
        result = run(fresh_venv / "venv" / "bin" / "python", "-c", script, cwd=fresh_venv, env=env)
        assert result.stdout.strip() == printed, result.stderr
    assert run(jobmesh, "get", "0000000000nosuchjob0000", cwd=fresh_venv, env=env).returncode == 4
