"""Where jobs' output is kept: one log per attempt, bounded, behind a small interface.

Workers send their jobs' output to the pool-manager (services/poolmanager/registry.py, AppendJobLog), which
writes it here only for the worker the attempt is assigned to; the gateway reads it back through the
pool-manager for the job's tenant (or an admin); queueing's retention deletes it with the job record.

`DirectoryLogStore` keeps each attempt's log as files under one directory (`<data dir>/job-logs` for `make run`):
every replica of the pool-manager and queueing must see the same directory (one host, or a shared volume). A
production mesh on several hosts would put an object store (S3, GCS) behind the same interface; see
docs/api.md ("Job logs").

A log is bounded: beyond `max_bytes` the oldest output is dropped (in halves) and a reader is told how much with a
marker line. Offsets are of two kinds: the *worker's* (bytes the attempt wrote, counted from its first: a resent
chunk is stored once and a gap is marked) and the *reader's* (bytes of the stored text, counted from the first
ever stored, so that a follower keeps its place while old output is dropped).
"""

from __future__ import annotations

import json
import os
import shutil
import threading
from dataclasses import dataclass
from typing import Protocol

from libs.keys import safe_segment
from libs.settings import LogStoreSettings

# What one attempt's log may hold; beyond it the oldest output goes.
DEFAULT_MAX_BYTES = LogStoreSettings.max_bytes


@dataclass(frozen=True)
class LogChunk:
    data: bytes
    next_offset: int
    found: bool


class LogStore(Protocol):
    def append(self, tenant_id: str, job_id: str, attempt: int, offset: int, data: bytes) -> int:
        """Stores `data` written by the attempt at worker offset `offset`; returns the next worker offset."""
        ...

    def read(self, tenant_id: str, job_id: str, attempt: int, offset: int, max_bytes: int) -> LogChunk: ...

    def attempts(self, tenant_id: str, job_id: str) -> list[int]: ...

    def delete(self, tenant_id: str, job_id: str) -> None: ...


def gap_marker(dropped: int) -> bytes:
    return f"\n[jobmesh: {dropped} bytes of output were dropped here (not sent in time)]\n".encode()


def head_marker(dropped: int) -> bytes:
    return f"[jobmesh: the first {dropped} bytes of output were dropped (log limit reached)]\n".encode()


@dataclass
class _Meta:
    # The worker offset the next chunk should start at.
    next_worker: int = 0
    # Stored bytes dropped from the front (rotated away): the reader offset of the first byte kept.
    rotated: int = 0


class DirectoryLogStore:
    """Each attempt as `<root>/<tenant>/<job>/<attempt>.0` (older half), `.1` (newest) and `.meta`. Thread-safe
    within a process; across processes, one writer per attempt (the pool-manager replica its worker talks to)."""

    def __init__(self, root: str, max_bytes: int = DEFAULT_MAX_BYTES):
        self.root = root
        self.half = max(max_bytes // 2, 1)
        self._lock = threading.Lock()

    def _dir(self, tenant_id: str, job_id: str) -> str:
        if not (safe_segment(tenant_id) and safe_segment(job_id)):
            raise ValueError("tenant and job ids must be plain path segments")
        return os.path.join(self.root, tenant_id, job_id)

    def _paths(self, tenant_id: str, job_id: str, attempt: int) -> tuple[str, str, str]:
        base = os.path.join(self._dir(tenant_id, job_id), str(int(attempt)))
        return base + ".0", base + ".1", base + ".meta"

    @staticmethod
    def _load(meta_path: str) -> _Meta:
        try:
            with open(meta_path) as f:
                raw = json.load(f)
            return _Meta(int(raw["next_worker"]), int(raw["rotated"]))
        except (OSError, ValueError, KeyError, TypeError):
            return _Meta()

    @staticmethod
    def _save(meta_path: str, meta: _Meta) -> None:
        tmp = meta_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump({"next_worker": meta.next_worker, "rotated": meta.rotated}, f)
        os.replace(tmp, meta_path)

    def append(self, tenant_id: str, job_id: str, attempt: int, offset: int, data: bytes) -> int:
        older, newest, meta_path = self._paths(tenant_id, job_id, attempt)
        with self._lock:
            os.makedirs(os.path.dirname(newest), mode=0o700, exist_ok=True)
            meta = self._load(meta_path)
            if offset + len(data) <= meta.next_worker:
                return meta.next_worker  # already stored (a resend)
            if offset < meta.next_worker:
                data = data[meta.next_worker - offset :]
                offset = meta.next_worker
            worker_end = offset + len(data)
            if offset > meta.next_worker:
                data = gap_marker(offset - meta.next_worker) + data
            if len(data) > self.half:  # more than half the bound at once: only its end is kept
                meta.rotated += _size(older) + _size(newest) + len(data) - self.half
                _remove(older)
                _remove(newest)
                data = data[-self.half :]
            elif _size(newest) + len(data) > self.half:
                meta.rotated += _size(older)
                if os.path.exists(newest):
                    os.replace(newest, older)
            with open(newest, "ab") as f:
                f.write(data)
            meta.next_worker = worker_end
            self._save(meta_path, meta)
            return meta.next_worker

    def read(self, tenant_id: str, job_id: str, attempt: int, offset: int, max_bytes: int) -> LogChunk:
        older, newest, meta_path = self._paths(tenant_id, job_id, attempt)
        with self._lock:
            if not os.path.exists(meta_path):
                return LogChunk(b"", offset, False)
            meta = self._load(meta_path)
            parts = [_read_all(older), _read_all(newest)]
        stored = b"".join(parts)
        end = meta.rotated + len(stored)
        prefix = b""
        if offset < meta.rotated:
            if meta.rotated:
                prefix = head_marker(meta.rotated)
            offset = meta.rotated
        start = min(offset, end) - meta.rotated
        data = stored[start : start + max(max_bytes - len(prefix), 1)]
        return LogChunk(prefix + data, meta.rotated + start + len(data), True)

    def attempts(self, tenant_id: str, job_id: str) -> list[int]:
        try:
            names = os.listdir(self._dir(tenant_id, job_id))
        except (OSError, ValueError):
            return []
        return sorted({int(n.split(".")[0]) for n in names if n.endswith(".meta") and n.split(".")[0].isdigit()})

    def delete(self, tenant_id: str, job_id: str) -> None:
        with self._lock:
            shutil.rmtree(self._dir(tenant_id, job_id), ignore_errors=True)


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _read_all(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return b""


def log_store_from_settings(settings: LogStoreSettings) -> DirectoryLogStore:
    """The store every service of one mesh shares: `JOBMESH_LOG_DIR` (default `<data dir>/job-logs`), each attempt's
    log bounded by `JOBMESH_LOG_MAX_BYTES` (default 10 MiB)."""
    return DirectoryLogStore(str(settings.directory), settings.max_bytes)
