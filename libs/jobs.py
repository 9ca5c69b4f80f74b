"""Pure rules for what a user submits: job ids, timestamps, spec validation. No I/O. (What happens to a job
after that lives in libs/lifecycle/.)"""

from __future__ import annotations

import os
import re

from google.protobuf.timestamp_pb2 import Timestamp

from jobmesh.common.v1 import types_pb2 as t
from libs.config import MeshConfig
from libs.errors import InvalidArgument
from libs.lifecycle.routing import fitting_pools

# A job's message is kept up to this many characters (a failed attempt's ends with the tail of its stderr).
MAX_MESSAGE = 4096
MAX_NAME = 253
MAX_ARGS = 256
MAX_ARGV_BYTES = 64 * 1024
MAX_ENV = 128
MAX_ENV_BYTES = 64 * 1024
MAX_RUNTIME = 7 * 24 * 3600
MAX_RETRIES = 10
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")  # whole names only: fullmatch
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._/-]{0,62})$")
_IDEM = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")


def new_job_id(now: float) -> str:
    """Time-ordered (millisecond prefix) so a tenant's jobs list in submission order."""
    return f"{int(now * 1000):012x}{os.urandom(5).hex()}"


def ts(seconds: float) -> Timestamp:
    stamp = Timestamp()
    stamp.FromNanoseconds(int(seconds * 1e9))
    return stamp


def validate_spec(spec: t.JobSpec, config: MeshConfig, now: float | None = None) -> None:
    """Raises InvalidArgument naming the first bad field."""
    size = spec.ByteSize()
    if size > config.max_spec_bytes:
        raise InvalidArgument(
            "spec",
            f"is {size} bytes; the limit is {config.max_spec_bytes} bytes ({config.max_spec_bytes // 1024} KiB)",
            reason="SPEC_TOO_LARGE",
        )
    if not spec.name.strip():
        raise InvalidArgument("name", "is required")
    if len(spec.name) > MAX_NAME:
        raise InvalidArgument("name", f"is longer than {MAX_NAME} characters")
    if not spec.command:
        raise InvalidArgument("command", "is required (a list: program and arguments)")
    if not spec.command[0]:
        raise InvalidArgument("command", "the program (first element) must not be empty")
    if len(spec.command) > MAX_ARGS:
        raise InvalidArgument("command", f"has more than {MAX_ARGS} arguments")
    if sum(len(a.encode()) for a in spec.command) > MAX_ARGV_BYTES:
        raise InvalidArgument("command", f"is larger than {MAX_ARGV_BYTES // 1024} KiB")
    if len(spec.env) > MAX_ENV:
        raise InvalidArgument("env", f"has more than {MAX_ENV} variables")
    if sum(len(k) + len(v.encode()) for k, v in spec.env.items()) > MAX_ENV_BYTES:
        raise InvalidArgument("env", f"is larger than {MAX_ENV_BYTES // 1024} KiB")
    for key, value in spec.env.items():
        if not ENV_NAME.fullmatch(key):
            raise InvalidArgument("env", f"{key!r} is not a valid variable name")
        if "\0" in value:
            raise InvalidArgument(f"env.{key}", "contains a NUL byte")
    for i, arg in enumerate(spec.command):
        if "\0" in arg:
            raise InvalidArgument(f"command[{i}]", "contains a NUL byte")
    if not spec.HasField("resources"):
        raise InvalidArgument("resources", "is required (cpu_millis and memory_mb)")
    if spec.resources.cpu_millis <= 0:
        raise InvalidArgument("resources.cpu_millis", "must be greater than 0")
    if spec.resources.memory_mb <= 0:
        raise InvalidArgument("resources.memory_mb", "must be greater than 0")
    if spec.pool and config.pool(spec.pool) is None:
        raise InvalidArgument("pool", f"unknown pool {spec.pool!r}")
    for key, value in spec.required_capabilities.items():
        if not _LABEL.match(key) or len(value) > 63:
            raise InvalidArgument("required_capabilities", f"{key!r} is not a valid label")
    fitting = fitting_pools(spec, config.pools)
    if not fitting:
        where = f"pool {spec.pool!r}" if spec.pool else "any pool"
        raise InvalidArgument(
            "resources",
            f"no worker in {where} has {spec.resources.cpu_millis}m CPU, "
            f"{spec.resources.memory_mb} MB and the required capabilities",
            reason="UNSCHEDULABLE",
        )
    if spec.max_runtime_seconds < 0 or spec.max_runtime_seconds > MAX_RUNTIME:
        raise InvalidArgument("max_runtime_seconds", f"must be between 0 and {MAX_RUNTIME}")
    if spec.max_retries < 0 or spec.max_retries > MAX_RETRIES:
        raise InvalidArgument("max_retries", f"must be between 0 and {MAX_RETRIES}")
    _validate_retry_on(spec)
    if spec.idempotency_key and not _IDEM.match(spec.idempotency_key):
        raise InvalidArgument("idempotency_key", "must be 1-128 characters of [A-Za-z0-9._:-]")
    if spec.working_dir and not spec.working_dir.startswith("/"):
        raise InvalidArgument("working_dir", "must be an absolute path")
    if spec.sla_tier and spec.sla_tier not in config.sla_tiers:
        raise InvalidArgument("sla_tier", f"must be one of {', '.join(sorted(config.sla_tiers))}")
    if now is not None and spec.HasField("deadline") and spec.deadline.ToNanoseconds() / 1e9 <= now:
        raise InvalidArgument("deadline", "is already in the past")
    if abs(spec.priority) > 1000:
        raise InvalidArgument("priority", "must be between -1000 and 1000")


def _validate_retry_on(spec: t.JobSpec) -> None:
    """Each entry a reason max_retries can retry (the list is short: a repeat is harmless and allowed)."""
    # Imported here: the lifecycle's transitions import this module for its limits and timestamps.
    from libs.lifecycle.transitions import RETRYABLE

    for i, reason in enumerate(spec.retry_on):
        if reason not in RETRYABLE:
            raise InvalidArgument(
                f"retry_on[{i}]", f"{reason[:64]!r} is not a retryable reason; one of {', '.join(RETRYABLE)}"
            )
