"""Attacks a tenant's job tries through its slot's spawner (services/worker/spawner.c and the Python program of
spawner.py, both, driven by services/worker/executor.py) and requests straight to a spawner's socket: real
processes, as root, each attack of which must fail; and the ordinary jobs that must keep working."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path

import psutil
import pytest

from devtools.launcher import REPO
from services.worker.executor import ExecSpec, JobExecutor
from services.worker.sandbox import JOB_PATH, Sandbox, SandboxSettings
from services.worker.spawner import (
    MAX_REQUEST,
    SPAWNER_KEEPS,
    Request,
    Spawner,
    compiled_spawner,
    detached_mount,
)
from tests.integration.test_sandbox import command_lines_seen_by_nobody, processes_with, sandbox_of, sh, spec
from tests.unit.test_spawner import _reencode_unchecked, request

PIDS_MAX = 64


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with sandbox_of(SandboxSettings(pids_max=PIDS_MAX)) as box:
        yield box


@pytest.fixture(params=["compiled", "python"], autouse=True)
def compiled(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch, sandbox: Sandbox) -> bool:
    """Every test runs against both spawners: services/worker/spawner.c (built by `make sandbox-tools`) and the
    Python program of spawner.py. The sandbox's spawners are made with the choice."""
    chosen = request.param == "compiled"
    if chosen and compiled_spawner() is None:
        if os.environ.get("CI") == "true":
            raise AssertionError("the compiled spawner is not built (make sandbox-tools)")
        pytest.skip("the compiled spawner is not built (make sandbox-tools)")
    monkeypatch.setattr(sandbox, "compiled", chosen)
    return chosen


@asynccontextmanager
async def slot(tmp_path: Path, sandbox: Sandbox, name: str = "scratch") -> AsyncIterator[JobExecutor]:
    """One slot's executor, its spawner started by its first job and stopped after."""
    executor = JobExecutor(str(tmp_path / name), sandbox=sandbox, sample_interval=0.05, kill_grace_seconds=0.5)
    try:
        yield executor
    finally:
        executor.close()


def spawner_processes(executor: JobExecutor) -> list[int]:
    """bwrap and the spawner below it (host pids)."""
    outer = executor.spawner_pid
    return [outer, *(p.pid for p in psutil.Process(outer).children())] if outer else []


# --- ordinary jobs keep working ---


@pytest.mark.asyncio
async def test_a_job_runs_in_its_scratch_dir_with_its_environment_and_exit_code(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    env = {"QUOTED": 'it\'s "x" $HOME `id`', "MULTI": "a\nb", "EMPTY": ""}
    async with slot(tmp_path, sandbox) as executor:
        result = await executor.run(sh("pwd; echo hello > f; cat f; env -0 > /scratch/env; exit 3", env=env))
        listed = await executor.run(spec(["env", "-0"], job_id="job-2", env=env))

    assert (result.reason, result.exit_code) == ("EXITED", 3), result
    assert result.output_tail.split() == ["/scratch", "hello"]
    got = dict(item.split("=", 1) for item in listed.output_tail.split("\0") if item)
    assert {k: got.get(k) for k in env} == env
    assert set(got) == {*env, "PATH", "HOME", "LANG"}  # exactly the job's: nothing of the spawner's


@pytest.mark.asyncio
async def test_a_missing_command_fails_with_127_and_says_why(tmp_path: Path, sandbox: Sandbox) -> None:
    async with slot(tmp_path, sandbox) as executor:
        result = await executor.run(spec(["no-such-command-x"]))

    assert result.exit_code == 127
    assert "no-such-command-x" in result.stderr_tail


# --- attacks, each of which must fail ---


@pytest.mark.asyncio
async def test_the_job_runs_as_its_own_uid_without_any_capability(tmp_path: Path, sandbox: Sandbox) -> None:
    fields_of = "grep -E '^(Uid|Gid|Groups|Cap[A-Za-z]+|NoNewPrivs|Seccomp):' /proc/self/status"
    script = f"{fields_of}; unshare -U true; echo u=$?"
    async with slot(tmp_path, sandbox) as executor:
        result = await executor.run(sh(script))

    lines = [line.split(":", 1) for line in result.output_tail.splitlines() if ":" in line]
    fields = {name: value.split() for name, value in lines}
    uid = fields["Uid"][0]
    assert int(uid) >= SandboxSettings().uid_first and fields["Uid"] == [uid] * 4 and fields["Gid"] == [uid] * 4
    assert fields["Groups"] == []
    for cap in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb"):
        assert fields[cap] == ["0000000000000000"], (cap, fields)
    assert fields["NoNewPrivs"] == ["1"] and fields["Seccomp"] == ["2"]
    assert "u=0" not in result.output_tail  # no user namespace (seccomp), so no capability anywhere


@pytest.mark.asyncio
async def test_the_spawner_holds_four_capabilities_no_environment_and_no_file_of_the_mesh(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    async with slot(tmp_path, sandbox) as executor:
        await executor.run(spec(["true"]))
        spawner = spawner_processes(executor)[-1]
        status = dict(line.split(":", 1) for line in Path(f"/proc/{spawner}/status").read_text().splitlines())
        environ = Path(f"/proc/{spawner}/environ").read_bytes()
        cmdline = Path(f"/proc/{spawner}/cmdline").read_bytes()

    assert int(status["CapEff"], 16) == int(status["CapPrm"], 16) == SPAWNER_KEEPS
    assert int(status["CapBnd"], 16) == int(status["CapInh"], 16) == int(status["CapAmb"], 16) == 0
    assert set(environ.split(b"\0")[:-1]) <= {b"PATH=" + JOB_PATH.encode(), b"PWD=/"}  # PWD: bwrap's
    assert str(REPO).encode() not in cmdline and b"/proc/self/fd/" in cmdline  # its program came in a memfd
    assert (b"python" in cmdline) is not compiled  # the spawner the test asked for


@pytest.mark.asyncio
async def test_a_job_holds_no_fd_but_its_own(tmp_path: Path, sandbox: Sandbox) -> None:
    """Not the spawner's socket above all: with it a job could ask for processes outside its cgroup."""
    async with slot(tmp_path, sandbox) as executor:
        result = await executor.run(sh("ls /proc/self/fd; echo end"))

    assert result.output_tail.split() == ["0", "1", "2", "3", "end"], result.output_tail  # 3: ls's own directory


@pytest.mark.asyncio
async def test_a_job_cannot_read_a_private_file_of_the_agents_user(tmp_path: Path, sandbox: Sandbox) -> None:
    secret = tmp_path / "agent-only"
    secret.write_text("agent-secret-7d1f")
    secret.chmod(0o600)
    script = f"cat {secret}; cat /proc/1/root{secret}; cat /proc/1/root/scratch/planted; cat /scratch/planted; echo end"
    async with slot(tmp_path, sandbox) as executor:
        # A root-owned 0600 file in the job's own scratch directory, planted as the job starts (its dir is made then).
        real_make = executor._make_scratch_dir

        def make_and_plant(spec: ExecSpec, owner: int | None = None) -> str:
            path = real_make(spec, owner)
            planted = Path(path) / "planted"
            planted.write_text("agent-secret-7d1f")
            planted.chmod(0o600)
            return path

        executor._make_scratch_dir = make_and_plant  # type: ignore[method-assign]
        result = await executor.run(sh(script))

    assert "end" in result.output_tail
    assert "agent-secret-7d1f" not in result.output_tail


@pytest.mark.asyncio
async def test_a_job_sees_no_path_of_the_spawner_checkout_venv_or_interpreter(tmp_path: Path, sandbox: Sandbox) -> None:
    paths = sorted({str(REPO), sys.prefix, sys.base_prefix, os.path.realpath(sys.base_prefix), str(tmp_path)})
    paths += [sandbox.etc_dir, os.path.dirname(sandbox.seccomp_program), "/run/jobmesh"]
    checks = "; ".join(f"test -e '{p}' && echo 'seen {p}'" for p in paths)
    script = f"{checks}; ls -A /root /opt 2>/dev/null | head; cat /proc/1/maps 2>&1 | head -c 300; ls /proc/1/fd 2>&1"
    async with slot(tmp_path, sandbox) as executor:
        result = await executor.run(sh(f"{script}; echo end"))

    assert "end" in result.output_tail
    assert "seen " not in result.output_tail, result.output_tail
    for path in paths:
        assert f"{path}/" not in result.output_tail.replace("seen", "")
    assert "python3.11" not in result.output_tail and ".pyenv" not in result.output_tail  # no map of the init's


@pytest.mark.asyncio
async def test_a_job_cannot_write_outside_its_scratch_dir_and_its_tmp_is_its_own(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    targets = ["/etc/x", "/usr/x", "/x", "/var/x", "/dev/x", "/proc/sys/kernel/hostname", f"{tmp_path}/x"]
    writes = "; ".join(f"echo pwned > {t} 2>/dev/null && echo 'wrote {t}'" for t in targets)
    async with slot(tmp_path, sandbox) as executor:
        first = await executor.run(sh(f"{writes}; echo one > /tmp/left; echo one > /dev/shm/left; echo end"))
        second = await executor.run(sh("cat /tmp/left /dev/shm/left /var/tmp/left 2>&1; ls -A /tmp; echo end"))

    assert "end" in first.output_tail and "wrote" not in first.output_tail, first.output_tail
    assert not (tmp_path / "x").exists()
    assert "end" in second.output_tail and "one" not in second.output_tail  # a fresh /tmp and /dev/shm per job


@pytest.mark.asyncio
async def test_each_job_has_namespaces_of_its_own_and_cannot_rename_its_host(tmp_path: Path, sandbox: Sandbox) -> None:
    script = (
        "for n in pid mnt ipc uts; do readlink /proc/self/ns/$n; done; cat /proc/sys/kernel/hostname; "
        "if (echo tenant-x > /proc/sys/kernel/hostname) 2>/dev/null; then echo renamed; else echo denied; fi"
    )
    async with slot(tmp_path, sandbox) as executor:
        first = await executor.run(sh(script))
        second = await executor.run(sh(script, job_id="job-2"))
        # The slot's spawner lives on, so none of its namespaces' numbers can have gone to a job (a job's, once it
        # ended, can: comparing two jobs' would be flaky).
        spawner = spawner_processes(executor)[-1]
        slots = [os.readlink(f"/proc/{spawner}/ns/{kind}") for kind in ("pid", "mnt", "ipc", "uts")]

    for result in (first, second):
        seen = result.output_tail.split()
        assert len(seen) == 6, result.output_tail
        assert all(job != its_slot for job, its_slot in zip(seen[:4], slots, strict=True)), (seen, slots)
        assert seen[4:] == ["jobmesh-job", "denied"]  # the slot's hostname, which a job cannot change


UNCOVER = """
import ctypes, os
libc = ctypes.CDLL(None, use_errno=True)
for target in (b"/proc", b"/tmp", b"/dev/shm"):
    print(target.decode(), libc.umount2(target, 2), ctypes.get_errno())
print("pids", sorted(int(p) for p in os.listdir("/proc") if p.isdigit()))
"""


@pytest.mark.asyncio
async def test_a_job_cannot_uncover_what_its_fresh_mounts_cover(tmp_path: Path, sandbox: Sandbox) -> None:
    # Its /proc, /tmp and /dev/shm are mounted over the spawner's (no unmount per start): what lies below must stay
    # out of reach, the spawner's /proc above all (it lists the host's processes).
    async with slot(tmp_path, sandbox) as executor:
        result = await executor.run(spec(["python3", "-c", UNCOVER]))

    lines = result.output_tail.splitlines()
    assert lines[:3] == ["/proc -1 1", "/tmp -1 1", "/dev/shm -1 1"], result.output_tail  # EPERM each time
    assert lines[3] == "pids [1, 2]", result.output_tail  # its init and itself: no process of the host


@pytest.mark.asyncio
async def test_a_job_cannot_see_another_jobs_processes_or_environment(tmp_path: Path, sandbox: Sandbox) -> None:
    async with slot(tmp_path, sandbox, "a") as victim_slot, slot(tmp_path, sandbox, "b") as attacker_slot:
        victim = asyncio.create_task(victim_slot.run(sh("sleep 5.25", job_id="victim", env={"TENANT_KEY": "tk-9a4"})))
        await asyncio.sleep(0.7)
        victims = processes_with("sleep 5.25")
        assert victims  # it runs
        host_paths = " ".join(f"/proc/{pid}/environ /proc/{pid}/cmdline" for pid in victims)
        script = f"ps -eo pid,user,args; cat /proc/*/environ {host_paths} 2>/dev/null | tr '\\0' '\\n'; echo end"
        result = await attacker_slot.run(sh(script))
        victim_slot.cancel("victim", kill_now=True)
        await victim

    assert "end" in result.output_tail
    assert "tk-9a4" not in result.output_tail
    assert "sleep 5.25" not in result.output_tail
    assert len([line for line in result.output_tail.splitlines() if line.strip()[:1].isdigit()]) <= 4  # init, sh, ps


@pytest.mark.asyncio
async def test_a_jobs_environment_is_in_no_command_line_or_other_process(tmp_path: Path, sandbox: Sandbox) -> None:
    secret = "tenant-secret-7f3e91"
    async with slot(tmp_path, sandbox) as executor:
        job = asyncio.create_task(executor.run(sh("sleep 2; echo done", env={"API_TOKEN": secret})))
        await asyncio.sleep(0.7)
        try:
            seen = await command_lines_seen_by_nobody()
            assert "sleep 2; echo done" in seen  # the job was running and visible
            assert secret not in seen
            # Root's view: only the job's own processes (its uid) hold it, not bwrap, the spawner or the job's init.
            for pid in spawner_processes(executor):
                assert secret.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
                assert secret.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
            init = psutil.Process(processes_with("sleep 2; echo done")[0]).ppid()
            assert secret.encode() not in Path(f"/proc/{init}/environ").read_bytes()
        finally:
            result = await job
    assert "done" in result.output_tail


def memory_holds(pid: int, needle: bytes) -> bool:
    """Whether any readable, private mapping of `pid` holds `needle` (read as root through /proc/<pid>/mem)."""
    with open(f"/proc/{pid}/maps") as maps, open(f"/proc/{pid}/mem", "rb", buffering=0) as mem:
        for line in maps:
            span, perms = line.split()[:2]
            if not perms.startswith("r") or "p" not in perms:
                continue
            start, end = (int(x, 16) for x in span.split("-"))
            try:
                mem.seek(start)
                if needle in mem.read(end - start):
                    return True
            except OSError:
                continue
    return False


@pytest.mark.asyncio
async def test_no_later_jobs_init_nor_the_spawner_holds_an_earlier_jobs_environment(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    secret = "ghost-of-job-a-5e7d1c"
    async with slot(tmp_path, sandbox) as executor:
        # Many variables of many sizes: a later, smaller request does not happen to reuse all of their memory.
        env = {f"TOKEN_{n}": secret + "x" * (n * 7) for n in range(24)}
        first = await executor.run(sh("echo ${#TOKEN_0}", env=env))
        later = asyncio.create_task(executor.run(sh("sleep 1.75", job_id="job-2")))
        deadline = time.monotonic() + 10
        while not processes_with("sleep 1.75") and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        init = psutil.Process(processes_with("sleep 1.75")[0]).ppid()
        try:
            assert memory_holds(init, b"sleep 1.75")  # the search finds what is there
            assert not memory_holds(init, secret.encode())
            assert not memory_holds(spawner_processes(executor)[-1], secret.encode())
        finally:
            await later
    assert first.output_tail.strip() == str(len(secret))


@pytest.mark.asyncio
async def test_nothing_a_job_starts_outlives_it(tmp_path: Path, sandbox: Sandbox) -> None:
    script = (
        "setsid sleep 311.5 >/dev/null 2>&1 < /dev/null &\n"
        "(sleep 312.5 >/dev/null 2>&1 &) \n"
        "nohup sh -c 'exec sleep 313.5' >/dev/null 2>&1 &\n"
        "sleep 0.3; echo started"
    )
    async with slot(tmp_path, sandbox) as executor:
        result = await executor.run(sh(script))
        timed_out = await executor.run(sh("setsid sleep 314.5 & sleep 30", job_id="job-2", max_runtime_seconds=0.5))

    assert "started" in result.output_tail
    assert timed_out.reason == "TIMEOUT"
    assert [processes_with(f"sleep 31{n}.5") for n in range(1, 5)] == [[]] * 4


@pytest.mark.asyncio
async def test_a_job_cannot_kill_its_spawner_or_agent(tmp_path: Path, sandbox: Sandbox) -> None:
    async with slot(tmp_path, sandbox) as executor:
        await executor.run(spec(["true"]))  # the spawner runs from here on
        targets = " ".join(str(pid) for pid in [os.getpid(), *spawner_processes(executor)])
        script = (
            f"for p in {targets}; do kill -9 $p 2>/dev/null && echo killed $p; done; "
            # Its init runs as the job's uid (undumpable): a signal to it from inside its namespace is dropped, as
            # to any pid 1 without a handler; were it killed, the namespace and this shell would die with it.
            "kill -9 1; kill -TERM 1; kill -INT 1; kill -9 -1; sleep 0.2; echo survived"
        )
        result = await executor.run(sh(script, job_id="job-2"))
        after = await executor.run(sh("echo still", job_id="job-3"))

    assert "killed" not in result.output_tail, result.output_tail
    assert "survived" in result.output_tail, result
    assert (after.reason, after.output_tail.strip()) == ("EXITED", "still")  # the same spawner starts the next job


@pytest.mark.asyncio
async def test_a_jobs_init_is_in_its_cgroup_before_the_job_runs_and_memory_is_limited(
    tmp_path: Path, sandbox: Sandbox
) -> None:
    hog = "b = bytearray(256 * 1024 * 1024); print('allocated')"
    async with slot(tmp_path, sandbox) as executor:
        where = await executor.run(sh("cat /proc/self/cgroup; ulimit -t; ulimit -n"))
        oom = await executor.run(spec(["python3", "-c", hog], job_id="job-2", memory_mb=64))
        after = await executor.run(spec(["python3", "-c", "b = bytearray(100 * 1024 * 1024)"], job_id="job-3"))

    memory = [line for line in where.output_tail.splitlines() if ":memory:" in line]
    assert memory and memory[0].endswith(executor._cgroup_name), where.output_tail  # the job's group, from its start
    assert where.output_tail.split()[-2:] == ["unlimited", str(SandboxSettings().max_open_files)]  # just the job's
    assert oom.reason == "OOM_KILLED" and "allocated" not in oom.output_tail, oom
    assert (after.reason, after.exit_code) == ("EXITED", 0), after


@pytest.mark.asyncio
async def test_a_job_cannot_start_more_processes_than_the_pids_limit(tmp_path: Path, sandbox: Sandbox) -> None:
    code = (
        "import os, time\nn = 0\nfor _ in range(4 * 64):\n    try:\n        pid = os.fork()\n"
        "    except OSError:\n        break\n    if pid == 0:\n        time.sleep(30)\n        os._exit(0)\n"
        "    n += 1\nprint('forked', n, flush=True)"
    )
    async with slot(tmp_path, sandbox) as executor:
        result = await executor.run(spec(["python3", "-c", code]))

    assert int(result.output_tail.split()[-1]) < PIDS_MAX
    assert processes_with("python3 -c import os, time") == []


def bare_spawner(tmp_path: Path, sandbox: Sandbox, compiled: bool, uid: int) -> tuple[Path, Spawner, int]:
    """A spawner of its own (no executor), a scratch directory for `uid` and /dev/null to write to."""
    scratch = tmp_path / "scratch"
    scratch.mkdir(mode=0o700)
    os.chown(scratch, uid, uid)
    spawner = Spawner(sandbox.bwrap, sandbox.etc_dir, sandbox.seccomp_program, compiled=compiled)
    return scratch, spawner, os.open(os.devnull, os.O_WRONLY)


def test_a_job_never_runs_unless_let_go_and_dies_with_its_spawner(
    tmp_path: Path, sandbox: Sandbox, compiled: bool
) -> None:
    scratch, spawner, out = bare_spawner(tmp_path, sandbox, compiled, 200_777)
    try:
        run = Request(200_777, 200_777, [b"sh", b"-c", b"touch /scratch/ran; exec sleep 321.5"], [], b"/scratch", [])
        held = spawner.spawn(run, out, out, str(scratch))
        held.control.setblocking(True)
        held._take(held.control.recv(64))  # the init's pid: it waits at the gate
        assert held.pid > 0
        held.control.shutdown(2)  # the agent gives up before the gate: end of file is no go
        time.sleep(0.5)
        assert not (scratch / "ran").exists()
        held.close()

        running = spawner.spawn(run, out, out, str(scratch))
        running.control.setblocking(True)
        running._take(running.control.recv(64))
        running.let_go()
        deadline = time.monotonic() + 10
        while not processes_with("sleep 321.5") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (scratch / "ran").exists() and processes_with("sleep 321.5")
        for child in psutil.Process(spawner.pid).children():
            # The spawner dies: its job's init follows (PDEATHSIG), and the whole namespace with it.
            os.kill(child.pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while processes_with("sleep 321.5") and time.monotonic() < deadline:
            time.sleep(0.05)
        assert processes_with("sleep 321.5") == []
        running.close()
    finally:
        os.close(out)
        spawner.close()


def test_a_running_job_dies_with_its_agent(tmp_path: Path, compiled: bool) -> None:
    """The agent (a process of its own here) is SIGKILLed while its job runs: bwrap dies with it (--die-with-parent),
    the spawner with bwrap, the job's init with the spawner (its parent-death signal), and the namespace with it."""
    script = f"""
import asyncio, sys
from services.worker.executor import ExecSpec
from services.worker.sandbox import JOB_PATH, Sandbox, SandboxSettings
from services.worker.executor import JobExecutor
box = Sandbox.for_this_machine(SandboxSettings())
box.compiled = {compiled!r}
ex = JobExecutor({str(tmp_path / "agent-scratch")!r}, sandbox=box)
print("started", flush=True)
asyncio.run(ex.run(ExecSpec("job-1", 1, ["sh", "-c", "sleep 331.5 & exec sleep 332.5"], {{}}, None, 60.0, 1000, 128)))
"""
    agent = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert agent.stdout is not None and agent.stdout.readline().strip() == "started"
        deadline = time.monotonic() + 15
        while len(sleeps()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert len(sleeps()) == 2
    finally:
        agent.kill()
        agent.wait()
    deadline = time.monotonic() + 10
    while sleeps() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert sleeps() == []


def sleeps() -> list[int]:
    """The job's two sleeps (not the agent, whose command line names them too)."""
    return processes_with("sleep 33", name="sleep")


# --- what reaches the spawner's socket straight, not through encode_request ---


def _reply_kinds(control: socket.socket) -> list[bytes]:
    """The first byte of every reply on a job's control socket, until its end of file."""
    control.settimeout(10)
    kinds = []
    while reply := control.recv(4096):
        kinds.append(reply[:1])
    return kinds


def _malformed() -> list[bytes]:
    good = _reencode_unchecked(request(rlimits=[]))
    header = struct.calcsize("<4sIIHHH")
    cases = [good[:3], good[:header], good[:-1], good + b"\0", b"XXXX" + good[4:], bytes(MAX_REQUEST + 1)]
    for offset, value in ((12, 60_000), (14, 60_000), (16, 60_000), (14, 0)):  # counts past the end; no argv
        cases.append(good[:offset] + struct.pack("<H", value) + good[offset + 2 :])
    for length in (2**31, 2**32 - 1, 2**32 - header):  # the cwd's length, past the end
        cases.append(good[:header] + struct.pack("<I", length) + good[header + 4 :])
    for overrides in (
        {"uid": 0},
        {"gid": 0},
        {"uid": 2**32 - 1},
        {"argv": [b"sh", b"a\0b"]},
        {"argv": [b""]},
        {"env": [b"X=a\0b"]},
        {"env": [b"=x"]},
        {"cwd": b"/etc"},
        {"cwd": b"/scratchy"},
        {"cwd": b"/scratch/../etc"},
        {"cwd": b"/scratch/.."},
        {"cwd": b"/scratch\0/x"},
    ):
        cases.append(_reencode_unchecked(request(**overrides)))
    return cases


def test_a_malformed_request_is_answered_e_and_the_spawner_keeps_serving(
    tmp_path: Path, sandbox: Sandbox, compiled: bool
) -> None:
    scratch, spawner, out = bare_spawner(tmp_path, sandbox, compiled, 200_778)
    try:
        for message in _malformed():
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            tree = detached_mount(str(scratch))
            with mine, theirs:
                socket.send_fds(spawner._sock, [message], [theirs.fileno(), out, out, tree])
                os.close(tree)
                theirs.close()
                kinds = _reply_kinds(mine)
            assert b"E" in kinds and b"X" not in kinds, (message[:40], kinds)
        # The wrong number of fds (or none at all: nobody to answer then), and an empty message.
        good = _reencode_unchecked(request(uid=200_778, gid=200_778, cwd=b"/scratch"))
        for count in (0, 1, 3, 5):
            mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with mine, theirs:
                socket.send_fds(spawner._sock, [good], [theirs.fileno(), *[out] * (count - 1)] if count else [])
                theirs.close()
                assert _reply_kinds(mine) == ([b"E"] if count else [])
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        with mine, theirs:
            socket.send_fds(spawner._sock, [b""], [theirs.fileno(), out, out, out])
            theirs.close()
            kinds = _reply_kinds(mine)
        assert b"E" in kinds and b"X" not in kinds, kinds
        spawner._sock.send(b"")  # no fd, no reply: not an end of file either
        job = spawner.spawn(Request(200_778, 200_778, [b"true"], [], b"/scratch", []), out, out, str(scratch))
        assert job.wait_blocking(10) == 0  # served as ever
        job.close()
    finally:
        os.close(out)
        spawner.close()
