"""Active/standby serving: one replica of a service serves it (the one that leads its etcd election), the other
reports it NOT_SERVING, so that clients' health-checked load balancing (libs/interceptors.py `channel` with
`health_service`) sends every call to the leader and moves over within milliseconds of a flip.

A term is served only once the replica's informers have handled every write made before the term began (its
leader key's create revision): the previous leader's last writes are then part of the state it decides on. Each
call takes the term's token (`token()`), and every write it makes is fenced by it.

Self-checks: the process's own health ("") goes NOT_SERVING and the process exits non-zero when the election
task dies or an informer's task stopped, so a supervisor (the launcher, Kubernetes' liveness probe) restarts it.
The gate and the self-check read the list of informers they are given each time (not a copy): a service may fill it
after building the gate.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Protocol

import grpc

from libs.errors import NotLeader, Unavailable
from libs.etcd.client import Compare, Etcd, KeyValue, RequestOp, TxnResult, op_put
from libs.etcd.election import LeaderElection, Leadership

log = logging.getLogger(__name__)

# Exit code of a replica whose self-check failed (the supervisor restarts it).
SELF_CHECK_FAILED = 70


class _Informer(Protocol):
    name: str

    async def wait_revision(self, revision: int, timeout: float = 10.0) -> None: ...

    @property
    def running(self) -> bool: ...


class _Health(Protocol):
    async def set_service_serving(self, name: str, serving: bool) -> None: ...


def _exit_now(code: int) -> None:
    logging.shutdown()
    os._exit(code)


class SelfCheck:
    """What a supervisor acts on: when the election task died or an informer's task stopped, the process reports
    NOT_SERVING (its own health and `services`) and exits with SELF_CHECK_FAILED to be restarted."""

    def __init__(
        self,
        election: LeaderElection,
        informers: Sequence[_Informer] = (),
        services: Sequence[str] = (),
        exit_process: Callable[[int], None] = _exit_now,
    ):
        self.election = election
        self.informers = informers  # read at each check: the service may change the list
        self.services = list(services)
        self.exit_process = exit_process
        self.failed = ""  # why, once it has

    def problem(self) -> str:
        task = self.election.task
        if task is not None and task.done() and not task.cancelled():
            return f"election task ended: {task.exception()!r}"
        for informer in self.informers:
            if not informer.running:
                return f"informer {informer.name} stopped"
        return ""

    async def check(self, health: _Health) -> bool:
        """True when the process is failing (and on its way out)."""
        why = self.failed or self.problem()
        if why and not self.failed:
            self.failed = why
            log.error("self-check failed, exiting to be restarted: %s", why)
            for name in (*self.services, ""):
                await health.set_service_serving(name, False)
            self.exit_process(SELF_CHECK_FAILED)
        return bool(why)

    async def run(self, health: _Health, poll: float = 0.5) -> None:
        """For a replica without a gated service (scheduler, pool-manager): checks until one fails."""
        while not await self.check(health):
            await asyncio.sleep(poll)


class LeaderGate:
    """Opens `service` on this replica's health while it leads and has caught up; closes it the moment it may not.
    `on_term` is told each change of the term served (None: not serving), e.g. to drop in-memory state that
    belongs to one term."""

    def __init__(
        self,
        election: LeaderElection,
        informers: Sequence[_Informer],
        service: str,
        on_term: Callable[[Leadership | None], Awaitable[None] | None] = lambda _: None,
        *,
        catch_up_timeout: float = 10.0,
        poll: float = 0.25,
        exit_process: Callable[[int], None] = _exit_now,
    ):
        self.election = election
        self.informers = informers  # read at each term: the service may fill it after building the gate
        self.service = service
        self.on_term = on_term
        self.catch_up_timeout = catch_up_timeout
        self.poll = poll
        self.serving: Leadership | None = None
        self.self_check = SelfCheck(election, informers, [service], exit_process)

    def serves(self) -> bool:
        """Whether this replica serves a term now (for leader-only work: writes, cycles, pruning)."""
        return self.serving is not None

    def token(self) -> Leadership:
        """The term a call runs under; UNAVAILABLE (clients retry, health routing moves them to the leader) when
        this replica does not serve one."""
        lead = self.serving
        if lead is None or lead != self.election.leadership:
            raise Unavailable(f"this replica does not lead {self.service}; retry", reason="NOT_LEADER")
        return lead

    async def fenced_txn(
        self, compare: Sequence[Compare], success: Sequence[RequestOp], failure: Sequence[RequestOp] = ()
    ) -> TxnResult:
        """A transaction fenced by the term served now (etcd.txn's signature, for stores that take a committer):
        UNAVAILABLE NOT_LEADER, which callers retry against the new leader, when that term is over."""
        term = self.token()
        try:
            return await self.election.fenced_txn(compare, success, failure, token=term)
        except NotLeader as exc:
            raise Unavailable(f"{exc.message}; retry", reason="NOT_LEADER") from exc

    def interceptor(self) -> grpc.aio.ServerInterceptor:
        """Refuses every call to the gated service on a replica that does not serve it (innermost, so the refusal
        is mapped like any domain error)."""
        return _GateInterceptor(self)

    async def run(self, health: _Health) -> None:
        """Follows the election until cancelled (or until a self-check fails: then the process exits)."""
        try:
            while True:
                self.election.changed.clear()
                if self.self_check.problem():
                    self.serving = None  # no call runs under the term any more
                    await self.self_check.check(health)
                    return  # closed for good: the process is on its way out
                lead = self.election.leadership
                if lead != self.serving:
                    await self._close(health)
                    if lead is not None:
                        await self._open(health, lead)
                try:
                    await asyncio.wait_for(self.election.changed.wait(), self.poll)
                except TimeoutError:
                    pass
        finally:
            self.serving = None

    async def _open(self, health: _Health, lead: Leadership) -> None:
        try:
            await asyncio.gather(*(i.wait_revision(lead.revision, self.catch_up_timeout) for i in self.informers))
        except TimeoutError as exc:
            # Stay closed and try again: etcd is slow or away, which the election will notice too.
            log.warning("not serving %s yet: %s", self.service, exc)
            return
        if self.election.leadership != lead:
            return
        started = self.on_term(lead)
        if inspect.isawaitable(started):
            await started
        if self.election.leadership != lead:
            return
        self.serving = lead
        await health.set_service_serving(self.service, True)
        log.info("serving %s as the leader (term %d)", self.service, lead.revision)

    async def _close(self, health: _Health) -> None:
        if self.serving is None:
            return
        self.serving = None
        await health.set_service_serving(self.service, False)
        ended = self.on_term(None)
        if inspect.isawaitable(ended):
            await ended
        log.warning("no longer serving %s (standby)", self.service)


class FencedStore:
    """etcd as a leader's stores see it: reads as they are, every write fenced by the term the gate serves when it
    is made (UNAVAILABLE NOT_LEADER once that term is over, or on a standby). For stores that take an object with
    etcd's `txn`, `put` and `get_prefix` (the cost service's ledgers)."""

    def __init__(self, etcd: Etcd, gate: LeaderGate):
        self.etcd = etcd
        self.gate = gate

    async def txn(
        self, compare: Sequence[Compare], success: Sequence[RequestOp], failure: Sequence[RequestOp] = ()
    ) -> TxnResult:
        return await self.gate.fenced_txn(compare, success, failure)

    async def put(self, key: str, value: bytes, lease: int = 0) -> int:
        return (await self.gate.fenced_txn([], [op_put(key, value, lease)])).revision

    async def get_prefix(
        self, prefix: str, *, start: str | None = None, limit: int = 0, keys_only: bool = False
    ) -> tuple[list[KeyValue], int, bool]:
        return await self.etcd.get_prefix(prefix, start=start, limit=limit, keys_only=keys_only)


class _GateInterceptor(grpc.aio.ServerInterceptor):
    def __init__(self, gate: LeaderGate):
        self.gate = gate
        self.prefix = f"/{gate.service}/"

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        if handler is None or not details.method.startswith(self.prefix):
            return handler
        gate = self.gate
        if handler.unary_unary is not None:
            unary = handler.unary_unary

            async def gated_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                gate.token()
                return await unary(request, context)

            return grpc.unary_unary_rpc_method_handler(
                gated_unary, handler.request_deserializer, handler.response_serializer
            )
        if handler.unary_stream is not None:
            stream = handler.unary_stream

            async def gated_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                gate.token()
                async for item in stream(request, context):
                    yield item

            return grpc.unary_stream_rpc_method_handler(
                gated_stream, handler.request_deserializer, handler.response_serializer
            )
        return handler
