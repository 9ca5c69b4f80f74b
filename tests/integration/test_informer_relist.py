"""The informer's list on real etcd: every page at one pinned revision (changes made while it pages are not lost)
and pages bounded in bytes (large records never make one reply too large)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from libs.errors import Unavailable
from libs.etcd import informer as informer_module
from libs.etcd.client import Etcd, KeyValue, WatchEvent
from libs.etcd.informer import Informer

PREFIX = "/relist-test/"


class PagingSpy:
    """Passes every page read through to the real etcd, writing between the first and second page."""

    def __init__(self, etcd: Etcd, between_pages: Any = None):
        self.etcd = etcd
        self.real = etcd.get_prefix
        self.between_pages = between_pages
        self.pages: list[tuple[int, int]] = []  # (keys, bytes) of each page

    async def get_prefix(self, prefix: str, **kwargs: Any) -> tuple[list[KeyValue], int, bool]:
        page, revision, more = await self.real(prefix, **kwargs)
        self.pages.append((len(page), sum(len(kv.value) for kv in page)))
        if len(self.pages) == 1 and self.between_pages is not None:
            await self.between_pages()
        return page, revision, more


@pytest.mark.asyncio
async def test_changes_made_while_the_list_pages_reach_the_cache(etcd: Etcd, monkeypatch: pytest.MonkeyPatch) -> None:
    for i in range(40):
        await etcd.put(f"{PREFIX}k{i:02d}", b"v0")
    monkeypatch.setattr(informer_module, "_FIRST_PAGE_KEYS", 5)
    monkeypatch.setattr(informer_module, "PAGE_KEYS", 5)

    async def write_meanwhile() -> None:
        await etcd.put(f"{PREFIX}k00", b"changed")  # on the page already read
        await etcd.delete(f"{PREFIX}k01")  # likewise
        await etcd.put(f"{PREFIX}k39", b"changed-late")  # on a page still to come
        await etcd.put(f"{PREFIX}zz", b"new")

    spy = PagingSpy(etcd, write_meanwhile)
    monkeypatch.setattr(etcd, "get_prefix", spy.get_prefix)
    seen: list[WatchEvent] = []
    informer = Informer(etcd, PREFIX, seen.append, "relist-test")
    informer.start()
    try:
        await informer.wait_synced(10)
        expected = {f"{PREFIX}k{i:02d}": b"v0" for i in range(2, 39)}
        expected.update({f"{PREFIX}k00": b"changed", f"{PREFIX}k39": b"changed-late", f"{PREFIX}zz": b"new"})
        for _ in range(100):  # the watch from the list's revision brings the changes made during it
            if {k: kv.value for k, kv in informer.cache.items()} == expected:
                break
            await asyncio.sleep(0.05)
        assert {k: kv.value for k, kv in informer.cache.items()} == expected
        assert len(spy.pages) == 8  # 40 keys as they were when the list began, 5 a page
        deleted = [e.kv.key for e in seen if e.kind == "delete"]
        assert deleted == [f"{PREFIX}k01"]
    finally:
        await informer.stop()


@pytest.mark.asyncio
async def test_pages_of_large_records_stay_within_the_byte_budget(etcd: Etcd, monkeypatch: pytest.MonkeyPatch) -> None:
    big = b"x" * (256 * 1024)
    for i in range(24):
        await etcd.put(f"{PREFIX}big{i:02d}", big)
    monkeypatch.setattr(informer_module, "PAGE_BYTES", 1024 * 1024)
    spy = PagingSpy(etcd)
    monkeypatch.setattr(etcd, "get_prefix", spy.get_prefix)
    informer = Informer(etcd, PREFIX, None, "relist-big")
    informer.start()
    try:
        await informer.wait_synced(10)
        assert len(informer.cache) == 24
        # The first page is taken blind (64 keys at most); after it, no page holds more than the budget.
        assert all(size <= 1024 * 1024 for _, size in spy.pages[1:]), spy.pages
        assert sum(n for n, _ in spy.pages) == 24
    finally:
        await informer.stop()


def test_the_page_limit_follows_the_largest_value() -> None:
    assert informer_module.next_page_limit(0) == informer_module.PAGE_KEYS
    assert informer_module.next_page_limit(100) == informer_module.PAGE_KEYS
    assert informer_module.next_page_limit(64 * 1024) == 128
    assert informer_module.next_page_limit(64 * 1024 * 1024) == 1


@pytest.mark.asyncio
async def test_wait_revision_returns_only_once_a_resumed_watch_has_replayed_what_it_missed(
    etcd: Etcd, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A watch that broke resumes from the revision after the last change it handled, and etcd (3.5.1) replays
    what it missed a moment later, while it answers a progress request at once with its current revision. Taking
    that answer as "caught up" would let a new leader serve its term (LeaderGate) before its cache holds the
    last writes: wait_revision must wait for them."""
    prefix = f"{PREFIX}resume/"
    await etcd.put(f"{prefix}first", b"0")
    real_watch = etcd.watch
    broken, resumed = asyncio.Event(), asyncio.Event()
    calls = 0

    async def watch(*args: Any, **kwargs: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls == 1:  # the first watch breaks once the writes below are made
            await broken.wait()
            raise Unavailable("etcd watch: UNAVAILABLE", reason="STORE_UNAVAILABLE")
            yield  # an async generator, as the real one
        resumed.set()
        async for batch in real_watch(*args, **kwargs):
            yield batch

    monkeypatch.setattr(etcd, "watch", watch)
    informer = Informer(etcd, prefix, name="resume-test")
    informer.start()
    try:
        await informer.wait_synced(10)
        last = 0
        for i in range(100):
            last = await etcd.put(f"{prefix}k{i:03d}", b"x")
        broken.set()
        await asyncio.wait_for(resumed.wait(), 10)
        await informer.wait_revision(last, timeout=10)
        assert len(informer.cache) == 101
    finally:
        await informer.stop()
