"""Domain errors: each carries the gRPC status and the stable reason code callers see."""

from __future__ import annotations

import grpc

from jobmesh.common.v1 import types_pb2 as t


class JobMeshError(Exception):
    """Root of every error we raise on purpose; the server interceptor maps it to a status."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL
    reason: str = "INTERNAL"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason is not None:
            self.reason = reason
        self.metadata = dict(metadata or {})


class Unauthenticated(JobMeshError):
    code = grpc.StatusCode.UNAUTHENTICATED
    reason = "UNAUTHENTICATED"


class PermissionDenied(JobMeshError):
    code = grpc.StatusCode.PERMISSION_DENIED
    reason = "PERMISSION_DENIED"


class InvalidArgument(JobMeshError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    reason = "INVALID_ARGUMENT"

    def __init__(self, field: str, message: str, *, reason: str | None = None):
        super().__init__(f"{field}: {message}", reason=reason, metadata={"field": field})
        self.field = field


class NotFound(JobMeshError):
    code = grpc.StatusCode.NOT_FOUND
    reason = "NOT_FOUND"


class ResourceExhausted(JobMeshError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    reason = "RESOURCE_EXHAUSTED"


class FailedPrecondition(JobMeshError):
    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "FAILED_PRECONDITION"


class Unavailable(JobMeshError):
    code = grpc.StatusCode.UNAVAILABLE
    reason = "UNAVAILABLE"


class Conflict(JobMeshError):
    """An etcd transaction lost a race; the caller re-reads and retries."""

    code = grpc.StatusCode.ABORTED
    reason = "CONFLICT"


class NotLeader(JobMeshError):
    """A fenced write was attempted by a replica that no longer holds leadership."""

    code = grpc.StatusCode.FAILED_PRECONDITION
    reason = "NOT_LEADER"


def item_error(err: JobMeshError) -> t.ItemError:
    """One failed item of a batch call, as the single call would have failed."""
    return t.ItemError(code=err.code.name, message=err.message, reason=err.reason, metadata=err.metadata)


def from_item_error(item: t.ItemError) -> JobMeshError:
    """The error a caller of the single call would have got back (unknown codes become INTERNAL)."""
    err = JobMeshError(item.message, reason=item.reason or None, metadata=dict(item.metadata))
    err.code = grpc.StatusCode.__members__.get(item.code, grpc.StatusCode.INTERNAL)
    return err
