"""Attacks through system calls a batch job never needs (the kernel's keyrings, user namespaces, the 32-bit entry),
each run by the real executor in the real sandbox and each of which must fail; and ordinary multi-threaded and
pipeline jobs, which must keep working under the sandbox's seccomp filter."""

from __future__ import annotations

import platform
import random
import secrets
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.worker.executor import ExecSpec, JobExecutor
from services.worker.sandbox import Sandbox, SandboxSettings
from tests.integration.test_sandbox import executor_of, sandbox_of, sh, spec

# Keys a job stores under its uid outlive it (the kernel keeps a uid's user keyring): with a one-uid range, the
# next job of any tenant runs under the same uid. A uid outside the default range, so that no other test's job
# holds it; random, so that a key left by an earlier run (before the filter) cannot answer for this one.
ONE_UID = random.randrange(270_000, 280_000)

# The system calls, by their x86-64 numbers, through libc's syscall(): jobs seldom have keyutils' keyctl.
PY_SYSCALLS = """
import ctypes, errno, os, struct
libc = ctypes.CDLL(None, use_errno=True)
L = ctypes.c_long
def call(*args):
    ctypes.set_errno(0)
    result = libc.syscall(*(a if isinstance(a, bytes) else L(a) for a in args))
    return result, errno.errorcode.get(ctypes.get_errno(), "0")
"""
ADD_KEY, KEYCTL, UNSHARE, CLONE, CLONE3 = 248, 250, 272, 56, 435
KEY_SPEC_USER_KEYRING, KEYCTL_SEARCH, KEYCTL_READ = -4, 10, 11
CLONE_NEWUSER, SIGCHLD = 0x10000000, 17


@pytest.fixture(scope="module")
def sandbox() -> Iterator[Sandbox]:
    with sandbox_of(SandboxSettings(uid_first=ONE_UID, uid_count=1)) as box:
        yield box


@pytest.fixture
def executor(tmp_path: Path, sandbox: Sandbox) -> Iterator[JobExecutor]:
    with executor_of(tmp_path, sandbox) as executor:
        yield executor


def python(code: str, **overrides: object) -> ExecSpec:
    return spec(["python3", "-c", PY_SYSCALLS + code], **overrides)


# --- ordinary jobs keep working ---


@pytest.mark.asyncio
async def test_a_multi_threaded_python_job_runs(executor: JobExecutor) -> None:
    code = (
        "import threading, concurrent.futures as cf\n"
        "with cf.ThreadPoolExecutor(8) as pool:\n"
        "    print(sum(pool.map(lambda n: sum(range(n)), range(2000))))\n"
        "t = threading.Thread(target=print, args=('thread',)); t.start(); t.join()\n"
        "import subprocess; print(subprocess.run(['echo', 'child'], capture_output=True, text=True).stdout.strip())\n"
    )

    result = await executor.run(spec(["python3", "-c", code]))

    assert (result.reason, result.exit_code) == ("EXITED", 0), result
    assert result.output_tail.split() == [str(sum(sum(range(n)) for n in range(2000))), "thread", "child"]


@pytest.mark.asyncio
async def test_a_shell_pipeline_with_background_jobs_and_a_compiler_runs(executor: JobExecutor) -> None:
    script = (
        "seq 1 1000 | sort -rn | head -3 | tr '\\n' ' '; echo; (sleep 0.05; echo bg) & wait; "
        "printf 'int main(void){return 7;}' > t.c && cc -o t t.c && { ./t; echo cc=$?; } || echo cc=none"
    )

    result = await executor.run(sh(script))

    assert (result.reason, result.exit_code) == ("EXITED", 0), result
    lines = result.output_tail.splitlines()
    assert lines[:2] == ["1000 999 998 ", "bg"], result.output_tail
    assert lines[2] in ("cc=7", "cc=none"), result.output_tail  # cc=none: no compiler on this machine


# --- attacks ---


@pytest.mark.asyncio
async def test_a_key_a_job_stores_under_its_uid_cannot_be_read_by_the_next_tenants_job(executor: JobExecutor) -> None:
    token = secrets.token_hex(8)
    desc, secret = f"jobmesh-{token}".encode(), f"secret-of-tenant-a-{token}".encode()
    store = f"print('add_key', *call({ADD_KEY}, b'user', {desc!r}, {secret!r}, {len(secret)}, {KEY_SPEC_USER_KEYRING}))"
    steal = (
        f"key, err = call({KEYCTL}, {KEYCTL_SEARCH}, {KEY_SPEC_USER_KEYRING}, b'user', {desc!r}, 0)\n"
        "print('search', key, err)\n"
        "buf = ctypes.create_string_buffer(256)\n"
        f"n, _ = call({KEYCTL}, {KEYCTL_READ}, key, ctypes.addressof(buf), 256) if key > 0 else (0, '')\n"
        "print('read', buf.raw[:max(n, 0)].decode())\n"
    )

    stored = await executor.run(python(store, job_id="tenant-a-job", env={"TENANT": "a"}))
    stolen = await executor.run(python(steal, job_id="tenant-b-job", env={"TENANT": "b"}))

    assert stored.reason == stolen.reason == "EXITED", (stored, stolen)
    assert secret.decode() not in stolen.output_tail, stolen.output_tail
    assert stored.output_tail.split() == ["add_key", "-1", "EPERM"], stored.output_tail
    assert stolen.output_tail.split()[:3] == ["search", "-1", "EPERM"], stolen.output_tail


@pytest.mark.asyncio
async def test_a_job_cannot_use_the_keyutils_tool_either(executor: JobExecutor) -> None:
    # The job sees the host's /usr read-only: without keyutils there, the system-call test above is the check.
    if shutil.which("keyctl") is None:
        pytest.skip("keyutils' keyctl is not installed on this host")

    result = await executor.run(sh("keyctl add user k v @u; echo rc=$?"))

    assert result.reason == "EXITED", result
    assert "rc=" in result.output_tail and "rc=0" not in result.output_tail, result.output_tail


@pytest.mark.asyncio
async def test_a_job_cannot_make_a_user_namespace(executor: JobExecutor) -> None:
    # clone and clone3 first: unshare, were it let through, would leave the job in a namespace where its uid has
    # no mapping (and a further user namespace would be refused for that reason, not by the filter).
    code = (
        "def child(*args):\n"
        "    pid, err = call(*args)\n"
        "    if pid == 0:\n        os._exit(0)\n"
        "    if pid > 0:\n        os.waitpid(pid, 0)\n"
        "    return min(pid, 0), err\n"
        f"print('clone', *child({CLONE}, {CLONE_NEWUSER | SIGCHLD}, 0, 0, 0, 0))\n"
        f"args = struct.pack('<QQQQQ', {CLONE_NEWUSER}, 0, 0, 0, {SIGCHLD}) + bytes(48)\n"
        f"print('clone3', *child({CLONE3}, args, 88))\n"
        f"print('unshare', *call({UNSHARE}, {CLONE_NEWUSER}))\n"
    )

    result = await executor.run(python(code))
    tool = await executor.run(sh("unshare -U -r true; echo unshare-tool=$?", job_id="job-2"))

    assert result.reason == "EXITED", result
    assert result.output_tail.splitlines() == ["clone -1 EPERM", "clone3 -1 ENOSYS", "unshare -1 EPERM"], result
    assert "unshare-tool=0" not in tool.output_tail, tool.output_tail


# The i386 entry (int 0x80) of an x86-64 process: its calls have other numbers (add_key is 286 there) and another
# audit arch, which a filter written for x86-64 alone would let through. Machine code run through ctypes:
# push rbx; mov eax, 286; mov ebx, type; mov ecx, desc; mov edx, payload; mov esi, len; mov edi, -4; int 0x80;
# pop rbx; ret. Its strings sit in the same page, mapped below 4 GiB (MAP_32BIT) for 32-bit pointers.
I386_ADD_KEY = """
import ctypes, mmap, struct
page = mmap.mmap(-1, 4096, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | 0x40,
                 prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
base = ctypes.addressof(ctypes.c_char.from_buffer(page))
assert base < 2**32
data = {256: b'user\\0', 272: b'jobmesh-i386\\0', 304: b'i386-secret\\0'}
for offset, blob in data.items():
    page[offset:offset + len(blob)] = blob
code = (b'\\x53' + b'\\xb8' + struct.pack('<I', 286) + b'\\xbb' + struct.pack('<I', base + 256)
        + b'\\xb9' + struct.pack('<I', base + 272) + b'\\xba' + struct.pack('<I', base + 304)
        + b'\\xbe' + struct.pack('<I', 11) + b'\\xbf' + struct.pack('<i', -4) + b'\\xcd\\x80\\x5b\\xc3')
page[0:len(code)] = code
print('i386 add_key', ctypes.CFUNCTYPE(ctypes.c_int)(base)())
"""


@pytest.mark.asyncio
async def test_a_job_cannot_reach_the_denied_calls_through_the_32_bit_entry(executor: JobExecutor) -> None:
    if platform.machine() != "x86_64":
        pytest.skip("the i386 entry is an x86-64 one")

    result = await executor.run(spec(["python3", "-c", I386_ADD_KEY]))

    assert result.reason == "EXITED", result
    assert result.output_tail.split() == ["i386", "add_key", "-1"], result.output_tail  # -EPERM, not a key's id
