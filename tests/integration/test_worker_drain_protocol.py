"""A real worker process against a pool-manager served by the test (grpc.aio on port 0): what it says and reports
while it drains, and a result that no replica takes for longer than a lease is reported again after the worker
reconnects."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import grpc
import pytest

from bench.worker_agent import stand_in_mesh, start_worker
from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from libs.settings import TlsSettings
from services.worker.agent import STOP_MARGIN_SECONDS

LEASE_TTL = 3


class PoolManager(poolmanager_pb2_grpc.WorkerRegistryServiceServicer):
    """Streams what is put in `outbox`, records results (or refuses them while `refusing`), notes draining."""

    def __init__(self, drain_grace: float):
        self.drain_grace = drain_grace
        self.outbox: asyncio.Queue[pm.ConnectResponse] = asyncio.Queue()
        self.results: list[pm.ReportResultRequest] = []
        self.registrations = 0
        self.draining = asyncio.Event()
        self.refuse_until = 0.0

    @staticmethod
    def assignment(job_id: str, command: list[str]) -> pm.ConnectResponse:
        spec = t.JobSpec(name=job_id, command=command, resources=t.Resources(cpu_millis=100, memory_mb=64))
        return pm.ConnectResponse(
            assignment=t.Assignment(job_id=job_id, tenant_id="acme", attempt=1, worker_id="w-0", spec=spec)
        )

    def _take(self, result: pm.ReportResultRequest) -> bool:
        if time.monotonic() < self.refuse_until:
            return False  # as a replica whose writes do not land: no acknowledgement
        self.results.append(result)
        return True

    async def Attach(
        self, request_iterator: AsyncIterator[pm.AttachRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pm.AttachResponse]:
        first = await anext(aiter(request_iterator))
        worker = first.connect.worker
        worker.lease_id = 1
        self.registrations += 1
        yield pm.AttachResponse(
            event=pm.ConnectResponse(
                registered=worker, lease_ttl_seconds=LEASE_TTL, drain_grace_seconds=self.drain_grace
            )
        )
        acks: asyncio.Queue[pm.ResultAck] = asyncio.Queue()

        async def read_results() -> None:
            async for message in request_iterator:
                if self._take(message.result):
                    acks.put_nowait(pm.ResultAck(job_id=message.result.job_id, attempt=1, accepted=True))

        reader = asyncio.create_task(read_results())
        try:
            while True:
                out, ack = asyncio.ensure_future(self.outbox.get()), asyncio.ensure_future(acks.get())
                done, pending = await asyncio.wait({out, ack}, return_when=asyncio.FIRST_COMPLETED)
                for future in pending:
                    future.cancel()
                if ack in done:
                    yield pm.AttachResponse(result_ack=ack.result())
                if out in done:
                    yield pm.AttachResponse(event=out.result())
        finally:
            reader.cancel()

    async def ReportResult(
        self, request: pm.ReportResultRequest, context: grpc.aio.ServicerContext
    ) -> pm.ReportResultResponse:
        if not self._take(request):
            await context.abort(grpc.StatusCode.UNAVAILABLE, "not now")
        return pm.ReportResultResponse(accepted=True)

    async def Heartbeat(self, request: pm.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pm.HeartbeatResponse:
        if request.draining:
            self.draining.set()
        return pm.HeartbeatResponse(alive=True)

    async def wait_results(self, count: int, timeout: float) -> dict[str, pm.ReportResultRequest]:
        end = time.monotonic() + timeout
        while len(self.results) < count:
            assert time.monotonic() < end, f"{len(self.results)} of {count} results"
            await asyncio.sleep(0.05)
        return {r.job_id: r for r in self.results}


@pytest.fixture()
def lease_ttl(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("JOBMESH_WORKER_LEASE_TTL", str(LEASE_TTL))  # start_worker passes our environment on
    yield


async def serve(manager: PoolManager, data_dir: Path) -> tuple[grpc.aio.Server, int, TlsSettings]:
    """The test's pool-manager on an mTLS port, and the worker certificate its worker is started with."""
    creds, worker_tls = stand_in_mesh(data_dir)
    server = grpc.aio.server()
    poolmanager_pb2_grpc.add_WorkerRegistryServiceServicer_to_server(manager, server)
    port = server.add_secure_port("127.0.0.1:0", creds)
    await server.start()
    return server, port, worker_tls


async def wait_until(predicate: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not predicate():  # type: ignore[operator]
        assert time.monotonic() < end, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


@pytest.mark.asyncio
@pytest.mark.usefixtures("lease_ttl")
async def test_a_draining_worker_says_so_gives_back_new_work_and_interrupts_its_job_after_the_grace(
    tmp_path: Path,
) -> None:
    manager = PoolManager(drain_grace=1.0)
    server, port, worker_tls = await serve(manager, tmp_path)
    worker = start_worker(port, tmp_path, worker_tls)
    try:
        await wait_until(lambda: manager.registrations, 15, "the registration")
        manager.outbox.put_nowait(manager.assignment("long", ["sleep", "30"]))
        await asyncio.sleep(1.0)

        worker.send_signal(signal.SIGTERM)
        stopped = time.monotonic()
        await asyncio.wait_for(manager.draining.wait(), 3)
        manager.outbox.put_nowait(manager.assignment("late", ["true"]))
        results = await manager.wait_results(2, timeout=10)
        exit_code = await asyncio.to_thread(worker.wait, 1.0 + STOP_MARGIN_SECONDS)
    finally:
        if worker.poll() is None:
            worker.kill()
        await server.stop(0)

    assert exit_code == 0
    assert time.monotonic() - stopped < 6.0  # the grace, the kill and the reports: not the job's 30 s
    late = results["late"]
    assert (late.reason, late.run_seconds) == ("INTERRUPTED", 0.0)
    assert "given back unstarted" in late.message
    long = results["long"]
    assert long.reason == "INTERRUPTED" and "drain grace" in long.message, long
    assert 1.5 < long.run_seconds < 5.0


@pytest.mark.asyncio
@pytest.mark.usefixtures("lease_ttl")
async def test_a_result_no_replica_takes_for_a_lease_is_reported_again_after_reconnecting(tmp_path: Path) -> None:
    manager = PoolManager(drain_grace=1.0)
    server, port, worker_tls = await serve(manager, tmp_path)
    worker = start_worker(port, tmp_path, worker_tls)
    try:
        await wait_until(lambda: manager.registrations, 15, "the registration")
        manager.refuse_until = time.monotonic() + 10.0  # past the 5 s ack wait and a lease of calls
        manager.outbox.put_nowait(manager.assignment("done", ["true"]))

        results = await manager.wait_results(1, timeout=30)
    finally:
        worker.terminate()
        await asyncio.to_thread(worker.wait, 10)
        await server.stop(0)

    assert results["done"].reason == "EXITED"
    assert manager.registrations >= 2  # it dropped the session and registered again before reporting it
