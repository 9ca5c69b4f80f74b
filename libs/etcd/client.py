"""A small typed asyncio etcd v3 client over grpc.aio (etcd's own protos, as bundled by etcd3aio)."""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass

import grpc
from etcd3aio import _protobuf as pb  # etcd's generated messages and stubs; works on the upb backend

from libs.errors import Unavailable
from libs.settings import EtcdSettings, SettingsError, TlsSettings
from libs.tls import RenewingChannel, sync_channel

log = logging.getLogger(__name__)

Compare = pb.Compare
RequestOp = pb.RequestOp


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: bytes
    create_revision: int
    mod_revision: int
    version: int
    lease: int


@dataclass(frozen=True)
class WatchEvent:
    kind: str  # "put" | "delete"
    kv: KeyValue
    revision: int


@dataclass(frozen=True)
class TxnResult:
    succeeded: bool
    revision: int
    responses: Sequence[pb.ResponseOp]

    def range_kvs(self, index: int) -> list[KeyValue]:
        return [_kv(kv) for kv in self.responses[index].response_range.kvs]


# How long after its creation a watch that may be replaying missed changes ignores progress answers (etcd syncs
# such watches every 100 ms): see Etcd.watch.
REPLAY_GRACE_SECONDS = 0.5


class WatchProgress:
    """Asks a running watch where it is: `request()` makes etcd answer with the revision up to which the watch has
    sent every event (`revision`, `heard` set on each answer). A request may go unanswered: ask again. (etcd 3.5.1
    answers at once, even while a new watch is still being sent what it missed: Etcd.watch holds back such
    answers.)"""

    def __init__(self) -> None:
        self.revision = 0
        self.heard = asyncio.Event()
        self._queue: asyncio.Queue[pb.WatchRequest] | None = None

    def attach(self, queue: asyncio.Queue[pb.WatchRequest] | None) -> None:
        self._queue = queue

    def request(self) -> bool:
        """False when no watch is running to ask."""
        if self._queue is None:
            return False
        ask = pb.WatchRequest()
        ask.progress_request.SetInParent()
        self._queue.put_nowait(ask)
        return True


class WatchCompacted(Exception):
    """The revision a watch asked for was compacted away: the caller must list again."""

    def __init__(self, compact_revision: int):
        super().__init__(f"compacted at {compact_revision}")
        self.compact_revision = compact_revision


def _kv(kv: pb.kv_pb2.KeyValue) -> KeyValue:  # type: ignore[name-defined]
    return KeyValue(
        key=kv.key.decode(),
        value=kv.value,
        create_revision=kv.create_revision,
        mod_revision=kv.mod_revision,
        version=kv.version,
        lease=kv.lease,
    )


def prefix_end(prefix: str) -> bytes:
    raw = bytearray(prefix.encode())
    for i in range(len(raw) - 1, -1, -1):
        if raw[i] < 0xFF:
            raw[i] += 1
            return bytes(raw[: i + 1])
    return b"\0"


# Builders for transaction predicates and operations.


def cmp_mod(key: str, revision: int) -> pb.Compare:
    return pb.Compare(result=pb.Compare.EQUAL, target=pb.Compare.MOD, key=key.encode(), mod_revision=revision)


def cmp_create(key: str, revision: int) -> pb.Compare:
    return pb.Compare(result=pb.Compare.EQUAL, target=pb.Compare.CREATE, key=key.encode(), create_revision=revision)


def cmp_lease(key: str, lease: int) -> pb.Compare:
    """True while `key` exists and is attached to `lease`."""
    return pb.Compare(result=pb.Compare.EQUAL, target=pb.Compare.LEASE, key=key.encode(), lease=lease)


def cmp_missing(key: str) -> pb.Compare:
    return cmp_create(key, 0)


def cmp_exists(key: str) -> pb.Compare:
    return pb.Compare(result=pb.Compare.GREATER, target=pb.Compare.CREATE, key=key.encode(), create_revision=0)


def cmp_none_under(prefix: str) -> pb.Compare:
    """True while no key exists under prefix (etcd applies a ranged compare to every key in the range)."""
    return pb.Compare(
        result=pb.Compare.EQUAL,
        target=pb.Compare.CREATE,
        key=prefix.encode(),
        range_end=prefix_end(prefix),
        create_revision=0,
    )


def op_put(key: str, value: bytes, lease: int = 0) -> pb.RequestOp:
    return pb.RequestOp(request_put=pb.PutRequest(key=key.encode(), value=value, lease=lease))


def op_delete(key: str) -> pb.RequestOp:
    return pb.RequestOp(request_delete_range=pb.DeleteRangeRequest(key=key.encode()))


def op_get(key: str) -> pb.RequestOp:
    return pb.RequestOp(request_range=pb.RangeRequest(key=key.encode()))


def grpc_target(endpoints: Sequence[str]) -> str:
    """One gRPC target for etcd's client endpoints (`host:port`, an `https://` prefix allowed): one endpoint as
    it is (a DNS name is resolved, and re-resolved, by gRPC: on Kubernetes the client Service's name covers
    every member), several IP endpoints balanced round-robin. gRPC has no target for several names."""
    hosts = [e.split("://", 1)[-1].rstrip("/") for e in endpoints if e.strip()]
    if not hosts:
        raise SettingsError("JOBMESH_ETCD_ENDPOINTS is empty")
    if len(hosts) == 1:
        return hosts[0]
    families = set()
    for host in hosts:
        try:
            families.add(ipaddress.ip_address(host.rsplit(":", 1)[0].strip("[]")).version)
        except ValueError:
            raise SettingsError(
                f"etcd endpoint {host}: give several members as IP addresses, or one DNS name that resolves to all"
            ) from None
    if len(families) > 1:
        raise SettingsError("etcd endpoints mix IPv4 and IPv6 addresses")
    return f"ipv{families.pop()}:" + ",".join(hosts)


class Etcd:
    """The operations jobmesh uses; every method maps transport failures to `Unavailable`. etcd is reached
    over TLS only, with the client certificate in `tls` (etcd runs with `--client-cert-auth`)."""

    def __init__(self, endpoints: Sequence[str], tls: TlsSettings, *, timeout: float = 5.0):
        self.endpoints = list(endpoints)
        self.timeout = timeout
        self._tls = tls
        # The highest raft term any answer of etcd carried. It grows with every leader election (a restart
        # included), when etcd gives every lease its full TTL again: see Worker.etcd_term.
        self.raft_term = 0
        self._channel = RenewingChannel(
            grpc_target(self.endpoints),
            tls,
            options=[
                ("grpc.lb_policy_name", "round_robin"),
                ("grpc.keepalive_time_ms", 10_000),
                ("grpc.keepalive_timeout_ms", 5_000),
                ("grpc.keepalive_permit_without_calls", 1),
                ("grpc.max_receive_message_length", 64 * 1024 * 1024),
            ],
        )
        self._kv = pb.KVStub(self._channel)
        self._lease = pb.LeaseStub(self._channel)
        self._watch = pb.WatchStub(self._channel)

    @classmethod
    def from_settings(cls, settings: EtcdSettings) -> Etcd:
        return cls(settings.endpoints, settings.client_tls())

    async def close(self) -> None:
        await self._channel.close()

    def _heard(self, header: pb.rpc_pb2.ResponseHeader) -> None:  # type: ignore[name-defined]
        if header.raft_term > self.raft_term:
            self.raft_term = int(header.raft_term)

    async def _call(self, fn, request, attempts: int = 3):  # type: ignore[no-untyped-def]
        delay = 0.1
        for attempt in range(attempts):
            try:
                resp = await fn(request, timeout=self.timeout)
                self._heard(resp.header)
                return resp
            except grpc.aio.AioRpcError as exc:
                if exc.code() == grpc.StatusCode.OUT_OF_RANGE:
                    # A read pinned to a revision that was compacted meanwhile: the caller reads afresh.
                    raise WatchCompacted(0) from exc
                if exc.code() not in (grpc.StatusCode.UNAVAILABLE,) or attempt == attempts - 1:
                    raise Unavailable(f"etcd: {exc.code().name}", reason="STORE_UNAVAILABLE") from exc
                await asyncio.sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")

    async def wait_ready(self, deadline: float = 30.0) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + deadline
        while True:
            try:
                await self._kv.Range(pb.RangeRequest(key=b"/", count_only=True), timeout=1.0)
                return
            except grpc.aio.AioRpcError:
                if loop.time() > end:
                    raise
                await asyncio.sleep(0.2)

    async def get(self, key: str) -> KeyValue | None:
        resp = await self._call(self._kv.Range, pb.RangeRequest(key=key.encode()))
        return _kv(resp.kvs[0]) if resp.kvs else None

    async def get_many(self, keys: Sequence[str]) -> tuple[list[KeyValue | None], int]:
        """Several keys read at one revision in a single round trip."""
        result = await self.txn([], [op_get(k) for k in keys])
        out: list[KeyValue | None] = []
        for i in range(len(keys)):
            kvs = result.range_kvs(i)
            out.append(kvs[0] if kvs else None)
        return out, result.revision

    async def get_prefix(
        self,
        prefix: str,
        *,
        start: str | None = None,
        limit: int = 0,
        keys_only: bool = False,
        revision: int = 0,
        end: str | None = None,
        descending: bool = False,
    ) -> tuple[list[KeyValue], int, bool]:
        """Keys under prefix from `start` (inclusive) to `end` (exclusive) in key order, or the reverse with
        `descending` (the last keys of the range first): (kvs, revision, more). With `revision`, as they were at
        that revision (raises WatchCompacted if it was compacted away)."""
        request = pb.RangeRequest(
            key=(start or prefix).encode(),
            range_end=end.encode() if end else prefix_end(prefix),
            limit=limit,
            keys_only=keys_only,
            revision=revision,
        )
        if descending:
            request.sort_order = pb.RangeRequest.DESCEND
            request.sort_target = pb.RangeRequest.KEY
        resp = await self._call(self._kv.Range, request)
        return [_kv(kv) for kv in resp.kvs], resp.header.revision, resp.more

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        resp = await self._call(self._kv.Put, pb.PutRequest(key=key.encode(), value=value, lease=lease))
        return int(resp.header.revision)

    async def delete(self, key: str) -> int:
        resp = await self._call(self._kv.DeleteRange, pb.DeleteRangeRequest(key=key.encode()))
        return int(resp.deleted)

    async def txn(
        self, compare: Sequence[pb.Compare], success: Sequence[pb.RequestOp], failure: Sequence[pb.RequestOp] = ()
    ) -> TxnResult:
        request = pb.TxnRequest(compare=list(compare), success=list(success), failure=list(failure))
        resp = await self._call(self._kv.Txn, request)
        return TxnResult(resp.succeeded, resp.header.revision, resp.responses)

    async def grant(self, ttl: int) -> int:
        resp = await self._call(self._lease.LeaseGrant, pb.LeaseGrantRequest(TTL=ttl))
        return int(resp.ID)

    async def revoke(self, lease_id: int) -> None:
        try:
            await self._call(self._lease.LeaseRevoke, pb.LeaseRevokeRequest(ID=lease_id), attempts=1)
        except Unavailable:
            log.warning("lease revoke failed; it will expire on its own")

    async def refresh(self, lease_id: int) -> int:
        """One keep-alive; returns the remaining TTL (<= 0 when the lease is gone)."""

        async def one() -> AsyncIterator[pb.LeaseKeepAliveRequest]:
            yield pb.LeaseKeepAliveRequest(ID=lease_id)

        call = self._lease.LeaseKeepAlive(one(), timeout=self.timeout)
        try:
            async for resp in call:
                self._heard(resp.header)
                return int(resp.TTL)
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"etcd keepalive: {exc.code().name}", reason="STORE_UNAVAILABLE") from exc
        finally:
            call.cancel()
        return 0

    def lease_keeper(self, lease_id: int, ttl: int, on_lost: Callable[[], None], since: float) -> LeaseKeeper:
        """A keeper of `lease_id` (granted at `since`, time.monotonic()) on a thread and channel of its own (see
        LeaseKeeper); not started."""
        return LeaseKeeper(self._channel.target, self._tls, lease_id, ttl, on_lost, since)

    async def watch(
        self, prefix: str, start_revision: int, progress: WatchProgress | None = None
    ) -> AsyncIterator[list[WatchEvent]]:
        """Batches of events under prefix from start_revision; raises WatchCompacted or Unavailable. With
        `progress`, the watch answers its requests with the revision it has sent every event up to."""
        queue: asyncio.Queue[pb.WatchRequest] = asyncio.Queue()
        if progress is not None:
            progress.attach(queue)
        await queue.put(
            pb.WatchRequest(
                create_request=pb.WatchCreateRequest(
                    key=prefix.encode(),
                    range_end=prefix_end(prefix),
                    start_revision=start_revision,
                    progress_notify=True,
                )
            )
        )

        async def requests() -> AsyncIterator[pb.WatchRequest]:
            while True:
                yield await queue.get()

        call = self._watch.Watch(requests())
        loop = asyncio.get_running_loop()
        # A watch from an older revision gets what it missed (up to the revision it was created at) a moment after
        # it is created, and etcd 3.5.1 answers a progress request at once with its current revision, possibly
        # before that replay (tests/integration/test_informer_relist.py). Until the replay is seen to reach that
        # revision, or REPLAY_GRACE_SECONDS have passed, a progress answer is no word of the watch's progress.
        replay_to, replay_deadline = 0, 0.0
        try:
            async for resp in call:
                self._heard(resp.header)
                if resp.compact_revision:
                    raise WatchCompacted(resp.compact_revision)
                if resp.canceled:
                    raise Unavailable(f"etcd watch cancelled: {resp.cancel_reason}", reason="STORE_UNAVAILABLE")
                if resp.created and resp.header.revision >= start_revision:
                    replay_to, replay_deadline = int(resp.header.revision), loop.time() + REPLAY_GRACE_SECONDS
                if resp.events and replay_to and resp.events[-1].kv.mod_revision >= replay_to:
                    replay_to = 0
                if not resp.events and not resp.created and progress is not None:
                    # A progress notification: every event up to this revision was sent before it, and the
                    # caller has handled those batches (this generator resumes only after it did).
                    if replay_to and loop.time() < replay_deadline:
                        continue
                    progress.revision = max(progress.revision, int(resp.header.revision))
                    progress.heard.set()
                if resp.events:
                    yield [
                        WatchEvent("delete" if ev.type == ev.DELETE else "put", _kv(ev.kv), ev.kv.mod_revision)
                        for ev in resp.events
                    ]
        except grpc.aio.AioRpcError as exc:
            raise Unavailable(f"etcd watch: {exc.code().name}", reason="STORE_UNAVAILABLE") from exc
        finally:
            if progress is not None:
                progress.attach(None)
            call.cancel()


class LeaseKeeper:
    """Keeps one lease alive from a thread of its own, over a blocking channel of its own, so that renewals go on
    however long the event loop is busy: a relist of a large backlog at takeover, a burst of work, a starved
    machine (the interpreter hands the thread the GIL every few milliseconds). A leader's term must not end
    because its loop was late, nor a second leader start beside one that is alive.

    Renews every third of `ttl` (sooner again after a failed try). Calls `on_lost`, from the thread and once, when
    the lease can no longer be counted on: etcd answered that it is gone, or no renewal sent in the last two thirds
    of `ttl` succeeded (the caller then gives up a third of `ttl` before the lease can expire on etcd's side; a
    renewal that hangs is cut off at that moment). ``stop`` ends the thread without calling it."""

    def __init__(
        self,
        target: str,
        tls: TlsSettings,
        lease_id: int,
        ttl: int,
        on_lost: Callable[[], None],
        since: float,
    ):
        self.target = target
        self.tls = tls
        self.lease_id = lease_id
        self.ttl = ttl
        self.on_lost = on_lost
        self.since = since  # when the lease was granted, on time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"lease-keeper-{lease_id:x}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        period = self.ttl / 3
        give_up_after = self.ttl * 2 / 3
        last_ok = self.since  # the lease was granted or last renewed no earlier than this
        wait = period
        channel: grpc.Channel | None = None
        try:
            while not self._stop.wait(wait):
                if channel is None:  # the identity's files as they are now: a renewed certificate is picked up
                    channel = sync_channel(self.target, self.tls)
                sent = time.monotonic()
                # A renewal that hangs must not carry the leader past the moment it has to give up.
                timeout = max(0.05, min(period, last_ok + give_up_after - sent))
                try:
                    left = self._renew(pb.LeaseStub(channel), timeout)
                except grpc.RpcError as exc:
                    log.warning("lease %x: keep-alive failed: %s", self.lease_id, exc.code().name)  # type: ignore[attr-defined]
                    left = -1
                    channel.close()
                    channel = None
                if left > 0:  # etcd renewed it at or after `sent`: it ends no sooner than ttl after that
                    last_ok, wait = sent, period
                    continue
                if (left == 0 or time.monotonic() - last_ok >= give_up_after) and not self._stop.is_set():
                    self.on_lost()
                    return
                wait = min(0.1, period)  # failed: try again soon, within the time left
        finally:
            if channel is not None:
                channel.close()

    def _renew(self, stub: pb.LeaseStub, timeout: float) -> int:
        """One keep-alive: the lease's remaining TTL, 0 when etcd no longer has it."""
        answers = stub.LeaseKeepAlive(iter([pb.LeaseKeepAliveRequest(ID=self.lease_id)]), timeout=timeout)
        try:
            for answer in answers:
                return int(answer.TTL)
        finally:
            answers.cancel()
        return 0
