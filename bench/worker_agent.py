"""Worker agent benchmark: the CPU one real worker process spends per short job, without the rest of the mesh.

Starts `python -m services.worker` against a pool-manager stand-in served in this process (the same
WorkerRegistryService: Attach, Connect, Heartbeat, ReportResult). The stand-in hands out one assignment of
--command at a time and the next one as soon as the previous result is reported, --jobs times. Prints the
worker's CPU per job (its own, and that of the job processes it reaped), the wall time per job and the
stand-in's own CPU per job. --sandbox none runs the jobs unsandboxed (the pool setting sandbox = "none"); the
default is the job sandbox (a bwrap-confined spawner per slot, a uid, namespaces and a cgroup per job), so the
difference is its cost per job start.
Bounded by --jobs and --timeout-seconds.

"job processes" is the CPU of the processes the worker reaped, and of those they reaped in turn. It misses what
runs inside a job's pid namespace: a job's init is its slot's spawner's child, reaped by the kernel. So,
where cgroup v1's cpuacct is mounted and we are root, the worker starts in a cpuacct group of its own, and
"worker and everything it started" is that group's CPU: the worker, every process of every job, and the
kernel's work for them (namespaces and mounts made and torn down), but not what the kernel defers to its own
threads (a network namespace's cleanup, for one).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path

import grpc

from bench.cpuacct import CpuacctGroup
from devtools.launcher import REPO
from jobmesh.common.v1 import types_pb2 as t
from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
from libs.meshpki import MeshPki, WorkerIssuer
from libs.settings import TlsSettings
from libs.tls import server_credentials

CLK_TCK = os.sysconf("SC_CLK_TCK")


class StandIn(poolmanager_pb2_grpc.WorkerRegistryServiceServicer):
    """Hands out `jobs` assignments one after another; `finished` is set once the last result is in."""

    def __init__(self, jobs: int, command: list[str]):
        self.jobs = jobs
        self.command = command
        self.log_bytes = 0
        self.outbox: asyncio.Queue[pm.ConnectResponse] = asyncio.Queue()
        self.reported = 0
        self.seen: set[str] = set()
        self.on_stream = 0  # results that came on the Attach stream (the others by ReportResult)
        self.failed = 0
        self.finished = asyncio.Event()

    def assignment(self, n: int) -> pm.ConnectResponse:
        spec = t.JobSpec(name=f"bench-{n}", command=self.command, resources=t.Resources(cpu_millis=100, memory_mb=64))
        return pm.ConnectResponse(
            assignment=t.Assignment(job_id=f"bench-{n:07d}", tenant_id="acme", attempt=1, worker_id="w-0", spec=spec)
        )

    async def Connect(
        self, request: pm.ConnectRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pm.ConnectResponse]:
        worker = request.worker
        worker.lease_id = 1
        yield pm.ConnectResponse(registered=worker)
        while True:
            yield await self.outbox.get()

    async def Attach(
        self, request_iterator: AsyncIterator[pm.AttachRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pm.AttachResponse]:
        first = await anext(aiter(request_iterator))
        worker = first.connect.worker
        worker.lease_id = 1
        yield pm.AttachResponse(event=pm.ConnectResponse(registered=worker))
        acks: asyncio.Queue[pm.ResultAck] = asyncio.Queue()

        async def read_results() -> None:
            async for message in request_iterator:
                self.record(message.result, on_stream=True)
                acks.put_nowait(
                    pm.ResultAck(job_id=message.result.job_id, attempt=message.result.attempt, accepted=True)
                )

        reader = asyncio.create_task(read_results())
        try:
            while True:
                outgoing = [asyncio.ensure_future(self.outbox.get()), asyncio.ensure_future(acks.get())]
                done, pending = await asyncio.wait(outgoing, return_when=asyncio.FIRST_COMPLETED)
                for future in pending:
                    future.cancel()
                for future in outgoing:
                    if future in done:
                        item = future.result()
                        if isinstance(item, pm.ResultAck):
                            yield pm.AttachResponse(result_ack=item)
                        else:
                            yield pm.AttachResponse(event=item)
        finally:
            reader.cancel()

    def record(self, result: pm.ReportResultRequest, on_stream: bool) -> None:
        if result.job_id in self.seen:
            return  # sent again after its acknowledgement was cut off (the worker stopping): counted once
        self.seen.add(result.job_id)
        self.reported += 1
        self.on_stream += on_stream
        self.failed += result.exit_code != 0
        if self.reported < self.jobs:
            self.outbox.put_nowait(self.assignment(self.reported))
        else:
            self.finished.set()

    async def Heartbeat(self, request: pm.HeartbeatRequest, context: grpc.aio.ServicerContext) -> pm.HeartbeatResponse:
        return pm.HeartbeatResponse(alive=True)

    async def AppendJobLog(
        self, request: pm.AppendJobLogRequest, context: grpc.aio.ServicerContext
    ) -> pm.AppendJobLogResponse:
        """The job's output, taken and dropped (the store's cost is not the worker's)."""
        self.log_bytes += len(request.data)
        return pm.AppendJobLogResponse(next_offset=request.offset + len(request.data))

    async def ReportResult(
        self, request: pm.ReportResultRequest, context: grpc.aio.ServicerContext
    ) -> pm.ReportResultResponse:
        self.record(request, on_stream=False)
        return pm.ReportResultResponse(accepted=True)


class ConnectOnly(StandIn):
    """A pool-manager from before Attach: the worker falls back to Connect and unary ReportResult."""

    Attach = poolmanager_pb2_grpc.WorkerRegistryServiceServicer.Attach  # type: ignore[assignment]


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(own, reaped children) CPU seconds of a process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return (utime + stime) / CLK_TCK, (cutime + cstime) / CLK_TCK


async def run(args: argparse.Namespace) -> dict[str, object]:
    stand_in = (ConnectOnly if args.without_attach else StandIn)(args.jobs, args.command)
    with tempfile.TemporaryDirectory() as data_dir:
        server_creds, worker_tls = stand_in_mesh(Path(data_dir))
        server = grpc.aio.server()
        poolmanager_pb2_grpc.add_WorkerRegistryServiceServicer_to_server(stand_in, server)
        port = server.add_secure_port("127.0.0.1:0", server_creds)
        await server.start()
        tree = CpuacctGroup.make("jobmesh-bench")
        worker = start_worker(port, Path(data_dir), worker_tls, args.sandbox, args.network, tree)
        try:
            await asyncio.sleep(1.0)  # registered, first heartbeat out of the way
            tree0 = tree.seconds() if tree else None
            own0, kids0 = cpu_seconds(worker.pid)
            ours0, wall0 = time.process_time(), time.perf_counter()
            stand_in.outbox.put_nowait(stand_in.assignment(0))
            progress = asyncio.create_task(report_progress(stand_in))
            try:
                await asyncio.wait_for(stand_in.finished.wait(), args.timeout_seconds)
            finally:
                progress.cancel()
            own1, kids1 = cpu_seconds(worker.pid)
            tree1 = tree.seconds() if tree else None
            ours1, wall1 = time.process_time(), time.perf_counter()
        finally:
            worker.terminate()
            await asyncio.to_thread(worker.wait, 10)  # the stand-in keeps serving while the worker stops
            await server.stop(0)
            if tree:
                tree.remove()
    n = stand_in.reported
    tree_ms = None if tree0 is None or tree1 is None else round((tree1 - tree0) * 1000 / n, 3)
    return {
        "jobs": n,
        "failed": stand_in.failed,
        "command": args.command,
        "sandbox": args.sandbox,
        "network": args.network,
        "results_on_stream": stand_in.on_stream,
        "output_bytes_received": stand_in.log_bytes,
        "worker_cpu_ms_per_job": round((own1 - own0) * 1000 / n, 3),
        "job_processes_cpu_ms_per_job": round((kids1 - kids0) * 1000 / n, 3),
        "worker_and_everything_it_started_cpu_ms_per_job": tree_ms,
        "wall_ms_per_job": round((wall1 - wall0) * 1000 / n, 3),
        "stand_in_cpu_ms_per_job": round((ours1 - ours0) * 1000 / n, 3),
    }


def stand_in_mesh(data_dir: Path) -> tuple[grpc.ServerCredentials, TlsSettings]:
    """The real mTLS for a pool-manager stand-in: its server credentials (the pool-manager's identity, trusting
    workers) and a worker certificate for the worker it serves, from a PKI of its own in `data_dir`."""
    pki = MeshPki(data_dir / "pki")
    creds = server_credentials(pki.service("poolmanager", "poolmanager", trust_workers=True))
    return creds, WorkerIssuer(pki.worker_ca_dir, pki.workers_dir).issue("static-general", "w-0")


def start_worker(
    port: int,
    data_dir: Path,
    tls: TlsSettings,
    sandbox: str = "bwrap",
    network: str = "none",
    tree: CpuacctGroup | None = None,
) -> subprocess.Popen[bytes]:
    env = {
        **os.environ,
        **tls.env(),
        "PYTHONPATH": f"{REPO}:{REPO / 'gen'}",
        "JOBMESH_POOLMANAGER_ADDRS": f"127.0.0.1:{port}",
        "JOBMESH_POOL_ID": "static-general",
        "JOBMESH_WORKER_ID": "w-0",
        "JOBMESH_DATA_DIR": str(data_dir),
        "JOBMESH_CONFIG": str(REPO / "tests" / "fixtures" / "mesh.toml"),
        "JOBMESH_WORKER_SANDBOX": sandbox,
        "JOBMESH_WORKER_NETWORK": network,
    }
    with open(data_dir / "worker.log", "w") as log:
        argv = [sys.executable, "-m", "services.worker"]
        return subprocess.Popen(tree.wrap(argv) if tree else argv, env=env, cwd=REPO, stdout=log, stderr=log)


async def report_progress(stand_in: StandIn) -> None:
    while True:
        await asyncio.sleep(1)
        print(f"  {stand_in.reported}/{stand_in.jobs} jobs", file=sys.stderr, flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--command", nargs="+", default=["true"])
    parser.add_argument("--timeout-seconds", type=float, default=120.0)
    parser.add_argument("--sandbox", choices=["bwrap", "none"], default="bwrap", help="the pool's job sandbox")
    parser.add_argument("--network", choices=["none", "host"], default="none", help="the pool's job network")
    parser.add_argument(
        "--without-attach",
        action="store_true",
        help="serve no Attach, as an older pool-manager: results go by unary ReportResult",
    )
    args = parser.parse_args()
    print(json.dumps(asyncio.run(run(args))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
