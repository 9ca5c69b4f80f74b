"""The worker agent: registers with the pool-manager, heartbeats, runs assigned jobs, reports results."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

import grpc

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from libs.interceptors import channel
from libs.settings import TlsSettings
from services.worker.executor import ExecResult, ExecSpec, JobExecutor
from services.worker.health import HealthCheck

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class AgentSettings:
    worker: t.Worker
    poolmanagers: tuple[str, ...]
    scratch_root: str
    tls: TlsSettings  # the worker's own certificate (spiffe://jobmesh/worker/<pool>/<worker>), issued at provisioning
    heartbeat_seconds: float = 2.0
    slots: int = 1  # jobs run at once (the pool's worker_slots)


class WorkerAgent:
    def __init__(self, settings: AgentSettings, executor: JobExecutor, health: HealthCheck | None = None):
        self.settings = settings
        self.health = health or HealthCheck(settings.scratch_root)
        self.worker = t.Worker()
        self.worker.CopyFrom(settings.worker)
        self.executor = executor
        self.stopping = asyncio.Event()
        self._endpoint = 0
        # One executor per slot; an attempt holds one while it runs.
        self._free = [executor, *(executor.sibling() for _ in range(settings.slots - 1))]
        self._running: dict[tuple[str, int], JobExecutor] = {}
        self._finished: list[tuple[str, int]] = []  # recent attempts, so a replayed assignment never reruns
        self._waiting: list[t.Assignment] = []  # arrived while every slot was busy (a job still being reaped)
        self._job_tasks: set[asyncio.Task[None]] = set()
        self._lost = asyncio.Event()
        self._reconnect = asyncio.Event()  # the session's replica stopped answering: end the session
        self._said_unhealthy = False
        self._channels: dict[str, grpc.aio.Channel] = {}  # one long-lived channel per replica, for reports
        # Results go on the session's own stream (Attach) and are acknowledged there; a pool-manager without
        # Attach (older) gets Connect and unary reports.
        self._attach = True
        self._stream: grpc.aio.StreamStreamCall[pm.AttachRequest, pm.AttachResponse] | None = None
        self._stream_writes = asyncio.Lock()
        self._acks: dict[tuple[str, int], asyncio.Future[pm.ResultAck | None]] = {}

    def _registry(self, addr: str) -> poolmanager_pb2_grpc.WorkerRegistryServiceStub:
        if addr not in self._channels:
            # A worker starts no traces and gets none with its assignments: nothing to propagate.
            self._channels[addr] = channel(addr, self.settings.tls, propagate=False)
        return poolmanager_pb2_grpc.WorkerRegistryServiceStub(self._channels[addr])

    def _next_endpoint(self) -> str:
        addr = self.settings.poolmanagers[self._endpoint % len(self.settings.poolmanagers)]
        self._endpoint += 1
        return addr

    async def run(self) -> None:
        backoff = 0.2
        while not self.stopping.is_set():
            addr = self._next_endpoint()
            try:
                await self._session(addr)
                backoff = 0.2
            except grpc.aio.AioRpcError as exc:
                log.warning("pool-manager %s: %s; reconnecting", addr, exc.code().name)
            if self.stopping.is_set():
                break
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 2.0)
        while self._job_tasks:
            await asyncio.wait(set(self._job_tasks))
        for executor in self._free:
            executor.close()
        for ch in self._channels.values():
            await ch.close()

    async def _session(self, addr: str) -> None:
        """One registration stream; ends when the stream breaks, the lease is lost, or we stop."""
        async with channel(addr, self.settings.tls, propagate=False) as ch:
            stub = poolmanager_pb2_grpc.WorkerRegistryServiceStub(ch)
            connect = pm.ConnectRequest(worker=self.worker)
            call: grpc.aio.Call
            if self._attach:
                call = stream = stub.Attach()
                await stream.write(pm.AttachRequest(connect=connect))
            else:
                call = stub.Connect(connect)
            self._lost.clear()
            self._reconnect.clear()
            heartbeat: asyncio.Task[None] | None = None
            stop_waiter = asyncio.create_task(self._end_signal())
            stop_waiter.add_done_callback(lambda _: call.cancel())
            try:
                async for response in call:  # type: ignore[attr-defined]
                    if self._attach:
                        if response.HasField("result_ack"):
                            self._acknowledged(response.result_ack)
                            continue
                        message = response.event
                    else:
                        message = response
                    kind = message.WhichOneof("event")
                    if kind == "registered":
                        if self._attach:
                            self._stream = stream
                        self.worker.lease_id = message.registered.lease_id
                        log.info("registered with %s (lease %x)", addr, self.worker.lease_id)
                        if heartbeat is None:
                            heartbeat = asyncio.create_task(self._heartbeat(addr))
                    elif kind == "assignment":
                        self._start(message.assignment)
                    elif kind == "cancel_job_id":
                        self._cancel(message.cancel_job_id)
            except asyncio.CancelledError:
                if not (self.stopping.is_set() or self._lost.is_set() or self._reconnect.is_set()):
                    raise
            except grpc.aio.AioRpcError as exc:
                if self._attach and exc.code() == grpc.StatusCode.UNIMPLEMENTED:
                    log.warning("pool-manager %s has no Attach; connecting without results on the stream", addr)
                    self._attach = False
                raise
            finally:
                self._stream = None
                for waiting in self._acks.values():  # sent on this stream, never to be acknowledged on it
                    if not waiting.done():
                        waiting.set_result(None)
                stop_waiter.cancel()
                if heartbeat is not None:
                    heartbeat.cancel()

    async def _end_signal(self) -> None:
        waiters = [asyncio.create_task(e.wait()) for e in (self.stopping, self._lost, self._reconnect)]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    async def _heartbeat(self, addr: str) -> None:
        """Keeps the lease alive through the session's replica; when that one does not answer (dead, or frozen
        with its connections open), through the others at once, and the session is dropped so that the next
        one streams our assignments from a replica that works."""
        endpoints = self.settings.poolmanagers
        others = [a for a in endpoints if a != addr]
        request = pm.HeartbeatRequest(worker_id=self.worker.worker_id, lease_id=self.worker.lease_id)
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            request.unhealthy_reason = await self._health()
            resp = None
            for target in [addr, *others]:
                try:
                    resp = await self._registry(target).Heartbeat(request, timeout=self.settings.heartbeat_seconds)
                    break
                except grpc.aio.AioRpcError as exc:
                    log.warning("heartbeat through %s failed: %s", target, exc.code().name)
            if resp is None:
                continue
            if target != addr:
                log.warning("pool-manager %s does not answer; reconnecting through another replica", addr)
                self._reconnect.set()
                return
            if not resp.alive:
                # We were declared lost: our job was retried elsewhere, so it must not keep running here.
                log.warning("lease lost; stopping any job and registering again")
                self._waiting.clear()  # taken back with the lease: never to start here
                for job_id, _ in list(self._running):
                    self._cancel(job_id)
                self.worker.lease_id = 0
                self._lost.set()
                return

    def _start(self, assignment: t.Assignment) -> None:
        key = (assignment.job_id, assignment.attempt)
        if key in self._running or key in self._finished:
            return  # the same assignment again after a reconnect
        if not self._free:
            # A previous job's process is still being reaped; run this one right after it.
            if all((w.job_id, w.attempt) != key for w in self._waiting):
                self._waiting.append(assignment)
            return
        executor = self._free.pop()
        self._running[key] = executor
        task = asyncio.create_task(self._execute(assignment, executor))
        self._job_tasks.add(task)
        task.add_done_callback(self._job_tasks.discard)

    def _cancel(self, job_id: str) -> None:
        self._waiting = [w for w in self._waiting if w.job_id != job_id]  # withdrawn before it started
        for (running_id, _), executor in self._running.items():
            if running_id == job_id and executor.cancel(job_id):
                log.info("cancelling job", extra={"job_id": job_id})

    async def _execute(self, a: t.Assignment, executor: JobExecutor) -> None:
        extra = {"job_id": a.job_id, "tenant_id": a.tenant_id, "attempt": a.attempt}
        log.debug("starting job", extra=extra)  # one INFO line per job, when it ends
        spec = ExecSpec(
            job_id=a.job_id,
            attempt=a.attempt,
            command=list(a.spec.command),
            env=dict(a.spec.env),
            working_dir=a.spec.working_dir or None,
            max_runtime_seconds=float(a.spec.max_runtime_seconds) if a.spec.max_runtime_seconds > 0 else None,
        )
        try:
            result = await executor.run(spec)
        except Exception as exc:  # never leave an attempt unreported: the job would sit RUNNING for ever
            log.exception("the executor failed", extra=extra)
            result = ExecResult(
                exit_code=-1,
                reason="START_FAILED",
                message=f"worker error: {exc}"[:500],
                run_seconds=0.0,
                cpu_seconds=0.0,
                max_memory_mb=0,
                output_tail="",
            )
        finally:
            self._finished = [*self._finished[-(16 * self.settings.slots - 1) :], (a.job_id, a.attempt)]
            del self._running[(a.job_id, a.attempt)]
            self._free.append(executor)
            self.worker.jobs_run += 1
        log.info("job ended: %s (%s)", result.reason, result.message, extra=extra)
        if self._waiting:
            self._start(self._waiting.pop(0))
        await self._report(a, result, await self._health())

    async def _health(self) -> str:
        try:
            reason = await self.health.check()
        except Exception as exc:  # a broken check must not stop heartbeats or reports
            reason = f"health check failed: {exc}"
        if reason and not self._said_unhealthy:
            self._said_unhealthy = True
            log.warning("unhealthy: %s; asking to be replaced", reason)
        return reason

    def _acknowledged(self, ack: pm.ResultAck) -> None:
        waiting = self._acks.get((ack.job_id, ack.attempt))
        if waiting is not None and not waiting.done():
            waiting.set_result(ack)

    async def _report_on_stream(self, request: pm.ReportResultRequest) -> bool:
        """Sends the result on the session's stream; True once the pool-manager acknowledged it."""
        stream = self._stream
        if stream is None:
            return False
        key = (request.job_id, request.attempt)
        waiting: asyncio.Future[pm.ResultAck | None] = asyncio.get_running_loop().create_future()
        self._acks[key] = waiting
        try:
            async with self._stream_writes:
                await stream.write(pm.AttachRequest(result=request))
            ack = await asyncio.wait_for(waiting, timeout=5.0)
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError, TimeoutError) as exc:
            log.warning("result not acknowledged on the stream (%s); reporting it again", type(exc).__name__)
            return False
        finally:
            self._acks.pop(key, None)
        if ack is None:
            return False  # the session ended first
        if not ack.accepted:
            log.warning("result was stale and not accepted", extra={"job_id": request.job_id})
        return True

    async def _report(self, a: t.Assignment, result: ExecResult, unhealthy: str = "") -> None:
        request = pm.ReportResultRequest(
            worker_id=self.worker.worker_id,
            job_id=a.job_id,
            tenant_id=a.tenant_id,
            attempt=a.attempt,
            exit_code=result.exit_code,
            reason=result.reason,
            message=result.message,
            run_seconds=result.run_seconds,
            cpu_seconds=result.cpu_seconds,
            max_memory_mb=result.max_memory_mb,
            unhealthy_reason=unhealthy,
        )
        if await self._report_on_stream(request):
            return
        delay = 0.2
        # Start with the replica our stream is on, then go round the others (own counter: the session loop
        # rotates too, and sharing one would keep both on a dead replica).
        endpoints = self.settings.poolmanagers
        first = (self._endpoint - 1) % len(endpoints)
        for attempt in range(60):
            addr = endpoints[(first + attempt) % len(endpoints)]
            try:
                resp = await self._registry(addr).ReportResult(request, timeout=5.0)
                if not resp.accepted:
                    log.warning("result was stale and not accepted", extra={"job_id": a.job_id})
                return
            except grpc.aio.AioRpcError as exc:
                log.warning("report to %s failed: %s", addr, exc.code().name)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        log.error("giving up reporting the result", extra={"job_id": a.job_id})


def default_scratch(data_dir: str) -> str:
    path = os.path.join(data_dir, "scratch")
    os.makedirs(path, exist_ok=True)
    return path
