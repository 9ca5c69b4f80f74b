"""The directory log store on a real file system: resends stored once, gaps and dropped output marked, bounded."""

from __future__ import annotations

from pathlib import Path

import pytest

from libs.logstore import DirectoryLogStore


def _all(store: DirectoryLogStore, offset: int = 0) -> tuple[bytes, int]:
    chunk = store.read("acme", "job1", 1, offset, 1 << 20)
    return chunk.data, chunk.next_offset


def test_a_resent_chunk_is_stored_once_and_a_gap_is_marked(tmp_path: Path) -> None:
    store = DirectoryLogStore(str(tmp_path), max_bytes=1 << 20)
    assert store.read("acme", "job1", 1, 0, 100).found is False
    assert store.append("acme", "job1", 1, 0, b"one\n") == 4
    assert store.append("acme", "job1", 1, 0, b"one\ntwo\n") == 8  # the answer to the first was lost
    assert store.append("acme", "job1", 1, 20, b"four\n") == 25  # 12 bytes never arrived
    data, end = _all(store)
    assert data.startswith(b"one\ntwo\n")
    assert b"12 bytes of output were dropped" in data
    assert data.endswith(b"four\n")
    assert _all(store, end) == (b"", end)  # a follower at the end gets nothing new


def test_the_oldest_output_goes_beyond_the_bound_and_a_reader_keeps_its_place(tmp_path: Path) -> None:
    store = DirectoryLogStore(str(tmp_path), max_bytes=100)
    offset = 0
    for i in range(30):
        line = f"line-{i:03d}\n".encode()  # 9 bytes
        store.append("acme", "job1", 1, offset, line)
        offset += len(line)
    data, end = _all(store)
    assert end == 270  # reader offsets count every byte ever stored
    assert data.startswith(b"[jobmesh: the first ")
    assert data.endswith(b"line-029\n")
    kept = data.split(b"\n", 1)[1]
    assert 50 <= len(kept) <= 100
    store.append("acme", "job1", 1, offset, b"more\n")
    assert _all(store, end) == (b"more\n", end + 5)


def test_delete_removes_every_attempt_and_paths_are_plain_segments(tmp_path: Path) -> None:
    store = DirectoryLogStore(str(tmp_path))
    store.append("acme", "job1", 1, 0, b"a")
    store.append("acme", "job1", 2, 0, b"b")
    assert store.attempts("acme", "job1") == [1, 2]
    store.delete("acme", "job1")
    assert store.attempts("acme", "job1") == []
    with pytest.raises(ValueError):
        store.append("../etc", "job1", 1, 0, b"x")
