"""Attacks a tenant's job tries against its worker, each run by the real executor in the real sandbox (bubblewrap,
its own uid, namespaces and cgroup), each of which must fail; and the ordinary jobs that must keep working."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import psutil
import pytest

from devtools.launcher import REPO, free_port
from services.worker.executor import ExecSpec, JobExecutor
from services.worker.sandbox import JobSandbox, Sandbox, SandboxError, SandboxSettings

PIDS_MAX = 64


@contextmanager
def sandbox_of(settings: SandboxSettings) -> Iterator[Sandbox]:
    """A sandbox with `settings`, closed after; the test is skipped on a machine that cannot sandbox jobs."""
    try:
        box = Sandbox.for_this_machine(settings)
    except SandboxError as exc:
        if os.environ.get("CI") == "true":
            raise  # CI runs as root with bubblewrap installed (.ci/run): never a silent skip there
        pytest.skip(f"this machine cannot sandbox jobs: {exc}")
    try:
        yield box
    finally:
        box.close()


@contextmanager
def executor_of(tmp_path: Path, sandbox: Sandbox) -> Iterator[JobExecutor]:
    executor = JobExecutor(str(tmp_path / "scratch"), sample_interval=0.05, kill_grace_seconds=0.5, sandbox=sandbox)
    try:
        yield executor
    finally:
        executor.close()


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with sandbox_of(SandboxSettings(pids_max=PIDS_MAX)) as box:
        yield box


@pytest.fixture
def executor(tmp_path: Path, sandbox: Sandbox) -> Iterator[JobExecutor]:
    with executor_of(tmp_path, sandbox) as executor:
        yield executor


def spec(command: list[str], job_id: str = "job-1", **overrides: object) -> ExecSpec:
    fields: dict[str, object] = {
        "job_id": job_id,
        "attempt": 1,
        "command": command,
        "env": {},
        "working_dir": None,
        "max_runtime_seconds": 20.0,
        "cpu_millis": 1000,
        "memory_mb": 256,
    }
    fields.update(overrides)
    return ExecSpec(**fields)  # type: ignore[arg-type]


def sh(script: str, **overrides: object) -> ExecSpec:
    return spec(["sh", "-c", script], **overrides)


def processes_with(marker: str, name: str | None = None) -> list[int]:
    """Live processes whose command line holds marker (and, given a name, whose name it is), read in one pass so
    a process that ends meanwhile is skipped, not raised."""
    found = []
    for proc in psutil.process_iter(["cmdline", "status", "name"]):
        try:
            if (
                marker in " ".join(proc.info["cmdline"] or [])
                and proc.info["status"] != psutil.STATUS_ZOMBIE
                and (name is None or proc.info["name"] == name)
            ):
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


async def wait_for_output(path: Path, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() and time.monotonic() < deadline:
        await asyncio.sleep(0.02)


# --- ordinary jobs keep working ---


@pytest.mark.asyncio
async def test_a_job_runs_in_its_scratch_dir_as_its_own_uid_with_the_usual_tools(executor: JobExecutor) -> None:
    script = 'id -u; pwd; echo "home=$HOME var=$JOB_VAR"; python3 -c "print(6 * 7)"; sleep 0.01; touch mine'

    result = await executor.run(sh(script, env={"JOB_VAR": "from-spec"}))

    assert (result.reason, result.exit_code) == ("EXITED", 0), result
    uid, cwd, env_line, answer = result.output_tail.splitlines()
    assert int(uid) >= 200_000 and int(uid) != os.getuid()
    assert (cwd, env_line, answer) == ("/scratch", "home=/scratch var=from-spec", "42")


@pytest.mark.asyncio
async def test_the_scratch_dir_is_private_to_the_job_and_removed_with_what_it_wrote(
    executor: JobExecutor, tmp_path: Path
) -> None:
    script = "stat -c '%a %u' /scratch; mkdir -p deep/er; echo x > deep/er/f; chmod 000 deep/er deep"

    result = await executor.run(sh(script))

    assert result.reason == "EXITED", result
    mode, owner = result.output_tail.split()
    assert mode == "700" and int(owner) >= 200_000
    assert list((tmp_path / "scratch").iterdir()) == []  # removed, unreadable subdirectories included


@pytest.mark.asyncio
async def test_two_running_jobs_get_different_uids(executor: JobExecutor) -> None:
    other = executor.sibling()
    first = asyncio.create_task(executor.run(sh("id -u; sleep 1")))
    second = asyncio.create_task(other.run(sh("id -u; sleep 1", job_id="job-2")))

    a, b = await asyncio.gather(first, second)

    assert a.reason == b.reason == "EXITED"
    assert a.output_tail.strip() != b.output_tail.strip()


@pytest.mark.asyncio
async def test_a_working_dir_outside_scratch_is_refused_and_one_inside_is_made(executor: JobExecutor) -> None:
    refused = await executor.run(sh("pwd", working_dir="/etc"))
    inside = await executor.run(sh("pwd", working_dir="/scratch/build/out"))

    assert refused.reason == "START_FAILED" and "/scratch" in refused.message
    assert (inside.reason, inside.output_tail.strip()) == ("EXITED", "/scratch/build/out")


@pytest.mark.asyncio
async def test_cpu_and_memory_are_measured_from_the_cgroup(executor: JobExecutor) -> None:
    code = (
        "import time\nb = bytearray(60 * 1024 * 1024)\nt = time.process_time()\n"
        "while time.process_time() - t < 0.3:\n    pass"
    )

    result = await executor.run(spec(["python3", "-c", code], memory_mb=256))

    assert result.reason == "EXITED", result
    assert result.cpu_seconds > 0.2
    assert result.max_memory_mb >= 55


@pytest.mark.asyncio
async def test_a_running_jobs_use_so_far_is_read_from_its_cgroup(executor: JobExecutor) -> None:
    code = "b = bytearray(60 * 1024 * 1024)\nwhile True:\n    pass"
    task = asyncio.create_task(executor.run(spec(["python3", "-c", code], memory_mb=256)))

    cpu_seconds, peak_mb = 0.0, 0
    deadline = time.monotonic() + 10.0
    while (cpu_seconds < 0.3 or peak_mb < 55) and time.monotonic() < deadline:
        await asyncio.sleep(0.1)
        cpu_seconds, peak_mb = await executor.used_so_far()
    executor.cancel("job-1")
    result = await asyncio.wait_for(task, 10.0)

    assert cpu_seconds >= 0.3 and peak_mb >= 55
    assert result.cpu_seconds >= cpu_seconds


@pytest.mark.asyncio
async def test_the_cpu_quota_holds_a_job_to_its_millicores(executor: JobExecutor) -> None:
    # 200 millicores: one second of wall time buys about 0.2 s of CPU, however hard the job spins.
    code = "import time\nend = time.time() + 1.0\nwhile time.time() < end:\n    pass"

    result = await executor.run(spec(["python3", "-c", code], cpu_millis=200))

    assert result.reason == "EXITED", result
    assert result.cpu_seconds < 0.45


@pytest.mark.asyncio
async def test_cancel_and_timeout_end_a_sandboxed_job(executor: JobExecutor) -> None:
    timed_out = await executor.run(sh("sleep 30", max_runtime_seconds=0.5))
    assert (timed_out.reason, timed_out.exit_code) == ("TIMEOUT", 128 + 15)

    task = asyncio.create_task(executor.run(sh("trap '' TERM; sleep 30", job_id="job-2")))
    await asyncio.sleep(0.5)
    assert executor.cancel("job-2")
    killed = await asyncio.wait_for(task, 10.0)
    assert (killed.reason, killed.exit_code) == ("KILLED", 128 + 9)
    assert "SIGKILL" in killed.message


# --- attacks, each of which must fail ---


@pytest.mark.asyncio
async def test_a_job_cannot_read_a_private_file_of_the_agents_user(executor: JobExecutor, tmp_path: Path) -> None:
    secret = tmp_path / "agent-only"
    secret.write_text("agent-secret-7d1f")
    secret.chmod(0o600)

    result = await executor.run(sh(f"cat {secret}; cat /proc/1/root{secret}; cat /root/.bash_history"))

    assert "agent-secret-7d1f" not in result.output_tail


@pytest.mark.asyncio
async def test_a_job_cannot_read_the_environment_of_another_job_or_of_its_agent(
    executor: JobExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_SECRET", "agent-env-51c2")
    victim = asyncio.create_task(executor.sibling().run(sh("sleep 5", job_id="victim", env={"TENANT_KEY": "tk-9a4"})))
    await asyncio.sleep(0.5)
    victims = [p.pid for p in psutil.Process().children(recursive=True) if "sleep 5" in " ".join(p.cmdline())]
    host_paths = " ".join(f"/proc/{pid}/environ" for pid in [os.getpid(), *victims])

    result = await executor.run(sh(f"cat /proc/*/environ {host_paths} 2>/dev/null | tr '\\0' '\\n'"))

    assert "tk-9a4" not in result.output_tail
    assert "agent-env-51c2" not in result.output_tail
    victim.cancel()
    await asyncio.gather(victim, return_exceptions=True)


async def command_lines_seen_by_nobody() -> str:
    """Every process's command line, as an unprivileged user of the host (nobody) reads them."""
    seen = await asyncio.to_thread(
        subprocess.run,
        ["sh", "-c", "cat /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' ' '"],
        user=65534,
        group=65534,
        extra_groups=[],
        capture_output=True,
        text=True,
        timeout=10,
    )
    return seen.stdout


@pytest.mark.asyncio
async def test_a_job_gets_exactly_its_environment_whatever_its_values_hold(executor: JobExecutor) -> None:
    env = {"QUOTED": 'it\'s "x" $HOME `id`', "MULTI": "a\nb", "PWD": "/given", "EMPTY": ""}

    result = await executor.run(spec(["env", "-0"], env=env))

    got = dict(item.split("=", 1) for item in result.output_tail.split("\0") if item)
    assert {k: got.get(k) for k in env} == env
    assert set(got) == {*env, "PATH", "HOME", "LANG"}  # and nothing of bwrap's, setpriv's or the shell's


@pytest.mark.asyncio
async def test_nothing_a_job_starts_outlives_it(executor: JobExecutor) -> None:
    script = (
        "setsid sleep 301.5 >/dev/null 2>&1 < /dev/null &\n"
        "(sleep 302.5 >/dev/null 2>&1 &) \n"
        "nohup sh -c 'exec sleep 303.5' >/dev/null 2>&1 &\n"
        "sleep 0.3; echo started"
    )

    result = await executor.run(sh(script))

    assert "started" in result.output_tail
    assert processes_with("sleep 301.5") + processes_with("sleep 302.5") + processes_with("sleep 303.5") == []


@pytest.mark.asyncio
async def test_nothing_a_cancelled_or_timed_out_job_started_survives(executor: JobExecutor) -> None:
    result = await executor.run(sh("setsid sleep 304.5 & sleep 30", max_runtime_seconds=0.5))

    assert result.reason == "TIMEOUT"
    assert processes_with("sleep 304.5") == []


def run_in_agent_process(tmp_path: Path, command: list[str]) -> tuple[int, dict[str, object]]:
    """Runs one job with the sandboxed executor in a process of its own, standing in for the agent: an attack on
    the agent that worked would end that process, not the test run."""
    script = f"""
import asyncio, dataclasses, json, sys
from services.worker.executor import ExecSpec, JobExecutor
from services.worker.sandbox import Sandbox, SandboxSettings
box = Sandbox.for_this_machine(SandboxSettings())
ex = JobExecutor({str(tmp_path / "agent-scratch")!r}, sandbox=box)
spec = ExecSpec("job-1", 1, {command!r}, {{}}, None, 20.0, 1000, 128)
result = asyncio.run(ex.run(spec))
box.close()
print(json.dumps(dataclasses.asdict(result)))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd=REPO)
    lines = proc.stdout.strip().splitlines()
    return proc.returncode, (json.loads(lines[-1]) if lines else {})


def test_a_job_cannot_kill_or_trace_its_agent(tmp_path: Path) -> None:
    # The job's parent is its init (pid 1 of its namespace, the job's uid once it let the job go): the kernel drops
    # SIGKILL and SIGSTOP sent to it from inside, so the job lives on to say so; it is undumpable (it changed uid),
    # so its memory and environment stay closed. Nothing outside the namespace (spawner, agent) is even visible.
    script = (
        "kill -9 $PPID; kill -STOP 1; kill -9 1; echo survived; "
        "echo mem=$(cat /proc/1/mem 2>/dev/null | head -c1 | wc -c) env=$(cat /proc/1/environ 2>/dev/null | wc -c); "
        "for p in /proc/[0-9]*; do kill -9 ${p#/proc/} 2>/dev/null; done"
    )

    rc, result = run_in_agent_process(tmp_path, ["sh", "-c", script])

    assert rc == 0, result  # the agent lived to report
    assert result["reason"] == "EXITED", result  # killed itself last: not the timeout a stopped init would cause
    assert str(result["output_tail"]).split("\n")[:2] == ["survived", "mem=0 env=0"], result


@pytest.mark.asyncio
async def test_a_job_using_four_times_its_memory_is_oom_killed(executor: JobExecutor) -> None:
    code = "b = bytearray(256 * 1024 * 1024); print('allocated')"

    result = await executor.run(spec(["python3", "-c", code], memory_mb=64))

    assert result.reason == "OOM_KILLED", result
    assert result.exit_code != 0
    assert "allocated" not in result.output_tail
    assert "64 MB" in result.message
    # The slot's cgroup is reused: the next job starts from clean counters and its own limit.
    after = await executor.run(spec(["python3", "-c", "b = bytearray(100 * 1024 * 1024)"], job_id="job-2"))
    assert (after.reason, after.exit_code) == ("EXITED", 0), after


@pytest.mark.asyncio
async def test_a_job_cannot_start_more_processes_than_the_pids_limit(executor: JobExecutor) -> None:
    code = (
        "import os, time\nn = 0\nfor _ in range(4 * 64):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
        "    n += 1\nprint('forked', n, flush=True)"
    )

    result = await executor.run(spec(["python3", "-c", code]))

    forked = int(result.output_tail.split()[-1])
    assert forked < PIDS_MAX
    assert processes_with("python3 -c import os, time") == []


def exactly(cmdline: list[str]) -> list[int]:
    """Processes running just `cmdline` (not bwrap, whose command line holds the job's)."""
    return [p.pid for p in psutil.process_iter(["cmdline"]) if p.info["cmdline"] == cmdline]


def host_cgroups(pid: int) -> dict[str, str]:
    """The v1 controllers' paths of a process as the host sees them (controller -> path)."""
    paths = {}
    for line in Path(f"/proc/{pid}/cgroup").read_text().splitlines():
        _, controllers, path = line.split(":", 2)
        for controller in controllers.split(","):
            paths[controller] = path
    return paths


@pytest.mark.asyncio
async def test_a_jobs_first_process_starts_in_its_cgroup_under_its_rlimits(executor: JobExecutor) -> None:
    # The job's first process is forked by bwrap's init: it is in the job's group only if the init was before it
    # forked, and nothing moves it there later.
    task = asyncio.create_task(executor.run(sh("cat /proc/self/limits; exec sleep 6.25", job_id="confined")))
    deadline = time.monotonic() + 10
    while not (first := exactly(["sleep", "6.25"])) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    try:
        assert len(first) == 1, first
        groups = host_cgroups(first[0])
    finally:
        executor.cancel("confined", kill_now=True)
        result = await task

    slot = executor._cgroup_name
    assert all(groups[c].endswith(f"/jobmesh-worker-{os.getpid()}/{slot}") for c in ("memory", "pids", "cpu")), groups
    limits = {line[:26].strip(): line[26:].split()[:2] for line in result.output_tail.splitlines()[1:]}
    assert limits["Max open files"] == ["4096", "4096"], result.output_tail
    assert limits["Max file size"] == [str(4096 << 20)] * 2, result.output_tail


@pytest.mark.asyncio
async def test_a_job_whose_sandbox_cannot_be_confined_never_runs(
    executor: JobExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    # bwrap lets its init go on at end of file as well as on a byte: a failed start must kill it, not just close up.
    def cgroup_write_fails(job: JobSandbox, init: int) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(JobSandbox, "confine", cgroup_write_fails)
    run = asyncio.create_task(executor.run(sh("exec sleep 7.75")))
    seen: list[int] = []
    until = time.monotonic() + 30
    while time.monotonic() < until:  # watched until 0.3 s after the start failed: an unconfined job would be up
        seen += exactly(["sleep", "7.75"])
        if run.done():
            until = min(until, time.monotonic() + 0.3)
        await asyncio.sleep(0.01)
    result = await run

    assert (result.reason, result.message) == (
        "START_FAILED",
        "cannot confine the job's sandbox: No space left on device",
    )
    assert seen == [] and processes_with("sleep 7.75") == []
    monkeypatch.undo()
    after = await executor.run(sh("echo fine", job_id="job-2"))
    assert (after.reason, after.output_tail.strip()) == ("EXITED", "fine")


@pytest.mark.asyncio
async def test_a_job_sees_no_cgroup_path_of_the_host_above_its_agents_group(executor: JobExecutor) -> None:
    agent = {path.strip("/") for path in host_cgroups(os.getpid()).values() if path.strip("/")}

    result = await executor.run(sh("cat /proc/self/cgroup"))

    assert result.reason == "EXITED" and result.output_tail, result
    assert agent and not [path for path in agent if path in result.output_tail], result.output_tail


@pytest.mark.asyncio
async def test_a_job_cannot_write_outside_its_scratch_dir(executor: JobExecutor, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    targets = [str(outside), "/usr/jobmesh-x", "/etc/jobmesh-x", "/jobmesh-x", f"{REPO}/jobmesh-x"]
    script = "; ".join(f"echo pwned > {t} 2>/dev/null && echo wrote {t}" for t in targets) + "; echo ok > /scratch/f"

    result = await executor.run(sh(script))

    assert "wrote" not in result.output_tail, result.output_tail
    assert not outside.exists() and not (REPO / "jobmesh-x").exists()
    assert not Path("/usr/jobmesh-x").exists() and not Path("/etc/jobmesh-x").exists()


@pytest.mark.asyncio
async def test_a_job_cannot_read_the_stacks_keys_certificates_or_checkout(
    executor: JobExecutor, tmp_path: Path
) -> None:
    data = tmp_path / ".jobmesh"
    (data / "keys").mkdir(parents=True)
    (data / "keys" / "jwt-private.pem").write_text("PRIVATE-KEY-3e8a")
    (data / "certs").mkdir()
    (data / "certs" / "worker.crt").write_text("CERT-0b7c")
    (data / "certs" / "worker.crt").chmod(0o644)
    script = (
        f"cat {data}/keys/* {data}/certs/* 2>&1; ls {REPO} 2>&1; "
        f"{REPO}/.venv/bin/jobmesh token --admin --tenant acme 2>&1; ls /work /root /home 2>&1 | head -5"
    )

    result = await executor.run(sh(script))

    for leaked in ("PRIVATE-KEY-3e8a", "CERT-0b7c", "README.md", "eyJ"):
        assert leaked not in result.output_tail, result.output_tail


# --- the network of a pool with network = "none": one namespace per slot, loopback only ---

CONNECT = (
    "import socket, sys\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2).close()\n"
    "    print('reached')\nexcept OSError as exc:\n    print('refused', type(exc).__name__)\n"
)
LISTEN = (
    "import socket, time\ns = socket.socket()\ns.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)\n"
    "s.bind(('127.0.0.1', {port}))\ns.listen()\nprint('listening', flush=True)\ntime.sleep({seconds})\n"
)


def net_namespace(output_line: str) -> str:
    assert output_line.startswith("net:["), output_line
    return output_line


@pytest.mark.asyncio
async def test_a_job_without_network_cannot_reach_the_hosts_loopback_services(executor: JobExecutor) -> None:
    host_service = socket.socket()
    host_service.bind(("127.0.0.1", 0))
    host_service.listen()
    host_service.setblocking(False)
    port = host_service.getsockname()[1]
    try:
        result = await executor.run(spec(["python3", "-c", CONNECT.format(port=port)]))

        assert result.reason == "EXITED", result
        assert result.output_tail.split()[0] == "refused", result.output_tail
        with pytest.raises(BlockingIOError):
            host_service.accept()
    finally:
        host_service.close()


@pytest.mark.asyncio
async def test_a_listener_left_by_a_job_is_gone_for_the_slots_next_job(executor: JobExecutor) -> None:
    port = free_port()
    # Tenant A leaves a listener behind, detached from its job's process tree.
    script_a = (
        f'readlink /proc/self/ns/net; setsid python3 -c "{LISTEN.format(port=port, seconds=300)}" '
        "> listener.log 2>&1 < /dev/null & sleep 0.5; cat listener.log"
    )
    a = await executor.run(sh(script_a, job_id="tenant-a-job", env={"TENANT": "a"}))
    # Tenant B is the slot's next job: same network namespace, nothing of A's left in it.
    script_b = f'readlink /proc/self/ns/net; python3 -c "{CONNECT.format(port=port)}"'
    b = await executor.run(sh(script_b, job_id="tenant-b-job", env={"TENANT": "b"}))

    assert a.reason == b.reason == "EXITED", (a, b)
    a_ns, a_listening = a.output_tail.split("\n")[:2]
    b_ns, b_connect = b.output_tail.split("\n")[:2]
    assert a_listening == "listening", a.output_tail
    assert net_namespace(a_ns) == net_namespace(b_ns) != os.readlink("/proc/self/ns/net")  # the slot's, not the host's
    assert b_connect.split()[0] == "refused", b.output_tail
    assert processes_with(f"s.bind(('127.0.0.1', {port}))") == []


@pytest.mark.asyncio
async def test_two_slots_running_at_once_have_separate_networks(executor: JobExecutor) -> None:
    port = free_port()
    listener = asyncio.create_task(
        executor.run(
            spec(["sh", "-c", f'readlink /proc/self/ns/net; python3 -c "{LISTEN.format(port=port, seconds=3)}"'])
        )
    )
    await asyncio.sleep(1.0)
    slot_2 = executor.sibling()
    try:
        other = await slot_2.run(
            sh(f'readlink /proc/self/ns/net; python3 -c "{CONNECT.format(port=port)}"', job_id="job-2")
        )
    finally:
        slot_2.close()
    first = await listener

    first_ns, listening = first.output_tail.split("\n")[:2]
    other_ns, connect = other.output_tail.split("\n")[:2]
    assert listening == "listening", first.output_tail
    assert net_namespace(first_ns) != net_namespace(other_ns)
    assert connect.split()[0] == "refused", other.output_tail


@pytest.mark.asyncio
async def test_a_slots_back_to_back_jobs_each_find_its_group_empty(
    executor: JobExecutor, caplog: pytest.LogCaptureFixture
) -> None:
    # Each job's processes are gone when the next starts: no uid is held back for a job that "left processes".
    results = [await executor.run(spec(["true"], job_id=f"quick-{n}")) for n in range(20)]

    assert {(r.reason, r.exit_code) for r in results} == {("EXITED", 0)}
    assert [r.message for r in caplog.records if r.levelno >= logging.WARNING] == []
