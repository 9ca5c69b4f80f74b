"""Runs one job as an isolated subprocess tree and reports how it ended and what it used.

With a Sandbox (services/worker/sandbox.py) each job runs under its own uid, namespaces and cgroup: its usage is
read from the cgroup and every process it started dies with it. Without one (`sandbox = "none"`, and the unit
tests) it runs as the agent's user in its own process group."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import resource
import secrets
import shutil
import signal
import stat
import subprocess
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import psutil

from services.worker.cgroups import JobCgroup, signal_pids
from services.worker.sandbox import JOB_PATH, SCRATCH, JobSandbox, Sandbox, SandboxError, SlotNetwork
from services.worker.spawner import Request, RequestError, SpawnedJob, Spawner, SpawnerError

REASON_EXITED = "EXITED"
REASON_KILLED = "KILLED"
REASON_TIMEOUT = "TIMEOUT"
REASON_START_FAILED = "START_FAILED"
REASON_OOM_KILLED = "OOM_KILLED"

log = logging.getLogger(__name__)

_TAIL_BYTES = 4096
_READ_CHUNK = 64 * 1024
# Once the job's root has exited and its group was SIGKILLed, the pipe closes almost at once; the bound
# only matters if some process escaped the group (setsid) while still holding our pipe.
_DRAIN_TIMEOUT_SECONDS = 1.0
_FALLBACK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MIB = 1024 * 1024
# Waiting for a sandboxed job's last processes to go once its namespace was killed: usually a few ms.
_EMPTY_TIMEOUT_SECONDS = 3.0


@dataclass(frozen=True)
class ExecSpec:
    job_id: str
    attempt: int
    command: list[str]
    env: dict[str, str]
    working_dir: str | None
    max_runtime_seconds: float | None
    # What the job asked for: its cgroup's limits when sandboxed (memory is a hard limit, CPU a quota).
    cpu_millis: int = 1000
    memory_mb: int = 1024
    # Called with each chunk of the job's output (stdout and stderr, as they come) on the agent's loop.
    output: Callable[[bytes], None] | None = field(default=None, compare=False)


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    reason: str
    message: str
    run_seconds: float
    cpu_seconds: float
    max_memory_mb: int
    output_tail: str
    # The last few KiB the job wrote to stderr alone (what a failed job's message shows).
    stderr_tail: str = ""


@dataclass(frozen=True)
class _TreeUsage:
    cpu_seconds: float
    rss_bytes: int
    high_water_bytes: int


class _RunState:
    """Mutable bookkeeping for the job currently in flight."""

    def __init__(self, job_id: str, loop: asyncio.AbstractEventLoop) -> None:
        self.job_id = job_id
        self.loop = loop
        self.stop_requested: asyncio.Future[None] = loop.create_future()
        self.kill_now = False  # stop with SIGKILL at once, without the SIGTERM grace
        self.pid = 0  # the job's root process, until it has been reaped
        self.root: psutil.Process | None = None  # made at the first sample: most jobs end before one
        self.cpu_seconds = 0.0
        self.peak_rss_bytes = 0
        self.cgroup: JobCgroup | None = None  # a sandboxed job's: its usage comes from there

    def request_stop(self) -> None:
        try:
            current = asyncio.get_running_loop()
        except RuntimeError:
            current = None
        if current is self.loop:
            self._stop()
            return
        # Futures are not thread-safe; a cancel from a gRPC thread must hop onto the job's loop.
        try:
            self.loop.call_soon_threadsafe(self._stop)
        except RuntimeError:
            pass  # loop already closed: the job is over anyway

    def _stop(self) -> None:
        if not self.stop_requested.done():
            self.stop_requested.set_result(None)

    def sampled_root(self) -> psutil.Process | None:
        """The root process to sample, looked up on first use (its pid stays ours until we reap it)."""
        if self.root is None and self.pid:
            try:
                self.root = psutil.Process(self.pid)
            except psutil.Error:
                self.pid = 0  # already gone; nothing to sample
        return self.root

    def record(self, usage: _TreeUsage) -> None:
        # Sampled totals can dip when a child is orphaned out of the tree, so keep the high-water marks.
        self.cpu_seconds = max(self.cpu_seconds, usage.cpu_seconds)
        self.peak_rss_bytes = max(self.peak_rss_bytes, usage.rss_bytes, usage.high_water_bytes)


class JobExecutor:
    """Runs at most one job at a time; see ``run`` and ``cancel``."""

    def __init__(
        self,
        scratch_root: str,
        sample_interval: float = 0.2,
        kill_grace_seconds: float = 2.0,
        first_sample_delay: float = 0.05,
        sandbox: Sandbox | None = None,
        refusal: str | None = None,
    ) -> None:
        if sample_interval <= 0 or first_sample_delay < 0:
            raise ValueError("sample_interval must be positive, first_sample_delay not negative")
        if kill_grace_seconds < 0:
            raise ValueError("kill_grace_seconds must not be negative")
        self._scratch_root = scratch_root
        self._sample_interval = sample_interval
        # Sampling walks the whole process table; a job that ends sooner than this is never walked (its CPU
        # still comes exactly from the kernel's accounting of reaped children).
        self._first_sample_delay = first_sample_delay
        self._kill_grace_seconds = kill_grace_seconds
        self._sandbox = sandbox
        self._cgroup: JobCgroup | None = None  # this slot's cgroup, empty, kept from its last sandboxed job
        self._cgroup_name = f"slot-{secrets.token_hex(4)}"
        # network = "none": this slot's network namespace, made at its first sandboxed job and kept for the next
        # ones (one at a time), dropped with a job whose processes could not all be killed.
        self._network: SlotNetwork | None = None
        # This slot's spawner (services/worker/spawner.py), started at its first sandboxed job, in its network
        # namespace, and kept for the next ones; replaced with the network namespace.
        self._spawner: Spawner | None = None
        # Set when the pool wants a sandbox this machine cannot give: every job is refused, none runs unconfined.
        self._refusal = refusal
        self._state: _RunState | None = None
        # The last job's scratch directory when that job left it empty: the next job gets it under its own name
        # (a rename), sparing the file system a directory made and removed per job.
        self._spare: str | None = None

    def sibling(self) -> JobExecutor:
        """Another executor with the same settings, for a worker that runs several jobs at once."""
        return JobExecutor(
            self._scratch_root,
            self._sample_interval,
            self._kill_grace_seconds,
            self._first_sample_delay,
            self._sandbox,
            self._refusal,
        )

    @property
    def spawner_pid(self) -> int:
        """The slot's spawner (bwrap's pid, its outermost process), 0 before the slot's first sandboxed job."""
        return self._spawner.pid if self._spawner is not None else 0

    @property
    def running_job_id(self) -> str | None:
        state = self._state
        return state.job_id if state is not None else None

    def cancel(self, job_id: str, *, kill_now: bool = False) -> bool:
        """Ask the running job to stop; True if ``job_id`` is the job this executor is running. ``kill_now``
        skips the SIGTERM grace (a worker fencing itself must have the job dead before its lease can expire)."""
        state = self._state
        if state is None or state.job_id != job_id:
            return False
        state.kill_now = state.kill_now or kill_now
        state.request_stop()
        return True

    async def live_usage(self) -> tuple[float, int]:
        """Current (cpu_seconds, rss_mb) of the running job's process tree; (0.0, 0) when idle."""
        state = self._state
        if state is None or (state.cgroup is None and state.sampled_root() is None):
            return (0.0, 0)
        rss_bytes = await self._sample(state)
        return (state.cpu_seconds, rss_bytes // _MIB)

    async def used_so_far(self) -> tuple[float, int]:
        """(cpu_seconds, peak memory MB) of the running job since it started, as its result will count them: the
        cgroup's counters read now when sandboxed, else the sampler's high-water marks (no extra walk of the process
        table); (0.0, 0) when idle."""
        state = self._state
        if state is None:
            return (0.0, 0)
        if state.cgroup is not None:
            await self._sample(state)
        return (state.cpu_seconds, state.peak_rss_bytes // _MIB)

    async def run(self, spec: ExecSpec) -> ExecResult:
        # Claim the executor before the first await so two concurrent callers cannot both get in.
        if self._state is not None:
            raise RuntimeError(f"executor is busy with job {self._state.job_id}")
        state = _RunState(spec.job_id, asyncio.get_running_loop())
        self._state = state
        try:
            return await self._run_in_dir(spec, state)
        finally:
            self._state = None

    async def _run_in_dir(self, spec: ExecSpec, state: _RunState) -> ExecResult:
        if self._refusal is not None:
            return _start_failed(self._refusal)
        if self._sandbox is not None:
            return await self._run_sandboxed(spec, state, self._sandbox)
        scratch: str | None = None
        if spec.working_dir is None:
            try:
                scratch = self._make_scratch_dir(spec)
            except OSError as exc:
                return _start_failed(f"cannot create scratch directory: {exc}")
            cwd = scratch
        elif not os.path.isdir(spec.working_dir):
            return _start_failed(f"working directory does not exist or is not a directory: {spec.working_dir}")
        else:
            cwd = spec.working_dir
        try:
            return await self._spawn_and_supervise(
                spec, state, spec.command, cwd, _job_env(spec.env, home=cwd, path=os.environ.get("PATH"))
            )
        finally:
            if scratch is not None:
                await self._keep_or_remove(scratch, os.getuid())

    async def _run_sandboxed(self, spec: ExecSpec, state: _RunState, sandbox: Sandbox) -> ExecResult:
        """The job in its own sandbox, started by the slot's spawner; its uid is given back only once the last of
        its processes is gone."""
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
                self._spawner = sandbox.spawner(self._network)
            # The slot's group from its last job is reused if it can be; prepare removes it otherwise.
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
            try:
                request = job.request(spec.command, _job_env(spec.env, home=SCRATCH, path=JOB_PATH), inner_cwd)
            except RequestError as exc:
                return _start_failed(f"invalid command or environment: {exc}")
            state.cgroup = job.cgroup
            return await self._start_spawned(spec, state, job, self._spawner, request, scratch)
        finally:
            state.cgroup = None
            if await _empty_cgroup(job.cgroup):
                sandbox.release(job)
                # The slot's next job gets this group back, its counters reset: no group made and removed per job.
                self._cgroup = job.cgroup
            else:
                # Keep the uid (and the group) out of use rather than hand a live process's uid to another job,
                # and give the slot's next job a spawner and network namespace those processes are not in.
                log.error("job %s left processes in its cgroup; its uid %d stays reserved", spec.job_id, job.uid)
                self._drop_spawner()
            if scratch is not None:
                await self._keep_or_remove(scratch, job.uid)

    async def _start_spawned(
        self, spec: ExecSpec, state: _RunState, job: JobSandbox, spawner: Spawner, request: Request, scratch: str
    ) -> ExecResult:
        """Asks the slot's spawner to start the job, puts the job's init (held at its gate) in the job's cgroup,
        lets it go and supervises it."""
        loop = asyncio.get_running_loop()
        output, out_write, err_write = _output_pipes(loop, spec)
        started = time.monotonic()
        try:
            try:
                handle = spawner.spawn(request, out_write, err_write, scratch)
            finally:
                os.close(out_write)  # the spawner's init holds its own copies
                os.close(err_write)
        except (OSError, SpawnerError) as exc:
            output.close()
            self._drop_spawner()  # a spawner that cannot take a job is not asked again
            return _start_failed(f"cannot start the job: {exc}")
        except RequestError as exc:
            output.close()
            return _start_failed(f"invalid command or environment: {exc}")
        try:
            # Any failure before let_go: closing `handle` kills the init at its gate, and nothing of the job's has run.
            try:
                init = await handle.init_pid()
            except (OSError, SpawnerError) as exc:
                return _start_failed(f"cannot start the job's sandbox: {exc}")
            try:
                # Off the event loop: the first write to a cgroup.procs can wait for an RCU grace period (ms).
                await loop.run_in_executor(None, job.confine, init)
            except OSError as exc:
                return _start_failed(f"cannot confine the job's sandbox: {exc.strerror or exc}")
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
        """Waits for the job's end, a stop or its time limit; its usage is the cgroup's (exact, no sampling)."""
        ended = asyncio.ensure_future(handle.exit_status())
        try:
            reason, escalated = await self._until_end(
                spec, state, ended, lambda grace: _terminate_spawned(handle, job.cgroup, ended, grace)
            )
            returncode = await ended
        except SpawnerError as exc:
            return _start_failed(f"the job's spawner failed: {exc}")
        finally:
            if not ended.done():
                ended.cancel()
        run_seconds = time.monotonic() - started
        await _empty_cgroup(job.cgroup)
        final = job.cgroup.usage()
        state.cpu_seconds = max(state.cpu_seconds, final.cpu_seconds)
        state.peak_rss_bytes = max(state.peak_rss_bytes, final.peak_memory_bytes)
        await asyncio.wait({output.closed}, timeout=_DRAIN_TIMEOUT_SECONDS)
        return self._result(spec, state, output, reason, returncode, run_seconds, escalated, final.oom_kills, True)

    async def _keep_or_remove(self, scratch: str, owner: int) -> None:
        if self._spare is None and _empty_own_dir(scratch, owner):
            try:
                if owner != os.getuid():
                    os.chown(scratch, os.getuid(), os.getgid())  # kept by the agent until the next job takes it
                self._spare = scratch
                return
            except OSError:
                pass
        await _remove_tree(scratch)

    def close(self) -> None:
        """Removes the kept scratch directory and cgroup, and stops the slot's spawner (the agent stops)."""
        self._drop_spawner()
        cgroup, self._cgroup = self._cgroup, None
        if cgroup is not None:
            _remove_cgroup(cgroup)
        spare, self._spare = self._spare, None
        if spare is not None:
            shutil.rmtree(spare, ignore_errors=True)

    def _drop_spawner(self) -> None:
        """Stops the slot's spawner (and any job it still runs) and lets go of the slot's network namespace."""
        spawner, self._spawner = self._spawner, None
        if spawner is not None:
            spawner.close()
        network, self._network = self._network, None
        if network is not None:
            network.close()

    def _make_scratch_dir(self, spec: ExecSpec, owner: int | None = None) -> str:
        """A fresh, empty 0700 directory for the job, owned by `owner` (the job's uid when sandboxed)."""
        path = os.path.join(self._scratch_root, _safe_name(spec))
        path = self._fresh_dir(path)
        if owner is not None and owner != os.getuid():
            os.chown(path, owner, owner)
        return path

    def _fresh_dir(self, path: str) -> str:
        spare, self._spare = self._spare, None
        if spare is not None:
            # Checked again now: a process of the last job that escaped its group may have written to it since.
            if _empty_own_dir(spare, os.getuid()) and not os.path.lexists(path):
                try:
                    os.rename(spare, path)
                    return path
                except OSError:
                    pass
            shutil.rmtree(spare, ignore_errors=True)
        try:
            os.mkdir(path, 0o700)
            return path
        except FileNotFoundError:
            os.makedirs(self._scratch_root, exist_ok=True)
        except FileExistsError:
            # A leftover from a crashed agent would leak old files into a retry that expects a fresh dir.
            if os.path.islink(path) or os.path.isfile(path):
                os.unlink(path)
            else:
                shutil.rmtree(path)
        os.mkdir(path, 0o700)
        return path

    async def _spawn_and_supervise(
        self,
        spec: ExecSpec,
        state: _RunState,
        argv: list[str],
        cwd: str,
        env: dict[str, str],
    ) -> ExecResult:
        if not spec.command:
            return _start_failed("empty command")

        loop = asyncio.get_running_loop()
        output, out_write, err_write = _output_pipes(loop, spec)
        started = time.monotonic()
        try:
            try:
                # Popen only forks and execs (vfork), then returns; the child is reaped through its pidfd.
                proc = subprocess.Popen(  # noqa: ASYNC220
                    argv,
                    stdin=_devnull(),
                    stdout=out_write,
                    stderr=err_write,
                    cwd=cwd,
                    env=env,
                    # Own session => own process group, so one killpg reaches everything the job forked.
                    start_new_session=True,
                )
            finally:
                # The child holds its own copies; ours would keep the pipes from ever reaching EOF.
                os.close(out_write)
                os.close(err_write)
        except (OSError, ValueError) as exc:
            output.close()
            return _start_failed(_describe_start_error(exc, spec.command[0], cwd))
        except BaseException:
            output.close()
            raise

        child = _Child(proc, loop)
        return await self._supervise(spec, state, child, output, started)

    async def _supervise(
        self,
        spec: ExecSpec,
        state: _RunState,
        child: _Child,
        output: _OutputTail,
        started: float,
    ) -> ExecResult:
        """An unsandboxed job (sandbox = "none"): its process group, sampled from the process table."""
        pgid = child.pid
        state.pid = child.pid
        sampler: asyncio.Task[None] | None = None

        def start_sampling() -> None:
            nonlocal sampler
            sampler = asyncio.create_task(self._sample_forever(state))

        # A job that ends before the first sample (most) never starts a sampler.
        first_sample = state.loop.call_later(self._first_sample_delay, start_sampling)
        exited = child.exited
        try:
            reason, escalated = await self._until_end(
                spec, state, exited, lambda grace: self._terminate(pgid, exited, grace)
            )
            returncode, usage = await exited
            run_seconds = time.monotonic() - started
            state.root, state.pid = None, 0
            # The kernel's account of the root and every descendant it waited for: exact, however short the job.
            state.cpu_seconds = max(state.cpu_seconds, usage.ru_utime + usage.ru_stime)
            state.peak_rss_bytes = max(state.peak_rss_bytes, usage.ru_maxrss * 1024)
            # Whatever the job left behind in its group must not outlive it.
            _signal_group(pgid, signal.SIGKILL)
            await asyncio.wait({output.closed}, timeout=_DRAIN_TIMEOUT_SECONDS)
        finally:
            _signal_group(pgid, signal.SIGKILL)
            first_sample.cancel()
            if sampler is not None:
                sampler.cancel()
            output.close()
        return self._result(spec, state, output, reason, returncode, run_seconds, escalated, 0, False)

    async def _until_end(
        self,
        spec: ExecSpec,
        state: _RunState,
        ended: asyncio.Future[Any],
        terminate: Callable[[float], Awaitable[bool]],
    ) -> tuple[str, bool]:
        """Waits for the job's end (`ended`), a stop or its time limit, and in the last two cases stops it
        (`terminate`, given the grace: True if it came to SIGKILL). (reason, escalated)."""
        stop = state.stop_requested
        waiting: set[asyncio.Future[Any]] = {ended, stop}
        done, _ = await asyncio.wait(waiting, timeout=_time_limit(spec), return_when=asyncio.FIRST_COMPLETED)
        if ended in done:
            return REASON_EXITED, False
        reason = REASON_KILLED if stop in done else REASON_TIMEOUT
        # Last look before the tree disappears, so the report covers the whole run.
        await self._sample(state)
        grace = 0.0 if state.kill_now else self._kill_grace_seconds
        return reason, await terminate(grace)

    def _result(
        self,
        spec: ExecSpec,
        state: _RunState,
        output: _OutputTail,
        reason: str,
        returncode: int,
        run_seconds: float,
        escalated: bool,
        oom_kills: int,
        sandboxed: bool,
    ) -> ExecResult:
        """How the job ended, in words, with what it used (``state``) and the tails of its output."""
        if reason == REASON_TIMEOUT:
            message = f"killed after {_fmt_seconds(_time_limit(spec) or 0.0)}s max runtime"
        elif reason == REASON_KILLED:
            message = "cancelled on request"
            if state.kill_now:
                message += "; SIGKILL at once"
            elif escalated:
                message += f"; SIGKILL after {_fmt_seconds(self._kill_grace_seconds)}s grace"
        elif oom_kills and returncode != 0:
            reason = REASON_OOM_KILLED
            message = f"out of memory: a process was killed at the job's {spec.memory_mb} MB limit"
        else:
            message = _describe_exit(returncode, sandboxed=sandboxed)
        return ExecResult(
            exit_code=_shell_exit_code(returncode),
            reason=reason,
            message=message,
            run_seconds=run_seconds,
            cpu_seconds=state.cpu_seconds,
            max_memory_mb=state.peak_rss_bytes // _MIB,
            output_tail=_decode_tail(output.tail),
            stderr_tail=_decode_tail(output.err_tail),
        )

    async def _terminate(
        self, pgid: int, exited: asyncio.Future[tuple[int, resource.struct_rusage]], grace: float
    ) -> bool:
        """SIGTERM the group, SIGKILL it if the root outlives the grace period; True if escalated."""
        if grace <= 0:
            _signal_group(pgid, signal.SIGKILL)
            return True
        _signal_group(pgid, signal.SIGTERM)
        done, _ = await asyncio.wait({exited}, timeout=grace)
        if done:
            return False
        _signal_group(pgid, signal.SIGKILL)
        return True

    async def _sample_forever(self, state: _RunState) -> None:
        while True:
            await self._sample(state)
            await asyncio.sleep(self._sample_interval)

    async def _sample(self, state: _RunState) -> int:
        """Record one usage sample into ``state``; returns the tree's current RSS in bytes."""
        if state.cgroup is not None:
            # A few small files the kernel keeps up to date: no walk of the process table.
            now = state.cgroup.usage()
            state.record(_TreeUsage(now.cpu_seconds, now.memory_bytes, now.peak_memory_bytes))
            return now.memory_bytes
        root = state.sampled_root()
        if root is None:
            return 0
        # Walking the process table reads all of /proc; keep that off the event loop.
        usage = await asyncio.to_thread(_measure_tree, root)
        state.record(usage)
        return usage.rss_bytes


_DEVNULL = -1


def _devnull() -> int:
    """Jobs read an empty stdin: one descriptor for the process (subprocess.DEVNULL opens one per job)."""
    global _DEVNULL
    if _DEVNULL < 0:
        _DEVNULL = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    return _DEVNULL


def _output_pipes(loop: asyncio.AbstractEventLoop, spec: ExecSpec) -> tuple[_OutputTail, int, int]:
    """The job's stdout and stderr: our own pipes rather than stdout=PIPE (asyncio's Process.wait() also waits for
    PIPE streams to close, which a backgrounded grandchild can hold open long after the job itself exited). Two, so
    that stderr's tail can be told apart; both go to the job's log as they come. Returns the reading side and the
    two write ends, for the job's first process only (close ours once it has them)."""
    out_read, out_write = os.pipe()
    err_read, err_write = os.pipe()
    try:
        return _OutputTail((out_read, err_read), loop, spec.output), out_write, err_write
    except BaseException:
        for fd in (out_read, out_write, err_read, err_write):
            os.close(fd)
        raise


def _job_env(extra: dict[str, str], home: str, path: str | None) -> dict[str, str]:
    # PATH is the only thing taken from the agent, so jobs find the host's tools but never its secrets.
    env = {
        "PATH": path or _FALLBACK_PATH,
        "HOME": home,
        "LANG": "C.UTF-8",
    }
    env.update(extra)
    return env


def _measure_tree(root: psutil.Process) -> _TreeUsage:
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return _TreeUsage(0.0, 0, 0)
    cpu = 0.0
    rss = 0
    high_water = 0
    for proc in procs:
        try:
            with proc.oneshot():
                times = proc.cpu_times()
                mem = proc.memory_info()
        except psutil.Error:
            continue  # exited between listing and reading; its CPU shows up in its parent's children_*
        # children_* holds already-reaped descendants, which no live process reports any more.
        cpu += times.user + times.system + times.children_user + times.children_system
        rss += mem.rss
        high_water = max(high_water, _high_water_rss(proc.pid))
    return _TreeUsage(cpu, rss, high_water)


class _Child:
    """A job's root process, reaped by us through a pidfd: no watcher thread per job, and wait4 hands back the
    kernel's exact CPU time and peak RSS of the root and the descendants it waited for."""

    def __init__(self, popen: subprocess.Popen[bytes], loop: asyncio.AbstractEventLoop) -> None:
        self.pid = popen.pid
        self._popen = popen
        self._loop = loop
        self.exited: asyncio.Future[tuple[int, resource.struct_rusage]] = loop.create_future()
        self._fd = -1
        try:
            self._fd = os.pidfd_open(self.pid)
        except (AttributeError, OSError):
            # No pidfd (old kernel, not Linux): a thread blocks in wait4 instead.
            loop.run_in_executor(None, self._wait_blocking)
            return
        loop.add_reader(self._fd, self._reap)

    def _reap(self) -> None:
        try:
            pid, status, usage = os.wait4(self.pid, os.WNOHANG)
        except ChildProcessError:  # reaped elsewhere: no status or usage left to read
            pid, status, usage = self.pid, 0, resource.struct_rusage((0,) * 16)
        if pid == 0:
            return  # not exited yet
        self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._finish(status, usage)

    def _wait_blocking(self) -> None:
        _, status, usage = os.wait4(self.pid, 0)
        self._loop.call_soon_threadsafe(self._finish, status, usage)

    def _finish(self, status: int, usage: resource.struct_rusage) -> None:
        code = os.waitstatus_to_exitcode(status)
        self._popen.returncode = code  # reaped here: Popen must not wait for it again
        if not self.exited.done():
            self.exited.set_result((code, usage))


def _high_water_rss(pid: int) -> int:
    # The kernel's per-process peak catches spikes shorter than the sampling interval (Linux only).
    try:
        with open(f"/proc/{pid}/status", "rb") as fh:
            for line in fh:
                if line.startswith(b"VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


class _OutputTail:
    """The job's stdout and stderr pipes, read as they come with reader callbacks on the raw descriptors (no
    transport or stream objects, and the same on asyncio and uvloop): each chunk goes to `sink` (the job's log),
    and the last _TAIL_BYTES are kept of both together and of stderr alone. `closed` resolves at end of file of
    both: once every process holding a write end is gone."""

    def __init__(
        self, fds: tuple[int, int], loop: asyncio.AbstractEventLoop, sink: Callable[[bytes], None] | None = None
    ) -> None:
        self._loop = loop
        self._sink = sink
        self._open = list(fds)
        self._err_fd = fds[1]
        self.tail = bytearray()
        self.err_tail = bytearray()
        self.closed: asyncio.Future[None] = loop.create_future()
        for fd in fds:
            os.set_blocking(fd, False)
        for fd in fds:
            loop.add_reader(fd, self._read, fd)

    def _read(self, fd: int) -> None:
        try:
            chunk = os.read(fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""  # output is best effort: a read error ends it
        if not chunk:
            self._close_fd(fd)
            return
        _keep_tail(self.tail, chunk)
        if fd == self._err_fd:
            _keep_tail(self.err_tail, chunk)
        if self._sink is not None:
            try:
                self._sink(chunk)
            except Exception:  # the log is best effort: the job runs on without it
                log.exception("the job's output sink failed")
                self._sink = None

    def _close_fd(self, fd: int) -> None:
        if fd in self._open:
            self._loop.remove_reader(fd)
            os.close(fd)
            self._open[self._open.index(fd)] = -1
        if all(f < 0 for f in self._open) and not self.closed.done():
            self.closed.set_result(None)

    def close(self) -> None:
        for fd in list(self._open):
            if fd >= 0:
                self._close_fd(fd)
        if not self.closed.done():
            self.closed.set_result(None)


def _keep_tail(tail: bytearray, chunk: bytes) -> None:
    tail += chunk
    if len(tail) > _TAIL_BYTES:
        del tail[:-_TAIL_BYTES]


def _empty_own_dir(path: str, owner: int) -> bool:
    """A real directory (no link), `owner`'s, private, and empty: fit to be a later job's fresh scratch directory."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != owner or stat.S_IMODE(st.st_mode) != 0o700:
            return False
        with os.scandir(path) as entries:
            return next(entries, None) is None
    except OSError:
        return False


async def _remove_tree(path: str) -> None:
    try:
        os.rmdir(path)  # most jobs leave their scratch dir empty
        return
    except OSError:
        pass
    try:
        await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
    except asyncio.CancelledError:
        # The caller is going away; still do not leave the scratch dir behind.
        shutil.rmtree(path, ignore_errors=True)
        raise


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass  # group already empty


def _safe_name(spec: ExecSpec) -> str:
    # job_id comes over the wire; never let it climb out of scratch_root (or out of the agent's cgroup).
    return f"{re.sub(r'[^A-Za-z0-9._-]', '_', spec.job_id) or 'job'}-{spec.attempt}"


def _inner_working_dir(working_dir: str | None) -> str | None:
    """Where a sandboxed job starts: /scratch, or a directory inside it; None for anywhere else."""
    if not working_dir:
        return SCRATCH
    path = os.path.normpath(working_dir)
    return path if path == SCRATCH or path.startswith(SCRATCH + "/") else None


def _make_inner_dirs(scratch: str, inner_cwd: str, owner: int) -> None:
    """Makes a working_dir below /scratch in the host's scratch dir, owned by the job."""
    current = scratch
    for part in os.path.relpath(inner_cwd, SCRATCH).split("/"):
        if part in ("", "."):
            continue
        current = os.path.join(current, part)
        os.mkdir(current, 0o700)
        os.chown(current, owner, owner)


async def _terminate_spawned(handle: SpawnedJob, cgroup: JobCgroup, ended: asyncio.Future[int], grace: float) -> bool:
    """SIGTERM the job's processes but its init (pid 1 of the namespace: killing it kills the namespace at once), then
    SIGKILL the init (its whole pid namespace) and the cgroup if the job outlives `grace` (at once without one); True
    if it came to that."""
    if grace > 0:
        signal_pids([p for p in cgroup.pids() if p != handle.pid], signal.SIGTERM)
        done, _ = await asyncio.wait({ended}, timeout=grace)
        if done:
            return False
    handle.kill()
    cgroup.kill()
    return True


def _time_limit(spec: ExecSpec) -> float | None:
    limit = spec.max_runtime_seconds
    return limit if limit is not None and limit > 0 else None


async def _empty_cgroup(cgroup: JobCgroup) -> bool:
    """Kills what is left in the job's cgroup until nothing is; False if something outlived the bound."""
    deadline = time.monotonic() + _EMPTY_TIMEOUT_SECONDS
    pause = 0.0005
    while cgroup.pids():
        if time.monotonic() > deadline:
            return False
        cgroup.kill()
        await asyncio.sleep(pause)
        pause = min(pause * 2, 0.05)
    return True


def _remove_cgroup(cgroup: JobCgroup) -> bool:
    for _ in range(20):  # an emptied group can stay busy for a moment while the last exits are accounted
        if cgroup.remove():
            return True
        time.sleep(0.005)
    return False


def _shell_exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _describe_exit(returncode: int, sandboxed: bool = False) -> str:
    if sandboxed and 128 < returncode <= 128 + 64:
        # bwrap reports a job killed by signal N as exit code 128 + N, as a shell does.
        try:
            return f"exit code {returncode} (128 + {signal.Signals(returncode - 128).name})"
        except ValueError:
            return f"exit code {returncode}"
    if returncode >= 0:
        return f"exit code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    return f"terminated by {name}"


def _describe_start_error(exc: OSError | ValueError, program: str, cwd: str) -> str:
    if isinstance(exc, ValueError):
        return f"invalid command or environment: {exc}"
    # subprocess reports a failed chdir with the directory as filename, a failed exec with the program.
    if exc.filename == cwd:
        return f"cannot enter working directory {cwd}: {exc.strerror or exc}"
    if isinstance(exc, FileNotFoundError):
        return f"command not found: {program}"
    if isinstance(exc, PermissionError):
        return f"permission denied: {program}"
    return f"cannot start {program}: {exc.strerror or exc}"


def _start_failed(message: str) -> ExecResult:
    return ExecResult(
        exit_code=-1,
        reason=REASON_START_FAILED,
        message=message,
        run_seconds=0.0,
        cpu_seconds=0.0,
        max_memory_mb=0,
        output_tail="",
    )


def _decode_tail(tail: bytearray) -> str:
    start = 0
    # Trimming to the last N bytes can cut a UTF-8 sequence; skip its orphaned continuation bytes.
    while start < len(tail) and start < 3 and (tail[start] & 0xC0) == 0x80:
        start += 1
    return bytes(tail[start:]).decode("utf-8", errors="replace")


def _fmt_seconds(seconds: float) -> str:
    return f"{seconds:.1f}" if round(seconds, 1) == seconds else f"{seconds:g}"
