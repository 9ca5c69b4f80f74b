"""etcd maintenance for operators (`jobmesh admin etcd ...`): status, compaction, defragmentation one member at a
time, and alarms. Status and Defragment act on the member a client reaches, so there is one client per member."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from etcd3aio import _protobuf as pb

from libs.errors import Unavailable
from libs.etcd.client import grpc_target
from libs.settings import TlsSettings
from libs.tls import RenewingChannel

ALARMS = {0: "NONE", 1: "NOSPACE", 2: "CORRUPT"}
# A defragmentation rewrites the member's whole database: seconds per GiB, so a generous deadline.
DEFRAG_TIMEOUT = 600.0


@dataclass(frozen=True)
class MemberStatus:
    endpoint: str
    member_id: int
    leader: bool
    revision: int
    db_size: int  # bytes the database file takes (what the quota counts)
    db_size_in_use: int  # bytes of it in use: the rest is what a defragmentation gives back
    quota: int  # the member's --quota-backend-bytes (0: etcd's default of 2 GiB)
    errors: tuple[str, ...]


@dataclass(frozen=True)
class Member:
    member_id: int
    name: str
    client_urls: tuple[str, ...]


def compaction_revision(current: int, keep: int) -> int:
    """The revision to compact to, keeping the newest `keep` revisions of history (0: nothing to compact)."""
    return max(current - keep, 0)


def defrag_order(statuses: list[MemberStatus]) -> list[MemberStatus]:
    """Followers first, the leader last: a member is blocked while it defragments, and the leader's turn is the one
    that can cost an election, so it comes once the others are done."""
    return sorted(statuses, key=lambda s: (s.leader, s.endpoint))


def size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    raise AssertionError("unreachable")


class EtcdMaintenance:
    """The maintenance API of the member at `endpoint` (`host:port`, an `https://` prefix allowed)."""

    def __init__(self, endpoint: str, tls: TlsSettings, *, timeout: float = 10.0):
        self.endpoint = endpoint.split("://", 1)[-1].rstrip("/")
        self.timeout = timeout
        self._channel = RenewingChannel(grpc_target([self.endpoint]), tls)
        self._maintenance = pb.MaintenanceStub(self._channel)
        self._kv = pb.KVStub(self._channel)
        self._cluster = pb.ClusterStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def _call(self, fn, request, timeout: float | None = None):  # type: ignore[no-untyped-def]
        try:
            return await fn(request, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"etcd {self.endpoint}: {exc.code().name}: {exc.details()}") from exc

    async def status(self) -> MemberStatus:
        r = await self._call(self._maintenance.Status, pb.StatusRequest())
        return MemberStatus(
            endpoint=self.endpoint,
            member_id=r.header.member_id,
            leader=r.leader == r.header.member_id,
            revision=r.header.revision,
            db_size=r.dbSize,
            db_size_in_use=r.dbSizeInUse,
            quota=r.dbSizeQuota,
            errors=tuple(r.errors),
        )

    async def compact(self, revision: int) -> bool:
        """Compacts the cluster's history up to `revision` (physical: returns once the space is free to reuse);
        False if it was compacted that far already."""
        try:
            await self._call(self._kv.Compact, pb.CompactionRequest(revision=revision, physical=True), DEFRAG_TIMEOUT)
        except Unavailable as exc:
            if "compacted" in str(exc):
                return False
            raise
        return True

    async def defragment(self) -> None:
        await self._call(self._maintenance.Defragment, pb.DefragmentRequest(), DEFRAG_TIMEOUT)

    async def members(self) -> list[Member]:
        r = await self._call(self._cluster.MemberList, pb.MemberListRequest())
        return [Member(m.ID, m.name, tuple(m.clientURLs)) for m in r.members]

    async def alarms(self) -> list[tuple[int, str]]:
        """(member id, alarm) of every raised alarm in the cluster."""
        r = await self._call(self._maintenance.Alarm, pb.AlarmRequest(action=pb.AlarmRequest.GET))
        return [(a.memberID, ALARMS.get(a.alarm, str(a.alarm))) for a in r.alarms]

    async def disarm(self, member_id: int, alarm: str) -> None:
        kind = {name: number for number, name in ALARMS.items()}[alarm]
        request = pb.AlarmRequest(action=pb.AlarmRequest.DEACTIVATE, memberID=member_id, alarm=kind)
        await self._call(self._maintenance.Alarm, request)
