"""Errors the mesh answers, as exceptions: one class per ErrorInfo reason, under one class per gRPC status.

Every error the API gives carries a `google.rpc.ErrorInfo` with a stable UPPER_SNAKE reason and metadata (see
the API reference, docs/api.md). `from_rpc_error` turns a failed call into the subclass named after its reason
(`QUOTA_EXCEEDED` -> `QuotaExceeded`), which is also an instance of the class of its status (`ResourceExhausted`),
so that callers can catch as narrowly or as broadly as they like. A reason this version does not know yet gives
the status class.
"""

from __future__ import annotations

import grpc
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "jobmesh.dev"


class JobmeshError(Exception):
    """Root of every error the client raises. `reason` is the ErrorInfo reason, `code` the gRPC status name,
    `metadata` the ErrorInfo metadata (e.g. `field` of a bad input, `limit` of an exceeded quota)."""

    code: str = "UNKNOWN"
    reason: str = "UNKNOWN"

    def __init__(self, message: str, *, reason: str | None = None, metadata: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        if reason:
            self.reason = reason
        self.metadata: dict[str, str] = dict(metadata or {})

    def __str__(self) -> str:
        return f"{self.reason}: {self.message}"


# One class per status -----------------------------------------------------------------------------------------


class InvalidArgument(JobmeshError):
    code = reason = "INVALID_ARGUMENT"

    @property
    def field(self) -> str:
        return self.metadata.get("field", "")


class Unauthenticated(JobmeshError):
    code = reason = "UNAUTHENTICATED"


class PermissionDenied(JobmeshError):
    code = reason = "PERMISSION_DENIED"


class NotFound(JobmeshError):
    code = reason = "NOT_FOUND"


class FailedPrecondition(JobmeshError):
    code = reason = "FAILED_PRECONDITION"


class ResourceExhausted(JobmeshError):
    code = reason = "RESOURCE_EXHAUSTED"

    @property
    def retry_after_seconds(self) -> float | None:
        value = self.metadata.get("retry_after_seconds")
        return float(value) if value else None


class Unavailable(JobmeshError):
    code = reason = "UNAVAILABLE"


class DeadlineExceeded(JobmeshError):
    code = reason = "DEADLINE_EXCEEDED"


class Internal(JobmeshError):
    code = reason = "INTERNAL"


# One class per reason -----------------------------------------------------------------------------------------


class TokenMissing(Unauthenticated):
    reason = "TOKEN_MISSING"


class TokenMalformed(Unauthenticated):
    reason = "TOKEN_MALFORMED"


class TokenExpired(Unauthenticated):
    reason = "TOKEN_EXPIRED"


class TokenInvalid(Unauthenticated):
    reason = "TOKEN_INVALID"


class UnknownTenant(Unauthenticated):
    reason = "UNKNOWN_TENANT"


class TenantForbidden(PermissionDenied):
    reason = "TENANT_FORBIDDEN"


class AdminOnly(PermissionDenied):
    reason = "ADMIN_ONLY"


class SpecTooLarge(InvalidArgument):
    reason = "SPEC_TOO_LARGE"


class Unschedulable(InvalidArgument):
    reason = "UNSCHEDULABLE"


class NeverFits(InvalidArgument):
    reason = "NEVER_FITS"


class JobFinished(FailedPrecondition):
    reason = "JOB_FINISHED"


class JobNotFound(NotFound):
    reason = "JOB_NOT_FOUND"


class PoolNotFound(NotFound):
    reason = "POOL_NOT_FOUND"


class TenantNotFound(NotFound):
    reason = "TENANT_NOT_FOUND"


class RouteNotFound(NotFound):
    reason = "ROUTE_NOT_FOUND"


class QuotaExceeded(ResourceExhausted):
    """Admitting the job would exceed a quota limit: `limit` names the resource (cpu_millis, memory_mb,
    concurrent_jobs), `limit_value` its limit and `usage` what is in use."""

    reason = "QUOTA_EXCEEDED"

    @property
    def limit(self) -> str:
        return self.metadata.get("limit", "")

    @property
    def limit_value(self) -> int | None:
        value = self.metadata.get("limit_value")
        return int(value) if value else None

    @property
    def usage(self) -> int | None:
        value = self.metadata.get("usage")
        return int(value) if value else None


class PayloadTooLarge(ResourceExhausted):
    reason = "PAYLOAD_TOO_LARGE"


class BurstUnavailable(ResourceExhausted):
    reason = "BURST_UNAVAILABLE"


class BudgetExceeded(ResourceExhausted):
    reason = "BUDGET_EXCEEDED"


class TooManyJobs(ResourceExhausted):
    reason = "TOO_MANY_JOBS"


class StoreUnavailable(Unavailable):
    reason = "STORE_UNAVAILABLE"


class DependencyUnavailable(Unavailable):
    reason = "DEPENDENCY_UNAVAILABLE"


class DependencyTimeout(DeadlineExceeded):
    reason = "DEPENDENCY_TIMEOUT"


class Timeout(DeadlineExceeded):
    """The client's own deadline passed (e.g. `wait(timeout=...)`)."""

    reason = "TIMEOUT"


def _subclasses(cls: type[JobmeshError]) -> list[type[JobmeshError]]:
    out = []
    for sub in cls.__subclasses__():
        out += [sub, *_subclasses(sub)]
    return out


# ErrorInfo reason -> class, and gRPC status name -> class.
BY_REASON: dict[str, type[JobmeshError]] = {c.reason: c for c in _subclasses(JobmeshError)}
BY_CODE: dict[str, type[JobmeshError]] = {c.code: c for c in JobmeshError.__subclasses__()}


def make(code: str, reason: str, message: str, metadata: dict[str, str] | None = None) -> JobmeshError:
    cls = BY_REASON.get(reason)
    if cls is None or cls.code != code:
        cls = BY_CODE.get(code, JobmeshError)
    return cls(message, reason=reason or code, metadata=metadata)


def from_rpc_error(err: grpc.RpcError) -> JobmeshError:
    """The exception for a failed call: its ErrorInfo (from the `grpc-status-details-bin` trailer) when there is
    one, else its status alone (e.g. UNAVAILABLE when the mesh cannot be reached)."""
    code = err.code() if hasattr(err, "code") else grpc.StatusCode.UNKNOWN
    details = err.details() if hasattr(err, "details") else ""
    trailers = err.trailing_metadata() if hasattr(err, "trailing_metadata") else None
    reason, metadata = "", {}
    for key, value in trailers or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            details = status.message or details
            for detail in status.details:
                info = error_details_pb2.ErrorInfo()
                if detail.Unpack(info):
                    reason, metadata = info.reason, dict(info.metadata)
    name = code.name if isinstance(code, grpc.StatusCode) else "UNKNOWN"
    return make(name, reason, details or name.lower().replace("_", " "), metadata)
