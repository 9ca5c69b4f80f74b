"""Unit tests for the job sandbox's pure parts (services/worker/sandbox.py): settings, the uid pool and the
command line a job starts with. The sandbox itself is tested with real processes in tests/integration."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from devtools.launcher import REPO
from services.worker import cgroups, seccomp
from services.worker.cgroups import CgroupDriver, Layout
from services.worker.executor import ExecSpec, JobExecutor
from services.worker.sandbox import (
    JobSandbox,
    Sandbox,
    SandboxError,
    SandboxSettings,
    UidPool,
    nsswitch_files_only,
    parse_uid_range,
)


def test_settings_come_from_the_pools_worker_variables() -> None:
    env = {
        "JOBMESH_WORKER_SANDBOX": "bwrap",
        "JOBMESH_WORKER_NETWORK": "host",
        "JOBMESH_WORKER_JOB_UIDS": "300000-300099",
        "JOBMESH_WORKER_PIDS_MAX": "64",
    }

    settings = SandboxSettings.from_env(env)

    assert (settings.mode, settings.network, settings.uid_first, settings.uid_count, settings.pids_max) == (
        "bwrap",
        "host",
        300_000,
        100,
        64,
    )


def test_without_settings_a_worker_sandboxes_jobs_without_network() -> None:
    settings = SandboxSettings.from_env({})

    assert (settings.mode, settings.network) == ("bwrap", "none")
    assert (settings.uid_first, settings.uid_count) == (200_000, 65_536)


@pytest.mark.parametrize(
    "env",
    [
        pytest.param({"JOBMESH_WORKER_SANDBOX": "off"}, id="unknown-mode"),
        pytest.param({"JOBMESH_WORKER_NETWORK": "bridge"}, id="unknown-network"),
        pytest.param({"JOBMESH_WORKER_JOB_UIDS": "0-100"}, id="uids-include-root"),
        pytest.param({"JOBMESH_WORKER_JOB_UIDS": "300000"}, id="uids-not-a-range"),
        pytest.param({"JOBMESH_WORKER_PIDS_MAX": "0"}, id="no-processes"),
    ],
)
def test_bad_settings_are_refused(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        SandboxSettings.from_env(env)


def test_a_uid_range_includes_both_ends() -> None:
    assert parse_uid_range("200000-200009") == (200_000, 10)


def test_running_jobs_never_share_a_uid_and_a_released_one_is_handed_out_again(tmp_path: Path) -> None:
    pool = UidPool(str(tmp_path / "locks"), 500_000, 3)
    other_agent = UidPool(str(tmp_path / "locks"), 500_000, 3)  # another agent on the same host
    held = [pool.acquire(), other_agent.acquire(), pool.acquire()]

    assert sorted(uid for uid, _ in held) == [500_000, 500_001, 500_002]
    with pytest.raises(SandboxError, match="in use"):
        other_agent.acquire()
    UidPool.release(held[1][1])
    assert other_agent.acquire()[0] == held[1][0]


def test_uids_to_avoid_are_never_handed_out(tmp_path: Path) -> None:
    pool = UidPool(str(tmp_path / "locks"), 500_000, 2, avoid=frozenset({500_000}))

    assert pool.acquire()[0] == 500_001
    with pytest.raises(SandboxError):
        pool.acquire()


class _Group:
    procs_files = ("/cg/memory/job/cgroup.procs",)


def test_the_spawner_is_asked_for_the_jobs_uid_command_environment_and_rlimits() -> None:
    job = JobSandbox(200_123, _Group(), -1, ((7, 4096),))  # type: ignore[arg-type]

    request = job.request(["python3", "-c", "print(1)"], {"LD_PRELOAD": "/scratch/x.so", "Q": "it's"}, "/scratch/w")

    assert (request.uid, request.gid) == (200_123, 200_123)
    assert request.argv == [b"python3", b"-c", b"print(1)"]
    # Exactly the job's environment, for the job's command alone: the spawner and its init run without it.
    assert request.env == [b"LD_PRELOAD=/scratch/x.so", b"Q=it's"]
    assert (request.cwd, request.rlimits) == (b"/scratch/w", [(7, 4096)])


@pytest.mark.parametrize("env", [{"BAD-NAME": "v"}, {"A;id": "v"}, {"K": "a\0b"}, {"A\nid": "v"}, {"A\n": "v"}])
def test_an_environment_entry_that_is_not_a_variables_is_refused(env: dict[str, str]) -> None:
    with pytest.raises(ValueError):
        JobSandbox(200_123, _Group(), -1).request(["true"], env)  # type: ignore[arg-type]


def test_jobs_look_users_and_groups_up_in_their_copied_files_only() -> None:
    host = [
        "# /etc/nsswitch.conf",
        "passwd:         files systemd",
        "group:          files systemd",
        "shadow:         files systemd",
        "hosts:          files dns",
        "#group: compat",
    ]

    assert nsswitch_files_only(host) == [
        "# /etc/nsswitch.conf",
        "passwd: files",
        "group: files",
        "shadow: files",
        "hosts:          files dns",
        "#group: compat",
        "gshadow: files",
    ]


def test_the_agent_marks_itself_non_dumpable() -> None:
    # In a process of its own: the flag cannot be undone, and the test run must stay debuggable.
    code = (
        "import ctypes\nfrom services.worker.app import make_non_dumpable\nmake_non_dumpable()\n"
        "print(ctypes.CDLL(None).prctl(3, 0, 0, 0, 0))"  # PR_GET_DUMPABLE
    )

    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO)

    assert out.stdout.strip() == "0"


def test_a_v2_slot_gets_a_new_group_of_the_same_name_for_each_job(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # cgroupfs removes a group with its control files; a plain directory needs them removed first.
    monkeypatch.setattr(cgroups, "_rmdir", lambda path: shutil.rmtree(path, ignore_errors=True) or True)
    cgroup_root = tmp_path / "cgroup"
    cgroup_root.mkdir()
    (cgroup_root / "cgroup.subtree_control").write_text("cpu memory pids")
    driver = CgroupDriver(Layout(2, {"": str(cgroup_root)}), agent_pid=7)
    driver.start()
    box = Sandbox(SandboxSettings(state_dir=str(tmp_path / "state")), driver, "bwrap")
    first = box.prepare("slot-1", memory_mb=64, cpu_millis=100)
    box.release(first)

    second = box.prepare("slot-1", memory_mb=128, cpu_millis=100, reuse=first.cgroup)

    group = cgroup_root / "jobmesh-worker-7" / "slot-1"
    assert (group / "memory.max").read_text() == str(128 << 20)  # made again, with the new job's limit
    assert second.cgroup.procs_files == (str(group / "cgroup.procs"),)
    assert (tmp_path / "state" / f"agent-{os.getpid()}" / "etc" / "passwd").exists()
    box.release(second)


def test_a_worker_that_cannot_sandbox_refuses_every_job_unless_its_pool_says_none(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from services.worker.app import job_sandbox

    def no_namespaces(settings: SandboxSettings) -> Sandbox:
        raise SandboxError("missing bwrap")

    monkeypatch.setattr(Sandbox, "for_this_machine", staticmethod(no_namespaces))

    sandbox, refusal = job_sandbox("static-general", SandboxSettings.from_env({"JOBMESH_WORKER_SANDBOX": "bwrap"}))

    assert sandbox is None and refusal is not None and "missing bwrap" in refusal
    assert "REFUSING TENANT JOBS" in caplog.text
    assert job_sandbox("laptop", SandboxSettings.from_env({"JOBMESH_WORKER_SANDBOX": "none"})) == (None, None)
    assert "JOB SANDBOX OFF" in caplog.text


def test_a_worker_whose_sandbox_settings_are_invalid_starts_and_refuses_every_job_saying_why() -> None:
    from services.worker.app import job_sandbox
    from services.worker.settings import Settings

    env = {"JOBMESH_CONFIG": str(REPO / "config" / "dev.toml"), "JOBMESH_TLS_DIR": "/certs"}
    settings = Settings.from_env({**env, "JOBMESH_WORKER_NETWORK": "everywhere"})

    sandbox, refusal = job_sandbox("static-general", settings.sandbox, settings.sandbox_error)

    assert sandbox is None
    assert refusal == "this worker's sandbox settings are invalid: network must be one of none, host"


@pytest.mark.asyncio
async def test_a_refusing_executor_ends_the_job_start_failed_with_the_reason(tmp_path: Path) -> None:
    executor = JobExecutor(str(tmp_path / "scratch"), refusal="this worker cannot sandbox jobs (missing bwrap)")

    result = await executor.run(ExecSpec("job-1", 1, ["true"], {}, None, 10.0))

    assert (result.reason, result.message) == ("START_FAILED", "this worker cannot sandbox jobs (missing bwrap)")
    assert not (tmp_path / "scratch").exists()  # nothing ran, nothing was made


def test_the_agent_compiles_the_jobs_seccomp_filter_once_into_a_root_only_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cgroups, "_rmdir", lambda path: shutil.rmtree(path, ignore_errors=True) or True)
    (tmp_path / "cgroup").mkdir()
    (tmp_path / "cgroup" / "cgroup.subtree_control").write_text("cpu memory pids")
    driver = CgroupDriver(Layout(2, {"": str(tmp_path / "cgroup")}), agent_pid=7)
    driver.start()
    box = Sandbox(SandboxSettings(state_dir=str(tmp_path / "state")), driver, "bwrap")
    program = tmp_path / "state" / f"agent-{os.getpid()}" / "seccomp.bpf"
    try:
        assert program.stat().st_mode & 0o777 == 0o600
        size = program.stat().st_size
        assert size > 0 and size % 8 == 0  # whole BPF instructions (8 bytes each)
        assert box.seccomp_program == str(program)
    finally:
        box.close()


def test_without_libseccomp_the_sandbox_cannot_be_made_and_says_what_is_missing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_library(name: str, **_: object) -> object:
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(seccomp.ctypes, "CDLL", no_library)
    driver = CgroupDriver(Layout(2, {"": str(tmp_path / "cgroup")}), agent_pid=7)

    with pytest.raises(SandboxError, match="missing libseccomp"):
        Sandbox(SandboxSettings(state_dir=str(tmp_path / "state")), driver, "bwrap")
    assert not (tmp_path / "state" / f"agent-{os.getpid()}").exists()
