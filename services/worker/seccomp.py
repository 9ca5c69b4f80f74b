"""The seccomp filter of every sandboxed job: the system calls a batch job never needs, denied, built with libseccomp.

The agent compiles the program once (``write_program``) into a root-only file; bwrap reads it from a fresh fd at
each job's start (``--seccomp``) and loads it in its init and in the job's first process before that execs setpriv,
so it holds for setpriv, for the job's command and for everything they start (a filter cannot be removed, only
added to). setpriv's own calls (setresuid, setgroups, capset, prctl, execve) are not in it.

libseccomp is reached through ctypes: seven of its stable C functions are all this needs, which spares the mesh a
binding package. See docs/security.md ("System calls a job cannot make") for why each call is denied.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
from dataclasses import dataclass

# Refused with EPERM (a program sees "not permitted", as from a missing capability, and most carry on): why each.
KEYRINGS = ("add_key", "keyctl", "request_key")  # a uid's keyring outlives its job and the uid is reused
MOUNTS = (  # the job has no capability for them; a user namespace would give it one (refused below)
    "mount",
    "umount2",
    "pivot_root",
    "move_mount",
    "open_tree",
    "fsopen",
    "fsconfig",
    "fsmount",
    "fspick",
    "mount_setattr",
    "setns",
)
KERNEL_ADMIN = (  # the host's, never a job's: refused by the kernel anyway (no capability), kept out of reach
    "kexec_load",
    "kexec_file_load",
    "init_module",
    "finit_module",
    "delete_module",
    "reboot",
    "swapon",
    "swapoff",
    "acct",
    "settimeofday",
    "clock_settime",
    "clock_adjtime",
    "syslog",
    "iopl",
    "ioperm",
    "open_by_handle_at",  # reads any file of a file system by its handle (CAP_DAC_READ_SEARCH)
    "lookup_dcookie",
    "quotactl",
)
ATTACK_SURFACE = (  # open to an unprivileged process, the source of many kernel exploits, no use to a batch job
    "bpf",
    "perf_event_open",
    "userfaultfd",
    "io_uring_setup",
    "io_uring_enter",
    "io_uring_register",
)
DENIED = KEYRINGS + MOUNTS + KERNEL_ADMIN + ATTACK_SURFACE
CLONE_NEWUSER = 0x10000000
# unshare and clone: refused with EPERM when their flags ask for a new user namespace (the one way for the job to
# hold capabilities again). clone3 passes its flags in memory, which a filter cannot read: it answers ENOSYS, and
# the C library falls back to clone, whose flags it can.
USER_NAMESPACE_CALLS = ("unshare", "clone")

# libseccomp's constants (seccomp.h).
_ACT_ALLOW = 0x7FFF0000
_ACT_KILL_PROCESS = 0x80000000
_ACT_ERRNO = 0x00050000
_ATTR_ACT_BADARCH = 2
_CMP_MASKED_EQ = 7
_NR_ERROR = -1
# The other ABIs a native process can call the kernel through, each given the same rules; any other arch kills.
_ARCH_I386, _ARCH_X32, _ARCH_ARM = 0x40000003, 0x4000003E, 0x40000028
_COMPAT_ARCHES = {"x86_64": (_ARCH_I386, _ARCH_X32), "aarch64": (_ARCH_ARM,)}


class SeccompError(RuntimeError):
    """libseccomp is missing, or the filter could not be built."""


class _ArgCmp(ctypes.Structure):
    _fields_ = [
        ("arg", ctypes.c_uint),
        ("op", ctypes.c_int),
        ("datum_a", ctypes.c_uint64),
        ("datum_b", ctypes.c_uint64),
    ]


@dataclass(frozen=True)
class Rule:
    syscall: str
    errno: int
    flags_with: int = 0  # only when the first argument (the flags) has these bits set


def rules() -> list[Rule]:
    """Every rule of the filter (its default: allow)."""
    denied = [Rule(name, errno.EPERM) for name in DENIED]
    denied += [Rule(name, errno.EPERM, CLONE_NEWUSER) for name in USER_NAMESPACE_CALLS]
    return [*denied, Rule("clone3", errno.ENOSYS)]


def _library() -> ctypes.CDLL:
    name = ctypes.util.find_library("seccomp") or "libseccomp.so.2"
    try:
        lib = ctypes.CDLL(name, use_errno=True)
    except OSError as exc:
        raise SeccompError("missing libseccomp (Debian: apt-get install libseccomp2)") from exc
    lib.seccomp_init.restype = ctypes.c_void_p
    lib.seccomp_init.argtypes = [ctypes.c_uint32]
    lib.seccomp_release.argtypes = [ctypes.c_void_p]
    lib.seccomp_arch_add.argtypes = [ctypes.c_void_p, ctypes.c_uint32]
    lib.seccomp_attr_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32]
    lib.seccomp_syscall_resolve_name.argtypes = [ctypes.c_char_p]
    lib.seccomp_rule_add_array.argtypes = [
        ctypes.c_void_p,
        ctypes.c_uint32,
        ctypes.c_int,
        ctypes.c_uint,
        ctypes.POINTER(_ArgCmp),
    ]
    lib.seccomp_export_bpf.argtypes = [ctypes.c_void_p, ctypes.c_int]
    return lib


def _check(result: int, what: str) -> None:
    if result < 0:
        raise SeccompError(f"libseccomp: {what}: {os.strerror(-result)}")


def _add_rule(lib: ctypes.CDLL, ctx: int, rule: Rule) -> None:
    number = lib.seccomp_syscall_resolve_name(rule.syscall.encode())
    if number == _NR_ERROR:
        return  # newer than this libseccomp (and so than most kernels it runs with): nothing to name
    action = _ACT_ERRNO | rule.errno
    if rule.flags_with:
        cmp = _ArgCmp(0, _CMP_MASKED_EQ, rule.flags_with, rule.flags_with)
        _check(lib.seccomp_rule_add_array(ctx, action, number, 1, ctypes.byref(cmp)), rule.syscall)
    else:
        _check(lib.seccomp_rule_add_array(ctx, action, number, 0, None), rule.syscall)


def write_program(path: str) -> None:
    """Compiles the filter for this machine's arch (and its compat ABIs) into `path`, readable by root only."""
    lib = _library()
    ctx = lib.seccomp_init(_ACT_ALLOW)
    if not ctx:
        raise SeccompError("libseccomp: cannot make a filter")
    try:
        _check(lib.seccomp_attr_set(ctx, _ATTR_ACT_BADARCH, _ACT_KILL_PROCESS), "bad-arch action")
        for arch in _COMPAT_ARCHES.get(platform.machine(), ()):
            result = lib.seccomp_arch_add(ctx, arch)
            if result != -errno.EEXIST:
                _check(result, f"arch {arch:#x}")
        for rule in rules():
            _add_rule(lib, ctx, rule)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            os.fchmod(fd, 0o600)
            _check(lib.seccomp_export_bpf(ctx, fd), "export")
        finally:
            os.close(fd)
    finally:
        lib.seccomp_release(ctx)
