"""Pruning of append-only histories (burst audit, scaling events, worker lifetimes) by age and by count: which
entries go (pure), and deleting them in bounded transactions."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from libs.clock import Clock
from libs.config import Pruning
from libs.errors import JobMeshError
from libs.etcd.client import Compare, Etcd, KeyValue, RequestOp, TxnResult, cmp_mod, op_delete

log = logging.getLogger(__name__)

# Entries per delete transaction: one compare and one delete each, well under etcd's 128 per list.
DELETE_CHUNK = 64
# Keys per read while listing a history.
PAGE = 1000

Txn = Callable[[Sequence[Compare], Sequence[RequestOp]], Awaitable[TxnResult]]


@dataclass(frozen=True)
class Entry:
    key: str
    at: float  # when it happened, in epoch seconds: what its age and its rank are measured by
    mod_revision: int = 0  # the revision it was read at: deleted only if unchanged since (0: not compared)


def to_prune(entries: Iterable[Entry], now: float, rule: Pruning) -> list[Entry]:
    """The entries beyond the newest `max_count`, and those older than `max_age_seconds` (0: no age limit);
    newest by time, then by key. Oldest first."""
    ranked = sorted(entries, key=lambda e: (e.at, e.key), reverse=True)
    cutoff = now - rule.max_age_seconds if rule.max_age_seconds > 0 else float("-inf")
    gone = [e for i, e in enumerate(ranked) if i >= rule.max_count or e.at < cutoff]
    return gone[::-1]


def time_from_key(key: str) -> float:
    """The time in keys that end in a zero-padded millisecond timestamp (`.../<ts_ms>` or `.../<ts_ms>-<id>`)."""
    last = key.rsplit("/", 1)[-1]
    return int(last.split("-", 1)[0]) / 1000.0


async def list_keys(etcd: Etcd, prefix: str) -> list[KeyValue]:
    """Every key under the prefix (no values), a page at a time."""
    out: list[KeyValue] = []
    start: str | None = None
    while True:
        kvs, _, more = await etcd.get_prefix(prefix, start=start, limit=PAGE, keys_only=True)
        out += kvs
        if not more or not kvs:
            return out
        start = kvs[-1].key + "\0"


async def delete_entries(txn: Txn, entries: Sequence[Entry]) -> int:
    """Deletes the entries, DELETE_CHUNK per transaction, each only if unchanged since it was read (when its
    revision is known); a chunk that fails a compare is deleted one by one. Returns how many were deleted."""
    deleted = 0
    for first in range(0, len(entries), DELETE_CHUNK):
        chunk = entries[first : first + DELETE_CHUNK]
        if len(chunk) > 1 and (await txn(*_plan(chunk))).succeeded:
            deleted += len(chunk)
            continue
        for entry in chunk:
            deleted += int((await txn(*_plan([entry]))).succeeded)
    return deleted


def _plan(entries: Sequence[Entry]) -> tuple[list[Compare], list[RequestOp]]:
    compares = [cmp_mod(e.key, e.mod_revision) for e in entries if e.mod_revision]
    return compares, [op_delete(e.key) for e in entries]


class _Counter(Protocol):
    def inc(self, amount: float = 1) -> None: ...


class HistoryPruner:
    """Every `interval`, lists a history's entries (in groups: each group keeps its own newest `max_count`) and
    deletes what the rule says is old. `may_run` gates it (a replica that does not lead prunes nothing)."""

    def __init__(
        self,
        name: str,
        entries: Callable[[], Awaitable[list[list[Entry]]]],
        txn: Txn,
        rule: Pruning,
        clock: Clock,
        pruned: _Counter,
        *,
        interval: float = 60.0,
        may_run: Callable[[], bool] = lambda: True,
    ):
        self.name = name
        self.entries = entries
        self.txn = txn
        self.rule = rule
        self.clock = clock
        self.pruned = pruned
        self.interval = interval
        self.may_run = may_run

    async def run_once(self) -> int:
        if not self.may_run():
            return 0
        now = self.clock.now()
        gone = [e for group in await self.entries() for e in to_prune(group, now, self.rule)]
        deleted = await delete_entries(self.txn, gone) if gone else 0
        if deleted:
            self.pruned.inc(deleted)
            log.info(
                "pruned %d %s entries (older than %.0f s or beyond the newest %d)",
                deleted,
                self.name,
                self.rule.max_age_seconds,
                self.rule.max_count,
            )
        return deleted

    async def run_forever(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.run_once()
            except JobMeshError as exc:
                log.warning("pruning %s failed (%s); next try in %.0f s", self.name, exc.reason, self.interval)
            except Exception:
                log.exception("pruning %s failed; next try in %.0f s", self.name, self.interval)
