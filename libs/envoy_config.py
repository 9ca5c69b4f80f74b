"""Renders the Envoy bootstrap for the public edge: REST/JSON transcoding and native gRPC on one port."""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libs import envoy_admission as admission
from libs import envoy_fields
from libs.config import EdgeLimits, MeshConfig, load_config
from libs.envoy_admission import EdgeAuth

PUBLIC_SERVICES: tuple[str, ...] = (
    "jobmesh.gateway.v1.JobService",
    "jobmesh.gateway.v1.TenantService",
    "jobmesh.gateway.v1.PoolService",
    "jobmesh.gateway.v1.CostService",
    "jobmesh.gateway.v1.MetricsService",
    "jobmesh.gateway.v1.ApiService",
)

# Largest request body accepted from a client (REST JSON or a native gRPC message); larger is 413.
MAX_REQUEST_BODY_BYTES = 1024 * 1024
# Largest transcoded response body (e.g. the Prometheus exposition) Envoy will buffer.
MAX_RESPONSE_BODY_BYTES = 16 * 1024 * 1024
ROUTE_TIMEOUT_SECONDS = 60
# Streams that stay open while a job runs (watch, log follow): no route timeout, only the client's own deadline,
# and this long without a message before Envoy ends one (a client reconnects).
STREAMING_METHODS: tuple[str, ...] = (
    "/jobmesh.gateway.v1.JobService/WatchJob",
    "/jobmesh.gateway.v1.JobService/GetJobLogs",
)
STREAM_IDLE_ROUTE_SECONDS = 3600
# Open to callers without a token: the API's description, over REST and native gRPC.
OPEN_PATHS: tuple[str, ...] = ("/api/v1/openapi.yaml", "/jobmesh.gateway.v1.ApiService/GetOpenApiDocument")
CONNECT_TIMEOUT_SECONDS = 1
STREAM_IDLE_TIMEOUT_SECONDS = 300
REQUEST_HEADERS_TIMEOUT_SECONDS = 10
ENVOY_LOG_LEVEL = "warning"
# Where Kubernetes mounts the jobmesh-jwt-keys Secret, in the gateway's pod and in Envoy's.
JWT_KEYS_MOUNT = "/var/run/secrets/jobmesh/jwt"

# Several gateways (stateless) behind one cluster: Envoy health-checks them (gRPC health of the JobService, which a
# stopping gateway reports NOT_SERVING first), ejects one whose connections fail at once, and sends a request that
# no gateway received to another, so that losing a gateway costs a caller at most one retry (see _retry_policy).
GATEWAY_HEALTH_SERVICE = "jobmesh.gateway.v1.JobService"
HEALTH_CHECK_INTERVAL_MS = 1000
# How long a gateway whose connection failed stays out of the balancing (each further ejection: once more).
EJECTION_SECONDS = 2
# Tries after the first, each on a gateway not tried yet for this request.
GATEWAY_RETRIES = 2

_GATEWAY_CLUSTER = "jobmesh_gateway"
# The same gateway for submits alone, so that a bound on submits in flight (a circuit breaker) applies to them only.
_SUBMIT_CLUSTER = "jobmesh_gateway_submits"
_CONSOLE_CLUSTER = "jobmesh_console"
CONSOLE_PREFIX = "/console/"
CONSOLE_ID = "spiffe://jobmesh/service/console"
CONSOLE_ROUTE_TIMEOUT_SECONDS = 10
_ERROR_DOMAIN = "jobmesh.dev"
# The transcoder rewrites :method to POST, so the client's method is saved before it runs.
_METHOD_STATE_KEY = "jobmesh.edge.request_method"

# Envoy's own error answers (not the gateway's) to REST callers, as
# (HTTP status, google.rpc.Code, ErrorInfo reason); any other status gets _FALLBACK_ERROR.
_LOCAL_ERRORS: tuple[tuple[int, int, str], ...] = (
    (400, 3, "INVALID_ARGUMENT"),
    (404, 5, "ROUTE_NOT_FOUND"),
    (413, 8, "PAYLOAD_TOO_LARGE"),
    (503, 14, "DEPENDENCY_UNAVAILABLE"),
    (504, 4, "DEPENDENCY_TIMEOUT"),
)
_FALLBACK_ERROR: tuple[int, str] = (2, "EDGE_ERROR")

# One line per request. No header but x-request-id is logged, so bearer tokens stay out of the log.
# grpc= is the real status for native gRPC; for REST it is derived from the HTTP status.
_ACCESS_LOG_FORMAT = (
    "[%START_TIME(%Y-%m-%dT%H:%M:%S.%3fZ)%] "
    f'"%FILTER_STATE({_METHOD_STATE_KEY}:PLAIN)% %REQ(X-ENVOY-ORIGINAL-PATH?:PATH)% %PROTOCOL%" '
    "%RESPONSE_CODE% grpc=%GRPC_STATUS_NUMBER% flags=%RESPONSE_FLAGS% "
    "in=%BYTES_RECEIVED% out=%BYTES_SENT% %DURATION%ms upstream=%UPSTREAM_HOST% id=%REQ(X-REQUEST-ID)%\n"
)


def _seconds(value: int) -> str:
    return f"{value}s"


def _socket_address(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host, "port_value": port}}


def _typed(type_name: str, **fields: Any) -> dict[str, Any]:
    return {"@type": f"type.googleapis.com/{type_name}", **fields}


@dataclass(frozen=True)
class EnvoyTls:
    """Envoy's mesh identity for its hop to the gateway: two SDS files (rendered by `sds_files`) that point at
    the certificate, key and CA files. Envoy watches their directories, so renewed files are used for new
    connections without a restart."""

    identity_sds: str  # SDS file with the `envoy_identity` TlsCertificate secret
    validation_sds: str  # SDS file with the `mesh_ca` validation context secret
    watched_dir: str  # the directory the certificate files are replaced in
    gateway_id: str = "spiffe://jobmesh/service/gateway"  # the only peer identity accepted upstream


_IDENTITY_SECRET = "envoy_identity"
_VALIDATION_SECRET = "mesh_ca"


def _sds_file(secret: dict[str, Any]) -> str:
    secret_type = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3.Secret"
    return json.dumps({"resources": [{"@type": secret_type, **secret}]}, indent=2) + "\n"


def sds_files(cert: str, key: str, ca: str) -> tuple[str, str]:
    """The contents of the identity and the validation SDS files (file paths inside, never key material)."""
    identity = _sds_file(
        {
            "name": _IDENTITY_SECRET,
            "tls_certificate": {"certificate_chain": {"filename": cert}, "private_key": {"filename": key}},
        }
    )
    validation = _sds_file({"name": _VALIDATION_SECRET, "validation_context": {"trusted_ca": {"filename": ca}}})
    return identity, validation


def _sds_ref(name: str, path: str, watched_dir: str) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {"path_config_source": {"path": path, "watched_directory": {"path": watched_dir}}},
    }


def _upstream_tls(tls: EnvoyTls, peer_id: str = "", alpn: str = "h2") -> dict[str, Any]:
    # mTLS upstream: Envoy's own certificate, the peer's verified against the mesh CA and pinned to its SPIFFE
    # id (the gateway's unless told otherwise). Never without verification.
    return {
        "name": "envoy.transport_sockets.tls",
        "typed_config": _typed(
            "envoy.extensions.transport_sockets.tls.v3.UpstreamTlsContext",
            common_tls_context={
                "alpn_protocols": [alpn],
                "tls_certificate_sds_secret_configs": [_sds_ref(_IDENTITY_SECRET, tls.identity_sds, tls.watched_dir)],
                "combined_validation_context": {
                    "default_validation_context": {
                        "match_typed_subject_alt_names": [
                            {"san_type": "URI", "matcher": {"exact": peer_id or tls.gateway_id}}
                        ]
                    },
                    "validation_context_sds_secret_config": _sds_ref(
                        _VALIDATION_SECRET, tls.validation_sds, tls.watched_dir
                    ),
                },
            },
        ),
    }


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _gateway_health_check() -> dict[str, Any]:
    # Over the cluster's own mTLS (health is open to every mesh identity, libs/authz.py); a restarted gateway is
    # back after one good answer, a dead or hung one out after two missed ones.
    interval = f"{HEALTH_CHECK_INTERVAL_MS / 1000:g}s"
    return {
        "timeout": interval,
        "interval": interval,
        "no_traffic_interval": interval,
        "unhealthy_threshold": 2,
        "healthy_threshold": 1,
        "grpc_health_check": {"service_name": GATEWAY_HEALTH_SERVICE},
    }


def _gateway_outlier_detection() -> dict[str, Any]:
    # Only failures of Envoy's own to reach a gateway (refused, reset, timed out) eject it: a gateway's error answers
    # (e.g. 503 while quota fails over) say nothing about the gateway and must not eject a healthy one.
    return {
        "split_external_local_origin_errors": True,
        "consecutive_local_origin_failure": 1,
        "enforcing_consecutive_local_origin_failure": 100,
        "enforcing_consecutive_5xx": 0,
        "enforcing_success_rate": 0,
        "enforcing_local_origin_success_rate": 0,
        "interval": "1s",
        "base_ejection_time": _seconds(EJECTION_SECONDS),
        "max_ejection_percent": 50,
    }


def _gateway_cluster(
    gateways: Sequence[tuple[str, int]], tls: EnvoyTls, limits: EdgeLimits, name: str = _GATEWAY_CLUSTER
) -> dict[str, Any]:
    if all(_is_address(host) for host, _ in gateways):
        discovery: dict[str, Any] = {"type": "STATIC"}
    else:  # a name (a headless Service): every address it resolves to is a gateway
        discovery = {"type": "STRICT_DNS", "dns_lookup_family": "V4_PREFERRED"}
    endpoints = [{"endpoint": {"address": _socket_address(host, port)}} for host, port in gateways]
    cluster = {
        "name": name,
        **discovery,
        "connect_timeout": _seconds(CONNECT_TIMEOUT_SECONDS),
        "lb_policy": "ROUND_ROBIN",
        "transport_socket": _upstream_tls(tls),
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        },
        "per_connection_buffer_limit_bytes": limits.per_connection_buffer_kb * 1024,
        "load_assignment": {"cluster_name": name, "endpoints": [{"lb_endpoints": endpoints}]},
        "health_checks": [_gateway_health_check()],
        "outlier_detection": _gateway_outlier_detection(),
    }
    if name == _SUBMIT_CLUSTER:
        cluster["circuit_breakers"] = admission.submit_circuit_breaker(limits)
    return cluster


def _console_cluster(console_port: int, tls: EnvoyTls) -> dict[str, Any]:
    # The console's static-file service on loopback (HTTP/1.1 over mTLS, pinned to the console's identity).
    return {
        "name": _CONSOLE_CLUSTER,
        "type": "STATIC",
        "connect_timeout": _seconds(CONNECT_TIMEOUT_SECONDS),
        "lb_policy": "ROUND_ROBIN",
        "transport_socket": _upstream_tls(tls, CONSOLE_ID, "http/1.1"),
        "load_assignment": {
            "cluster_name": _CONSOLE_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address("127.0.0.1", console_port)}}]}],
        },
    }


_OTLP_CLUSTER = "otel_collector"


def _otlp_cluster(collector: tuple[str, int]) -> dict[str, Any]:
    # An OTLP/gRPC collector (cleartext HTTP/2, as the services' exporters use), for Envoy's spans.
    host, port = collector
    return {
        "name": _OTLP_CLUSTER,
        "type": "STRICT_DNS",
        "connect_timeout": _seconds(CONNECT_TIMEOUT_SECONDS),
        "lb_policy": "ROUND_ROBIN",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": _typed(
                "envoy.extensions.upstreams.http.v3.HttpProtocolOptions",
                explicit_http_config={"http2_protocol_options": {}},
            )
        },
        "load_assignment": {
            "cluster_name": _OTLP_CLUSTER,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _socket_address(host, port)}}]}],
        },
    }


def _tracing() -> dict[str, Any]:
    # Envoy's span of each request, sent to the collector; its W3C traceparent goes on to the gateway, whose spans
    # (and through the job record, the whole job's) become children of it.
    return {
        "provider": {
            "name": "envoy.tracers.opentelemetry",
            "typed_config": _typed(
                "envoy.config.trace.v3.OpenTelemetryConfig",
                grpc_service={"envoy_grpc": {"cluster_name": _OTLP_CLUSTER}, "timeout": "1s"},
                service_name="envoy",
            ),
        }
    }


def otlp_collector(env: dict[str, str]) -> tuple[str, int] | None:
    """Where Envoy sends its spans: the collector the services export to when they export over OTLP (the same
    variables as libs/settings.py TelemetrySettings), else nowhere."""
    exporter = env.get("JOBMESH_OTEL_EXPORTER") or env.get("OTEL_TRACES_EXPORTER") or "none"
    if exporter != "otlp":
        return None
    endpoint = (
        env.get("JOBMESH_OTEL_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or "127.0.0.1:4317"
    )
    host, _, port = endpoint.split("://")[-1].rstrip("/").rpartition(":")
    return host.strip("[]") or "127.0.0.1", int(port or 4317)


def _console_routes() -> list[dict[str, Any]]:
    # Static files, not gRPC: the transcoder (which refuses paths it cannot map to a method) is off here.
    off = _typed("envoy.config.route.v3.FilterConfig", disabled=True)
    transcoder_off = {"envoy.filters.http.grpc_json_transcoder": off, admission.RATE_LIMIT_FILTER: off}
    return [
        {
            "name": "console_redirect",
            "match": {"path": CONSOLE_PREFIX.rstrip("/")},
            "redirect": {"path_redirect": CONSOLE_PREFIX},
            "typed_per_filter_config": transcoder_off,
        },
        {
            "name": "console",
            "match": {"prefix": CONSOLE_PREFIX},
            "route": {"cluster": _CONSOLE_CLUSTER, "timeout": _seconds(CONSOLE_ROUTE_TIMEOUT_SECONDS)},
            "typed_per_filter_config": transcoder_off,
        },
    ]


def _remember_method_filter() -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.set_filter_state",
        "typed_config": _typed(
            "envoy.extensions.filters.http.set_filter_state.v3.Config",
            on_request_headers=[
                {
                    "object_key": _METHOD_STATE_KEY,
                    "factory_key": "envoy.string",
                    "format_string": {"text_format_source": {"inline_string": "%REQ(:METHOD)%"}},
                }
            ],
        ),
    }


def _body_limit_filter() -> dict[str, Any]:
    # The transcoder's own max_request_body_size does not stop a unary JSON body from being
    # streamed upstream, so the whole request is buffered here first; overflow is a 413.
    return {
        "name": "envoy.filters.http.buffer",
        "typed_config": _typed(
            "envoy.extensions.filters.http.buffer.v3.Buffer",
            max_request_bytes=MAX_REQUEST_BODY_BYTES,
        ),
    }


def _transcoder_filter(descriptor_path: str) -> dict[str, Any]:
    return {
        "name": "envoy.filters.http.grpc_json_transcoder",
        "typed_config": _typed(
            "envoy.extensions.filters.http.grpc_json_transcoder.v3.GrpcJsonTranscoder",
            proto_descriptor=descriptor_path,
            services=list(PUBLIC_SERVICES),
            print_options={
                "add_whitespace": False,
                "preserve_proto_field_names": True,
                "always_print_primitive_fields": True,
                "always_print_enums_as_ints": False,
                # A streamed answer (WatchJob) is one JSON object per line, not one array: readable as it comes.
                "stream_newline_delimited": True,
            },
            convert_grpc_status=True,
            ignore_unknown_query_parameters=False,
            request_validation_options={
                "reject_unknown_method": True,
                "reject_unknown_query_parameters": True,
                "reject_binding_body_field_collisions": True,
            },
            case_insensitive_enum_parsing=False,
            max_request_body_size=MAX_REQUEST_BODY_BYTES,
            max_response_body_size=MAX_RESPONSE_BODY_BYTES,
        ),
    }


def read_methods() -> tuple[str, ...]:
    """The public methods the API binds to GET (reads, streams included): sending one again is harmless."""
    from google.api import annotations_pb2

    from jobmesh.gateway.v1 import gateway_pb2

    return tuple(
        f"/{service.full_name}/{method.name}"
        for service in gateway_pb2.DESCRIPTOR.services_by_name.values()
        if service.full_name in PUBLIC_SERVICES
        for method in service.methods
        if method.GetOptions().Extensions[annotations_pb2.http].WhichOneof("pattern") == "get"
    )


def _retry_policy(read: bool) -> dict[str, Any]:
    # A request no gateway received (its connection was refused, or reset before the request went out: a gateway
    # that just died) is sent to another gateway whatever it is. One a gateway may have received (reset after it
    # went out) is sent again only for a read: a write is answered 503 UNAVAILABLE and left to the caller, who
    # knows whether it is safe (a submit with an idempotency key is; the Python client always sends one).
    conditions = ["connect-failure", "refused-stream", "reset-before-request", *(["reset"] if read else [])]
    return {
        "retry_on": ",".join(conditions),
        "num_retries": GATEWAY_RETRIES,
        "retry_host_predicate": [
            {
                "name": "envoy.retry_host_predicates.previous_hosts",
                "typed_config": _typed("envoy.extensions.retry.host.previous_hosts.v3.PreviousHostsPredicate"),
            }
        ],
        "host_selection_retry_max_attempts": 3,
        "retry_back_off": {"base_interval": "0.025s", "max_interval": "0.25s"},
    }


def _gateway_route(cluster: str, read: bool = False) -> dict[str, Any]:
    return {
        "cluster": cluster,
        "timeout": _seconds(ROUTE_TIMEOUT_SECONDS),
        "max_stream_duration": {"grpc_timeout_header_max": _seconds(ROUTE_TIMEOUT_SECONDS)},
        "retry_policy": _retry_policy(read),
    }


def _routes(limits: EdgeLimits, console: bool = False) -> list[dict[str, Any]]:
    # The transcoder rewrites a matched REST request to its gRPC path before routing, so these
    # prefixes carry both REST and native gRPC traffic; every other path (internal services
    # included) falls through to the 404 below and never reaches the gateway. Submits have a route of their
    # own: their own rate limit per tenant, and their own cluster with its bound on submits in flight.
    routes: list[dict[str, Any]] = [
        {
            "name": method.rsplit("/", 1)[-1],
            "match": {"path": method, "grpc": {}},
            "route": {
                "cluster": _GATEWAY_CLUSTER,
                "timeout": "0s",
                "idle_timeout": _seconds(STREAM_IDLE_ROUTE_SECONDS),
                "max_stream_duration": {"grpc_timeout_header_max": "0s"},
                "retry_policy": _retry_policy(read=True),
            },
        }
        for method in STREAMING_METHODS
    ]
    routes += [
        {
            "name": admission.SUBMIT_ROUTE,
            "match": {"path": admission.SUBMIT_PATH, "grpc": {}},
            "route": _gateway_route(_SUBMIT_CLUSTER),
            "typed_per_filter_config": {admission.RATE_LIMIT_FILTER: admission.submit_rate_limit(limits)},
        }
    ]
    # Reads have routes of their own only for their retry policy; everything else goes by its service's prefix.
    routes += [
        {
            "name": method.rsplit("/", 1)[-1],
            "match": {"path": method, "grpc": {}},
            "route": _gateway_route(_GATEWAY_CLUSTER, read=True),
        }
        for method in read_methods()
        if method not in STREAMING_METHODS
    ]
    routes += [
        {"name": service, "match": {"prefix": f"/{service}/", "grpc": {}}, "route": _gateway_route(_GATEWAY_CLUSTER)}
        for service in PUBLIC_SERVICES
    ]
    if console:
        routes += _console_routes()
    routes.append(
        {
            "name": "not_found",
            "match": {"prefix": "/"},
            "direct_response": {
                "status": 404,
                "body": {"inline_string": "no such endpoint"},
            },
        }
    )
    return routes


def _rest_caller_filter() -> dict[str, Any]:
    # Native gRPC callers keep Envoy's gRPC-shaped local replies (trailers-only, grpc-status);
    # everyone else is a REST caller. A transcoded request already carries a gRPC content type
    # when Envoy answers it, so the transcoder's x-envoy-original-path marks it as REST.
    not_grpc = {
        "header_filter": {
            "header": {
                "name": "content-type",
                "string_match": {"prefix": "application/grpc"},
                "invert_match": True,
                "treat_missing_header_as_empty": True,
            }
        }
    }
    transcoded = {"header_filter": {"header": {"name": "x-envoy-original-path", "present_match": True}}}
    return {"or_filter": {"filters": [not_grpc, transcoded]}}


def _status_json(code: int, reason: str, message: str = "%LOCAL_REPLY_BODY%") -> dict[str, Any]:
    detail = {
        "@type": "type.googleapis.com/google.rpc.ErrorInfo",
        "reason": reason,
        "domain": _ERROR_DOMAIN,
    }
    return {
        "json_format": {
            "code": code,
            "message": message,
            "details": [detail],
        },
        "content_type": "application/json",
    }


def _unknown_fields_filter() -> dict[str, Any]:
    from jobmesh.gateway.v1 import gateway_pb2

    return envoy_fields.lua_filter((gateway_pb2.DESCRIPTOR,), PUBLIC_SERVICES)


def _local_reply_config(limits: EdgeLimits) -> dict[str, Any]:
    # The refusals of the admission filters and of the unknown-field check first (they also answer native gRPC
    # callers with status details).
    errors = admission.admission_errors(limits)
    mappers = [
        envoy_fields.local_reply_mapper(_rest_caller_filter(), _ERROR_DOMAIN),
        *admission.local_reply_mappers(errors, _rest_caller_filter(), _status_json),
    ]
    for http_status, code, reason in _LOCAL_ERRORS:
        status_filter = {
            "status_code_filter": {
                "comparison": {
                    "op": "EQ",
                    "value": {
                        "default_value": http_status,
                        "runtime_key": f"jobmesh.edge.status_{http_status}",
                    },
                }
            }
        }
        mappers.append(
            {
                "filter": {"and_filter": {"filters": [status_filter, _rest_caller_filter()]}},
                "body_format_override": _status_json(code, reason),
            }
        )
    mappers.append(
        {
            "filter": _rest_caller_filter(),
            "body_format_override": _status_json(*_FALLBACK_ERROR),
        }
    )
    return {"mappers": mappers}


def _http_connection_manager(
    descriptor_path: str, auth: EdgeAuth, limits: EdgeLimits, console: bool = False, traced: bool = False
) -> dict[str, Any]:
    hcm = _http_connection_manager_untraced(descriptor_path, auth, limits, console)
    if traced:
        hcm["tracing"] = _tracing()
    return hcm


def _http_connection_manager_untraced(
    descriptor_path: str, auth: EdgeAuth, limits: EdgeLimits, console: bool
) -> dict[str, Any]:
    return _typed(
        "envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager",
        stat_prefix="jobmesh_edge",
        codec_type="AUTO",
        # This is the edge: trust the peer address, not client-sent X-Forwarded-For, and drop
        # client-sent x-envoy-* headers.
        use_remote_address=True,
        stream_idle_timeout=_seconds(STREAM_IDLE_TIMEOUT_SECONDS),
        request_headers_timeout=_seconds(REQUEST_HEADERS_TIMEOUT_SECONDS),
        http2_protocol_options={
            "max_concurrent_streams": 100,
            "initial_stream_window_size": 65536,
            "initial_connection_window_size": 1048576,
        },
        normalize_path=True,
        merge_slashes=True,
        path_with_escaped_slashes_action="REJECT_REQUEST",
        access_log=[
            {
                "name": "envoy.access_loggers.stdout",
                "typed_config": _typed(
                    "envoy.extensions.access_loggers.stream.v3.StdoutAccessLog",
                    log_format={"text_format_source": {"inline_string": _ACCESS_LOG_FORMAT}},
                ),
            }
        ],
        local_reply_config=_local_reply_config(limits),
        route_config={
            "name": "jobmesh_public",
            "virtual_hosts": [{"name": "jobmesh", "domains": ["*"], "routes": _routes(limits, console)}],
        },
        # The token is checked first, before a body is read; the rate limits after the transcoder, where a REST
        # call and its native gRPC twin have the same route.
        http_filters=[
            admission.jwt_filter(auth, (CONSOLE_PREFIX,) if console else (), OPEN_PATHS),
            _remember_method_filter(),
            _body_limit_filter(),
            _unknown_fields_filter(),
            _transcoder_filter(descriptor_path),
            admission.rate_limit_filter(limits),
            {
                "name": "envoy.filters.http.router",
                "typed_config": _typed("envoy.extensions.filters.http.router.v3.Router"),
            },
        ],
    )


def render_envoy_config(
    *,
    listen_host: str,
    listen_port: int,
    admin_socket: str,
    gateways: Sequence[tuple[str, int]],
    descriptor_path: str,
    tls: EnvoyTls,
    auth: EdgeAuth,
    limits: EdgeLimits,
    console_port: int | None = None,
    otlp: tuple[str, int] | None = None,
) -> str:
    """Return the Envoy v3 bootstrap (as JSON, which is also valid YAML) for the public edge.

    One listener on ``listen_host:listen_port`` speaks HTTP/1.1 and cleartext HTTP/2 (codec AUTO).
    REST under ``/api/v1/`` is transcoded to gRPC with the descriptor set at ``descriptor_path``
    (JSON uses proto field names and enum names; gRPC errors come back as JSON google.rpc.Status
    with their details); native gRPC to the public ``jobmesh.gateway.v1`` services passes as is.
    Both go over HTTP/2 to the gateways at ``gateways`` (host, port each; a host name is resolved to every address
    it has), health-checked, with a failed connection's request sent to another; every other path is a 404 and
    never reaches them. The hop to the gateway is mTLS (``tls``: Envoy's certificate, the mesh CA,
    the gateway's SPIFFE id pinned). Request bodies are capped at 1 MiB (413), and Envoy's own errors to
    REST callers are JSON google.rpc.Status bodies too. Admin listens only on the unix socket
    ``admin_socket``, mode 0600 (its owner alone may read stats or change anything), never on TCP.
    With ``console_port``, ``/console/`` is routed to the console's static-file service on that loopback port.
    With ``otlp`` (a collector's host and port), Envoy traces every request there and passes the trace on.

    Some settings live on Envoy's command line, not in the bootstrap: the launcher must start
    Envoy with ``--concurrency 1`` and ``--log-level warning`` (:func:`envoy_argv` builds that
    command). Write the result to a file ending in ``.yaml`` or ``.json`` and pass it with ``-c``.
    """
    bootstrap: dict[str, Any] = {
        # SDS (the certificate files, watched) wants to know who this Envoy is.
        "node": {"id": "jobmesh-edge", "cluster": "jobmesh-edge"},
        "admin": {"address": {"pipe": {"path": admin_socket, "mode": 0o600}}},
        "overload_manager": admission.overload_manager(limits),
        "static_resources": {
            "listeners": [
                {
                    "name": "jobmesh_public",
                    "address": _socket_address(listen_host, listen_port),
                    "per_connection_buffer_limit_bytes": limits.per_connection_buffer_kb * 1024,
                    "filter_chains": [
                        {
                            "filters": [
                                {
                                    "name": "envoy.filters.network.http_connection_manager",
                                    "typed_config": _http_connection_manager(
                                        descriptor_path, auth, limits, console_port is not None, otlp is not None
                                    ),
                                }
                            ]
                        }
                    ],
                }
            ],
            "clusters": [
                _gateway_cluster(gateways, tls, limits),
                _gateway_cluster(gateways, tls, limits, _SUBMIT_CLUSTER),
            ],
        },
    }
    if console_port is not None:
        bootstrap["static_resources"]["clusters"].append(_console_cluster(console_port, tls))
    if otlp is not None:
        bootstrap["static_resources"]["clusters"].append(_otlp_cluster(otlp))
    return json.dumps(bootstrap, indent=2) + "\n"


def envoy_argv(envoy_binary: str, config_path: str, *, base_id: int | None = None) -> list[str]:
    """Return the command that runs Envoy on a rendered config: one worker, warning-level logs.

    Access-log lines are flushed every second so they show up promptly on stdout.
    """
    argv = [
        envoy_binary,
        "-c",
        config_path,
        "--concurrency",
        "1",
        "--log-level",
        ENVOY_LOG_LEVEL,
        "--file-flush-interval-msec",
        "1000",
    ]
    if base_id is not None:
        argv += ["--base-id", str(base_id)]
    return argv


_REPO = Path(__file__).resolve().parent.parent


def edge_auth(config: MeshConfig, keys_file: str) -> EdgeAuth:
    """The mesh config's issuer and audience with the file of public keys the gateway verifies with too."""
    return EdgeAuth(issuer=config.issuer, audience=config.audience, keys_file=keys_file)


def render_dev_defaults(limits: EdgeLimits | None = None, console_port: int | None = None) -> str:
    """The committed `envoy/envoy.json`: the dev defaults (config/dev.toml), with `make run`'s data dir `.jobmesh/`
    (other `limits` or a console port: what the tests check)."""
    config = load_config(_REPO / "config" / "dev.toml")
    return render_envoy_config(
        listen_host="127.0.0.1",
        listen_port=8080,
        admin_socket=".jobmesh/envoy-admin.sock",
        gateways=[("127.0.0.1", 50051), ("127.0.0.1", 50061)],  # the launcher's default gateway ports
        descriptor_path="build/jobmesh.pb",
        tls=EnvoyTls(
            identity_sds=".jobmesh/pki/envoy/identity-sds.json",
            validation_sds=".jobmesh/pki/envoy/validation-sds.json",
            watched_dir=".jobmesh/pki/services",
        ),
        auth=edge_auth(config, ".jobmesh/keys/edge-jwks.json"),
        limits=limits or config.edge,
        console_port=console_port,
    )


def render_cluster_defaults() -> str:
    """`k8s/base/envoy.json`: the gateway Service by name (headless: every gateway pod), Envoy's certificate and
    the mesh CA from a mounted Secret in /etc/jobmesh/tls (Kubernetes swaps a Secret's files by renaming a directory
    link, which the watch on that directory sees), the SDS files beside the bootstrap, admin on a socket in the
    pod's /tmp. Tokens are checked against the JWKS the gateway uses (the jobmesh-jwt-keys Secret), limits come
    from k8s/base/mesh.toml."""
    config = load_config(_REPO / "k8s" / "base" / "mesh.toml")
    return render_envoy_config(
        listen_host="0.0.0.0",
        listen_port=8080,
        admin_socket="/tmp/envoy-admin.sock",
        gateways=[("gateway", 50051)],
        descriptor_path="/etc/envoy/descriptors/jobmesh.pb",
        tls=EnvoyTls(
            identity_sds="/etc/envoy/bootstrap/identity-sds.json",
            validation_sds="/etc/envoy/bootstrap/validation-sds.json",
            watched_dir="/etc/jobmesh/tls",
        ),
        auth=edge_auth(config, JWT_KEYS_MOUNT + "/jwks.json"),
        limits=config.edge,
    )
