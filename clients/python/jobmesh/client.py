"""The blocking client: `jobmesh.Client(url, token)` over native gRPC through the mesh's public port."""

from __future__ import annotations

import builtins
import codecs
import time
from collections.abc import Iterator, Sequence
from typing import Any, Unpack

import grpc

from jobmesh import _common as c
from jobmesh.common.v1 import pool_pb2, quota_pb2
from jobmesh.common.v1 import types_pb2 as t
from jobmesh.errors import JobmeshError, Timeout, from_rpc_error
from jobmesh.gateway.v1 import gateway_pb2 as g
from jobmesh.gateway.v1 import gateway_pb2_grpc as gg


class Client:
    """A tenant's (or an admin's) view of the mesh. `url` defaults to $JOBMESH_URL (else http://127.0.0.1:8080),
    `token` to $JOBMESH_TOKEN. Every call has a deadline (`timeout` seconds); failures raise
    `jobmesh.errors.JobmeshError` subclasses named after the answer's ErrorInfo reason."""

    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = c.DEFAULT_TIMEOUT):
        target = c.target_of(url)
        self.timeout = timeout
        self._token = token
        self._metadata = c.metadata_of(token)
        if target.secure:
            self._channel = grpc.secure_channel(
                target.address, grpc.ssl_channel_credentials(), options=c.CHANNEL_OPTIONS
            )
        else:
            self._channel = grpc.insecure_channel(target.address, options=c.CHANNEL_OPTIONS)
        self._jobs = gg.JobServiceStub(self._channel)
        self._tenants = gg.TenantServiceStub(self._channel)
        self._pools = gg.PoolServiceStub(self._channel)
        self._cost = gg.CostServiceStub(self._channel)

    def close(self) -> None:
        self._channel.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: Any, request: Any, timeout: float | None = None) -> Any:
        try:
            return method(request, metadata=self._metadata, timeout=timeout or self.timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    def _stream(self, method: Any, request: Any, timeout: float | None = None) -> Iterator[Any]:
        try:
            yield from method(request, metadata=self._metadata, timeout=timeout)
        except grpc.RpcError as err:
            raise from_rpc_error(err) from None

    # Jobs -----------------------------------------------------------------------------------------------------

    def submit(self, command: Sequence[str], **args: Unpack[c.SubmitArgs]) -> t.Job:
        """Submits a job (`command` is the argv list; name, cpu_millis and memory_mb are required, see
        `SubmitArgs`) and returns it, PENDING. Without an idempotency key one is made, so that a retried call
        never makes two jobs."""
        return self.submit_spec(c.job_spec(command, **args))

    def submit_spec(self, spec: t.JobSpec) -> t.Job:
        """Submits a spec as it is (e.g. read from a file); it gets an idempotency key if it has none."""
        if not spec.idempotency_key:
            spec.idempotency_key = c.new_idempotency_key()
        return self._call(self._jobs.SubmitJob, g.SubmitJobRequest(spec=spec))  # type: ignore[no-any-return]

    def dry_run(self, command: Sequence[str], **args: Unpack[c.SubmitArgs]) -> g.DryRunJobResponse:
        """What `submit` with the same arguments would do, creating nothing."""
        return self.dry_run_spec(c.job_spec(command, **args))

    def dry_run_spec(self, spec: t.JobSpec) -> g.DryRunJobResponse:
        return self._call(self._jobs.DryRunJob, g.DryRunJobRequest(spec=spec))  # type: ignore[no-any-return]

    def get(self, job_id: str) -> t.Job:
        return self._call(self._jobs.GetJob, g.GetJobRequest(job_id=job_id))  # type: ignore[no-any-return]

    def list(self, state: str | int | None = None, *, newest_first: bool = False) -> Iterator[t.Job]:
        """Every job of the caller's tenant (in `state`, if given), walking all pages."""
        request = g.ListJobsRequest(
            state=c.job_state(state), page_size=c.PAGE_SIZE, order_by="create_time desc" if newest_first else ""
        )
        while True:
            page = self._call(self._jobs.ListJobs, request)
            yield from page.jobs
            if not page.next_page_token:
                return
            request.page_token = page.next_page_token

    def cancel(self, job_id: str) -> t.Job:
        return self._call(self._jobs.CancelJob, g.CancelJobRequest(job_id=job_id))  # type: ignore[no-any-return]

    def watch(self, job_id: str, timeout: float | None = None) -> Iterator[t.Job]:
        """The job now, then at each change (state, attempt, queue position), until it ends; no polling. A stream
        the edge closed early is opened again."""
        end = None if timeout is None else time.monotonic() + timeout
        last: t.Job | None = None
        for _ in range(100):
            left = None if end is None else end - time.monotonic()
            if left is not None and left <= 0:
                raise Timeout(f"job {job_id} did not end within {timeout}s")
            try:
                for job in self._stream(self._jobs.WatchJob, g.WatchJobRequest(job_id=job_id), left):
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
                time.sleep(0.5)
        raise c.ended_early(last)

    def wait(self, job_id: str, timeout: float | None = None) -> t.Job:
        """Blocks until the job ends and returns it (raises `jobmesh.errors.Timeout` after `timeout` seconds)."""
        last = None
        for job in self.watch(job_id, timeout):
            last = job
        assert last is not None
        return last

    def logs(self, job_id: str, follow: bool = False, attempt: int = 0) -> Iterator[str]:
        """The job's output (stdout and stderr as written) in text chunks; with `follow`, until the job ends."""
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        request = g.GetJobLogsRequest(job_id=job_id, follow=follow, attempt=attempt)
        for body in self._stream(self._jobs.GetJobLogs, request, None if follow else self.timeout):
            text = decoder.decode(body.data)
            if text:
                yield text
        tail = decoder.decode(b"", final=True)
        if tail:
            yield tail

    # Tenants, pools, cost -------------------------------------------------------------------------------------

    def quota(self, tenant: str | None = None) -> quota_pb2.Quota:
        """A tenant's limits, usage and burst sessions (default: the token's tenant)."""
        request = g.GetQuotaRequest(tenant_id=c.tenant_or_own(tenant, self._token))
        return self._call(self._tenants.GetQuota, request)  # type: ignore[no-any-return]

    def burst(
        self,
        *,
        cpu_millis: int = 0,
        memory_mb: int = 0,
        concurrent_jobs: int = 0,
        duration_seconds: int = 600,
        tenant: str | None = None,
    ) -> quota_pb2.BurstSession:
        """Asks for a time-boxed burst session beyond the quota."""
        request = c.burst_request(
            c.tenant_or_own(tenant, self._token), cpu_millis, memory_mb, concurrent_jobs, duration_seconds
        )
        return self._call(self._tenants.RequestBurst, request)  # type: ignore[no-any-return]

    def pools(self) -> builtins.list[pool_pb2.Pool]:
        return list(self._call(self._pools.ListPools, g.ListPoolsRequest()).pools)

    def cost_report(
        self, start: str | None = None, end: str | None = None, tenant: str | None = None
    ) -> g.GetCostReportsResponse:
        """Cost by tenant, pool and day between RFC 3339 `start` and `end` (default: the last 30 days)."""
        request = g.GetCostReportsRequest(start=start or "", end=end or "", tenant_id=tenant or "")
        return self._call(self._cost.GetCostReports, request)  # type: ignore[no-any-return]
