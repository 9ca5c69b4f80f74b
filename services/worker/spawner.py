"""A per-slot spawner: one long-lived, already-confined root process that starts each of its slot's jobs with one
fork and a few system calls (the worker's executor, services/worker/executor.py, asks it for every sandboxed job).
services/worker/spawner.c is the same spawner compiled (build/jobmesh-spawner, `make sandbox-tools`): ``Spawner``
runs it when it is built, and this module's Python program otherwise (the same protocol, the same steps).

Once per slot the agent starts (``Spawner``), in the slot's network namespace:

  bwrap (root)     the well-kept tool does the heavy, security-relevant part once: new mount, ipc, uts and cgroup
                   namespaces, read-only system directories, the agent's copy of /etc, a minimal /dev, tmpfs /tmp
                   and /dev/shm, an empty /scratch; no file of the mesh (this module's source comes in a sealed
                   memfd); the interpreter's directory only when it is not a system one (unmounted again per job).
                   Every capability dropped but the five the spawner needs (SPAWNER_CAPS); dies with the agent. No
                   pid namespace of its own: the pids the spawner reports are the agent's, for its cgroup.procs.
  python -S -I     this module's ``serve``: os, socket, struct, signal, resource and ctypes on the C library only.
                   Makes its mounts private, empties its bounding set (inherited by every job) and then drops
                   CAP_SETPCAP (SPAWNER_KEEPS stay), reads the seccomp filter (services/worker/seccomp.py) once, then
                   one request per job from its socketpair with the agent (SOCK_SEQPACKET: one message, one request)
                   with four fds (SCM_RIGHTS): the job's control socket, stdout, stderr and scratch directory (a
                   detached mount, open_tree). The environment travels only in that message (no command line ever
                   holds it), which the spawner does not even decode: it zeroes it once the job's init has forked.

Per job (``_start``) the spawner unshares a pid namespace for its next child, forks the job's init, returns to its
own pid namespace (setns) and sends the init's pid to the agent. It is then at its socket again: no per-job state is
left in the root process, and its own namespaces never change.

  init (pid 1)     the job's init (``_init``); dies with the spawner (PDEATHSIG, set again after the uid switch,
                   which clears it; a lifeline pipe covers the moment between). Decodes the request; unshares
                   mount, ipc and uts namespaces: unmounts the interpreter's directory, fresh tmpfs on /tmp and
                   /dev/shm (over the spawner's), the scratch directory at /scratch (nosuid, nodev), a /proc of its
                   own (``_namespaces``). Waits for the
                   gate byte on the control socket while the agent puts it in the job's cgroup (end of file: the job
                   never runs); then rlimits, no groups, the job's gid and uid (which empties its capabilities and
                   makes it undumpable: the job can neither ptrace it nor read its /proc files), no inheritable or
                   ambient capability, no_new_privs, chdir as the job, the seccomp filter; then the job's command by
                   posix_spawn (a vfork, in a session of its own, stdin /dev/null) with exactly the job's
                   environment. It reaps every process of the namespace until the job's first one ends and sends
                   that status (128 + N for a signal, as bwrap reports it) to the agent; its exit makes the kernel
                   kill whatever is left in the namespace.

The agent's side of one job (``SpawnedJob``): read the init's pid, confine it (cgroup.procs), ``let_go``, read the
status and the end of file that follows the init's exit; to end a job, SIGKILL its init (through a pidfd opened while
it waited at the gate: no reused pid is hit) and kill its cgroup.
"""

from __future__ import annotations

import ctypes
import gc
import os
import resource
import signal
import socket
import struct
import sys

# The request: header, rlimits, then length-prefixed byte strings (cwd, argv..., env "NAME=value"...).
MAGIC = b"JMS1"
_HEADER = struct.Struct("<4sIIHHH")  # magic, uid, gid, rlimit count, argv count, env count
_RLIMIT = struct.Struct("<IQ")  # resource, soft and hard limit
_LENGTH = struct.Struct("<I")
MAX_REQUEST = 1 << 20  # bytes: far above the API's bounds on a job's command and environment (64 KiB)
REQUEST_FDS = 4  # control socket, stdout, stderr, scratch directory
# Replies, on the job's control socket (C1 writes them): 'P' + C2's pid (in the agent's pid namespace), 'X' + C2's
# wait status, 'E' + why the job could not be started. The agent writes GATE (let the job go) or KILL (end it now);
# end of file is a KILL too, so a job dies with its agent's interest in it.
_PID = struct.Struct("<cI")
_STATUS = struct.Struct("<ci")
GATE = b"G"
KILL = b"K"

# Kernel constants (linux/sched.h, linux/mount.h, linux/prctl.h, linux/capability.h, linux/seccomp.h).
_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC, _CLONE_NEWPID = 0x00020000, 0x04000000, 0x08000000, 0x20000000
_MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = 2, 4, 8, 32, 4096, 16384, 1 << 18
_MNT_DETACH = 2
_PR_SET_PDEATHSIG, _PR_SET_SECCOMP, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT = 1, 22, 24, 38, 47
_PR_CAP_AMBIENT_CLEAR_ALL, _SECCOMP_MODE_FILTER = 4, 2
# open_tree and move_mount: the same number on every architecture (since Linux 5.2); no C library wrapper needed.
_SYS_OPEN_TREE, _SYS_MOVE_MOUNT = 428, 429
_OPEN_TREE_CLONE, _OPEN_TREE_CLOEXEC, _AT_SYMLINK_NOFOLLOW, _AT_FDCWD = 1, os.O_CLOEXEC, 0x100, -100
_MOVE_MOUNT_F_EMPTY_PATH = 0x4
_CAP_VERSION_3 = 0x20080522
# Namespaces and mounts; the job's ids; the bounding set (emptied at the start);
# CAP_KILL for the parent-death signal alone: the kernel sends it with the dying parent's credentials, and a root
# spawner without it may not signal a job's init once that runs as the job's uid.
SPAWNER_CAPS = ("CAP_SYS_ADMIN", "CAP_SETUID", "CAP_SETGID", "CAP_SETPCAP", "CAP_KILL")
# What it keeps once its bounding set is empty: CAP_KILL (5), CAP_SETGID (6), CAP_SETUID (7), CAP_SYS_ADMIN (21).
SPAWNER_KEEPS = (1 << 5) | (1 << 6) | (1 << 7) | (1 << 21)
SCRATCH = "/scratch"


class RequestError(ValueError):
    """A request that does not decode, or that asks for something no job may get."""


class Request:
    """One job to start: who it runs as, what it runs, with what environment, where, under which rlimits."""

    __slots__ = ("argv", "cwd", "env", "gid", "rlimits", "uid")

    def __init__(
        self,
        uid: int,
        gid: int,
        argv: list[bytes],
        env: list[bytes],
        cwd: bytes,
        rlimits: list[tuple[int, int]],
    ) -> None:
        self.uid, self.gid, self.argv, self.env, self.cwd, self.rlimits = uid, gid, argv, env, cwd, rlimits

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Request) and all(getattr(self, a) == getattr(other, a) for a in self.__slots__)

    def __repr__(self) -> str:  # never the environment's values: they are the tenant's secrets
        return f"Request(uid={self.uid}, argv={self.argv!r}, env={len(self.env)} entries, cwd={self.cwd!r})"


def _check_string(value: bytes, what: str) -> None:
    if b"\0" in value:
        raise RequestError(f"{what} holds a NUL byte")


def _check(request: Request) -> None:
    """What the spawner refuses whoever asks: root or the agent's ids, an empty command, a cwd outside /scratch,
    an environment entry that is not NAME=value."""
    if request.uid in (0, 2**32 - 1) or request.gid in (0, 2**32 - 1):
        raise RequestError("a job never runs as root")
    if not request.argv or not request.argv[0]:
        raise RequestError("empty command")
    for arg in request.argv:
        _check_string(arg, "an argument")
    cwd = request.cwd
    _check_string(cwd, "the working directory")
    if (cwd != SCRATCH.encode() and not cwd.startswith(SCRATCH.encode() + b"/")) or b"/../" in cwd + b"/":
        raise RequestError("the working directory must be /scratch or inside it")
    for entry in request.env:
        _check_string(entry, "an environment entry")
        if entry.find(b"=") < 1:
            raise RequestError("an environment entry must be NAME=value")


def encode_request(request: Request) -> bytes:
    """The request as one message (RequestError when it is not one the spawner would take)."""
    _check(request)
    strings = [request.cwd, *request.argv, *request.env]
    parts = [_HEADER.pack(MAGIC, request.uid, request.gid, len(request.rlimits), len(request.argv), len(request.env))]
    parts += [_RLIMIT.pack(limit, value) for limit, value in request.rlimits]
    for value in strings:
        parts += [_LENGTH.pack(len(value)), value]
    message = b"".join(parts)
    if len(message) > MAX_REQUEST:
        raise RequestError(f"a request of {len(message)} bytes (at most {MAX_REQUEST})")
    return message


def decode_request(data: bytes | bytearray | memoryview) -> Request:
    """The request in `data`; RequestError when it is malformed (short, long, a count or length past its end)."""
    view = memoryview(data)
    if len(view) < _HEADER.size or len(view) > MAX_REQUEST:
        raise RequestError("a request of the wrong size")
    magic, uid, gid, n_rlimits, n_argv, n_env = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise RequestError("not a spawner request")
    offset = _HEADER.size
    if offset + n_rlimits * _RLIMIT.size > len(view):
        raise RequestError("truncated rlimits")
    rlimits = [_RLIMIT.unpack_from(view, offset + i * _RLIMIT.size) for i in range(n_rlimits)]
    offset += n_rlimits * _RLIMIT.size
    strings: list[bytes] = []
    for _ in range(1 + n_argv + n_env):
        if offset + _LENGTH.size > len(view):
            raise RequestError("truncated request")
        (length,) = _LENGTH.unpack_from(view, offset)
        offset += _LENGTH.size
        if offset + length > len(view):
            raise RequestError("truncated request")
        strings.append(bytes(view[offset : offset + length]))
        offset += length
    if offset != len(view):
        raise RequestError("trailing bytes after the request")
    request = Request(uid, gid, strings[1 : 1 + n_argv], strings[1 + n_argv :], strings[0], rlimits)
    _check(request)
    return request


def decode_reply(data: bytes) -> tuple[str, int | str]:
    """('pid', C2's pid) | ('status', wait status) | ('error', why) | ('gone', 0) at end of file."""
    if not data:
        return ("gone", 0)
    kind = data[:1]
    if kind == b"P" and len(data) == _PID.size:
        return ("pid", _PID.unpack(data)[1])
    if kind == b"X" and len(data) == _STATUS.size:
        return ("status", _STATUS.unpack(data)[1])
    if kind == b"E":
        return ("error", data[1:].decode(errors="replace"))
    raise RequestError(f"not a spawner reply: {data[:16]!r}")


# ---- The spawner's side: `python -S -I /proc/self/fd/<this module> <socket fd> <seccomp fd> <hidden dirs...>` ----


class _SockFprog(ctypes.Structure):
    _fields_ = [("len", ctypes.c_ushort), ("filter", ctypes.c_void_p)]


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


class _Kernel:
    """The few C library calls Python's os module lacks (3.11), checked: OSError on failure."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self._mount = libc.mount
        self._mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
        self._umount2 = libc.umount2
        self._umount2.argtypes = [ctypes.c_char_p, ctypes.c_int]
        self._unshare = libc.unshare
        self._unshare.argtypes = [ctypes.c_int]
        self._setns = libc.setns
        self._setns.argtypes = [ctypes.c_int, ctypes.c_int]
        self._prctl = libc.prctl
        self._prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
        self._capset = libc.capset
        self._capset.argtypes = [ctypes.c_void_p, ctypes.c_void_p]
        self._syscall = libc.syscall

    @staticmethod
    def _ok(result: int, what: str) -> None:
        if result != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"{what}: {os.strerror(err)}")

    def mount(self, source: bytes | None, target: bytes, fstype: bytes | None, flags: int, data: bytes | None) -> None:
        self._ok(self._mount(source, target, fstype, flags, data), f"mount {target.decode()}")

    def move_mount(self, tree: int, target: bytes) -> None:
        """Attaches the detached mount `tree` (from ``detached_mount``) at `target`."""
        result = self._syscall(_SYS_MOVE_MOUNT, tree, b"", _AT_FDCWD, target, _MOVE_MOUNT_F_EMPTY_PATH)
        self._ok(result, f"move_mount {target.decode()}")

    def umount(self, target: bytes) -> None:
        self._ok(self._umount2(target, _MNT_DETACH), f"umount {target.decode()}")

    def unshare(self, flags: int) -> None:
        self._ok(self._unshare(flags), "unshare")

    def setns(self, fd: int, kind: int) -> None:
        self._ok(self._setns(fd, kind), "setns")

    def prctl(self, option: int, arg: int = 0, what: str = "prctl") -> None:
        self._ok(self._prctl(option, arg, 0, 0, 0), what)

    def clear_capabilities(self, keep: int = 0) -> None:
        """Leaves only `keep` (a mask of capabilities numbered below 32) in the effective and permitted sets, nothing
        in the inheritable set: a lowering, allowed without any capability."""
        header = _CapHeader(_CAP_VERSION_3, 0)
        data = (_CapData * 2)()
        data[0].effective = data[0].permitted = keep
        self._ok(self._capset(ctypes.byref(header), ctypes.byref(data)), "capset")

    def load_seccomp(self, program: ctypes.Array[ctypes.c_char], length: int) -> None:
        prog = _SockFprog(length // 8, ctypes.addressof(program))  # struct sock_filter: 8 bytes
        self._ok(self._prctl(_PR_SET_SECCOMP, _SECCOMP_MODE_FILTER, ctypes.addressof(prog), 0, 0), "seccomp")


class _Slot:
    """What the spawner keeps for every job: the kernel calls, the seccomp program, the directories to hide."""

    def __init__(self, seccomp: bytes, hidden: list[bytes]) -> None:
        self.kernel = _Kernel()
        self.seccomp_length = len(seccomp)
        self.seccomp = ctypes.create_string_buffer(seccomp, len(seccomp))
        self.hidden = hidden
        with open("/proc/sys/kernel/cap_last_cap", "rb") as fh:
            self.cap_last = int(fh.read())
        self.own_pid = os.open("/proc/self/ns/pid", os.O_RDONLY | os.O_CLOEXEC)  # unshare(NEWPID) again needs it
        # A pipe nobody writes to: its write end lives only in the spawner, so its read end reads end of file once
        # the spawner is gone (see _init).
        self.lifeline, self.lifeline_end = os.pipe()
        os.set_blocking(self.lifeline, False)


def _send(fd: int, data: bytes) -> None:
    try:
        os.write(fd, data)  # a SOCK_SEQPACKET socket: one write, one message
    except OSError:
        pass  # the agent closed its end: it has given up on this job


def _start(slot: _Slot, message: bytearray, fds: list[int]) -> None:
    """One job: its init forked into a new pid namespace, its pid sent to the agent. That is all the spawner does
    per job: the init decodes the request (the spawner's heap never holds a job's environment, so no later job's
    init, a copy of that heap, does), makes the rest of the job's namespaces, talks to the agent from here on, and
    its end is reaped by the kernel (SIGCHLD ignored). Every page the spawner writes while an init lives is copied."""
    control, stdout, stderr, scratch = fds
    k = slot.kernel
    try:
        k.unshare(_CLONE_NEWPID)  # for our next child only: it is pid 1 of a new pid namespace
        try:
            init = os.fork()
            if init == 0:
                os.close(slot.lifeline_end)
                try:
                    request = decode_request(message)
                except RequestError as exc:
                    _send(control, b"E" + str(exc).encode())
                    os._exit(1)
                _init(slot, request, control, stdout, stderr, scratch)
        finally:
            k.setns(slot.own_pid, _CLONE_NEWPID)  # our own again, or the next unshare(CLONE_NEWPID) fails
        _send(control, _PID.pack(b"P", init))
    except OSError as exc:
        _send(control, b"E" + f"cannot start the job's init: {exc}".encode(errors="replace"))
    finally:
        message[:] = bytes(len(message))  # the job's environment stays in no buffer of ours
        for fd in fds:
            os.close(fd)


def _namespaces(k: _Kernel, hidden: list[bytes], scratch: int) -> None:
    """The init's mount, ipc and uts namespaces: the spawner's view (whose mounts are all private: nothing propagates
    back) minus the interpreter's directory, with a fresh /tmp, /dev/shm and /proc, the job's scratch at /scratch."""
    k.unshare(_CLONE_NEWNS | _CLONE_NEWIPC | _CLONE_NEWUTS)
    for path in hidden:  # the interpreter's own directory, when not a system one: no job sees it
        k.umount(path)
    # Fresh file systems go over the spawner's, never in their place: each unmount makes the kernel wait for an
    # expedited RCU grace period (an interrupt to every CPU), a large part of a start. What lies below is empty (/tmp,
    # /dev/shm) or the spawner's /proc, out of the job's reach (it has no capability to unmount what covers them).
    for path in (b"/tmp", b"/dev/shm"):
        k.mount(b"tmpfs", path, b"tmpfs", _MS_NOSUID | _MS_NODEV, b"mode=1777")
    # The scratch directory: a detached bind mount the agent made of it (open_tree), attached here: no path of the
    # host is resolved in here (and a bind from the agent's mount namespace would be refused).
    k.move_mount(scratch, SCRATCH.encode())
    k.mount(None, SCRATCH.encode(), None, _MS_REMOUNT | _MS_BIND | _MS_NOSUID | _MS_NODEV, None)
    os.close(scratch)
    # The spawner's /proc shows the host's processes; this one, over it, only the job's.
    k.mount(b"proc", b"/proc", b"proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC, None)


def _init(slot: _Slot, request: Request, control: int, stdout: int, stderr: int, scratch: int) -> None:
    """The job's init: pid 1 of its pid namespace. Mounts the namespace's /proc, waits at the gate, then becomes
    the job's uid with nothing else (no group, no capability, no_new_privs, the seccomp filter), starts the job's
    command with posix_spawn (a vfork: no copy of this interpreter's memory), reaps every process of the namespace
    until that first one ends and sends its status to the agent. Never returns."""
    code = 126
    try:
        k = slot.kernel
        k.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, "pdeathsig")  # the spawner (and so the agent) gone: we go
        # Pid 1 ignores every signal it has no handler for: Python's SIGINT handler is dropped so that a job's
        # SIGINT cannot end its init. SIGCHLD back to the default, for waitpid.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        try:
            _namespaces(k, slot.hidden, scratch)
        except OSError as exc:
            _send(control, b"E" + f"cannot set up the job's namespaces: {exc}".encode(errors="replace"))
            os._exit(1)
        # The gate: nothing of the job's runs before the agent has put this process in the job's cgroup. End of
        # file (the agent gave up, or died) is not a go.
        if os.read(control, 16) != GATE:
            os._exit(1)
        for limit, value in request.rlimits:  # lowering only: no CAP_SYS_RESOURCE needed
            resource.setrlimit(limit, (value, value))
        os.setgroups([])
        os.setresgid(request.gid, request.gid, request.gid)
        # Clears the effective and permitted sets (the bounding set is empty since the spawner's start), and the
        # dumpable flag: the job can neither ptrace its init nor read its /proc files.
        os.setresuid(request.uid, request.uid, request.uid)
        # A change of uid clears the parent-death signal: set again, then make sure the spawner did not die before.
        k.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, "pdeathsig")
        try:
            if not os.read(slot.lifeline, 1):
                os._exit(1)
        except BlockingIOError:
            pass  # the spawner lives (and holds the write end)
        k.clear_capabilities()  # the inheritable set too
        k.prctl(_PR_CAP_AMBIENT, _PR_CAP_AMBIENT_CLEAR_ALL, "clear ambient capabilities")
        k.prctl(_PR_SET_NO_NEW_PRIVS, 1, "no_new_privs")
        os.chdir(request.cwd)  # as the job: a directory it may not enter stays closed
        env = dict(entry.split(b"=", 1) for entry in request.env)
        k.load_seccomp(slot.seccomp, slot.seccomp_length)  # the filter holds for the init and the job alike
        try:
            job = os.posix_spawn(
                _find(request.argv[0], env.get(b"PATH", b"/usr/bin:/bin")),
                request.argv,
                env,  # type: ignore[arg-type]  # bytes names and values: what execve takes
                file_actions=[
                    (os.POSIX_SPAWN_OPEN, 0, "/dev/null", os.O_RDONLY, 0),
                    (os.POSIX_SPAWN_DUP2, stdout, 1),
                    (os.POSIX_SPAWN_DUP2, stderr, 2),
                ],
                setsid=True,
                setsigdef=(signal.SIGPIPE, signal.SIGXFSZ, signal.SIGINT),  # Python ignores the first two
            )
        except OSError as exc:
            os.write(stderr, f"jobmesh: cannot run {request.argv[0].decode(errors='replace')}: {exc}\n".encode())
            code = 127 if isinstance(exc, FileNotFoundError) else 126
            raise
        os.close(stdout)
        os.close(stderr)
        while True:  # reap every process of the namespace until the job's first one ends
            pid, status = os.waitpid(-1, 0)
            if pid == job:
                code = os.waitstatus_to_exitcode(status)
                code = 128 - code if code < 0 else code
                break
    except BaseException as exc:
        if code == 126:
            try:
                os.write(stderr, f"jobmesh: cannot start the job: {exc}\n".encode(errors="replace"))
            except OSError:
                pass
    _send(control, _STATUS.pack(b"X", code << 8))  # a wait status, as waitpid would give the agent
    os._exit(code)


def _find(command: bytes, path: bytes) -> bytes:
    """`command` looked up in the job's PATH as execvp does, by the job's uid (posix_spawnp would search the
    spawner's PATH, and os.execvpe imports a module the job's namespace no longer has)."""
    if b"/" in command:
        return command
    for directory in path.split(b":"):
        candidate = os.path.join(directory or b".", command)
        if os.access(candidate, os.X_OK) and not os.path.isdir(candidate):
            return candidate
    raise FileNotFoundError(2, "command not found")


def _hung_up(fd: int) -> bool:
    """Whether the agent has closed its end of the spawner's socket."""
    import select

    poller = select.poll()
    poller.register(fd, select.POLLRDHUP)
    return any(events & (select.POLLHUP | select.POLLRDHUP | select.POLLERR) for _, events in poller.poll(0))


def serve(sock_fd: int, seccomp_fd: int, hidden: list[bytes]) -> None:
    """The spawner's loop: one request, one job started and seen to its end; returns when the agent closes its end."""
    # The agent passed our socket inheritable: no job's init may hand it to its job (which could then ask us for
    # processes outside its cgroup, as any uid but root's).
    os.set_inheritable(sock_fd, False)
    with os.fdopen(seccomp_fd, "rb") as fh:
        slot = _Slot(fh.read(), hidden)
    # The jobs' mounts never propagate back here (nor to the next job): every mount of ours is private.
    slot.kernel.mount(None, b"/", None, _MS_REC | _MS_PRIVATE, None)
    # An empty bounding set, inherited by every job: what the spawner holds it keeps (its permitted set), but no
    # process it starts can ever gain a capability by an exec.
    for cap in range(slot.cap_last + 1):
        slot.kernel.prctl(_PR_CAPBSET_DROP, cap, "drop from the bounding set")
    slot.kernel.clear_capabilities(keep=SPAWNER_KEEPS)  # CAP_SETPCAP was for the line above only
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the jobs' inits are reaped by the kernel
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a ^C at the agent's terminal is for the agent
    # Every later fork copies this process's page tables, and a collection would write to every object of it:
    # no collections (the spawner makes no cycles worth one), and what exists now is left alone.
    gc.disable()
    gc.freeze()
    sock = socket.socket(fileno=sock_fd)
    fd_space = socket.CMSG_SPACE(REQUEST_FDS * 4)
    while True:
        # The size first (MSG_PEEK | MSG_TRUNC: the whole message's), then a buffer of just that size.
        size = sock.recv_into(bytearray(1), 1, socket.MSG_PEEK | socket.MSG_TRUNC)
        if size == 0 and _hung_up(sock_fd):
            return  # the agent has gone (an empty message reads as 0 bytes too, and is refused below)
        buffer = bytearray(min(size, MAX_REQUEST + 1))
        received, ancillary, flags, _ = sock.recvmsg_into([buffer], fd_space, socket.MSG_CMSG_CLOEXEC)
        fds: list[int] = []
        for level, kind, data in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds += struct.unpack(f"{len(data) // 4}i", data[: len(data) - len(data) % 4])
        if flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or len(fds) != REQUEST_FDS or received != len(buffer):
            buffer[:] = bytes(len(buffer))
            if fds:
                _send(fds[0], b"Ea request without its four fds, or cut short")
            for fd in fds:
                os.close(fd)
            continue
        _start(slot, buffer, fds)


def main(argv: list[str]) -> None:
    os.close(int(argv[0].rsplit("/", 1)[1]))  # the memfd this program was read from (/proc/self/fd/N)
    serve(int(argv[1]), int(argv[2]), [path.encode() for path in argv[3:]])


if __name__ == "__main__":
    main(sys.argv)


# ---- The agent's side. Its imports stay in its functions: the spawner program (above) runs without the mesh. ----


def compiled_spawner(repo: str | None = None) -> str | None:
    """The compiled spawner (services/worker/spawner.c, built by `make sandbox-tools` into build/jobmesh-spawner),
    or None when it is not built, or not to be trusted: it and its directory must belong to root or to this
    process's user and be writable by no one else (it runs as root), and it must not be older than its source (a
    build not remade after a change would speak an old protocol)."""
    if repo is None:
        repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    path = os.path.join(repo, "build", "jobmesh-spawner")
    owners = {0, os.geteuid()}
    try:
        binary, directory = os.stat(path), os.stat(os.path.dirname(path))
    except OSError:
        return None
    for st in (binary, directory):
        if st.st_uid not in owners or st.st_mode & 0o022:
            return None
    if not binary.st_mode & 0o100:
        return None
    try:
        if os.stat(os.path.join(repo, "services", "worker", "spawner.c")).st_mtime > binary.st_mtime:
            return None
    except OSError:
        pass  # an installation without the source: the binary is what was installed
    return path


def spawner_argv(
    bwrap: str, etc_dir: str, program_fd: int, sock_fd: int, seccomp_fd: int, compiled: bool = False
) -> list[str]:
    """bwrap's command line for a slot's spawner: the job's view of the system, made once, and the spawner's program
    (read from `program_fd`, see ``program``): the compiled one executed from that fd, or this module run by the
    base interpreter. Nothing of the mesh's checkout or venv is bound."""
    from services.worker.sandbox import SYSTEM_DIRS

    args = [bwrap, "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--die-with-parent", "--new-session"]
    args += ["--hostname", "jobmesh-job", "--cap-drop", "ALL"]
    for cap in SPAWNER_CAPS:
        args += ["--cap-add", cap]
    for name in SYSTEM_DIRS:
        host = f"/{name}"
        if os.path.islink(host):
            args += ["--symlink", os.readlink(host), host]
        elif os.path.isdir(host):
            args += ["--ro-bind", host, host]
    args += ["--ro-bind", etc_dir, "/etc", "--proc", "/proc", "--dev", "/dev"]
    args += ["--perms", "1777", "--tmpfs", "/dev/shm", "--perms", "1777", "--tmpfs", "/tmp"]
    args += ["--perms", "0755", "--dir", "/var", "--symlink", "/tmp", "/var/tmp", "--perms", "0755", "--dir", SCRATCH]
    program = f"/proc/self/fd/{program_fd}"
    if compiled:  # no interpreter: nothing to bind, nothing to hide again
        return [*args, "--", program, str(sock_fd), str(seccomp_fd)]
    python = os.path.realpath(getattr(sys, "_base_executable", None) or sys.executable)
    prefix = os.path.realpath(sys.base_prefix)
    hidden: list[str] = []
    top = "/" + prefix.strip("/").split("/", 1)[0]
    if top.strip("/") not in SYSTEM_DIRS:
        # An interpreter outside the system directories (pyenv's under /root, say): on a tmpfs over its top
        # directory, which each job's mount namespace unmounts again (the job sees an empty /root or /opt).
        if top in ("/", "/etc", "/proc", "/dev", "/tmp", "/var", SCRATCH):
            raise OSError(f"the interpreter's directory {prefix} cannot be hidden from jobs")
        args += ["--perms", "0755", "--tmpfs", top, "--ro-bind", prefix, prefix]
        hidden.append(top)
    return [*args, "--", python, "-S", "-I", program, str(sock_fd), str(seccomp_fd), *hidden]


def program(path: str | None = None) -> int:
    """A sealed memfd holding the spawner's program (`path`, the compiled one, or this module's source): what the
    spawner runs, with no path of the mesh's checkout."""
    with open(path or __file__, "rb") as fh:
        source = fh.read()
    import fcntl

    fd = os.memfd_create("jobmesh-spawner", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        while source:
            source = source[os.write(fd, source) :]
        seals = fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, seals)
        if path is not None:
            # An executable must have no writable fd open (ETXTBSY): a read-only one of the same file instead.
            readonly = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY | os.O_CLOEXEC)
            os.close(fd)
            fd = readonly
    except BaseException:
        os.close(fd)
        raise
    return fd


def detached_mount(path: str) -> int:
    """A detached bind mount of `path` (a directory of the agent's mount namespace, no symlink followed), as an fd
    another mount namespace can attach (open_tree with OPEN_TREE_CLONE)."""
    from services.worker.sandbox import LIBC

    syscall = LIBC.syscall
    flags = _OPEN_TREE_CLONE | _OPEN_TREE_CLOEXEC | _AT_SYMLINK_NOFOLLOW
    fd = int(syscall(_SYS_OPEN_TREE, _AT_FDCWD, path.encode(), flags))
    if fd < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"open_tree {path}: {os.strerror(err)}")
    return fd


class SpawnerError(RuntimeError):
    """The spawner is gone, or refused a job."""


class SpawnedJob:
    """The agent's handle on one job started by a spawner: its init's pid, the gate, its end."""

    def __init__(self, control: socket.socket) -> None:
        self.control = control
        self.pid = 0  # the job's init: pid 1 of its namespace, here in the agent's
        self._pidfd = -1  # the init's, opened while it waits at the gate: a kill never hits a reused pid
        self.wait_status: int | None = None
        self._ended = False

    def _take(self, data: bytes) -> None:
        kind, value = decode_reply(data)
        if kind == "pid" and isinstance(value, int):
            self._pidfd = os.pidfd_open(value)
            self.pid = value
        elif kind == "status" and isinstance(value, int):
            self.wait_status = value
        elif kind == "error":
            raise SpawnerError(str(value))
        elif not self.pid:
            raise SpawnerError("the spawner dropped the job before starting it")
        else:
            self._ended = True  # the init has exited (its fds close after its memory is released)
            if self.wait_status is None:  # without a status: it was killed
                self.wait_status = signal.SIGKILL

    async def init_pid(self) -> int:
        """The pid to confine (cgroup.procs): the job's code runs only after ``let_go``."""
        import asyncio

        loop = asyncio.get_running_loop()
        while not self.pid:
            self._take(await loop.sock_recv(self.control, 4096))
        return self.pid

    def let_go(self) -> None:
        self.control.send(GATE)

    async def exit_status(self) -> int:
        """The job's exit code as bwrap gives it (128 + N for a job killed by signal N), or -9 if its init was killed
        (``kill``)."""
        import asyncio

        loop = asyncio.get_running_loop()
        while not self._ended:  # the status, then end of file: the init is gone, not just about to go
            self._take(await loop.sock_recv(self.control, 4096))
        assert self.wait_status is not None
        return os.waitstatus_to_exitcode(self.wait_status)

    def wait_blocking(self, timeout: float, confine: object = None) -> int:
        """``init_pid``, `confine` (given the init's pid), ``let_go`` and ``exit_status`` in one, blocking (the
        sandbox's self-test, tests). `confine` is a callable (typed loosely: this module imports no typing)."""
        self.control.settimeout(timeout)
        while not self.pid:
            self._take(self.control.recv(4096))
        if callable(confine):
            confine(self.pid)
        self.let_go()
        while not self._ended:
            self._take(self.control.recv(4096))
        assert self.wait_status is not None
        return os.waitstatus_to_exitcode(self.wait_status)

    def kill(self) -> None:
        """SIGKILLs the job's init, and with it the job's whole pid namespace."""
        if self._pidfd >= 0 and not self._ended:
            try:
                signal.pidfd_send_signal(self._pidfd, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def close(self) -> None:
        """Kills the job unless it has ended (at its gate, end of file alone would do), and lets go of it."""
        self.kill()
        if self._pidfd >= 0:
            os.close(self._pidfd)
            self._pidfd = -1
        self.control.close()


class Spawner:
    """One slot's spawner process (see the module's docstring). ``spawn`` starts a job; ``close`` ends it, and every
    job it still runs."""

    _SO_SNDBUFFORCE = 32  # root may send a message above net.core.wmem_max: a request is one message

    def __init__(
        self,
        bwrap: str,
        etc_dir: str,
        seccomp_program: str,
        network: object | None = None,
        *,
        compiled: bool | None = None,
    ) -> None:
        """`compiled`: run the compiled spawner (``compiled_spawner``; SpawnerError when it is not built), or this
        module's Python program; None: the compiled one when it is built."""
        import subprocess
        from contextlib import nullcontext

        from services.worker.sandbox import JOB_PATH, SlotNetwork

        binary = compiled_spawner() if compiled is not False else None
        if compiled and binary is None:
            raise SpawnerError("the compiled spawner is not built (make sandbox-tools)")
        self.compiled = binary is not None
        self._sock, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        seccomp_fd = source = -1
        try:
            self._sock.setsockopt(socket.SOL_SOCKET, self._SO_SNDBUFFORCE, 2 * MAX_REQUEST)
            seccomp_fd = os.open(seccomp_program, os.O_RDONLY | os.O_CLOEXEC)
            source = program(binary)
            argv = spawner_argv(bwrap, etc_dir, source, theirs.fileno(), seccomp_fd, compiled=self.compiled)
            entered = network.entered() if isinstance(network, SlotNetwork) else nullcontext()
            with entered:
                self._process = subprocess.Popen(
                    argv,
                    env={"PATH": JOB_PATH},
                    stdin=subprocess.DEVNULL,
                    pass_fds=(theirs.fileno(), seccomp_fd, source),
                    start_new_session=True,
                )
        except BaseException:
            self._sock.close()
            raise
        finally:
            theirs.close()
            for fd in (seccomp_fd, source):
                if fd >= 0:
                    os.close(fd)

    @property
    def pid(self) -> int:
        return self._process.pid

    def spawn(self, request: Request, stdout: int, stderr: int, scratch_dir: str) -> SpawnedJob:
        """Sends one job (RequestError for one the spawner would refuse). `scratch_dir` (a host path, the job's)
        becomes its /scratch: a detached mount of it made here, so the spawner never resolves a path of the host."""
        message = encode_request(request)
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            scratch = detached_mount(scratch_dir)
            try:
                socket.send_fds(self._sock, [message], [theirs.fileno(), stdout, stderr, scratch])
            except OSError as exc:
                raise SpawnerError(f"the spawner is gone: {exc.strerror or exc}") from exc
            finally:
                os.close(scratch)
        except BaseException:
            mine.close()
            raise
        finally:
            theirs.close()
        mine.setblocking(False)
        return SpawnedJob(mine)

    def close(self, timeout: float = 5.0) -> None:
        import subprocess

        self._sock.close()  # the spawner reads end of file and exits; its C1s (and their jobs) die with it
        try:
            self._process.wait(timeout)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
