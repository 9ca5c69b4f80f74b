"""What the public edge admits before any Python runs: JWT verification, per-tenant rate limits, the bound on
submits in flight, Envoy's overload manager, and the JSON/gRPC shape of the answers it gives on its own."""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass
from typing import Any

from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2

from libs.config import EdgeLimits

ERROR_DOMAIN = "jobmesh.dev"
JWT_PROVIDER = "jobmesh"
JWT_FILTER = "envoy.filters.http.jwt_authn"
RATE_LIMIT_FILTER = "envoy.filters.http.local_ratelimit"
# Where jwt_authn puts a verified token's claims (dynamic metadata of JWT_FILTER): the rate limits key on its tenant.
PAYLOAD_KEY = "jwt_payload"
SUBMIT_PATH = "/jobmesh.gateway.v1.JobService/SubmitJob"
SUBMIT_ROUTE = "submit"
# The most tenants that get a bucket of their own at once (a tenant id is only ever a verified token's claim).
MAX_TENANT_BUCKETS = 10_000


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


@dataclass(frozen=True)
class EdgeAuth:
    """Whose tokens the edge accepts: the mesh config's issuer and audience, and a JWKS file with the public keys the
    gateway verifies with (JOBMESH_JWT_KEYS, or the JWKS `libs.auth.jwks_document` makes of its PEM key)."""

    issuer: str
    audience: str
    keys_file: str


# Auth -------------------------------------------------------------------------------------------------------


def jwt_filter(auth: EdgeAuth, exempt_prefixes: tuple[str, ...], exempt_paths: tuple[str, ...] = ()) -> dict[str, Any]:
    """jwt_authn: every path needs a valid token (RS256, `exp`, `iss`, `aud`) except the exempt ones (the console's
    static files, the API's OpenAPI document); a missing or bad one is a 401 that never reaches the gateway. The
    token is forwarded (the gateway verifies it again, and takes the tenant and roles from it); its claims go to
    dynamic metadata for the rate limits."""
    exempt = [{"match": {"prefix": prefix}} for prefix in exempt_prefixes]
    exempt += [{"match": {"path": path}} for path in exempt_paths]
    exempt += [{"match": {"path": prefix.rstrip("/")}} for prefix in exempt_prefixes if prefix.endswith("/")]
    return {
        "name": JWT_FILTER,
        "typed_config": _typed(
            "envoy.extensions.filters.http.jwt_authn.v3.JwtAuthentication",
            providers={
                JWT_PROVIDER: {
                    "issuer": auth.issuer,
                    "audiences": [auth.audience],
                    "local_jwks": {"filename": auth.keys_file},
                    "from_headers": [{"name": "authorization", "value_prefix": "Bearer "}],
                    "forward": True,
                    "payload_in_metadata": PAYLOAD_KEY,
                    "clock_skew_seconds": 30,
                    # A token seen again (a client's every call) skips the RSA check until it expires: under a
                    # flood of refused calls this is most of what a refusal would cost.
                    "jwt_cache_config": {"jwt_cache_size": 1000},
                }
            },
            rules=[*exempt, {"match": {"prefix": "/"}, "requires": {"provider_name": JWT_PROVIDER}}],
        ),
    }


# Rate limits ------------------------------------------------------------------------------------------------


def _bucket(rate_per_second: float, burst: int) -> dict[str, Any]:
    # Whole tokens per fill: a rate of 2.5/s is 5 every 2 s; below 1/s, one every 1/rate s.
    tokens, interval_ms = _fill(rate_per_second)
    return {"max_tokens": burst, "tokens_per_fill": tokens, "fill_interval": f"{interval_ms / 1000:.3f}s"}


def _fill(rate_per_second: float) -> tuple[int, int]:
    """(tokens, interval in ms) that refill at `rate_per_second`."""
    if rate_per_second < 1:
        return 1, round(1000 / rate_per_second)
    for interval_ms in (1000, 2000, 4000, 5000, 10000):
        tokens = rate_per_second * interval_ms / 1000
        if abs(tokens - round(tokens)) < 1e-6:
            return round(tokens), interval_ms
    return max(1, round(rate_per_second)), 1000


def retry_after_for(rate_per_second: float) -> int:
    """The Retry-After of a tenant whose bucket is empty: by then at least one token has come back."""
    _, interval_ms = _fill(rate_per_second)
    return retry_after_seconds(interval_ms / 1000)


def _limiter(stat_prefix: str, rate_per_second: float, burst: int) -> dict[str, Any]:
    # One bucket per tenant (a descriptor with an empty value: a bucket for each value seen); a request with no
    # tenant (none of the public routes) falls to the default bucket of the same size. Only the tenant's bucket is
    # taken from, so one tenant's flood never empties another's.
    return _typed(
        "envoy.extensions.filters.http.local_ratelimit.v3.LocalRateLimit",
        stat_prefix=stat_prefix,
        token_bucket=_bucket(rate_per_second, burst),
        filter_enabled={"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        filter_enforced={"default_value": {"numerator": 100, "denominator": "HUNDRED"}},
        descriptors=[{"entries": [{"key": "tenant", "value": ""}], "token_bucket": _bucket(rate_per_second, burst)}],
        rate_limits=tenant_descriptor(),
        max_dynamic_descriptors=MAX_TENANT_BUCKETS,
        always_consume_default_token_bucket=False,
        rate_limited_as_resource_exhausted=True,
        local_rate_limit_per_downstream_connection=False,
    )


def rate_limit_filter(limits: EdgeLimits) -> dict[str, Any]:
    """local_ratelimit, after the transcoder (so REST and gRPC meet on one route): the reads bucket of each tenant
    here, the submit route's own in `submit_rate_limit`."""
    return {
        "name": RATE_LIMIT_FILTER,
        "typed_config": _limiter("tenant_reads", limits.read_rate_per_second, limits.read_burst),
    }


def submit_rate_limit(limits: EdgeLimits) -> dict[str, Any]:
    return _limiter("tenant_submits", limits.submit_rate_per_second, limits.submit_burst)


def tenant_descriptor() -> list[dict[str, Any]]:
    """The limiter's rate_limits: the descriptor (tenant, <the verified token's tenant claim>)."""
    return [
        {
            "actions": [
                {
                    "metadata": {
                        "descriptor_key": "tenant",
                        "metadata_key": {"key": JWT_FILTER, "path": [{"key": PAYLOAD_KEY}, {"key": "tenant"}]},
                        "source": "DYNAMIC",
                        "skip_if_absent": True,
                    }
                }
            ]
        }
    ]


# Shedding ---------------------------------------------------------------------------------------------------


def submit_circuit_breaker(limits: EdgeLimits) -> dict[str, Any]:
    """The submit cluster's bound on requests in flight to the gateway: beyond it Envoy answers at once (UO, mapped
    to 429 OVERLOADED) instead of queueing. Retries (only of submits that no gateway received: a gateway that just
    died, libs/envoy_config.py) are bounded alike; a bound of 0 would turn each of them into a 429."""
    bound = limits.max_inflight_submits
    return {
        "thresholds": [
            {"priority": "DEFAULT", "max_requests": bound, "max_pending_requests": bound, "max_retries": bound}
        ]
    }


def overload_manager(limits: EdgeLimits) -> dict[str, Any]:
    heap = "envoy.resource_monitors.fixed_heap"
    connections = "envoy.resource_monitors.global_downstream_max_connections"
    return {
        "refresh_interval": "0.25s",
        "resource_monitors": [
            {
                "name": heap,
                "typed_config": _typed(
                    "envoy.extensions.resource_monitors.fixed_heap.v3.FixedHeapConfig",
                    max_heap_size_bytes=limits.max_heap_mb * 1024 * 1024,
                ),
            },
            {
                "name": connections,
                "typed_config": _typed(
                    "envoy.extensions.resource_monitors.downstream_connections.v3.DownstreamConnectionsConfig",
                    max_active_downstream_connections=limits.max_connections,
                ),
            },
        ],
        "actions": [
            {
                "name": "envoy.overload_actions.shrink_heap",
                "triggers": [{"name": heap, "threshold": {"value": 0.9}}],
            },
            {
                "name": "envoy.overload_actions.stop_accepting_requests",
                "triggers": [{"name": heap, "threshold": {"value": 0.98}}],
            },
        ],
    }


# Envoy's own answers ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LocalError:
    """One kind of answer Envoy gives itself: how to recognise it, and what the caller gets."""

    filter: dict[str, Any]
    http_status: int
    code: int  # google.rpc.Code
    reason: str
    message: str
    retry_after: int = 0  # seconds; 0: no Retry-After


def _flag(flag: str, details: str) -> dict[str, Any]:
    # A filter may set its response flag only after its local reply went through the mappers, so the response code
    # details (set with the reply) are checked too.
    return {"or_filter": {"filters": [{"response_flag_filter": {"flags": [flag]}}, _details(details)]}}


def _details(code: str) -> dict[str, Any]:
    # jwt_authn says why it refused in the response code details (e.g. jwt_authn_access_denied{Jwt_is_expired}).
    return _cel(f"response.code_details.contains('{code}')")


def _cel(expression: str) -> dict[str, Any]:
    return {
        "extension_filter": {
            "name": "envoy.access_loggers.extension_filters.cel",
            "typed_config": _typed(
                "envoy.extensions.access_loggers.filters.cel.v3.ExpressionFilter", expression=expression
            ),
        }
    }


def _status_code(status: int) -> dict[str, Any]:
    return {
        "status_code_filter": {
            "comparison": {
                "op": "EQ",
                "value": {"default_value": status, "runtime_key": f"jobmesh.edge.status_{status}"},
            }
        }
    }


def admission_errors(limits: EdgeLimits) -> tuple[LocalError, ...]:
    """The refusals of this module's filters, first match wins (a 401 without a known cause is TOKEN_INVALID)."""
    unauthenticated = 16
    jwt_401 = _status_code(401)
    overloaded = (429, 8, "OVERLOADED", "the mesh is saturated, retry later", limits.overloaded_retry_after_seconds)
    return (
        LocalError(_flag("UO", "overflow"), *overloaded),
        LocalError(_flag("OM", "overload"), *overloaded),
        LocalError(
            _and(_flag("RL", "local_rate_limited"), _cel(f"xds.route_name == '{SUBMIT_ROUTE}'")),
            429,
            8,
            "RATE_LIMITED",
            f"the tenant's submit rate limit ({limits.submit_rate_per_second:g}/s) is exceeded",
            retry_after_for(limits.submit_rate_per_second),
        ),
        LocalError(
            _flag("RL", "local_rate_limited"),
            429,
            8,
            "RATE_LIMITED",
            f"the tenant's request rate limit ({limits.read_rate_per_second:g}/s) is exceeded",
            retry_after_for(limits.read_rate_per_second),
        ),
        LocalError(
            _and(jwt_401, _details("Jwt_is_missing")), 401, unauthenticated, "TOKEN_MISSING", "missing bearer token"
        ),
        LocalError(_and(jwt_401, _details("Jwt_is_expired")), 401, unauthenticated, "TOKEN_EXPIRED", "token expired"),
        LocalError(jwt_401, 401, unauthenticated, "TOKEN_INVALID", "invalid token"),
    )


def _and(*filters: dict[str, Any]) -> dict[str, Any]:
    return {"and_filter": {"filters": list(filters)}}


def status_details_bin(code: int, message: str, reason: str, retry_after: int) -> str:
    """The grpc-status-details-bin value (a google.rpc.Status with ErrorInfo, and RetryInfo when retrying helps)
    that a native gRPC caller finds on Envoy's own answer, as on the gateway's."""
    info = any_pb2.Any()
    metadata = {"retry_after_seconds": str(retry_after)} if retry_after else {}
    info.Pack(error_details_pb2.ErrorInfo(reason=reason, domain=ERROR_DOMAIN, metadata=metadata))
    details = [info]
    if retry_after:
        retry = any_pb2.Any()
        retry.Pack(error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(seconds=retry_after)))
        details.append(retry)
    status = status_pb2.Status(code=code, message=message, details=details)
    return base64.b64encode(status.SerializeToString()).decode().rstrip("=")


def local_reply_mappers(errors: tuple[LocalError, ...], rest_caller: dict[str, Any], body: Any) -> list[dict[str, Any]]:
    """Local reply mappers for `errors`: to REST callers the status and a JSON google.rpc.Status body (`body(code,
    reason)`), to native gRPC callers the gRPC code, message and status details; Retry-After to both."""
    mappers: list[dict[str, Any]] = []
    for err in errors:
        retry = [_header("retry-after", str(err.retry_after))] if err.retry_after else []
        mappers.append(
            {
                "filter": _and(err.filter, rest_caller),
                "status_code": err.http_status,
                "headers_to_add": retry,
                "body_format_override": body(err.code, err.reason, err.message),
            }
        )
        # A gRPC local reply's grpc-message is its body.
        grpc_headers = [
            _header("grpc-status", str(err.code)),
            _header("grpc-status-details-bin", status_details_bin(err.code, err.message, err.reason, err.retry_after)),
        ]
        mappers.append(
            {
                "filter": err.filter,
                "status_code": err.http_status,
                "headers_to_add": retry + grpc_headers,
                "body_format_override": {"text_format_source": {"inline_string": err.message}},
            }
        )
    return mappers


def _header(key: str, value: str) -> dict[str, Any]:
    return {"header": {"key": key, "value": value}, "append_action": "OVERWRITE_IF_EXISTS_OR_ADD"}


def retry_after_seconds(delay: float) -> int:
    """A Retry-After value: whole seconds, at least one."""
    return max(1, math.ceil(delay))
