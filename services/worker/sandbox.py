"""The job sandbox: one unprivileged uid, one set of namespaces and one cgroup per job.

Each worker slot has a spawner (services/worker/spawner.py; its compiled form spawner.c when built): bubblewrap
makes, once per slot, the view of the system every job of the slot gets (read-only system directories, a copy of the
allowed part of /etc, a minimal /dev, no file of the mesh), and runs the spawner in it as root with four capabilities
and an empty bounding set. For each job the spawner starts the job's init in new pid, mount, ipc and uts namespaces (a
fresh /proc, /tmp and /dev/shm, the job's scratch directory at /scratch). The init waits at its gate while the agent
puts it in the job's cgroup(s) (``JobSandbox.confine``); then it sets the job's rlimits, becomes the job's uid and gid
with no group and no capability, sets no_new_privs, loads the jobs' seccomp filter (services/worker/seccomp.py) and
starts the job's command with exactly the job's environment, which travels only in the agent's message to the
spawner (no command line, no file). Nothing the tenant sets (LD_PRELOAD, say) reaches a process that runs as root.

Nothing of the job's runs before its init is confined: every process of the job descends from it. With
`network = "none"` the slot's spawner, and so every job of the slot, runs in the slot's network namespace (loopback
only), made once per slot: a slot runs one job at a time, and whatever a job left listening there died with it.
Everything the job starts is in its cgroup and its pid namespace: when its first process ends its init exits and the
kernel kills the rest; the agent then empties the cgroup (kept for the slot's next job, or removed).
See docs/security.md ("Job sandbox").
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import random
import resource
import shutil
import socket
import struct
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass

from libs.config import NETWORK_MODES, SANDBOX_MODES
from libs.jobs import ENV_NAME
from services.worker.cgroups import CgroupDriver, CgroupError, JobCgroup, limits_for
from services.worker.seccomp import SeccompError, write_program
from services.worker.spawner import Request, RequestError, Spawner, SpawnerError

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


@dataclass
class JobSandbox:
    """One job's sandbox: its uid (held until released), its cgroup, and the rlimits its spawner sets."""

    uid: int
    cgroup: JobCgroup
    _lock_fd: int
    rlimits: tuple[tuple[int, int], ...] = ()  # (resource.RLIMIT_*, soft and hard limit) for the job's processes

    def request(self, command: list[str], env: Mapping[str, str], cwd: str = SCRATCH) -> Request:
        """What the slot's spawner is asked to start (RequestError for a command or environment it would refuse)."""
        for name, value in env.items():
            if not ENV_NAME.fullmatch(name) or "\0" in value:
                raise RequestError(f"environment variable {name[:64]!r}: not a valid name, or a value with a NUL byte")
        return Request(
            self.uid,
            self.uid,
            [arg.encode() for arg in command],
            [f"{name}={value}".encode() for name, value in env.items()],
            cwd.encode(),
            list(self.rlimits),
        )

    def confine(self, init: int) -> None:
        """Puts the job's init (held at its gate) into the job's cgroup(s), so that every process of the job starts
        there. The first write to a cgroup.procs can wait for an RCU grace period (a few ms): call this off the
        event loop."""
        pid = str(init).encode()
        for path in self.cgroup.procs_files:
            fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
            try:
                os.write(fd, pid)
            finally:
                os.close(fd)


_CLONE_NEWNET = 0x40000000
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1
LIBC = ctypes.CDLL(None, use_errno=True)  # the agent's: the calls os lacks (setns, unshare, open_tree)


def _setns(fd: int) -> None:
    if LIBC.setns(fd, _CLONE_NEWNET) != 0:
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
        if LIBC.unshare(_CLONE_NEWNET) != 0:
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


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


class Sandbox:
    """Sets up the sandbox of each job of one agent; shared by the agent's slots (each has its own spawner)."""

    def __init__(self, settings: SandboxSettings, cgroups: CgroupDriver, bwrap: str):
        self.settings = settings
        self.cgroups = cgroups
        self.bwrap = bwrap
        # Which spawner program the slots run: None = the compiled one when it is built (services/worker/spawner.py,
        # ``compiled_spawner``), True = only that one, False = the Python one (tests and benchmarks choose).
        self.compiled: bool | None = None
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
        self._host_net = -1
        if settings.network == "none":
            self._host_net = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
        s = settings
        self._rlimits = ((resource.RLIMIT_NOFILE, s.max_open_files), (resource.RLIMIT_FSIZE, s.max_file_mb * _MIB))

    @property
    def etc_dir(self) -> str:
        """The copy of /etc jobs see (bound read-only by every slot's spawner)."""
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
        bwrap = shutil.which("bwrap", path=JOB_PATH)
        if bwrap is None:
            raise SandboxError("missing bwrap (Debian: apt-get install bubblewrap)")
        try:
            cgroups = CgroupDriver.detect()
        except CgroupError as exc:
            raise SandboxError(f"no cgroups for jobs: {exc.strerror or exc}") from exc
        try:
            sandbox = cls(settings, cgroups, bwrap)
        except BaseException:
            cgroups.close()
            raise
        try:
            sandbox.self_test()
        except BaseException:
            sandbox.close()
            raise
        return sandbox

    def spawner(self, network: SlotNetwork | None) -> Spawner:
        """A slot's spawner, in the slot's network namespace (`network`, from ``slot_network``)."""
        if network is None and self._host_net >= 0:
            raise SandboxError('network = "none": a spawner never starts in the host\'s network namespace')
        return Spawner(self.bwrap, self._etc, self._seccomp, network, compiled=self.compiled)

    def self_test(self) -> None:
        """Starts `true` in a sandbox the way jobs start: a machine without namespaces fails here, not per job."""
        with tempfile.TemporaryDirectory(prefix="jobmesh-sandbox-check-") as scratch:
            try:
                network = self.slot_network()
            except OSError as exc:
                raise SandboxError(f"cannot make a network namespace for jobs: {exc.strerror or exc}") from exc
            try:
                job = self.prepare("self-test", memory_mb=64, cpu_millis=1000)
            except BaseException:
                if network is not None:
                    network.close()
                raise
            try:
                os.chown(scratch, job.uid, job.uid)
                returncode, output = self._run_test_job(job, scratch, network)
            finally:
                job.cgroup.kill()
                job.cgroup.remove()
                self.release(job)
                if network is not None:
                    network.close()
        if returncode != 0:
            detail = output.decode(errors="replace").strip()[-300:]
            raise SandboxError(f"a sandboxed test job failed (exit {returncode}): {detail}")

    def _run_test_job(self, job: JobSandbox, scratch: str, network: SlotNetwork | None) -> tuple[int, bytes]:
        """`true` in `job`'s sandbox, started by a spawner through the gate as every job starts: (exit code, output)."""
        try:
            spawner = self.spawner(network)
        except OSError as exc:
            raise SandboxError(f"cannot start a spawner: {exc.strerror or exc}") from exc
        read, write = os.pipe()
        try:
            try:
                handle = spawner.spawn(job.request(["true"], {"PATH": JOB_PATH}), write, write, scratch)
            finally:
                os.close(write)
            try:
                returncode = handle.wait_blocking(10, confine=job.confine)
            except (OSError, SpawnerError) as exc:
                return 1, f"the spawner failed: {exc}".encode()
            finally:
                handle.close()
            os.set_blocking(read, False)
            try:
                output = os.read(read, 4096)
            except BlockingIOError:
                output = b""
            return returncode, output
        finally:
            os.close(read)
            spawner.close()

    def slot_network(self) -> SlotNetwork | None:
        """A network namespace for one slot's jobs when the pool says network = "none"; None for "host"."""
        return SlotNetwork(self._host_net) if self._host_net >= 0 else None

    def prepare(self, name: str, memory_mb: int, cpu_millis: int, reuse: JobCgroup | None = None) -> JobSandbox:
        """Takes a uid and readies the job's cgroup: `reuse` (the slot's group from its last job, empty) when it
        can be, a new one called `name` otherwise. ``release`` gives the uid back once the job is gone."""
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
        return JobSandbox(uid, cgroup, fd, self._rlimits)

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
