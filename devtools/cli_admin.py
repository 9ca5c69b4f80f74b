"""`jobmesh admin etcd ...`: the etcd routine of docs/operations.md (status, compaction, defragmentation member by
member, NOSPACE alarm recovery), as an operator with an etcd client certificate."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Awaitable, Callable
from typing import Any

from libs.errors import JobMeshError
from libs.etcd.maintenance import EtcdMaintenance, MemberStatus, compaction_revision, defrag_order, size
from libs.settings import SettingsError, TlsSettings

# Revisions of history a manual compaction keeps: watchers that fall further behind re-list (the informers do so
# without losing a change), and every write since is still there to watch.
KEEP_REVISIONS = 10_000


def add_admin_parser(subparsers: Any) -> None:
    admin = subparsers.add_parser("admin", help="operate the mesh's infrastructure (operators)")
    verbs = admin.add_subparsers(dest="admin_command", required=True)
    etcd = verbs.add_parser("etcd", help="etcd maintenance: status, compact, defrag, disarm, recover").add_subparsers(
        dest="etcd_command", required=True
    )
    commands: list[tuple[str, str, Callable[[argparse.Namespace], int]]] = [
        ("status", "each member's revision, database size (in use / on disk / quota) and raised alarms", cmd_status),
        ("compact", "drop history older than the newest --keep-revisions revisions (the whole cluster)", cmd_compact),
        (
            "defrag",
            "give the compacted space back to the disk, one member at a time (followers, then leader)",
            cmd_defrag,
        ),
        ("disarm", "clear NOSPACE alarms (after compact and defrag brought the database under its quota)", cmd_disarm),
        (
            "recover",
            "compact, defrag every member, disarm NOSPACE, then show the status (docs/operations.md)",
            cmd_recover,
        ),
    ]
    for name, text, func in commands:
        cmd = etcd.add_parser(name, help=text)
        cmd.add_argument(
            "--endpoints",
            default=os.environ.get("JOBMESH_ETCD_ENDPOINTS", "127.0.0.1:2379"),
            help="comma-separated client endpoints (default: $JOBMESH_ETCD_ENDPOINTS or 127.0.0.1:2379)",
        )
        cmd.add_argument(
            "--no-discover",
            action="store_true",
            help="act on the given endpoints only, not on every member they list (e.g. through a port-forward)",
        )
        if name in ("compact", "recover"):
            cmd.add_argument("--keep-revisions", type=int, default=KEEP_REVISIONS)
        cmd.set_defaults(func=_run(func))


def _run(func: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return func(args)
        except (JobMeshError, SettingsError) as exc:
            print(f"jobmesh admin etcd: {exc}", file=sys.stderr)
            return 1

    return run


def operator_tls(args: argparse.Namespace) -> TlsSettings:
    """JOBMESH_ETCD_TLS_CERT/KEY/CA (or _DIR): a client certificate from the etcd CA; else the dev stack's own."""
    tls = TlsSettings.from_env(os.environ, "operator", "JOBMESH_ETCD_TLS")
    if tls is not None:
        return tls
    from libs.meshpki import MeshPki

    return MeshPki(args.data_dir / "pki").etcd("client-operator", "operator")


class Cluster:
    """One maintenance client per member."""

    def __init__(self, members: list[EtcdMaintenance]):
        self.members = members

    @classmethod
    async def connect(cls, args: argparse.Namespace) -> Cluster:
        tls = operator_tls(args)
        given = [e.strip() for e in args.endpoints.split(",") if e.strip()]
        if not given:
            raise SettingsError("--endpoints is empty")
        if args.no_discover or len(given) > 1:
            return cls([EtcdMaintenance(e, tls) for e in given])
        first = EtcdMaintenance(given[0], tls)
        try:
            urls = [m.client_urls[0] for m in await first.members() if m.client_urls]
        finally:
            await first.close()
        return cls([EtcdMaintenance(url, tls) for url in urls or given])

    async def statuses(self) -> list[MemberStatus]:
        return [await m.status() for m in self.members]

    def of(self, status: MemberStatus) -> EtcdMaintenance:
        return next(m for m in self.members if m.endpoint == status.endpoint)

    async def close(self) -> None:
        for m in self.members:
            await m.close()


def _with_cluster(args: argparse.Namespace, work: Callable[[Cluster], Awaitable[int]]) -> int:
    async def go() -> int:
        cluster = await Cluster.connect(args)
        try:
            return await work(cluster)
        finally:
            await cluster.close()

    return asyncio.run(go())


def say(line: str) -> None:
    print(line, flush=True)


def _role(s: MemberStatus) -> str:
    return "leader" if s.leader else "follower"


async def show_status(cluster: Cluster) -> int:
    statuses = await cluster.statuses()
    say(f"{'endpoint':<32} {'member':<16} {'role':<8} {'revision':>10} {'in use':>10} {'on disk':>10} {'quota':>10}")
    for s in statuses:
        quota = size(s.quota) if s.quota else "2.0 GiB"
        say(
            f"{s.endpoint:<32} {s.member_id:016x} {_role(s):<8} {s.revision:>10} {size(s.db_size_in_use):>10} "
            f"{size(s.db_size):>10} {quota:>10}"
        )
    alarms = await cluster.members[0].alarms()
    say("alarms: " + (", ".join(f"{alarm} on {member:016x}" for member, alarm in alarms) or "none"))
    return 0


async def compact(cluster: Cluster, keep: int) -> int:
    current = (await cluster.members[0].status()).revision
    target = compaction_revision(current, keep)
    if target == 0:
        say(f"revision {current}: nothing older than the newest {keep} revisions to compact")
        return 0
    done = await cluster.members[0].compact(target)
    say(
        f"compacted history to revision {target} (current {current}, kept {keep})"
        if done
        else f"history was already compacted past revision {target}"
    )
    return 0


async def defrag(cluster: Cluster) -> int:
    order = defrag_order(await cluster.statuses())
    freed = 0
    for i, before in enumerate(order, 1):
        say(f"[{i}/{len(order)}] defragmenting {before.endpoint} ({_role(before)}), {size(before.db_size)} on disk ...")
        started = time.monotonic()
        await cluster.of(before).defragment()
        after = await cluster.of(before).status()
        freed += before.db_size - after.db_size
        say(
            f"[{i}/{len(order)}] {before.endpoint}: {size(before.db_size)} -> {size(after.db_size)} on disk "
            f"({size(after.db_size_in_use)} in use) in {time.monotonic() - started:.1f} s"
        )
    say(f"defragmented {len(order)} member(s), {size(max(freed, 0))} given back to the disk")
    return 0


async def disarm(cluster: Cluster) -> int:
    alarms = await cluster.members[0].alarms()
    if not alarms:
        say("no alarm raised")
        return 0
    for member, alarm in alarms:
        if alarm != "NOSPACE":
            say(f"{alarm} on {member:016x}: not disarmed here (a CORRUPT member must be restored, see docs)")
            continue
        await cluster.members[0].disarm(member, alarm)
        say(f"disarmed NOSPACE on {member:016x}")
    for s in await cluster.statuses():
        if s.quota and s.db_size >= 0.95 * s.quota:
            say(
                f"warning: {s.endpoint} is still at {size(s.db_size)} of its {size(s.quota)} quota: it will raise "
                "NOSPACE again; compact and defrag first"
            )
    left = [a for a in await cluster.members[0].alarms() if a[1] == "NOSPACE"]
    return 1 if left else 0


def cmd_status(args: argparse.Namespace) -> int:
    return _with_cluster(args, show_status)


def cmd_compact(args: argparse.Namespace) -> int:
    return _with_cluster(args, lambda c: compact(c, args.keep_revisions))


def cmd_defrag(args: argparse.Namespace) -> int:
    return _with_cluster(args, defrag)


def cmd_disarm(args: argparse.Namespace) -> int:
    return _with_cluster(args, disarm)


def cmd_recover(args: argparse.Namespace) -> int:
    async def recover(cluster: Cluster) -> int:
        await compact(cluster, args.keep_revisions)
        await defrag(cluster)
        code = await disarm(cluster)
        await show_status(cluster)
        return code

    return _with_cluster(args, recover)
