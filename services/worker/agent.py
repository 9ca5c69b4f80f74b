"""The worker agent: registers with the pool-manager, heartbeats, runs assigned jobs, reports results."""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Coroutine
from dataclasses import dataclass, replace

import grpc
from opentelemetry import trace

from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from libs.interceptors import channel
from libs.lifecycle.transitions import INTERRUPTED
from libs.settings import TlsSettings
from libs.telemetry import job_span
from services.worker.executor import (
    REASON_EXITED,
    REASON_KILLED,
    REASON_OOM_KILLED,
    REASON_TIMEOUT,
    ExecResult,
    ExecSpec,
    JobExecutor,
)
from services.worker.fencing import LeaseFence
from services.worker.health import HealthCheck
from services.worker.logship import LogShipper

log = logging.getLogger(__name__)
_tracer = trace.get_tracer("jobmesh.worker")

# After its drain grace, what a stopping worker may still take: stopping its jobs (the executor's kill grace),
# then reporting them (an acknowledgement on the stream, else calls for up to a lease's TTL). Kubernetes gives a
# worker pod the pool's drain grace plus this (k8s/base/worker-*.yaml; the manifest test checks the sum).
STOP_MARGIN_SECONDS = 15.0
# How long a result waits for the rest of its attempt's output to be sent.
LOG_FLUSH_SECONDS = 5.0
# How much of its stderr a failed attempt's message ends with.
STDERR_IN_MESSAGE = 3072


@dataclass(frozen=True)
class AgentSettings:
    worker: t.Worker
    poolmanagers: tuple[str, ...]
    scratch_root: str
    tls: TlsSettings  # the worker's own certificate (spiffe://jobmesh/worker/<pool>/<worker>), issued at provisioning
    heartbeat_seconds: float = 2.0
    slots: int = 1  # jobs run at once (the pool's worker_slots)
    # Until the pool-manager says otherwise with the registration: the lease's TTL (self-fencing) and how long
    # a draining worker lets its jobs run.
    lease_ttl_seconds: float = 6.0
    drain_grace_seconds: float = 30.0


class WorkerAgent:
    def __init__(self, settings: AgentSettings, executor: JobExecutor, health: HealthCheck | None = None):
        self.settings = settings
        self.health = health or HealthCheck(settings.scratch_root)
        self.worker = t.Worker()
        self.worker.CopyFrom(settings.worker)
        self.executor = executor
        self.stopping = asyncio.Event()  # every job is over and reported (or could not be): end the sessions
        self.draining = asyncio.Event()  # told to stop: no new job, the running ones get the drain grace
        self._drainer: asyncio.Task[None] | None = None
        self._drain_grace = settings.drain_grace_seconds
        self._fence = LeaseFence(settings.lease_ttl_seconds, time.monotonic())
        self._interrupted: dict[tuple[str, int], str] = {}  # attempts we stop ourselves (drain, fence), and why
        self._fenced: set[tuple[str, int]] = set()
        # Results no replica took within a lease's time: sent again after the next registration.
        self._unreported: dict[tuple[str, int], pm.ReportResultRequest] = {}
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
            self._channels[addr] = channel(addr, self.settings.tls, propagate=False, fail_fast=True)
        return poolmanager_pb2_grpc.WorkerRegistryServiceStub(self._channels[addr])

    def _next_endpoint(self) -> str:
        addr = self.settings.poolmanagers[self._endpoint % len(self.settings.poolmanagers)]
        self._endpoint += 1
        return addr

    async def run(self) -> None:
        fence = asyncio.create_task(self._fence_watch())
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
        if self._job_tasks:  # only when the drain ran out of time: whatever is left is killed (the executor's finally)
            _, late = await asyncio.wait(set(self._job_tasks), timeout=1.0)
            for task in late:
                task.cancel()
            if late:
                await asyncio.wait(late, timeout=2.0)
        fence.cancel()
        for executor in self._free:
            executor.close()
        for ch in self._channels.values():
            await ch.close()

    async def _session(self, addr: str) -> None:
        """One registration stream; ends when the stream breaks, the lease is lost, or we stop."""
        async with channel(addr, self.settings.tls, propagate=False, fail_fast=True) as ch:
            stub = poolmanager_pb2_grpc.WorkerRegistryServiceStub(ch)
            connect = pm.ConnectRequest(worker=self.worker)
            connect_sent = time.monotonic()
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
                        self._fence.refreshed(connect_sent)  # the lease was granted or refreshed for it
                        if message.lease_ttl_seconds > 0:  # an older pool-manager says neither
                            self._fence.set_ttl(message.lease_ttl_seconds)
                            self._drain_grace = message.drain_grace_seconds
                        log.info("registered with %s (lease %x)", addr, self.worker.lease_id)
                        self._resend_unreported()
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
        while True:
            await asyncio.sleep(self.settings.heartbeat_seconds)
            alive, target = await self._beat(addr)
            if alive is None:
                continue
            if target != addr:
                log.warning("pool-manager %s does not answer; reconnecting through another replica", addr)
                self._reconnect.set()
                return
            if not alive:
                # We were declared lost: our job was retried elsewhere, so it must not keep running here.
                log.warning("lease lost; stopping any job and registering again")
                self._waiting.clear()  # taken back with the lease: never to start here
                for job_id, _ in list(self._running):
                    self._cancel(job_id, kill_now=True)
                self.worker.lease_id = 0
                self._lost.set()
                return

    async def _beat(self, addr: str) -> tuple[bool | None, str]:
        """One lease refresh (saying whether we are draining or unhealthy), through `addr` first and then the other
        replicas: (alive, the replica that answered), or (None, "") when none did."""
        endpoints = self.settings.poolmanagers
        request = pm.HeartbeatRequest(
            worker_id=self.worker.worker_id,
            lease_id=self.worker.lease_id,
            unhealthy_reason=await self._health(),
            draining=self.draining.is_set(),
            usage=await self._usage(),
        )
        # A frozen replica gets part of an interval, so that a refresh through another lands before the fence.
        timeout = self.settings.heartbeat_seconds / max(2, len(endpoints))
        for target in [addr, *(a for a in endpoints if a != addr)]:
            sent = time.monotonic()
            try:
                resp = await self._registry(target).Heartbeat(request, timeout=timeout)
            except grpc.aio.AioRpcError as exc:
                log.warning("heartbeat through %s failed: %s", target, exc.code().name)
                continue
            if resp.alive:
                self._fence.refreshed(sent)
            return resp.alive, target
        return None, ""

    async def _usage(self) -> list[pm.RunningUsage]:
        """One sample per running attempt of what it used so far, for the cost of running jobs (docs/cost.md)."""
        samples = []
        for (job_id, attempt), executor in list(self._running.items()):
            try:
                cpu_seconds, max_memory_mb = await executor.used_so_far()
            except Exception:  # best effort: the heartbeat (the lease) goes without it
                log.exception("measuring a running job failed", extra={"job_id": job_id})
                continue
            samples.append(
                pm.RunningUsage(job_id=job_id, attempt=attempt, cpu_seconds=cpu_seconds, max_memory_mb=max_memory_mb)
            )
        return samples

    async def _fence_watch(self) -> None:
        """Self-fencing: once no lease refresh has succeeded for FENCE_AT of the lease's TTL, every running job is
        killed (SIGKILL at once) and reported INTERRUPTED, so that it is dead before the lease can expire and the
        leader retries it elsewhere: two copies of one attempt never run at the same time."""
        while True:
            now = time.monotonic()
            if self._fence.due(now):
                targets = [key for key in self._running if key not in self._fenced]
                if targets or self._waiting:
                    log.warning(
                        "no pool-manager refreshed our lease for %.1fs (TTL %.0fs): stopping %d job(s) before it "
                        "can expire",
                        now - (self._fence.lease_end - self._fence.ttl),
                        self._fence.ttl,
                        len(targets),
                    )
                    self._fenced.update(targets)
                    self._interrupt("no pool-manager answered: stopped before the lease could expire", targets, True)
            await asyncio.sleep(min(0.1, max(0.01, self._fence.deadline - now)))

    def request_drain(self) -> None:
        """SIGTERM (a rollout, a drain, a scale-down): drain, then stop."""
        if self._drainer is None:
            self._drainer = asyncio.create_task(self.drain())

    async def drain(self) -> None:
        """Takes no new job and says so; lets the running jobs finish within the drain grace, then stops them and
        reports them INTERRUPTED (retried elsewhere without using a retry); stops once every result is reported,
        within STOP_MARGIN_SECONDS after the grace."""
        if self.draining.is_set():
            return
        self.draining.set()
        self.worker.state = t.WORKER_STATE_DRAINING  # and so a later registration says it at once
        log.info("draining: %d job(s) running, %.0fs grace", len(self._running), self._drain_grace)
        endpoints = self.settings.poolmanagers
        await self._beat(endpoints[(self._endpoint - 1) % len(endpoints)])
        self._interrupt("the worker is draining", [], False)  # the waiting ones: never started here
        if self._running:
            await asyncio.wait(set(self._job_tasks), timeout=self._drain_grace)
        if self._running:
            why = f"the worker was stopped; still running after the {self._drain_grace:g}s drain grace"
            self._interrupt(why, list(self._running), False)
        # The reports, including any kept for the next session (sent again once registered): bounded by the margin.
        end = time.monotonic() + STOP_MARGIN_SECONDS - 1.0
        while (self._job_tasks or self._unreported) and time.monotonic() < end:
            if self._job_tasks:
                await asyncio.wait(set(self._job_tasks), timeout=end - time.monotonic())
            else:
                await asyncio.sleep(0.1)
        if self._unreported:
            log.error("stopping with %d result(s) unreported: the lease will lapse first", len(self._unreported))
        self.stopping.set()

    def _interrupt(self, why: str, keys: list[tuple[str, int]], kill_now: bool) -> None:
        """Stops these running attempts as INTERRUPTED, and gives back the ones waiting for a slot."""
        waiting, self._waiting = self._waiting, []
        for assignment in waiting:
            self._give_back(assignment, why)
        for key in keys:
            executor = self._running.get(key)
            if executor is not None:
                self._interrupted.setdefault(key, why)
                executor.cancel(key[0], kill_now=kill_now)

    def _start(self, assignment: t.Assignment) -> None:
        key = (assignment.job_id, assignment.attempt)
        if key in self._running or key in self._finished:
            return  # the same assignment again after a reconnect
        if self.draining.is_set():
            # Dispatched before the pool-manager knew we drain: run it elsewhere rather than here.
            self._give_back(assignment, "the worker is draining")
            return
        if self._fence.due(time.monotonic()):
            self._give_back(assignment, "the worker's lease may lapse before it could run")
            return
        if not self._free:
            # A previous job's process is still being reaped; run this one right after it.
            if all((w.job_id, w.attempt) != key for w in self._waiting):
                self._waiting.append(assignment)
            return
        executor = self._free.pop()
        self._running[key] = executor
        self._spawn(self._execute(assignment, executor))

    def _spawn(self, work: Coroutine[object, object, None]) -> None:
        """A job's run and report (or a report alone): the drain and the stop wait for these."""
        task = asyncio.create_task(work)
        self._job_tasks.add(task)
        task.add_done_callback(self._job_tasks.discard)

    def _give_back(self, a: t.Assignment, why: str) -> None:
        """Reports an assignment that never started here as INTERRUPTED, so that it runs elsewhere."""
        self._remember_finished((a.job_id, a.attempt))
        log.info("giving back an unstarted job: %s", why, extra={"job_id": a.job_id, "attempt": a.attempt})
        result = ExecResult(-1, INTERRUPTED, f"given back unstarted: {why}", 0.0, 0.0, 0, "")
        self._spawn(self._report(a, result))

    def _remember_finished(self, key: tuple[str, int]) -> None:
        self._finished = [*self._finished[-(16 * self.settings.slots - 1) :], key]

    def _cancel(self, job_id: str, kill_now: bool = False) -> None:
        self._waiting = [w for w in self._waiting if w.job_id != job_id]  # withdrawn before it started
        for (running_id, _), executor in self._running.items():
            if running_id == job_id and executor.cancel(job_id, kill_now=kill_now):
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
            cpu_millis=a.spec.resources.cpu_millis or 1000,
            memory_mb=a.spec.resources.memory_mb or 1024,
        )
        shipper = LogShipper(self._append_log, self.worker.worker_id, a.job_id, a.attempt)
        spec = replace(spec, output=shipper.write)
        try:
            with job_span(_tracer, "run job", a.trace_parent, job_id=a.job_id, attempt=a.attempt) as span:
                result = await executor.run(spec)
                span.set_attribute("reason", result.reason)
                span.set_attribute("exit_code", result.exit_code)
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
            key = (a.job_id, a.attempt)
            self._remember_finished(key)
            del self._running[key]
            self._fenced.discard(key)
            self._free.append(executor)
            self.worker.jobs_run += 1
        why = self._interrupted.pop(key, None)
        if why is not None and result.reason == REASON_KILLED:  # stopped by us, not cancelled, nor ended first
            result = replace(result, reason=INTERRUPTED, message=f"{why} ({result.message})"[:500])
        log.info("job ended: %s (%s)", result.reason, result.message, extra=extra)
        if self._waiting:
            self._start(self._waiting.pop(0))
        await shipper.close(LOG_FLUSH_SECONDS)
        await self._report(a, with_stderr(result), await self._health())

    async def _append_log(self, request: pm.AppendJobLogRequest) -> pm.AppendJobLogResponse:
        """To the replica our session is with (any replica stores it in the shared log store)."""
        endpoints = self.settings.poolmanagers
        addr = endpoints[(self._endpoint - 1) % len(endpoints)]
        return await self._registry(addr).AppendJobLog(request, timeout=5.0)

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
        await self._deliver(request)

    async def _deliver(self, request: pm.ReportResultRequest) -> None:
        """Reports a result on the stream, else with calls to any replica for up to a lease's TTL; a result still
        not taken then is kept, the session is dropped, and it is reported again once registered with a replica
        that answers: the attempt never stays RUNNING for ever."""
        if await self._report_on_stream(request):
            return
        delay = 0.2
        # Start with the replica our stream is on, then go round the others (own counter: the session loop
        # rotates too, and sharing one would keep both on a dead replica).
        endpoints = self.settings.poolmanagers
        first = (self._endpoint - 1) % len(endpoints)
        end = time.monotonic() + self._fence.ttl
        for attempt in range(60):
            addr = endpoints[(first + attempt) % len(endpoints)]
            try:
                resp = await self._registry(addr).ReportResult(request, timeout=5.0)
                if not resp.accepted:
                    log.warning("result was stale and not accepted", extra={"job_id": request.job_id})
                return
            except grpc.aio.AioRpcError as exc:
                log.warning("report to %s failed: %s", addr, exc.code().name)
            if time.monotonic() + delay >= end:
                break
            await asyncio.sleep(delay)
            delay = min(delay * 2, 2.0)
        if self.stopping.is_set() or len(self._unreported) >= 16 * self.settings.slots:
            log.error("giving up reporting the result", extra={"job_id": request.job_id})
            return
        log.warning("result not reported; reporting it again after reconnecting", extra={"job_id": request.job_id})
        self._unreported[(request.job_id, request.attempt)] = request
        self._reconnect.set()

    def _resend_unreported(self) -> None:
        unreported, self._unreported = self._unreported, {}
        for request in unreported.values():
            self._spawn(self._deliver(request))


def with_stderr(result: ExecResult) -> ExecResult:
    """A failed attempt's message ends with the last of what it wrote to stderr, so `get` shows why."""
    failed = result.reason in (REASON_OOM_KILLED, REASON_TIMEOUT) or (
        result.reason == REASON_EXITED and result.exit_code != 0
    )
    tail = result.stderr_tail[-STDERR_IN_MESSAGE:].strip()
    if not failed or not tail:
        return result
    return replace(result, message=f"{result.message}; stderr:\n{tail}")


def default_scratch(data_dir: str) -> str:
    path = os.path.join(data_dir, "scratch")
    os.makedirs(path, exist_ok=True)
    return path
