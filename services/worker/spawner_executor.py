"""PROTOTYPE: a JobExecutor whose sandboxed jobs start through the slot's spawner (services/worker/spawner.py)
instead of a bwrap -> setpriv -> sh chain per job. Used by bench/spawner_start.py and tests/integration/
test_spawner.py only; the worker still runs JobExecutor. It keeps everything of JobExecutor but the start: the
slot's uid pool, cgroup (reused), network namespace, scratch directory and the way a job's end is read from its
cgroup. Integrating it means moving ``_run_sandboxed`` and ``_start_and_supervise`` into executor.py."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from services.worker.cgroups import JobCgroup, signal_pids
from services.worker.executor import (
    _DRAIN_TIMEOUT_SECONDS,
    _MIB,
    REASON_EXITED,
    REASON_KILLED,
    REASON_OOM_KILLED,
    REASON_TIMEOUT,
    ExecResult,
    ExecSpec,
    JobExecutor,
    _decode_tail,
    _describe_exit,
    _empty_cgroup,
    _fmt_seconds,
    _inner_working_dir,
    _job_env,
    _make_inner_dirs,
    _OutputTail,
    _RunState,
    _shell_exit_code,
    _start_failed,
)
from services.worker.sandbox import JOB_PATH, SCRATCH, JobSandbox, Sandbox, SandboxError
from services.worker.spawner import Request, RequestError, SpawnedJob, Spawner, SpawnerError


class SpawnerExecutor(JobExecutor):
    """One slot's executor with its spawner, started at the slot's first sandboxed job and kept until ``close``."""

    def __init__(self, scratch_root: str, sandbox: Sandbox, bwrap: str = "/usr/bin/bwrap", **kwargs: float) -> None:
        super().__init__(scratch_root, sandbox=sandbox, **kwargs)  # type: ignore[arg-type]
        self._bwrap = bwrap
        self._spawner: Spawner | None = None

    @property
    def spawner_pid(self) -> int:
        return self._spawner.pid if self._spawner is not None else 0

    def close(self) -> None:
        if self._spawner is not None:
            self._spawner.close()
            self._spawner = None
        super().close()

    async def _run_sandboxed(self, spec: ExecSpec, state: _RunState, sandbox: Sandbox) -> ExecResult:
        if not spec.command:
            return _start_failed("empty command")
        inner_cwd = _inner_working_dir(spec.working_dir)
        if inner_cwd is None:
            return _start_failed(f"working_dir must be {SCRATCH} or inside it for a sandboxed job: {spec.working_dir}")
        kept, self._cgroup = self._cgroup, None
        try:
            if self._spawner is None:
                if self._network is None:
                    self._network = sandbox.slot_network()
                self._spawner = Spawner(self._bwrap, sandbox.etc_dir, sandbox.seccomp_program, self._network)
            job = sandbox.prepare(self._cgroup_name, spec.memory_mb, spec.cpu_millis, reuse=kept)
        except (OSError, SandboxError, ValueError) as exc:
            return _start_failed(f"cannot set up the job's sandbox: {exc}")
        scratch: str | None = None
        try:
            try:
                scratch = self._make_scratch_dir(spec, owner=job.uid)
                _make_inner_dirs(scratch, inner_cwd, job.uid)
            except OSError as exc:
                return _start_failed(f"cannot create scratch directory: {exc}")
            state.cgroup = job.cgroup
            env = _job_env(spec.env, home=SCRATCH, path=JOB_PATH)
            request = Request(
                job.uid,
                job.uid,
                [arg.encode() for arg in spec.command],
                [f"{name}={value}".encode() for name, value in env.items()],
                inner_cwd.encode(),
                list(job.rlimits),
            )
            return await self._start_and_supervise(spec, state, job, request, scratch)
        except RequestError as exc:
            return _start_failed(f"invalid command or environment: {exc}")
        finally:
            state.cgroup = None
            if await _empty_cgroup(job.cgroup):
                sandbox.release(job)
                self._cgroup = job.cgroup
            else:
                self._drop_network()  # its uid stays reserved, as JobExecutor does
                if self._spawner is not None:
                    self._spawner.close()  # the next job gets a spawner in a fresh network namespace
                    self._spawner = None
            if scratch is not None:
                await self._keep_or_remove(scratch, job.uid)

    async def _start_and_supervise(
        self, spec: ExecSpec, state: _RunState, job: JobSandbox, request: Request, scratch: str
    ) -> ExecResult:
        assert self._spawner is not None
        loop = asyncio.get_running_loop()
        out_read, out_write = os.pipe()
        err_read, err_write = os.pipe()
        output = _OutputTail((out_read, err_read), loop, spec.output)
        started = time.monotonic()
        try:
            try:
                handle = self._spawner.spawn(request, out_write, err_write, scratch)
            finally:
                os.close(out_write)
                os.close(err_write)
        except (OSError, SpawnerError) as exc:
            output.close()
            return _start_failed(f"cannot start the job: {exc}")
        try:
            try:
                init = await handle.init_pid()
                # Off the event loop, as JobExecutor does: a first write to a cgroup.procs can wait for RCU.
                await loop.run_in_executor(None, _join_cgroup, job.cgroup, init)
            except (OSError, SpawnerError) as exc:
                return _start_failed(f"cannot confine the job's sandbox: {exc}")  # closing `handle` kills it
            handle.let_go()
            return await self._supervise_spawned(spec, state, job, handle, output, started)
        finally:
            handle.close()
            output.close()

    async def _supervise_spawned(
        self,
        spec: ExecSpec,
        state: _RunState,
        job: JobSandbox,
        handle: SpawnedJob,
        output: _OutputTail,
        started: float,
    ) -> ExecResult:
        ended = asyncio.ensure_future(handle.exit_status())
        stop = state.stop_requested
        limit = spec.max_runtime_seconds if spec.max_runtime_seconds and spec.max_runtime_seconds > 0 else None
        reason, escalated = REASON_EXITED, False
        try:
            waiting: set[asyncio.Future[object]] = {ended, stop}  # type: ignore[arg-type]
            done, _ = await asyncio.wait(waiting, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
            if ended not in done:
                reason = REASON_KILLED if stop in done else REASON_TIMEOUT
                await self._sample(state)
                grace = 0.0 if state.kill_now else self._kill_grace_seconds
                escalated = await _terminate(handle, job.cgroup, ended, grace)
            returncode = await ended
        except SpawnerError as exc:
            return _start_failed(f"the job's spawner failed: {exc}")
        finally:
            if not ended.done():
                ended.cancel()
        run_seconds = time.monotonic() - started
        await _empty_cgroup(job.cgroup)
        final = job.cgroup.usage()
        await asyncio.wait({output.closed}, timeout=_DRAIN_TIMEOUT_SECONDS)
        if reason == REASON_TIMEOUT:
            message = f"killed after {_fmt_seconds(limit or 0.0)}s max runtime"
        elif reason == REASON_KILLED:
            message = "cancelled on request" + ("; SIGKILL at once" if state.kill_now else "")
            if escalated and not state.kill_now:
                message += f"; SIGKILL after {_fmt_seconds(self._kill_grace_seconds)}s grace"
        elif final.oom_kills and returncode != 0:
            reason = REASON_OOM_KILLED
            message = f"out of memory: a process was killed at the job's {spec.memory_mb} MB limit"
        else:
            message = _describe_exit(returncode, sandboxed=True)
        return ExecResult(
            exit_code=_shell_exit_code(returncode),
            reason=reason,
            message=message,
            run_seconds=run_seconds,
            cpu_seconds=final.cpu_seconds,
            max_memory_mb=final.peak_memory_bytes // _MIB,
            output_tail=_decode_tail(output.tail),
            stderr_tail=_decode_tail(output.err_tail),
        )


def _join_cgroup(cgroup: JobCgroup, pid: int) -> None:
    """The job's init into the job's cgroup(s) before it is let go (its children, the job, start there). The rlimits
    are the spawner's to set, in the job's first process."""
    data = str(pid).encode()
    for path in cgroup.procs_files:
        fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


async def _terminate(handle: SpawnedJob, cgroup: JobCgroup, ended: asyncio.Future[int], grace: float) -> bool:
    """SIGTERM the job's processes but its init, then SIGKILL the init (its whole pid namespace) and the cgroup if the
    job outlives `grace`; True if it came to that."""
    if grace > 0:
        signal_pids([p for p in cgroup.pids() if p != handle.pid], signal.SIGTERM)
        done, _ = await asyncio.wait({ended}, timeout=grace)
        if done:
            return False
    handle.kill()
    cgroup.kill()
    return True
