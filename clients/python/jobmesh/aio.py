"""The asyncio client: `jobmesh.aio.Client` has the methods of `jobmesh.Client`, as coroutines (and async
iterators for `list`, `watch` and `logs`)."""

from __future__ import annotations

import asyncio
import builtins
import codecs
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any, Unpack

import grpc

from jobmesh import _common as c
from jobmesh.common.v1 import pool_pb2, quota_pb2
from jobmesh.common.v1 import types_pb2 as t
from jobmesh.errors import JobmeshError, Timeout, from_rpc_error
from jobmesh.gateway.v1 import gateway_pb2 as g
from jobmesh.gateway.v1 import gateway_pb2_grpc as gg


class Client:
    """See `jobmesh.Client`; use `async with jobmesh.aio.Client(...) as client:`."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = c.DEFAULT_TIMEOUT):
        target = c.target_of(url)
        self.timeout = timeout
        self._token = token
        self._metadata = c.metadata_of(token)
        if target.secure:
            creds = grpc.ssl_channel_credentials()
            self._channel = grpc.aio.secure_channel(target.address, creds, options=c.CHANNEL_OPTIONS)
        else:
            self._channel = grpc.aio.insecure_channel(target.address, options=c.CHANNEL_OPTIONS)
        self._jobs = gg.JobServiceStub(self._channel)
        self._tenants = gg.TenantServiceStub(self._channel)
        self._pools = gg.PoolServiceStub(self._channel)
        self._cost = gg.CostServiceStub(self._channel)

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return await method(request, metadata=self._metadata, timeout=timeout or self.timeout)
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    async def _stream(self, method: Any, request: Any, timeout: float | None = None) -> AsyncIterator[Any]:
        try:
            async for item in method(request, metadata=self._metadata, timeout=timeout):
                yield item
        except grpc.aio.AioRpcError as err:
            raise from_rpc_error(err) from None

    async def submit(self, command: Sequence[str], **args: Unpack[c.SubmitArgs]) -> t.Job:
        """Submits a job (`command` is the argv list; name, cpu_millis and memory_mb are required, see
        `SubmitArgs`) and returns it, PENDING. Without an idempotency key one is made, so that a retried call
        never makes two jobs."""
        return await self.submit_spec(c.job_spec(command, **args))

    async def submit_spec(self, spec: t.JobSpec) -> t.Job:
        if not spec.idempotency_key:
            spec.idempotency_key = c.new_idempotency_key()
        return await self._call(self._jobs.SubmitJob, g.SubmitJobRequest(spec=spec))  # type: ignore[no-any-return]

    async def dry_run(self, command: Sequence[str], **args: Unpack[c.SubmitArgs]) -> g.DryRunJobResponse:
        return await self.dry_run_spec(c.job_spec(command, **args))

    async def dry_run_spec(self, spec: t.JobSpec) -> g.DryRunJobResponse:
        return await self._call(self._jobs.DryRunJob, g.DryRunJobRequest(spec=spec))  # type: ignore[no-any-return]

    async def get(self, job_id: str) -> t.Job:
        return await self._call(self._jobs.GetJob, g.GetJobRequest(job_id=job_id))  # type: ignore[no-any-return]

    async def list(self, state: str | int | None = None, *, newest_first: bool = False) -> AsyncIterator[t.Job]:
        request = g.ListJobsRequest(
            state=c.job_state(state), page_size=c.PAGE_SIZE, order_by="create_time desc" if newest_first else ""
        )
        while True:
            page = await self._call(self._jobs.ListJobs, request)
            for job in page.jobs:
                yield job
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    async def cancel(self, job_id: str) -> t.Job:
        return await self._call(self._jobs.CancelJob, g.CancelJobRequest(job_id=job_id))  # type: ignore[no-any-return]

    async def watch(self, job_id: str, timeout: float | None = None) -> AsyncIterator[t.Job]:
        end = None if timeout is None else time.monotonic() + timeout
        last: t.Job | None = None
        for _ in range(100):
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout(f"job {job_id} did not end within {timeout}s")
            try:
                async for job in self._stream(self._jobs.WatchJob, g.WatchJobRequest(job_id=job_id), left):
                    if last is None or job != last:
                        yield job
                    last = job
                    if c.is_over(job):
                        return
            except JobmeshError as err:
                if err.code == "DEADLINE_EXCEEDED" and end is not None:
                    raise Timeout(f"job {job_id} did not end within {timeout}s") from None
                if err.code != "UNAVAILABLE":
                    raise
                await asyncio.sleep(0.5)
        raise c.ended_early(last)

    async def wait(self, job_id: str, timeout: float | None = None) -> t.Job:
        last = None
        async for job in self.watch(job_id, timeout):
            last = job
        assert last is not None
        return last

    async def logs(self, job_id: str, follow: bool = False, attempt: int = 0) -> AsyncIterator[str]:
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        request = g.GetJobLogsRequest(job_id=job_id, follow=follow, attempt=attempt)
        async for body in self._stream(self._jobs.GetJobLogs, request, None if follow else self.timeout):
            text = decoder.decode(body.data)
            if text:
                yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    async def quota(self, tenant: str | None = None) -> quota_pb2.Quota:
        request = g.GetQuotaRequest(tenant_id=c.tenant_or_own(tenant, self._token))
        return await self._call(self._tenants.GetQuota, request)  # type: ignore[no-any-return]

    async def burst(
        self,
        *,
        cpu_millis: int = 0,
        memory_mb: int = 0,
        concurrent_jobs: int = 0,
        duration_seconds: int = 600,
        tenant: str | None = None,
    ) -> quota_pb2.BurstSession:
        request = c.burst_request(
            c.tenant_or_own(tenant, self._token), cpu_millis, memory_mb, concurrent_jobs, duration_seconds
        )
        return await self._call(self._tenants.RequestBurst, request)  # type: ignore[no-any-return]

    async def pools(self) -> builtins.list[pool_pb2.Pool]:
        return list((await self._call(self._pools.ListPools, g.ListPoolsRequest())).pools)

    async def cost_report(
        self, start: str | None = None, end: str | None = None, tenant: str | None = None
    ) -> g.GetCostReportsResponse:
        request = g.GetCostReportsRequest(start=start or "", end=end or "", tenant_id=tenant or "")
        return await self._call(self._cost.GetCostReports, request)  # type: ignore[no-any-return]
