"""Runs one job as an isolated subprocess tree and reports how it ended and what it used."""

from __future__ import annotations

import asyncio
import os
import re
import resource
import shutil
import signal
import stat
import subprocess
import time
from dataclasses import dataclass

import psutil

REASON_EXITED = "EXITED"
REASON_KILLED = "KILLED"
REASON_TIMEOUT = "TIMEOUT"
REASON_START_FAILED = "START_FAILED"

_TAIL_BYTES = 4096
_READ_CHUNK = 64 * 1024
# Once the job's root has exited and its group was SIGKILLed, the pipe closes almost at once; the bound
# only matters if some process escaped the group (setsid) while still holding our pipe.
_DRAIN_TIMEOUT_SECONDS = 1.0
_FALLBACK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MIB = 1024 * 1024


@dataclass(frozen=True)
class ExecSpec:
    job_id: str
    attempt: int
    command: list[str]
    env: dict[str, str]
    working_dir: str | None
    max_runtime_seconds: float | None


@dataclass(frozen=True)
class ExecResult:
    exit_code: int
    reason: str
    message: str
    run_seconds: float
    cpu_seconds: float
    max_memory_mb: int
    output_tail: str


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
        self._state: _RunState | None = None
        # The last job's scratch directory when that job left it empty: the next job gets it under its own name
        # (a rename), sparing the file system a directory made and removed per job.
        self._spare: str | None = None

    def sibling(self) -> JobExecutor:
        """Another executor with the same settings, for a worker that runs several jobs at once."""
        return JobExecutor(
            self._scratch_root, self._sample_interval, self._kill_grace_seconds, self._first_sample_delay
        )

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
        if state is None or state.sampled_root() is None:
            return (0.0, 0)
        rss_bytes = await self._sample(state)
        return (state.cpu_seconds, rss_bytes // _MIB)

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
            return await self._spawn_and_supervise(spec, state, cwd)
        finally:
            if scratch is not None:
                if self._spare is None and _empty_own_dir(scratch):
                    self._spare = scratch
                else:
                    await _remove_tree(scratch)

    def close(self) -> None:
        """Removes the kept scratch directory (the agent stops)."""
        spare, self._spare = self._spare, None
        if spare is not None:
            shutil.rmtree(spare, ignore_errors=True)

    def _make_scratch_dir(self, spec: ExecSpec) -> str:
        # job_id comes over the wire; never let it climb out of scratch_root.
        safe_id = re.sub(r"[^A-Za-z0-9._-]", "_", spec.job_id) or "job"
        path = os.path.join(self._scratch_root, f"{safe_id}-{spec.attempt}")
        spare, self._spare = self._spare, None
        if spare is not None:
            # Checked again now: a process of the last job that escaped its group may have written to it since.
            if _empty_own_dir(spare) and not os.path.lexists(path):
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

    async def _spawn_and_supervise(self, spec: ExecSpec, state: _RunState, cwd: str) -> ExecResult:
        if not spec.command:
            return _start_failed("empty command")
        env = _job_env(spec.env, home=cwd)

        # Our own pipe rather than stdout=PIPE: asyncio's Process.wait() also waits for PIPE streams to
        # close, which a backgrounded grandchild can hold open long after the job itself exited.
        read_fd, write_fd = os.pipe()
        loop = asyncio.get_running_loop()
        try:
            output = _OutputTail(read_fd, loop)
        except BaseException:
            os.close(read_fd)
            os.close(write_fd)
            raise

        started = time.monotonic()
        try:
            try:
                # Popen only forks and execs (vfork), then returns; the child is reaped through its pidfd.
                proc = subprocess.Popen(  # noqa: ASYNC220
                    spec.command,
                    stdin=_devnull(),
                    stdout=write_fd,
                    stderr=subprocess.STDOUT,
                    cwd=cwd,
                    env=env,
                    # Own session => own process group, so one killpg reaches everything the job forked.
                    start_new_session=True,
                )
            finally:
                # The child holds its own copy; ours would keep the pipe from ever reaching EOF.
                os.close(write_fd)
        except (OSError, ValueError) as exc:
            output.close()
            return _start_failed(_describe_start_error(exc, spec.command[0], cwd))
        except BaseException:
            output.close()
            raise

        return await self._supervise(spec, state, _Child(proc, loop), output, started)

    async def _supervise(
        self, spec: ExecSpec, state: _RunState, child: _Child, output: _OutputTail, started: float
    ) -> ExecResult:
        pgid = child.pid
        state.pid = child.pid
        sampler: asyncio.Task[None] | None = None

        def start_sampling() -> None:
            nonlocal sampler
            sampler = asyncio.create_task(self._sample_forever(state))

        # A job that ends before the first sample (most) never starts a sampler.
        first_sample = state.loop.call_later(self._first_sample_delay, start_sampling)
        exited = child.exited
        stop = state.stop_requested
        limit = spec.max_runtime_seconds
        if limit is not None and limit <= 0:
            limit = None
        reason = REASON_EXITED
        escalated = False
        try:
            waiting: set[asyncio.Future[object]] = {exited, stop}  # type: ignore[arg-type]
            done, _ = await asyncio.wait(waiting, timeout=limit, return_when=asyncio.FIRST_COMPLETED)
            if exited not in done:
                reason = REASON_KILLED if stop in done else REASON_TIMEOUT
                # Last look before the tree disappears, so the report covers the whole run.
                await self._sample(state)
                escalated = await self._terminate(pgid, exited, 0.0 if state.kill_now else self._kill_grace_seconds)
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

        if reason == REASON_TIMEOUT:
            message = f"killed after {_fmt_seconds(limit or 0.0)}s max runtime"
        elif reason == REASON_KILLED:
            message = "cancelled on request"
            if state.kill_now:
                message += "; SIGKILL at once"
            elif escalated:
                message += f"; SIGKILL after {_fmt_seconds(self._kill_grace_seconds)}s grace"
        else:
            message = _describe_exit(returncode)
        return ExecResult(
            exit_code=_shell_exit_code(returncode),
            reason=reason,
            message=message,
            run_seconds=run_seconds,
            cpu_seconds=state.cpu_seconds,
            max_memory_mb=state.peak_rss_bytes // _MIB,
            output_tail=_decode_tail(output.tail),
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


def _job_env(extra: dict[str, str], home: str) -> dict[str, str]:
    # PATH is the only thing taken from the agent, so jobs find the host's tools but never its secrets.
    env = {
        "PATH": os.environ.get("PATH") or _FALLBACK_PATH,
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
    """The job's output pipe, read as it comes with a reader callback on the raw descriptor (no transport or
    stream objects, and the same on asyncio and uvloop), keeping the last _TAIL_BYTES. `closed` resolves at
    end of file: once every process holding the write end is gone."""

    def __init__(self, fd: int, loop: asyncio.AbstractEventLoop) -> None:
        os.set_blocking(fd, False)
        self._fd = fd
        self._loop = loop
        self.tail = bytearray()
        self.closed: asyncio.Future[None] = loop.create_future()
        loop.add_reader(fd, self._read)

    def _read(self) -> None:
        try:
            chunk = os.read(self._fd, _READ_CHUNK)
        except BlockingIOError:
            return
        except OSError:
            chunk = b""  # output is best effort: a read error ends it
        if not chunk:
            self.close()
            return
        self.tail += chunk
        if len(self.tail) > _TAIL_BYTES:
            del self.tail[:-_TAIL_BYTES]

    def close(self) -> None:
        if self._fd >= 0:
            self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1
        if not self.closed.done():
            self.closed.set_result(None)


def _empty_own_dir(path: str) -> bool:
    """A real directory (no link), ours, private, and empty: fit to be a later job's fresh scratch directory."""
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != 0o700:
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


def _shell_exit_code(returncode: int) -> int:
    return 128 - returncode if returncode < 0 else returncode


def _describe_exit(returncode: int) -> str:
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
