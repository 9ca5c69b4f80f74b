"""`jobmesh admin etcd` against a real etcd: compaction drops old history, defragmentation gives the space back to
the disk (the database file shrinks), and `recover` clears a NOSPACE alarm that had made the store read-only."""

from __future__ import annotations

import asyncio
import re

import pytest
from etcd3aio import _protobuf as pb

from devtools.cli import main
from devtools.launcher import Stack
from libs.errors import Unavailable
from libs.etcd.client import WatchCompacted
from libs.etcd.maintenance import EtcdMaintenance, MemberStatus

VALUE = b"x" * 16 * 1024


def cli(stack: Stack, *argv: str) -> int:
    return main(["--data-dir", str(stack.data_dir), "admin", "etcd", *argv, "--endpoints", endpoint(stack)])


def endpoint(stack: Stack) -> str:
    return f"127.0.0.1:{stack.ports.etcd}"


def status(stack: Stack) -> MemberStatus:
    async def read() -> MemberStatus:
        member = EtcdMaintenance(endpoint(stack), stack.pki.etcd("client-operator", "operator"))
        try:
            return await member.status()
        finally:
            await member.close()

    return asyncio.run(read())


def churn(stack: Stack, keys: int = 300, rounds: int = 5) -> int:
    """Writes every key `rounds` times and deletes them all: a lot of history, nothing live. Returns the revision
    of the first round's last write."""

    async def write() -> int:
        etcd = stack.etcd_client()
        try:
            first = 0
            for _ in range(rounds):
                for i in range(keys):
                    revision = await etcd.put(f"/churn/{i:04d}", VALUE)
                first = first or revision
            for i in range(keys):
                await etcd.delete(f"/churn/{i:04d}")
            return first
        finally:
            await etcd.close()

    return asyncio.run(write())


def test_compact_then_defrag_gives_the_space_back(etcd_stack: Stack, capsys: pytest.CaptureFixture[str]) -> None:
    first_round = churn(etcd_stack)
    before = status(etcd_stack)
    assert before.db_size > 20 * 1024 * 1024  # 300 x 16 KiB x 5 rounds of history

    assert cli(etcd_stack, "compact", "--keep-revisions", "10") == 0
    assert cli(etcd_stack, "defrag") == 0

    after = status(etcd_stack)
    out = capsys.readouterr().out
    print(f"etcd db size before: {before.db_size} bytes, after compact+defrag: {after.db_size} bytes\n{out}")
    assert after.db_size < before.db_size / 4
    assert re.search(r"compacted history to revision \d+", out)
    assert "[1/1] defragmenting" in out and "defragmented 1 member(s)" in out

    async def old_read() -> None:
        etcd = etcd_stack.etcd_client()
        try:
            await etcd.get_prefix("/churn/", revision=first_round)
        finally:
            await etcd.close()

    with pytest.raises(WatchCompacted):
        asyncio.run(old_read())  # that history is gone
    assert cli(etcd_stack, "compact", "--keep-revisions", "10") == 0  # again: nothing new, no error


def test_recover_clears_a_nospace_alarm_and_writes_work_again(
    etcd_stack: Stack, capsys: pytest.CaptureFixture[str]
) -> None:
    async def raise_alarm() -> None:
        member = EtcdMaintenance(endpoint(etcd_stack), etcd_stack.pki.etcd("client-operator", "operator"))
        try:
            member_id = (await member.status()).member_id
            request = pb.AlarmRequest(action=pb.AlarmRequest.ACTIVATE, memberID=member_id, alarm=1)
            await member._call(member._maintenance.Alarm, request)
        finally:
            await member.close()

    async def put() -> None:
        etcd = etcd_stack.etcd_client()
        try:
            await etcd.put("/after-alarm", b"1")
        finally:
            await etcd.close()

    churn(etcd_stack, keys=50, rounds=2)
    asyncio.run(raise_alarm())
    with pytest.raises(Unavailable):
        asyncio.run(put())  # NOSPACE: the store takes no more writes
    assert cli(etcd_stack, "status") == 0
    assert "alarms: NOSPACE on" in capsys.readouterr().out

    assert cli(etcd_stack, "recover", "--keep-revisions", "5") == 0

    out = capsys.readouterr().out
    assert "disarmed NOSPACE" in out and "alarms: none" in out
    asyncio.run(put())
