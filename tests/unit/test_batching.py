"""Unit tests for libs/batching.py: what arrives during a write shares the next one; results and errors map back."""

from __future__ import annotations

import asyncio

import pytest

from libs.batching import GroupCommit


class Recorder:
    def __init__(self, fail_on: int | None = None) -> None:
        self.batches: list[list[int]] = []
        self.fail_on = fail_on
        self.gate = asyncio.Event()
        self.gate.set()

    async def write(self, batch: list[int]) -> list[int]:
        self.batches.append(list(batch))
        await self.gate.wait()
        if self.fail_on is not None and self.fail_on in batch:
            raise RuntimeError(f"cannot write {self.fail_on}")
        return [item * 10 for item in batch]


@pytest.mark.asyncio
async def test_a_lone_caller_is_written_at_once() -> None:
    rec = Recorder()
    commit = GroupCommit(rec.write)

    assert await commit.submit(4) == 40
    assert rec.batches == [[4]]


@pytest.mark.asyncio
async def test_callers_arriving_during_a_write_share_the_next_one_and_get_their_own_results() -> None:
    rec = Recorder()
    rec.gate.clear()
    sizes: list[int] = []
    commit = GroupCommit(rec.write, on_batch=sizes.append)
    first = asyncio.ensure_future(commit.submit(1))
    await asyncio.sleep(0)
    rest = [asyncio.ensure_future(commit.submit(i)) for i in range(2, 6)]
    await asyncio.sleep(0)
    rec.gate.set()

    results = await asyncio.gather(first, *rest)

    assert results == [10, 20, 30, 40, 50]
    assert rec.batches == [[1], [2, 3, 4, 5]]
    assert sizes == [1, 4]


@pytest.mark.asyncio
async def test_batches_are_capped_at_max_batch() -> None:
    rec = Recorder()
    rec.gate.clear()
    commit = GroupCommit(rec.write, max_batch=2)
    futures = [asyncio.ensure_future(commit.submit(i)) for i in range(5)]
    await asyncio.sleep(0)
    rec.gate.set()

    assert await asyncio.gather(*futures) == [0, 10, 20, 30, 40]
    assert [len(b) for b in rec.batches] == [2, 2, 1]


@pytest.mark.asyncio
async def test_a_failed_write_fails_only_its_own_batch() -> None:
    rec = Recorder(fail_on=2)
    rec.gate.clear()
    commit = GroupCommit(rec.write)
    first = asyncio.ensure_future(commit.submit(1))
    await asyncio.sleep(0)
    doomed = [asyncio.ensure_future(commit.submit(i)) for i in (2, 3)]
    await asyncio.sleep(0)
    rec.gate.set()

    assert await first == 10
    for future in doomed:
        with pytest.raises(RuntimeError, match="cannot write 2"):
            await future
    assert await commit.submit(7) == 70


def test_max_batch_must_be_positive() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        GroupCommit(Recorder().write, max_batch=0)


@pytest.mark.asyncio
async def test_with_linger_a_lone_caller_is_still_written_at_once() -> None:
    rec = Recorder()
    commit = GroupCommit(rec.write, linger=10.0)  # a wait this long would time the test out

    assert await asyncio.wait_for(commit.submit(1), timeout=1.0) == 10


@pytest.mark.asyncio
async def test_with_linger_a_write_soon_after_the_last_one_waits_for_more_callers() -> None:
    rec = Recorder()
    commit = GroupCommit(rec.write, linger=0.05)
    await commit.submit(1)  # written at once: nothing was written before it

    first = asyncio.ensure_future(commit.submit(2))  # right after a write: under load, so it lingers
    await asyncio.sleep(0.01)
    late = asyncio.ensure_future(commit.submit(3))  # arrives during the linger and shares the write

    assert await asyncio.gather(first, late) == [20, 30]
    assert rec.batches == [[1], [2, 3]]


def test_a_negative_linger_is_refused() -> None:
    with pytest.raises(ValueError):
        GroupCommit(Recorder().write, linger=-1.0)


def test_chunks_are_bounded_by_count_and_by_bytes_and_an_oversized_item_stands_alone() -> None:
    from libs.batching import chunks

    sizes = [10, 10, 10, 50, 200, 10, 10]
    assert list(chunks(sizes, lambda n: n, max_items=2, max_bytes=100)) == [[10, 10], [10, 50], [200], [10, 10]]
    assert list(chunks(sizes, lambda n: n, max_items=10, max_bytes=100)) == [[10, 10, 10, 50], [200], [10, 10]]
    assert list(chunks([], lambda n: n, max_items=3)) == []


@pytest.mark.asyncio
async def test_a_batch_is_cut_at_max_bytes_and_the_rest_goes_in_the_next_write() -> None:
    rec = Recorder()
    rec.gate.clear()
    commit = GroupCommit(rec.write, max_batch=64, size=lambda n: n, max_bytes=100)
    first = asyncio.create_task(commit.submit(1))
    await asyncio.sleep(0)
    waiting = [asyncio.create_task(commit.submit(n)) for n in (60, 30, 20, 90)]
    await asyncio.sleep(0)
    rec.gate.set()

    assert await first == 10
    assert [await w for w in waiting] == [600, 300, 200, 900]
    assert rec.batches == [[1], [60, 30], [20], [90]]
