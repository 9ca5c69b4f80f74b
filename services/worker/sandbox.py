"""The job sandbox: one unprivileged uid, one set of namespaces (bubblewrap) and one cgroup per job.

A sandboxed job starts as this chain, each step doing one thing and then getting out of the way:

  bwrap (root)             started by the agent itself (no shell): new pid, mount, ipc, uts and cgroup
                           namespaces; a root file system of read-only system directories, a fresh /proc, a
                           minimal /dev, private tmpfs /tmp and /dev/shm and the job's scratch directory; every
                           capability dropped but the four setpriv needs; dies with the agent. Its init (pid 1 of
                           the namespace) then waits at the start gate (--info-fd, --block-fd, see StartGate)
                           while the agent puts it in the job's cgroup(s) and sets its rlimits; once let go it
                           forks the job's first process (pid 2 of the namespace), which execs, under the jobs'
                           seccomp filter (--seccomp, loaded by bwrap; services/worker/seccomp.py),
  setpriv                  switches to the job's uid and gid, drops every group and capability (bounding set
                           included) and sets no_new_privs, then execs
  sh                       (as the job's uid) which exports the job's environment, read from its standard input
                           (a memfd the agent wrote, never a command line: /proc/<pid>/cmdline is readable by
                           every user of the host), points standard input at /dev/null and execs the job's
                           command. Nothing the tenant sets (LD_PRELOAD, say) ever reaches a process that runs as
                           root: bwrap and setpriv get only PATH.

Nothing of the job's runs before its init is confined: every process of the job descends from it. With
`network = "none"` the job starts in its slot's network namespace (loopback only), made once per slot and
entered by the agent's thread just for the fork of bwrap: a slot runs one job at a time, and whatever a job left
listening there died with it. Everything the job starts is in its cgroup and its pid namespace: when its first
process ends, bwrap's init (pid 1 of the namespace) dies and the kernel kills the rest; the agent then empties
the cgroup (kept for the slot's next job, or removed).
See docs/security.md ("Job sandbox").
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import json
import logging
import os
import random
import resource
import select
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import Any

from libs.config import NETWORK_MODES, SANDBOX_MODES
from libs.jobs import ENV_NAME
from services.worker.cgroups import CgroupDriver, CgroupError, JobCgroup, limits_for
from services.worker.seccomp import SeccompError, write_program

log = logging.getLogger(__name__)

SCRATCH = "/scratch"  # where the job sees its scratch directory (its cwd and HOME)
JOB_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_MIB = 1024 * 1024

# The parts of /etc a job may read: what the C library, the dynamic loader, TLS clients and common tools need.
# An allowlist, not /etc minus a denylist: whatever an operator adds to /etc later (credentials of a cloud
# agent, the mesh's own config) stays out without anyone having to remember it.
ETC_ALLOWED = (
    "alternatives",
    "ca-certificates",
    "ca-certificates.conf",
    "debian_version",
    "gai.conf",
    "group",
    "host.conf",
    "hosts",
    "inputrc",
    "ld.so.cache",
    "ld.so.conf",
    "ld.so.conf.d",
    "localtime",
    "magic",
    "mime.types",
    "nsswitch.conf",
    "os-release",
    "passwd",
    "protocols",
    "resolv.conf",
    "services",
    "ssl/certs",
    "ssl/openssl.cnf",
    "timezone",
)
# The databases that jobs look up in the copied /etc only: there is no systemd, NIS or other service to ask
# inside the sandbox, and the modules for them cost every process that looks up a user a few libraries' load
# (setpriv does, for the job's uid).
NSS_FILES_ONLY = ("passwd", "group", "shadow", "gshadow")
# Top-level system directories: bound read-only when real directories, recreated as symlinks when (as on a
# merged-/usr system) they are symlinks into /usr. Not /opt, /srv, /home, /root, /var or /run: what lives there
# is some installation's or some user's, not the system's.
SYSTEM_DIRS = ("usr", "bin", "sbin", "lib", "lib32", "lib64", "libx32")


class SandboxError(RuntimeError):
    """This machine cannot sandbox jobs, or one job's sandbox could not be set up."""


@dataclass(frozen=True)
class SandboxSettings:
    """The pool's sandbox settings, as the provider hands them to the worker (JOBMESH_WORKER_* variables)."""

    mode: str = "bwrap"  # "bwrap" | "none" (jobs run as the agent's user with its view: a developer laptop only)
    network: str = "none"  # "none": a network namespace of its own (loopback only) | "host"
    uid_first: int = 200_000
    uid_count: int = 65_536
    pids_max: int = 512
    max_file_mb: int = 4096  # RLIMIT_FSIZE
    max_open_files: int = 4096  # RLIMIT_NOFILE
    # Root-only state on this host: job-uids/ (one lock file per uid in use, shared by every agent) and
    # agent-<pid>/etc (the /etc jobs see, copied at the agent's start).
    state_dir: str = "/run/jobmesh"

    def __post_init__(self) -> None:
        if self.mode not in SANDBOX_MODES:
            raise ValueError(f"sandbox must be one of {', '.join(SANDBOX_MODES)}")
        if self.network not in NETWORK_MODES:
            raise ValueError(f"network must be one of {', '.join(NETWORK_MODES)}")
        if self.uid_first < 1000 or self.uid_count < 1 or self.uid_first + self.uid_count > 2**32 - 2:
            raise ValueError("job uids must be a range above 999 (and below 2^32 - 2)")
        if min(self.pids_max, self.max_file_mb, self.max_open_files) < 1:
            raise ValueError("pids_max, max_file_mb and max_open_files must be positive")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> SandboxSettings:
        first, count = parse_uid_range(env.get("JOBMESH_WORKER_JOB_UIDS") or "200000-265535")
        return cls(
            mode=env.get("JOBMESH_WORKER_SANDBOX") or "bwrap",
            network=env.get("JOBMESH_WORKER_NETWORK") or "none",
            uid_first=first,
            uid_count=count,
            pids_max=int(env.get("JOBMESH_WORKER_PIDS_MAX") or 512),
            max_file_mb=int(env.get("JOBMESH_WORKER_MAX_FILE_MB") or 4096),
            max_open_files=int(env.get("JOBMESH_WORKER_MAX_OPEN_FILES") or 4096),
            state_dir=env.get("JOBMESH_WORKER_SANDBOX_STATE_DIR") or "/run/jobmesh",
        )


def parse_uid_range(text: str) -> tuple[int, int]:
    """'200000-265535' -> (first, count); both ends included."""
    try:
        low, high = (int(part) for part in text.split("-", 1))
    except ValueError as exc:
        raise ValueError(f"job uids must look like 200000-265535, got {text!r}") from exc
    if high < low:
        raise ValueError(f"job uids {text!r}: the range is empty")
    return low, high - low + 1


class UidPool:
    """Hands out uids from a range, one per running job, never one in use by a job of any agent on this host:
    a uid is taken by an exclusive flock on its file in `lock_dir`, held until the job's last process is gone,
    and the kernel drops it if the agent dies."""

    def __init__(self, lock_dir: str, first: int, count: int, avoid: frozenset[int] = frozenset()) -> None:
        self._dir = lock_dir
        self._first = first
        self._count = count
        self._avoid = avoid
        os.makedirs(lock_dir, mode=0o700, exist_ok=True)
        os.chmod(lock_dir, 0o700)

    def acquire(self) -> tuple[int, int]:
        """(uid, lock fd); SandboxError when every uid of the range is in use."""
        start = random.randrange(self._count)  # spreads agents over the range: the first try almost always wins
        for step in range(self._count):
            uid = self._first + (start + step) % self._count
            if uid in self._avoid:
                continue
            fd = os.open(os.path.join(self._dir, str(uid)), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return uid, fd
            except OSError as exc:
                os.close(fd)
                if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    raise
        raise SandboxError(f"all {self._count} job uids from {self._first} are in use")

    @staticmethod
    def release(fd: int) -> None:
        os.close(fd)  # drops the flock


# What the job's uid runs first: the job's environment only (PWD and PATH, set by sh or inherited from bwrap, are
# dropped first; the file sets PATH), exported from standard input, then /dev/null as standard input and the command.
ENV_FROM_STDIN = 'unset PWD PATH; set -a; . /dev/stdin; set +a; exec </dev/null; exec "$@"'


def env_script(env: Mapping[str, str]) -> bytes:
    """`env` as assignments for ``ENV_FROM_STDIN``, every value single-quoted. ValueError for a name that is not a
    shell variable's or a value with a NUL (the API refuses both; an environment cannot hold them either)."""
    quote = "'\\''"
    for name, value in env.items():
        if not ENV_NAME.fullmatch(name) or "\0" in value:
            raise ValueError(f"environment variable {name[:64]!r}: not a valid name, or a value with a NUL byte")
    return "".join(f"{name}='{value.replace(chr(39), quote)}'\n" for name, value in env.items()).encode()


class StartGate:
    """Where bwrap holds a job's sandbox before anything of the job's runs. bwrap writes the pid of the sandbox's
    init (pid 1 of its namespace: bwrap's own code, as root, its mounts under way) to `info_fd` as JSON, and the init
    waits for a byte on `block_fd` before it forks the job's first process. Meanwhile the agent confines it
    (``JobSandbox.confine``). The two fds are bwrap's (``child_fds``: pass them to it, then call ``spawned``).

    bwrap lets the job go on end of file too, not only on a byte. So ``close`` without ``let_go`` first SIGKILLs
    bwrap's process group, which holds the init until it is let go: a start that fails never runs the job.

    With `program` (the seccomp filter's file) the gate also holds a fresh fd of it for bwrap (``seccomp_fd``)."""

    def __init__(self, program: str | None = None) -> None:
        self._bwrap = 0  # bwrap's pid (and process group), while it may be held at the gate
        self._data = b""
        self._info, self.info_fd = os.pipe()
        self.block_fd = self._go = self.seccomp_fd = self.stdin = -1
        try:
            self.block_fd, self._go = os.pipe()
            if program is not None:
                self.seccomp_fd = os.open(program, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            self.close()
            raise
        os.set_blocking(self._info, False)

    @property
    def child_fds(self) -> tuple[int, ...]:
        return (self.info_fd, self.block_fd) if self.seccomp_fd < 0 else (self.info_fd, self.block_fd, self.seccomp_fd)

    def carry_env(self, env: Mapping[str, str]) -> None:
        """Puts the job's environment in ``stdin``, a memfd for bwrap's standard input (see ENV_FROM_STDIN): in no
        command line, and readable only through the job's own fd 0 until its shell has read it."""
        fd = os.memfd_create("jobmesh-job-env", os.MFD_CLOEXEC)
        try:
            data = env_script(env)
            while data:
                data = data[os.write(fd, data) :]
            os.lseek(fd, 0, os.SEEK_SET)
        except BaseException:
            os.close(fd)
            raise
        if self.stdin >= 0:
            os.close(self.stdin)
        self.stdin = fd

    def spawned(self, pid: int) -> None:
        """bwrap (`pid`, its own process group) has its ends; ours are closed, so its death reads as end of file."""
        self._bwrap = pid
        for fd in (*self.child_fds, self.stdin):
            if fd >= 0:
                os.close(fd)
        self.info_fd = self.block_fd = self.seccomp_fd = self.stdin = -1

    def read_init_pid(self) -> int | None:
        """Reads what `info` has now: the init's pid once bwrap has written it all; 0 while it has not (yet);
        None when bwrap closed it without (it failed before making the sandbox)."""
        try:
            chunk = os.read(self._info, 4096)
        except BlockingIOError:
            return 0
        self._data += chunk
        pid = init_pid_of(self._data)
        if pid is None and not chunk:
            return None
        return pid or 0

    async def init_pid(self, exited: asyncio.Future[Any]) -> int | None:
        """The init's pid, as soon as bwrap has reported it; None if bwrap ends (`exited`) or fails first."""
        loop = asyncio.get_running_loop()
        found: asyncio.Future[int | None] = loop.create_future()

        def readable() -> None:
            pid = self.read_init_pid()
            if pid != 0 and not found.done():
                found.set_result(pid)

        def ended(_: object) -> None:
            if not found.done():
                found.set_result(None)

        loop.add_reader(self._info, readable)
        exited.add_done_callback(ended)
        try:
            return await found
        finally:
            loop.remove_reader(self._info)
            exited.remove_done_callback(ended)

    def wait_init_pid(self, timeout: float) -> int | None:
        """The init's pid, blocking for at most `timeout` seconds (None without it)."""
        poller = select.poll()
        poller.register(self._info, select.POLLIN)
        while poller.poll(timeout * 1000):
            pid = self.read_init_pid()
            if pid != 0:
                return pid
        return None

    def let_go(self) -> None:
        """The confined init forks the job's first process."""
        os.write(self._go, b"1")
        self._bwrap = 0
        self.close()

    def close(self) -> None:
        if self._bwrap:
            kill_group(self._bwrap)  # not let go: neither bwrap nor its init may go on
            self._bwrap = 0
        for fd in (self._info, self._go, self.info_fd, self.block_fd, self.seccomp_fd, self.stdin):
            if fd >= 0:
                os.close(fd)
        self._info = self._go = self.info_fd = self.block_fd = self.seccomp_fd = self.stdin = -1


def init_pid_of(info: bytes) -> int | None:
    """The sandbox init's pid from bwrap's --info-fd JSON, None until the whole document is there."""
    try:
        pid = json.loads(info).get("child-pid")
    except (ValueError, AttributeError):
        return None
    return pid if isinstance(pid, int) and pid > 0 else None


@dataclass
class JobSandbox:
    """One job's sandbox: its uid (held until released), its cgroup and rlimits, and how to start its command."""

    uid: int
    cgroup: JobCgroup
    _bwrap: list[str]
    _switch: list[str]  # setpriv, then sh exporting the environment from stdin
    _lock_fd: int
    network: SlotNetwork | None = field(default=None)  # the slot's network namespace the job starts in
    rlimits: tuple[tuple[int, int], ...] = ()  # (resource.RLIMIT_*, soft and hard limit) for the job's processes
    seccomp: str | None = None  # the file of the job's seccomp filter (services/worker/seccomp.py)

    def start_gate(self) -> StartGate:
        """A gate for one start of this job, with a fresh fd of its seccomp filter."""
        return StartGate(self.seccomp)

    def spawning(self) -> AbstractContextManager[None]:
        """Around the fork of bwrap: puts the forking thread in the job's network namespace."""
        return self.network.entered() if self.network is not None else nullcontext()

    def argv(
        self, command: list[str], env: Mapping[str, str], scratch: str, gate: StartGate, cwd: str = SCRATCH
    ) -> list[str]:
        """The whole command line: `scratch` (a host directory) is the job's /scratch, `cwd` is inside the sandbox.
        bwrap holds the job at `gate` (from ``start_gate``) until ``confine``; its fds must be passed to bwrap as
        they are, and its ``stdin`` (which carries `env`, see ``StartGate.carry_env``) as bwrap's standard input."""
        if self.seccomp is not None and gate.seccomp_fd < 0:
            raise SandboxError("a job's start gate without its seccomp filter")  # never start a job without it
        gate.carry_env(env)
        filtered = ("--seccomp", str(gate.seccomp_fd)) if gate.seccomp_fd >= 0 else ()
        return [
            *self._bwrap,
            *("--info-fd", str(gate.info_fd), "--block-fd", str(gate.block_fd), *filtered),
            *("--bind", scratch, SCRATCH, "--chdir", cwd, "--"),
            *self._switch,
            *command,
        ]

    def confine(self, init: int) -> None:
        """Puts the sandbox's init (held at its gate) under the job's rlimits and into the job's cgroup(s), so that
        every process of the job starts there. The first write to a cgroup.procs can wait for an RCU grace period
        (a few ms): call this off the event loop."""
        for limit, value in self.rlimits:
            resource.prlimit(init, limit, (value, value))
        pid = str(init).encode()
        for path in self.cgroup.procs_files:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)


_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
_libc = ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    if _libc.setns(fd, _CLONE_NEWNET) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


class SlotNetwork:
    """A network namespace with only a loopback interface, kept for one worker slot: each of its jobs (one at a
    time) starts in it, so no namespace is made and torn down per job. Made by root in the host's initial user
    namespace, so a job (no capability there) cannot change its interfaces, routes or filters; every socket a
    job opened is closed when its processes are killed, before the slot's next job starts. Held by a
    descriptor: gone when closed, or when the agent dies."""

    def __init__(self, host: int) -> None:
        self._host = host  # the agent's own network namespace, to go back to
        if _libc.unshare(_CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"unshare(CLONE_NEWNET): {os.strerror(err)}")
        try:
            self._fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
            try:
                _loopback_up()
            except BaseException:
                os.close(self._fd)
                raise
        finally:
            self._return()

    @contextmanager
    def entered(self) -> Iterator[None]:
        """The calling thread in this namespace for the block (a process it forks there starts there)."""
        _setns(self._fd)
        try:
            yield
        finally:
            self._return()

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def _return(self) -> None:
        try:
            _setns(self._host)
        except OSError:
            # The agent's thread would stay cut off from the mesh, and could start a later "host" job there.
            log.critical("cannot return the agent's thread to its own network namespace: stopping")
            os._exit(70)


def _loopback_up() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH22x", b"lo", 0)
        flags = struct.unpack("16sH22x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH22x", b"lo", flags | _IFF_UP))


def _copy_etc(own_dir: str, state_dir: str) -> str:
    """Copies the allowed part of /etc (links kept as links) into `own_dir`/etc, read by jobs through one bind
    mount; sweeps the copies of agents that are gone. A change to /etc reaches jobs when their agent restarts."""
    for name in os.listdir(state_dir) if os.path.isdir(state_dir) else []:
        if name.startswith("agent-") and name[6:].isdigit() and not _pid_alive(int(name[6:])):
            shutil.rmtree(os.path.join(state_dir, name), ignore_errors=True)
    etc = os.path.join(own_dir, "etc")
    shutil.rmtree(own_dir, ignore_errors=True)
    os.makedirs(own_dir, mode=0o700)
    os.mkdir(etc, 0o755)
    for name in ETC_ALLOWED:
        source, target = os.path.join("/etc", name), os.path.join(etc, name)
        if not os.path.lexists(source):
            continue
        os.makedirs(os.path.dirname(target), mode=0o755, exist_ok=True)
        if os.path.isdir(source) and not os.path.islink(source):
            shutil.copytree(source, target, symlinks=True)
        else:
            shutil.copy2(source, target, follow_symlinks=False)
    _files_only_nsswitch(os.path.join(etc, "nsswitch.conf"))
    return etc


def _files_only_nsswitch(path: str) -> None:
    """Rewrites the copied nsswitch.conf so that users and groups are looked up in the copied files only."""
    if os.path.islink(path) or not os.path.isfile(path):
        return
    with open(path) as fh:
        lines = fh.read().splitlines()
    with open(path, "w") as fh:
        for line in nsswitch_files_only(lines):
            fh.write(line + "\n")


def nsswitch_files_only(lines: list[str]) -> list[str]:
    """nsswitch.conf lines with `files` as the only source of the NSS_FILES_ONLY databases (added if missing)."""
    out, seen = [], set()
    for line in lines:
        name = line.split(":", 1)[0].strip() if ":" in line and not line.lstrip().startswith("#") else ""
        if name in NSS_FILES_ONLY:
            seen.add(name)
            out.append(f"{name}: files")
        else:
            out.append(line)
    out += [f"{name}: files" for name in NSS_FILES_ONLY if name not in seen]
    return out


def kill_group(pgid: int) -> None:
    """SIGKILLs a process group, if there is one left."""
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class Sandbox:
    """Sets up the sandbox of each job of one agent; shared by the agent's slots."""

    def __init__(self, settings: SandboxSettings, cgroups: CgroupDriver, bwrap: str, setpriv: str, sh: str):
        self.settings = settings
        self.cgroups = cgroups
        self._uids = UidPool(
            os.path.join(settings.state_dir, "job-uids"),
            settings.uid_first,
            settings.uid_count,
            frozenset({os.getuid(), 0, 65534}),
        )
        self._own_dir = os.path.join(settings.state_dir, f"agent-{os.getpid()}")
        self._etc = _copy_etc(self._own_dir, settings.state_dir)
        self._seccomp = os.path.join(self._own_dir, "seccomp.bpf")
        try:
            write_program(self._seccomp)
        except (SeccompError, OSError) as exc:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            raise SandboxError(f"cannot build the jobs' seccomp filter: {exc}") from exc
        self._static = self._static_bwrap_args(bwrap, own_network=False)
        # network = "none": each slot's jobs start in the slot's own namespace (SlotNetwork); a job prepared
        # without one gets a namespace of its own from bwrap, as it never starts in the host's.
        self._unshare_net = self._static_bwrap_args(bwrap, own_network=True)
        self._host_net = -1
        if settings.network == "none":
            self._host_net = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        self._setpriv = setpriv
        self._sh = sh
        s = settings
        self._rlimits = ((resource.RLIMIT_NOFILE, s.max_open_files), (resource.RLIMIT_FSIZE, s.max_file_mb * _MIB))

    @property
    def etc_dir(self) -> str:
        """The copy of /etc jobs see (the spawner prototype binds it too: services/worker/spawner.py)."""
        return self._etc

    @property
    def seccomp_program(self) -> str:
        """The file of the jobs' compiled seccomp filter."""
        return self._seccomp

    @classmethod
    def for_this_machine(cls, settings: SandboxSettings) -> Sandbox:
        """The sandbox, checked to work here by starting one; SandboxError saying what is missing otherwise."""
        if os.geteuid() != 0:
            raise SandboxError("the worker must run as root to start jobs under their own uids")
        tools = {name: shutil.which(name, path=JOB_PATH) for name in ("bwrap", "setpriv", "sh")}
        missing = [name for name, path in tools.items() if path is None]
        if missing:
            hint = " (Debian: apt-get install bubblewrap)" if "bwrap" in missing else ""
            raise SandboxError(f"missing {', '.join(missing)}{hint}")
        try:
            cgroups = CgroupDriver.detect()
        except CgroupError as exc:
            raise SandboxError(f"no cgroups for jobs: {exc.strerror or exc}") from exc
        try:
            sandbox = cls(settings, cgroups, tools["bwrap"] or "", tools["setpriv"] or "", tools["sh"] or "")
        except BaseException:
            cgroups.close()
            raise
        try:
            sandbox.self_test()
        except BaseException:
            sandbox.close()
            raise
        return sandbox

    def self_test(self) -> None:
        """Starts `true` in a sandbox the way jobs start: a machine without namespaces fails here, not per job."""
        with tempfile.TemporaryDirectory(prefix="jobmesh-sandbox-check-") as scratch:
            try:
                network = self.slot_network()
            except OSError as exc:
                raise SandboxError(f"cannot make a network namespace for jobs: {exc.strerror or exc}") from exc
            try:
                job = self.prepare("self-test", memory_mb=64, cpu_millis=1000, network=network)
            except BaseException:
                if network is not None:
                    network.close()
                raise
            try:
                os.chown(scratch, job.uid, job.uid)
                returncode, output = self._run_test_job(job, scratch)
            finally:
                job.cgroup.kill()
                job.cgroup.remove()
                self.release(job)
                if network is not None:
                    network.close()
        if returncode != 0:
            detail = output.decode(errors="replace").strip()[-300:]
            raise SandboxError(f"a sandboxed test job failed (exit {returncode}): {detail}")

    @staticmethod
    def _run_test_job(job: JobSandbox, scratch: str) -> tuple[int, bytes]:
        """`true` in `job`'s sandbox, through its start gate as every job starts: (exit code, output)."""
        gate = job.start_gate()
        try:
            with job.spawning():
                child = subprocess.Popen(
                    job.argv(["true"], {"PATH": JOB_PATH}, scratch, gate),
                    env={"PATH": JOB_PATH},
                    stdin=gate.stdin,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.STDOUT,
                    pass_fds=gate.child_fds,
                    start_new_session=True,
                )
        except BaseException:
            gate.close()
            raise
        try:
            gate.spawned(child.pid)
            init = gate.wait_init_pid(timeout=10)
            if init is not None:  # None: bwrap failed before making the sandbox, and says why in its output
                try:
                    job.confine(init)
                except OSError as exc:
                    raise SandboxError(f"cannot put a test job in its cgroup: {exc.strerror or exc}") from exc
                gate.let_go()
            output, _ = child.communicate(timeout=10)
        finally:
            gate.close()  # kills bwrap and its init unless they were let go
            child.kill()
            child.wait()
        return child.returncode, output

    def slot_network(self) -> SlotNetwork | None:
        """A network namespace for one slot's jobs when the pool says network = "none"; None for "host"."""
        return SlotNetwork(self._host_net) if self._host_net >= 0 else None

    def prepare(
        self,
        name: str,
        memory_mb: int,
        cpu_millis: int,
        reuse: JobCgroup | None = None,
        network: SlotNetwork | None = None,
    ) -> JobSandbox:
        """Takes a uid and readies the job's cgroup: `reuse` (the slot's group from its last job, empty) when it
        can be, a new one called `name` otherwise. With network = "none" the job starts in `network` (the slot's,
        see ``slot_network``), or in a namespace of its own without one. ``release`` gives the uid back once
        the job is gone."""
        uid, fd = self._uids.acquire()
        try:
            limits = limits_for(memory_mb, cpu_millis, self.settings.pids_max)
            if reuse is not None and reuse.reuse(limits):
                cgroup = reuse
            else:
                if reuse is not None:
                    reuse.remove()  # v2, or a group that could not be reset: a new one, perhaps of the same name
                cgroup = self.cgroups.create(name, limits)
        except BaseException:
            self._uids.release(fd)
            raise
        switch = [
            self._setpriv,
            f"--reuid={uid}",
            f"--regid={uid}",
            "--clear-groups",
            "--no-new-privs",
            "--inh-caps=-all",
            "--bounding-set=-all",
            "--",
            self._sh,
            "-c",
            ENV_FROM_STDIN,
            "jobmesh-job",  # $0; the job's command and its arguments are "$@"
        ]
        if self._host_net < 0:
            network = None  # network = "host"
        bwrap = self._static if network is not None or self._host_net < 0 else self._unshare_net
        return JobSandbox(uid, cgroup, bwrap, switch, fd, network, self._rlimits, self._seccomp)

    def release(self, job: JobSandbox) -> None:
        """Gives the uid back: only once every process of the job is gone."""
        if job._lock_fd >= 0:
            self._uids.release(job._lock_fd)
            job._lock_fd = -1

    def close(self) -> None:
        self.cgroups.close()
        shutil.rmtree(self._own_dir, ignore_errors=True)
        if self._host_net >= 0:
            os.close(self._host_net)
            self._host_net = -1

    def _static_bwrap_args(self, bwrap: str, own_network: bool) -> list[str]:
        args = [bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
        if own_network:
            args.append("--unshare-net")
        args += ["--die-with-parent", "--new-session", "--hostname", "jobmesh-job", "--cap-drop", "ALL"]
        # What setpriv needs to become the job's uid and drop the bounding set (and to chdir into the job's
        # 0700 scratch dir before it has): all gone once it has switched uid.
        for cap in ("CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_DAC_OVERRIDE"):
            args += ["--cap-add", cap]
        for name in SYSTEM_DIRS:
            host = f"/{name}"
            if os.path.islink(host):
                args += ["--symlink", os.readlink(host), host]
            elif os.path.isdir(host):
                args += ["--ro-bind", host, host]
        # One bind of a copy rather than one per allowed file: bwrap rereads the mount table for every
        # read-only bind, and that cost (a few ms of CPU per start) grows with their number.
        args += ["--ro-bind", self._etc, "/etc"]
        args += ["--proc", "/proc", "--dev", "/dev"]
        args += ["--perms", "1777", "--tmpfs", "/dev/shm", "--perms", "1777", "--tmpfs", "/tmp"]
        args += ["--perms", "0755", "--dir", "/var", "--symlink", "/tmp", "/var/tmp"]
        return args
