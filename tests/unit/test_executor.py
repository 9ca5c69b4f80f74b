"""Tests for the worker's JobExecutor, run against real subprocesses."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import psutil
import pytest

from services.worker.executor import ExecResult, ExecSpec, JobExecutor

PY = sys.executable


def make_spec(command: list[str], **overrides: object) -> ExecSpec:
    fields: dict[str, object] = {
        "job_id": "job-1",
        "attempt": 1,
        "command": command,
        "env": {},
        "working_dir": None,
        "max_runtime_seconds": 10.0,
    }
    fields.update(overrides)
    return ExecSpec(**fields)  # type: ignore[arg-type]


@pytest.fixture
def executor(tmp_path: Path) -> JobExecutor:
    return JobExecutor(str(tmp_path / "scratch"), sample_interval=0.05, kill_grace_seconds=0.5)


async def job_root_pid(timeout: float = 5.0, min_descendants: int = 0) -> int:
    """Pid of the job's root process: a child of this test process leading its own group, started just now
    (a whole stack started by an earlier test tier may also be among our children, leading groups of its own)."""
    deadline = time.monotonic() + timeout
    # Called right after the job's task was created and before it ran: every child already here is not the job.
    before = {child.pid for child in psutil.Process().children()}
    while time.monotonic() < deadline:
        for child in psutil.Process().children():
            try:
                if (
                    child.pid not in before
                    and os.getpgid(child.pid) == child.pid
                    and len(child.children(recursive=True)) >= min_descendants
                ):
                    return int(child.pid)
            except (ProcessLookupError, psutil.Error):
                continue
        await asyncio.sleep(0.02)
    raise AssertionError("job process never appeared")


def live_members_of_group(pgid: int) -> list[int]:
    members = []
    for proc in psutil.process_iter(["status"]):
        try:
            if os.getpgid(proc.pid) == pgid and proc.info["status"] != psutil.STATUS_ZOMBIE:
                members.append(proc.pid)
        except (ProcessLookupError, psutil.Error):
            continue
    return members


async def group_gone(pgid: int, timeout: float = 2.0) -> list[int]:
    """The group's live members once SIGKILL has had time to land (delivery is asynchronous): [] when all died."""
    deadline = time.monotonic() + timeout
    while (members := live_members_of_group(pgid)) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return members


async def run_and_cancel(executor: JobExecutor, spec: ExecSpec, min_descendants: int) -> tuple[ExecResult, int]:
    task = asyncio.create_task(executor.run(spec))
    pgid = await job_root_pid(min_descendants=min_descendants)
    assert executor.running_job_id == spec.job_id
    assert executor.cancel(spec.job_id) is True
    return await asyncio.wait_for(task, 5.0), pgid


@pytest.mark.asyncio
async def test_echo_succeeds_with_exit_code_zero_and_its_output_in_the_tail(executor: JobExecutor) -> None:
    result = await executor.run(make_spec(["echo", "hello jobmesh"]))

    assert result.reason == "EXITED"
    assert result.exit_code == 0
    assert result.message == "exit code 0"
    assert "hello jobmesh" in result.output_tail
    assert executor.running_job_id is None


@pytest.mark.asyncio
async def test_a_nonzero_exit_is_reported_as_exited_with_that_code(executor: JobExecutor) -> None:
    result = await executor.run(make_spec(["sh", "-c", "exit 3"]))

    assert (result.reason, result.exit_code, result.message) == ("EXITED", 3, "exit code 3")


@pytest.mark.asyncio
async def test_stdout_and_stderr_share_one_tail(executor: JobExecutor) -> None:
    result = await executor.run(make_spec(["sh", "-c", "echo to-out; echo to-err >&2"]))

    assert "to-out" in result.output_tail
    assert "to-err" in result.output_tail


@pytest.mark.asyncio
async def test_a_chatty_job_does_not_block_and_only_the_last_bytes_are_kept(executor: JobExecutor) -> None:
    code = "import sys; sys.stdout.write('x' * 3_000_000); sys.stdout.write('THE-END')"
    result = await executor.run(make_spec([PY, "-c", code], max_runtime_seconds=5.0))

    assert result.reason == "EXITED"
    assert result.output_tail.endswith("THE-END")
    assert len(result.output_tail) <= 4096


@pytest.mark.asyncio
async def test_job_env_reaches_the_job_but_the_agents_own_env_does_not(
    executor: JobExecutor, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AGENT_SECRET", "leaked")
    script = 'echo "job=$JOB_VAR secret=${AGENT_SECRET:-unset} lang=$LANG"'

    result = await executor.run(make_spec(["sh", "-c", script], env={"JOB_VAR": "from-spec"}))

    assert "job=from-spec" in result.output_tail
    assert "secret=unset" in result.output_tail
    assert "lang=C.UTF-8" in result.output_tail


@pytest.mark.asyncio
async def test_a_missing_program_fails_to_start_and_names_the_program(executor: JobExecutor) -> None:
    result = await executor.run(make_spec(["no-such-program-jobmesh"]))

    assert result.reason == "START_FAILED"
    assert result.exit_code == -1
    assert "no-such-program-jobmesh" in result.message
    assert executor.running_job_id is None


@pytest.mark.asyncio
async def test_a_non_executable_file_fails_to_start_with_permission_denied(
    executor: JobExecutor, tmp_path: Path
) -> None:
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\necho hi\n")
    script.chmod(0o644)

    result = await executor.run(make_spec([str(script)]))

    assert result.reason == "START_FAILED"
    assert result.exit_code == -1
    assert result.message == f"permission denied: {script}"


@pytest.mark.asyncio
async def test_a_missing_working_dir_fails_to_start_with_a_clear_message(executor: JobExecutor, tmp_path: Path) -> None:
    missing = tmp_path / "nope"

    result = await executor.run(make_spec(["true"], working_dir=str(missing)))

    assert result.reason == "START_FAILED"
    assert result.exit_code == -1
    assert str(missing) in result.message
    assert "working directory" in result.message


@pytest.mark.asyncio
async def test_a_job_over_its_max_runtime_times_out_quickly_and_leaves_no_process(
    executor: JobExecutor,
) -> None:
    started = time.monotonic()
    task = asyncio.create_task(executor.run(make_spec(["sleep", "30"], max_runtime_seconds=0.5)))
    pgid = await job_root_pid()

    result = await asyncio.wait_for(task, 5.0)

    assert result.reason == "TIMEOUT"
    assert result.exit_code == 128 + 15
    assert result.message == "killed after 0.5s max runtime"
    assert time.monotonic() - started < 3.0
    assert await group_gone(pgid) == []


@pytest.mark.asyncio
async def test_cancel_kills_the_job_and_the_children_it_spawned(executor: JobExecutor) -> None:
    spec = make_spec(["sh", "-c", "sleep 30 & sleep 30"])

    result, pgid = await run_and_cancel(executor, spec, min_descendants=2)

    assert result.reason == "KILLED"
    assert result.exit_code == 128 + 15
    assert await group_gone(pgid) == []
    assert executor.running_job_id is None


@pytest.mark.asyncio
async def test_a_job_ignoring_sigterm_is_sigkilled_after_the_grace_period(executor: JobExecutor) -> None:
    spec = make_spec(["sh", "-c", "trap '' TERM; sleep 30 & sleep 30"])

    result, pgid = await run_and_cancel(executor, spec, min_descendants=2)

    assert result.reason == "KILLED"
    assert result.exit_code == 128 + 9
    assert "SIGKILL" in result.message
    assert 0.4 < result.run_seconds < 3.0
    assert await group_gone(pgid) == []


@pytest.mark.asyncio
async def test_a_cancel_that_kills_now_sends_sigkill_without_the_grace(tmp_path: Path) -> None:
    executor = JobExecutor(str(tmp_path / "scratch"), sample_interval=0.05, kill_grace_seconds=5.0)
    task = asyncio.create_task(executor.run(make_spec(["sh", "-c", "trap '' TERM; sleep 30 & sleep 30"])))
    pgid = await job_root_pid(min_descendants=2)
    started = time.monotonic()

    assert executor.cancel("job-1", kill_now=True) is True
    result = await asyncio.wait_for(task, 5.0)

    assert (result.reason, result.exit_code) == ("KILLED", 128 + 9)
    assert "SIGKILL at once" in result.message
    assert time.monotonic() - started < 1.5  # not the 5 s grace
    assert await group_gone(pgid) == []


@pytest.mark.asyncio
async def test_background_processes_left_by_a_finished_job_are_swept(executor: JobExecutor) -> None:
    task = asyncio.create_task(executor.run(make_spec(["sh", "-c", "sleep 30 & sleep 0.3; exit 0"])))
    pgid = await job_root_pid(min_descendants=1)

    result = await asyncio.wait_for(task, 5.0)

    assert (result.reason, result.exit_code) == ("EXITED", 0)
    assert result.run_seconds < 3.0
    assert await group_gone(pgid) == []


@pytest.mark.asyncio
async def test_cancel_of_another_job_id_is_refused(executor: JobExecutor) -> None:
    assert executor.cancel("job-1") is False
    task = asyncio.create_task(executor.run(make_spec(["sleep", "30"])))
    await job_root_pid()

    assert executor.cancel("some-other-job") is False
    assert executor.cancel("job-1") is True
    assert (await asyncio.wait_for(task, 5.0)).reason == "KILLED"


@pytest.mark.asyncio
async def test_running_a_second_job_while_busy_raises(executor: JobExecutor) -> None:
    task = asyncio.create_task(executor.run(make_spec(["sleep", "30"])))
    await job_root_pid()

    with pytest.raises(RuntimeError):
        await executor.run(make_spec(["true"], job_id="job-2"))

    executor.cancel("job-1")
    await asyncio.wait_for(task, 5.0)


@pytest.mark.asyncio
async def test_a_cpu_bound_job_reports_its_cpu_seconds(executor: JobExecutor) -> None:
    code = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.5:\n    pass"

    result = await executor.run(make_spec([PY, "-c", code]))

    assert result.reason == "EXITED"
    assert result.cpu_seconds > 0.2


@pytest.mark.asyncio
async def test_a_job_allocating_50_mb_reports_its_peak_memory(executor: JobExecutor) -> None:
    code = "x = bytearray(50 * 1024 * 1024); import time; time.sleep(0.6)"

    result = await executor.run(make_spec([PY, "-c", code]))

    assert result.reason == "EXITED"
    assert result.max_memory_mb >= 40


@pytest.mark.asyncio
async def test_live_usage_reports_the_running_tree_and_zero_when_idle(executor: JobExecutor) -> None:
    assert await executor.live_usage() == (0.0, 0)
    code = "x = bytearray(30 * 1024 * 1024); import time; time.sleep(30)"
    task = asyncio.create_task(executor.run(make_spec([PY, "-c", code])))
    await job_root_pid()

    rss_mb = 0
    deadline = time.monotonic() + 5.0
    while rss_mb < 25 and time.monotonic() < deadline:
        _, rss_mb = await executor.live_usage()
        await asyncio.sleep(0.05)

    assert rss_mb >= 25
    executor.cancel("job-1")
    await asyncio.wait_for(task, 5.0)
    assert await executor.live_usage() == (0.0, 0)


@pytest.mark.asyncio
async def test_use_so_far_grows_while_a_busy_job_runs_and_its_result_counts_at_least_as_much(
    executor: JobExecutor,
) -> None:
    assert await executor.used_so_far() == (0.0, 0)
    code = "x = bytearray(30 * 1024 * 1024)\nwhile True: pass"
    task = asyncio.create_task(executor.run(make_spec([PY, "-c", code])))
    await job_root_pid()

    cpu_seconds, peak_mb = 0.0, 0
    deadline = time.monotonic() + 10.0
    while (cpu_seconds < 0.3 or peak_mb < 25) and time.monotonic() < deadline:
        cpu_seconds, peak_mb = await executor.used_so_far()
        await asyncio.sleep(0.05)
    executor.cancel("job-1")
    result = await asyncio.wait_for(task, 5.0)

    assert cpu_seconds >= 0.3 and peak_mb >= 25
    assert result.cpu_seconds >= cpu_seconds and result.max_memory_mb >= peak_mb
    assert await executor.used_so_far() == (0.0, 0)


@pytest.mark.asyncio
async def test_the_scratch_dir_is_home_and_cwd_and_is_removed_after_the_job(
    executor: JobExecutor, tmp_path: Path
) -> None:
    result = await executor.run(make_spec(["sh", "-c", 'pwd; echo "home=$HOME"; touch leftover']))

    scratch = tmp_path / "scratch" / "job-1-1"
    assert result.reason == "EXITED"
    assert str(scratch) in result.output_tail
    assert f"home={scratch}" in result.output_tail
    assert not scratch.exists()


@pytest.mark.asyncio
async def test_an_empty_scratch_dir_is_the_next_jobs_under_its_own_name(executor: JobExecutor, tmp_path: Path) -> None:
    root = tmp_path / "scratch"
    first = await executor.run(make_spec(["sh", "-c", "ls -A; echo dir=$PWD"]))
    assert first.reason == "EXITED"
    assert sorted(p.name for p in root.iterdir()) == ["job-1-1"]  # left empty: kept for the next job

    second = await executor.run(make_spec(["sh", "-c", "ls -A; echo dir=$PWD; touch mine"], job_id="job-2"))
    assert second.output_tail.strip() == f"dir={root / 'job-2-1'}"  # its own name, and nothing in it
    assert list(root.iterdir()) == []  # it left a file: removed, not kept

    third = await executor.run(make_spec(["sh", "-c", "ls -A"], job_id="job-3"))
    assert (third.reason, third.output_tail) == ("EXITED", "")
    executor.close()
    assert list(root.iterdir()) == []


@pytest.mark.asyncio
async def test_a_kept_scratch_dir_that_changed_is_not_handed_on(executor: JobExecutor, tmp_path: Path) -> None:
    root = tmp_path / "scratch"
    await executor.run(make_spec(["true"]))
    kept = root / "job-1-1"
    (kept / "late").write_text("written after its job ended")  # e.g. by a process that escaped the job's group

    result = await executor.run(make_spec(["sh", "-c", "ls -A"], job_id="job-2"))

    assert (result.reason, result.output_tail) == ("EXITED", "")
    assert not kept.exists()


@pytest.mark.asyncio
async def test_a_given_working_dir_is_used_as_cwd_and_kept(executor: JobExecutor, tmp_path: Path) -> None:
    workdir = tmp_path / "work"
    workdir.mkdir()

    result = await executor.run(make_spec(["sh", "-c", "pwd; touch made-here"], working_dir=str(workdir)))

    assert result.reason == "EXITED"
    assert str(workdir) in result.output_tail
    assert (workdir / "made-here").exists()
