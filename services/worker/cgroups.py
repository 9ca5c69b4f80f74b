"""Per-job control groups: made with the job's limits, read for its usage and OOM kills, emptied and removed.

cgroup v2 where its unified hierarchy has the memory, pids and cpu controllers; v1 otherwise (memory, pids,
cpu and cpuacct hierarchies, possibly co-mounted). Job groups nest under the agent's own group in each
hierarchy, so a job can never get more than the agent was given. The parsers and the limit arithmetic are
pure; the drivers only make directories and read and write the kernel's files (a test can point them at a
plain directory).
"""

from __future__ import annotations

import errno
import os
import re
import signal
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

# The CFS period of a job's CPU quota. Longer than the kernel's usual 100 ms because the part of the sandbox's start
# after its init joined the job's group (what is left of bwrap's mounts, the fork of the job's first process,
# setpriv's and env's execs) costs a few ms of CPU charged to the job's own group: at 100 millicores a 100 ms
# period allows 10 ms, which that and a short job can use up, stalling it for the rest of the period.
CPU_PERIOD_US = 250_000
_MIN_CPU_QUOTA_US = 1_000  # the kernel refuses less
_V1_CONTROLLERS = ("memory", "pids", "cpu", "cpuacct")
_V2_CONTROLLERS = ("memory", "pids", "cpu")
_WORKER_DIR = re.compile(r"^jobmesh-worker-(\d+)$")


class CgroupError(OSError):
    """The machine cannot give jobs control groups (missing controllers, no permission, no delegation)."""


@dataclass(frozen=True)
class CgroupLimits:
    memory_bytes: int
    cpu_quota_us: int
    cpu_period_us: int
    pids_max: int


def limits_for(memory_mb: int, cpu_millis: int, pids_max: int, period_us: int = CPU_PERIOD_US) -> CgroupLimits:
    """The job's requested memory as a hard limit, its millicores as a CFS quota per period, a pids cap."""
    if memory_mb <= 0 or cpu_millis <= 0 or pids_max <= 0:
        raise ValueError("memory_mb, cpu_millis and pids_max must be positive")
    quota = max(_MIN_CPU_QUOTA_US, cpu_millis * period_us // 1000)
    return CgroupLimits(memory_mb * 1024 * 1024, quota, period_us, pids_max)


@dataclass(frozen=True)
class CgroupUsage:
    cpu_seconds: float
    memory_bytes: int  # now
    peak_memory_bytes: int  # high-water mark since the group was made (0 if the kernel does not keep one)
    oom_kills: int


def parse_keyed(text: str) -> dict[str, int]:
    """`key value` lines (memory.events, cpu.stat, memory.oom_control); lines that do not parse are skipped."""
    values: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2:
            try:
                values[parts[0]] = int(parts[1])
            except ValueError:
                continue
    return values


def parse_proc_cgroup(text: str) -> dict[str, str]:
    """/proc/<pid>/cgroup as controller -> path; the v2 entry is under the key ""."""
    paths: dict[str, str] = {}
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            paths[""] = path
        for controller in controllers.split(","):
            if controller:
                paths[controller] = path
    return paths


@dataclass(frozen=True)
class Mount:
    fstype: str
    point: str
    options: frozenset[str]


def parse_mounts(text: str) -> list[Mount]:
    """/proc/self/mounts (octal escapes in mount points decoded)."""
    mounts = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) < 4:
            continue
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), parts[1])
        mounts.append(Mount(parts[2], point, frozenset(parts[3].split(","))))
    return mounts


@dataclass(frozen=True)
class Layout:
    """Where job groups go: one directory (v2) or one per v1 hierarchy, each the agent's own group there."""

    version: int
    parents: dict[str, str]  # controller -> directory ("" for v2)


def plan_layout(mounts: list[Mount], own: dict[str, str], v2_controllers: set[str]) -> Layout | str:
    """The layout to use, or why there is none. v2 needs memory, pids and cpu enabled on its hierarchy."""
    unified = next((m for m in mounts if m.fstype == "cgroup2"), None)
    if unified is not None and set(_V2_CONTROLLERS) <= v2_controllers and "" in own:
        return Layout(2, {"": _join(unified.point, own[""])})
    parents: dict[str, str] = {}
    for controller in _V1_CONTROLLERS:
        mount = next((m for m in mounts if m.fstype == "cgroup" and controller in m.options), None)
        if mount is None or controller not in own:
            have = "cgroup v2 without " + ", ".join(sorted(set(_V2_CONTROLLERS) - v2_controllers))
            return f"no cgroup v1 {controller} hierarchy and {have if unified else 'no cgroup v2 mount'}"
        parents[controller] = _join(mount.point, own[controller])
    return Layout(1, parents)


def _join(point: str, path: str) -> str:
    return os.path.join(point, path.lstrip("/")) if path.strip("/") else point


class JobCgroup(Protocol):
    """One job's group: the agent writes the sandbox init's pid into every file of `procs_files`."""

    @property
    def procs_files(self) -> tuple[str, ...]: ...

    def usage(self) -> CgroupUsage: ...

    def pids(self) -> list[int]: ...

    def kill(self) -> None: ...

    def remove(self) -> bool: ...

    def reuse(self, limits: CgroupLimits) -> bool:
        """Ready this (empty) group for the next job with `limits`, its usage counted from zero again; False
        when it cannot be (then make a new one)."""
        ...


_CHUNK = 65536


def _read(path: str) -> str:
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        chunks = []
        while chunk := os.read(fd, _CHUNK):
            chunks.append(chunk)
        return b"".join(chunks).decode(errors="replace")
    except OSError:
        return ""
    finally:
        os.close(fd)


def _read_int(path: str) -> int:
    return _int_of(_read(path))


def _int_of(text: str) -> int:
    try:
        return int(text.split()[0])
    except (ValueError, IndexError):
        return 0


class _KeptReads:
    """Counter files of one group read again and again (its usage), through descriptors kept open for the group's
    life: one positioned read per look, not a path lookup, an open and a close each time. Each read is the
    kernel's current value. Not for cgroup.procs (see _V1Group.pids). A file that cannot be opened reads as
    empty, and is tried again at the next look."""

    def __init__(self) -> None:
        self._fds: dict[str, int] = {}

    def read(self, path: str) -> str:
        fd = self._fds.get(path)
        if fd is None:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError:
                return ""
            self._fds[path] = fd
        try:
            return os.pread(fd, _CHUNK, 0).decode(errors="replace")  # a few short lines
        except OSError:
            return ""

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()


def _write(path: str, value: str) -> None:
    # A bare descriptor, not a text file object: a few of these per job start (a slot's group reused).
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def _pids_of(procs: str) -> list[int]:
    return [int(p) for p in _read(procs).split() if p.isdigit()]


def signal_pids(pids: Iterable[int], sig: signal.Signals = signal.SIGKILL) -> None:
    for pid in pids:
        try:
            os.kill(pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


def _rmdir(path: str) -> bool:
    try:
        os.rmdir(path)
        return True
    except FileNotFoundError:
        return True
    except OSError:
        return False


class _V1Group:
    def __init__(self, dirs: dict[str, str], limits: CgroupLimits) -> None:
        self._dirs = dirs
        self._mem = dirs["memory"]
        self.procs_files = tuple(os.path.join(d, "cgroup.procs") for d in sorted(set(dirs.values())))
        self._limits: CgroupLimits | None = None
        self._oom_base = 0  # oom_kill cannot be reset: a reused group counts from here
        self._kept = _KeptReads()
        self._apply(limits)

    def _apply(self, limits: CgroupLimits) -> None:
        old = self._limits
        mem = str(limits.memory_bytes)
        limit, memsw = (os.path.join(self._mem, f) for f in ("memory.limit_in_bytes", "memory.memsw.limit_in_bytes"))
        # memory + swap must stay >= memory at every step; equal, so the limit cannot be dodged by swapping.
        if old is None or limits.memory_bytes < old.memory_bytes:
            _write(limit, mem)
            _write_if_present(memsw, mem)
        elif limits.memory_bytes > old.memory_bytes:
            _write_if_present(memsw, mem)
            _write(limit, mem)
        cpu = self._dirs["cpu"]
        if old is None or limits.cpu_period_us != old.cpu_period_us:
            _write(os.path.join(cpu, "cpu.cfs_period_us"), str(limits.cpu_period_us))
        # Written for every job, even unchanged: that refills the group's CPU budget for the current period.
        # Otherwise back-to-back jobs of a slot share one period's quota, and a job starting late in a period
        # whose quota the last job used up waits, throttled, for the next one.
        _write(os.path.join(cpu, "cpu.cfs_quota_us"), str(limits.cpu_quota_us))
        if old is None or limits.pids_max != old.pids_max:
            _write(os.path.join(self._dirs["pids"], "pids.max"), str(limits.pids_max))
        self._limits = limits

    def reuse(self, limits: CgroupLimits) -> bool:
        if self.pids():
            return False
        try:
            _write(os.path.join(self._mem, "memory.max_usage_in_bytes"), "0")
            _write(os.path.join(self._dirs["cpuacct"], "cpuacct.usage"), "0")
            self._apply(limits)
        except OSError:
            return False  # e.g. a lower limit the kernel could not reclaim down to
        self._oom_base = parse_keyed(self._kept.read(os.path.join(self._mem, "memory.oom_control"))).get("oom_kill", 0)
        return True

    def usage(self) -> CgroupUsage:
        read = self._kept.read
        oom = parse_keyed(read(os.path.join(self._mem, "memory.oom_control")))
        return CgroupUsage(
            cpu_seconds=_int_of(read(os.path.join(self._dirs["cpuacct"], "cpuacct.usage"))) / 1e9,
            memory_bytes=_int_of(read(os.path.join(self._mem, "memory.usage_in_bytes"))),
            peak_memory_bytes=_int_of(read(os.path.join(self._mem, "memory.max_usage_in_bytes"))),
            oom_kills=oom.get("oom_kill", 0) - self._oom_base,
        )

    def pids(self) -> list[int]:
        # Opened afresh for each look, never kept: v1 hands a descriptor that reads it again within a second the
        # list of pids it loaded for that descriptor's first read, however many of them have exited since.
        return _pids_of(os.path.join(self._dirs["pids"], "cgroup.procs"))

    def kill(self) -> None:
        signal_pids(self.pids())  # v1 has no cgroup.kill; the caller repeats until the group is empty

    def remove(self) -> bool:
        self._kept.close()
        return all([_rmdir(d) for d in sorted(set(self._dirs.values()))])


class _V2Group:
    def __init__(self, path: str) -> None:
        self._path = path
        self.procs_files = (os.path.join(path, "cgroup.procs"),)

    def usage(self) -> CgroupUsage:
        cpu = parse_keyed(_read(os.path.join(self._path, "cpu.stat")))
        events = parse_keyed(_read(os.path.join(self._path, "memory.events")))
        return CgroupUsage(
            cpu_seconds=cpu.get("usage_usec", 0) / 1e6,
            memory_bytes=_read_int(os.path.join(self._path, "memory.current")),
            peak_memory_bytes=_read_int(os.path.join(self._path, "memory.peak")),  # kernel 5.19+; else 0
            oom_kills=events.get("oom_kill", 0),
        )

    def pids(self) -> list[int]:
        return _pids_of(os.path.join(self._path, "cgroup.procs"))

    def kill(self) -> None:
        try:
            _write(os.path.join(self._path, "cgroup.kill"), "1")  # kernel 5.14+: the whole group at once
        except OSError:
            signal_pids(self.pids())

    def remove(self) -> bool:
        return _rmdir(self._path)

    def reuse(self, limits: CgroupLimits) -> bool:
        return False  # memory.peak resets only per open file (6.12+): a new group is simpler and always right


class CgroupDriver:
    """Makes the job groups of one agent under `jobmesh-worker-<pid>` in its own group of each hierarchy."""

    def __init__(self, layout: Layout, agent_pid: int | None = None) -> None:
        self.layout = layout
        self.version = layout.version
        pid = os.getpid() if agent_pid is None else agent_pid
        self._bases = {c: os.path.join(p, f"jobmesh-worker-{pid}") for c, p in layout.parents.items()}

    @classmethod
    def detect(cls) -> CgroupDriver:
        """The driver for this machine, or CgroupError saying why there is none."""
        mounts = parse_mounts(_read("/proc/self/mounts"))
        own = parse_proc_cgroup(_read("/proc/self/cgroup"))
        unified = next((m for m in mounts if m.fstype == "cgroup2"), None)
        v2 = set(_read(os.path.join(unified.point, "cgroup.controllers")).split()) if unified else set()
        layout = plan_layout(mounts, own, v2)
        if isinstance(layout, str):
            raise CgroupError(errno.ENOTSUP, layout)
        driver = cls(layout)
        driver.start()
        return driver

    def start(self) -> None:
        """Makes this agent's base groups (and sweeps those of agents that died without removing theirs)."""
        try:
            for controller, base in self._bases.items():
                self._sweep_dead_agents(os.path.dirname(base))
                os.makedirs(base, exist_ok=True)
                if self.version == 2:
                    self._delegate_v2(controller, base)
        except OSError as exc:
            raise CgroupError(exc.errno or errno.EIO, f"cannot make job cgroups under {base}: {exc}") from exc

    def _delegate_v2(self, controller: str, base: str) -> None:
        # A v2 group hands controllers to its children only through subtree_control, and only when it holds no
        # process itself (except the root): the agent's own group must already delegate them (systemd
        # Delegate=, a container's cgroup namespace root), and the agent's base group holds no process.
        wanted = " ".join(f"+{c}" for c in _V2_CONTROLLERS)
        parent = os.path.dirname(base)
        enabled = set(_read(os.path.join(parent, "cgroup.subtree_control")).split())
        if not set(_V2_CONTROLLERS) <= enabled:
            _write(os.path.join(parent, "cgroup.subtree_control"), wanted)
        _write(os.path.join(base, "cgroup.subtree_control"), wanted)

    @staticmethod
    def _sweep_dead_agents(parent: str) -> None:
        try:
            names = os.listdir(parent)
        except OSError:
            return
        for name in names:
            match = _WORKER_DIR.match(name)
            if match is None or _alive(int(match.group(1))):
                continue
            base = os.path.join(parent, name)
            for entry in _subdirs(base):
                signal_pids(_pids_of(os.path.join(entry, "cgroup.procs")))
                _rmdir(entry)
            _rmdir(base)

    def create(self, name: str, limits: CgroupLimits) -> JobCgroup:
        """A fresh group called `name` with `limits` (a leftover of that name is emptied and replaced)."""
        dirs = {c: os.path.join(b, name) for c, b in self._bases.items()}
        for path in sorted(set(dirs.values())):
            try:
                os.mkdir(path, 0o755)
            except FileExistsError:
                signal_pids(_pids_of(os.path.join(path, "cgroup.procs")))
                if not _rmdir(path):
                    raise
                os.mkdir(path, 0o755)
        group: JobCgroup
        if self.version == 2:
            path = dirs[""]
            _write(os.path.join(path, "memory.max"), str(limits.memory_bytes))
            _write_if_present(os.path.join(path, "memory.swap.max"), "0")
            _write(os.path.join(path, "cpu.max"), f"{limits.cpu_quota_us} {limits.cpu_period_us}")
            _write(os.path.join(path, "pids.max"), str(limits.pids_max))
            group = _V2Group(path)
        else:
            group = _V1Group(dirs, limits)
        return group

    def close(self) -> None:
        """Removes the agent's base groups and the job groups its slots kept for their next jobs."""
        for base in sorted(set(self._bases.values())):
            for entry in _subdirs(base):
                signal_pids(_pids_of(os.path.join(entry, "cgroup.procs")))
                _rmdir(entry)
            _rmdir(base)


def _write_if_present(path: str, value: str) -> None:
    if os.path.exists(path):
        try:
            _write(path, value)
        except OSError:
            pass  # e.g. swap accounting compiled in but off: nothing to limit


def _subdirs(path: str) -> list[str]:
    try:
        return [e.path for e in os.scandir(path) if e.is_dir(follow_symlinks=False)]
    except OSError:
        return []


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
