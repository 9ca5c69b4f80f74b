"""The same API over native gRPC on the public port, with the same authentication."""

from __future__ import annotations

import grpc
import pytest

from devtools.launcher import Stack
from jobmesh.common.v1 import types_pb2 as t
from jobmesh.gateway.v1 import gateway_pb2 as g
from jobmesh.gateway.v1 import gateway_pb2_grpc
from tests.helpers import token, wait_for


def _spec(name: str, command: list[str]) -> t.JobSpec:
    return t.JobSpec(name=name, command=command, resources=t.Resources(cpu_millis=100, memory_mb=64))


@pytest.fixture()
def jobs(stack: Stack):  # type: ignore[no-untyped-def]
    with grpc.insecure_channel(stack.grpc_target) as channel:
        yield gateway_pb2_grpc.JobServiceStub(channel), [("authorization", f"Bearer {token(stack, 'acme')}")]


def test_submit_get_list_and_cancel_over_grpc(jobs) -> None:  # type: ignore[no-untyped-def]
    stub, auth = jobs
    job = stub.SubmitJob(g.SubmitJobRequest(spec=_spec("native", ["sh", "-c", "exit 4"])), metadata=auth, timeout=10)
    assert job.state == t.JOB_STATE_PENDING
    done = wait_for(
        lambda: (
            (j := stub.GetJob(g.GetJobRequest(job_id=job.job_id), metadata=auth, timeout=10)).state
            in (t.JOB_STATE_SUCCEEDED, t.JOB_STATE_FAILED)
            and j
        ),
        what="native job to end",
    )
    assert done.state == t.JOB_STATE_FAILED
    assert done.exit_code == 4
    listed = stub.ListJobs(g.ListJobsRequest(page_size=500), metadata=auth, timeout=10)
    assert job.job_id in {j.job_id for j in listed.jobs}

    sleeper = stub.SubmitJob(g.SubmitJobRequest(spec=_spec("sleeper", ["sleep", "60"])), metadata=auth, timeout=10)
    cancelled = stub.CancelJob(g.CancelJobRequest(job_id=sleeper.job_id), metadata=auth, timeout=10)
    assert cancelled.state == t.JOB_STATE_CANCELLED


def test_grpc_callers_are_authenticated_the_same_way(jobs) -> None:  # type: ignore[no-untyped-def]
    stub, _ = jobs
    for metadata in ([], [("authorization", "Bearer nope")]):
        with pytest.raises(grpc.RpcError) as caught:
            stub.ListJobs(g.ListJobsRequest(), metadata=metadata, timeout=10)
        assert caught.value.code() == grpc.StatusCode.UNAUTHENTICATED


def test_grpc_errors_carry_the_contract_status(jobs) -> None:  # type: ignore[no-untyped-def]
    stub, auth = jobs
    with pytest.raises(grpc.RpcError) as caught:
        stub.SubmitJob(g.SubmitJobRequest(spec=t.JobSpec(name="x")), metadata=auth, timeout=10)
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    with pytest.raises(grpc.RpcError) as caught:
        stub.GetJob(g.GetJobRequest(job_id="missing"), metadata=auth, timeout=10)
    assert caught.value.code() == grpc.StatusCode.NOT_FOUND


def test_internal_services_are_not_reachable_through_the_public_port(stack: Stack) -> None:
    from jobmesh.quota.v1 import quota_pb2, quota_pb2_grpc

    # Even with a valid admin token: the internal services have no route through the edge.
    admin = [("authorization", f"Bearer {token(stack, 'initech', admin=True)}")]
    with grpc.insecure_channel(stack.grpc_target) as channel:
        with pytest.raises(grpc.RpcError) as caught:
            quota_pb2_grpc.QuotaServiceStub(channel).UpdateQuota(
                quota_pb2.UpdateQuotaRequest(tenant_id="acme"), metadata=admin, timeout=10
            )
    assert caught.value.code() in (
        grpc.StatusCode.UNIMPLEMENTED,
        grpc.StatusCode.NOT_FOUND,
        grpc.StatusCode.UNAVAILABLE,
    )


def test_a_field_the_api_does_not_define_is_refused_by_number_not_dropped(stack: Stack) -> None:
    """A gRPC client built from other protos (or a crafted payload) sends field 101 inside the spec's resources:
    the gateway names it instead of acting as if it had not been sent, and creates nothing."""
    resources = t.Resources(cpu_millis=100, memory_mb=64).SerializeToString() + b"\xa8\x06\x05"  # field 101 = 5
    spec = t.JobSpec(name="unknown-field", command=["true"])
    # JobSpec.resources is field 4 (length-delimited): append it by hand, bytes and all.
    raw_spec = spec.SerializeToString() + b"\x22" + bytes([len(resources)]) + resources
    raw = b"\x0a" + bytes([len(raw_spec)]) + raw_spec  # SubmitJobRequest.spec is field 1
    assert t.JobSpec.DESCRIPTOR.fields_by_name["resources"].number == 4
    assert g.SubmitJobRequest.DESCRIPTOR.fields_by_name["spec"].number == 1
    auth = [("authorization", f"Bearer {token(stack, 'acme')}")]
    with grpc.insecure_channel(stack.grpc_target) as channel:
        submit = channel.unary_unary(
            "/jobmesh.gateway.v1.JobService/SubmitJob",
            request_serializer=lambda b: b,
            response_deserializer=t.Job.FromString,
        )
        with pytest.raises(grpc.RpcError) as caught:
            submit(raw, metadata=auth, timeout=10)
        listed = gateway_pb2_grpc.JobServiceStub(channel).ListJobs(
            g.ListJobsRequest(page_size=500), metadata=auth, timeout=10
        )
    assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "spec.resources.#101" in (caught.value.details() or "")
    assert "unknown-field" not in {j.spec.name for j in listed.jobs}
