"""The client package's pure parts: errors named after ErrorInfo reasons, request building, CLI usage errors."""

from __future__ import annotations

import pytest
from click.testing import CliRunner

from jobmesh import _common, errors
from jobmesh.cli import EXIT_USAGE, run
from jobmesh.common.v1 import types_pb2 as t


def test_an_error_is_the_class_of_its_reason_under_the_class_of_its_status() -> None:
    meta = {"limit": "cpu_millis", "limit_value": "64000", "usage": "63900", "retry_after_seconds": "5"}
    err = errors.make("RESOURCE_EXHAUSTED", "QUOTA_EXCEEDED", "quota exceeded", meta)
    assert type(err) is errors.QuotaExceeded and isinstance(err, errors.ResourceExhausted)
    assert (err.limit, err.limit_value, err.usage, err.retry_after_seconds) == ("cpu_millis", 64000, 63900, 5.0)
    assert str(err) == "QUOTA_EXCEEDED: quota exceeded"
    assert type(errors.make("NOT_FOUND", "JOB_NOT_FOUND", "x")) is errors.JobNotFound
    assert type(errors.make("NOT_FOUND", "SOMETHING_NEW", "x")) is errors.NotFound  # a reason not known yet
    assert type(errors.make("UNAVAILABLE", "JOB_NOT_FOUND", "x")) is errors.Unavailable  # the status decides
    assert errors.make("DATA_LOSS", "", "x").reason == "DATA_LOSS"


def test_every_documented_reason_has_its_class() -> None:
    documented = """TOKEN_MISSING TOKEN_MALFORMED TOKEN_EXPIRED TOKEN_INVALID UNKNOWN_TENANT TENANT_FORBIDDEN ADMIN_ONLY
    INVALID_ARGUMENT SPEC_TOO_LARGE UNSCHEDULABLE NEVER_FITS JOB_FINISHED JOB_NOT_FOUND POOL_NOT_FOUND
    TENANT_NOT_FOUND QUOTA_EXCEEDED BURST_UNAVAILABLE BUDGET_EXCEEDED TOO_MANY_JOBS STORE_UNAVAILABLE
    DEPENDENCY_UNAVAILABLE DEPENDENCY_TIMEOUT""".split()
    for reason in documented:
        cls = errors.BY_REASON[reason]
        assert cls.__name__ == "".join(w.capitalize() for w in reason.split("_")), reason


def test_a_spec_gets_an_idempotency_key_and_states_and_urls_are_read_leniently() -> None:
    spec = _common.job_spec(["echo", "hi"], name="n", cpu_millis=100, memory_mb=64, deadline="2030-01-01T00:00:00Z")
    assert spec.idempotency_key.startswith("client-") and spec.deadline.seconds > 0
    assert _common.job_state("running") == _common.job_state("JOB_STATE_RUNNING") == t.JOB_STATE_RUNNING
    with pytest.raises(errors.InvalidArgument):
        _common.job_state("sleeping")
    with pytest.raises(errors.InvalidArgument):
        _common.job_spec("echo hi", name="n", cpu_millis=1, memory_mb=1)  # type: ignore[arg-type]
    retried = _common.job_spec(["false"], name="n", cpu_millis=1, memory_mb=1, max_retries=2, retry_on=["WORKER_LOST"])
    assert (retried.max_retries, list(retried.retry_on)) == (2, ["WORKER_LOST"])
    assert list(spec.retry_on) == []  # none given: every retryable reason
    with pytest.raises(errors.InvalidArgument, match="retry_on"):
        _common.job_spec(["false"], name="n", cpu_millis=1, memory_mb=1, retry_on="WORKER_LOST")  # a string, not a list
    assert _common.target_of("http://127.0.0.1:8080") == _common.Target("127.0.0.1:8080", False)
    assert _common.target_of("https://mesh.example") == _common.Target("mesh.example:443", True)
    with pytest.raises(errors.InvalidArgument):
        _common.target_of("ftp://x")


@pytest.mark.parametrize(
    "argv, says",
    [
        (["frobnicate"], "No such command"),
        (["submit"], "no command"),
        (["submit", "--env", "X", "--", "true"], "KEY=VALUE"),
        (["submit", "--", "--not-a-command"], "unknown option"),
        (["-o", "xml", "list"], "xml"),
    ],
)
def test_usage_errors_exit_2_with_a_reason(argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert run(argv) == EXIT_USAGE
    assert says in capsys.readouterr().err


def test_every_verb_has_help() -> None:
    runner = CliRunner()
    for verb in ("submit", "get", "list", "cancel", "logs", "watch", "quota", "burst", "pools", "cost", "completion"):
        result = runner.invoke(run.__globals__["main"], [verb, "--help"])
        assert result.exit_code == 0 and "Usage:" in result.output, verb
