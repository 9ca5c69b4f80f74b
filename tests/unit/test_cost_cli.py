"""`jobmesh cost report` (devtools/cli_cost.py): arguments, tokens, HTTP errors and the printed tables."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import httpx
import pytest

from devtools import cli_cost
from devtools.launcher import REPO, free_port
from libs.auth import TokenVerifier, key_paths, load_verification_keys

FIXTURE_CONFIG = REPO / "tests" / "fixtures" / "mesh.toml"


def money(amount: str) -> dict[str, str]:
    return {"currency": "USD", "micros": str(int(float(amount) * 1_000_000)), "amount": amount}


BODY: dict[str, Any] = {
    "reports": [
        {
            "tenant_id": "acme",
            "total": money("1.250000"),
            "by_pool": [{"key": "static-general", "cost": money("1.250000")}],
            "by_day": [{"key": "2026-03-10", "cost": money("1.250000")}],
            "burst_spend": money("0.000000"),
            "jobs": 3,
            "recommendations": [
                {
                    "kind": "RIGHTSIZE_MEMORY",
                    "description": "3 attempts used at most 1/4 of the memory they requested",
                    "estimated_savings": money("0.200000"),
                }
            ],
        },
        {
            "tenant_id": "__idle__",
            "total": money("0.750000"),
            "by_pool": [{"key": "static-general", "cost": money("0.750000")}],
            "by_day": [],
            "burst_spend": money("0.000000"),
            "jobs": 0,
            "recommendations": [],
        },
    ],
    "idle_cost": money("0.750000"),
}


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="jobmesh")
    parser.add_argument("--data-dir", type=Path, default=Path("/nonexistent"))
    parser.add_argument("--config", type=Path, default=FIXTURE_CONFIG)
    cli_cost.add_cost_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def answering(status: int, body: object, seen: list[httpx.Request] | None = None) -> httpx.MockTransport:
    def handle(request: httpx.Request) -> httpx.Response:
        if seen is not None:
            seen.append(request)
        return httpx.Response(status, content=json.dumps(body).encode(), headers={"content-type": "application/json"})

    return httpx.MockTransport(handle)


def test_the_report_subcommand_parses_its_arguments_into_the_query() -> None:
    args = parse("cost", "report", "--start", "2026-03-01T00:00:00Z", "--tenant", "acme", "--token", "t0k")

    assert args.func is cli_cost.cmd_cost_report
    assert args.url == "http://127.0.0.1:8080"
    assert cli_cost.query(args) == {"tenant_id": "acme", "start": "2026-03-01T00:00:00Z"}
    assert cli_cost.bearer_token(args) == "t0k"


def test_a_token_and_a_minted_token_cannot_both_be_given(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("cost", "report", "--token", "x", "--tenant-token", "acme")


def test_a_minted_tenant_token_is_one_the_mesh_accepts_for_that_tenant(tmp_path: Path) -> None:
    args = parse("cost", "report", "--tenant-token", "globex", "--admin", "--data-dir", str(tmp_path))

    token = cli_cost.bearer_token(args)

    verifier = TokenVerifier(
        load_verification_keys(key_paths(tmp_path)[1]),
        issuer="jobmesh-test",
        audience="jobmesh",
        tenants={"acme", "globex", "initech"},
    )
    principal = verifier.verify(f"Bearer {token}")
    assert (principal.tenant_id, principal.is_admin) == ("globex", True)


def test_minting_for_an_unknown_tenant_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("cost", "report", "--tenant-token", "umbrella", "--data-dir", str(tmp_path))

    assert cli_cost.cmd_cost_report(args) == 1
    assert "unknown tenant 'umbrella'" in capsys.readouterr().err


def test_without_any_token_it_says_how_to_give_one(monkeypatch: pytest.MonkeyPatch) -> None:
    args = parse("cost", "report")
    args.token = ""

    with pytest.raises(cli_cost.CostCliError, match="--tenant-token"):
        cli_cost.bearer_token(args)


def test_the_report_is_fetched_with_the_bearer_token_and_query() -> None:
    seen: list[httpx.Request] = []

    body = cli_cost.fetch_reports("http://mesh", "t0k", {"tenant_id": "acme"}, answering(200, BODY, seen))

    assert body == BODY
    assert seen[0].url.path == "/api/v1/cost-optimization/reports"
    assert seen[0].url.params["tenant_id"] == "acme"
    assert seen[0].headers["authorization"] == "Bearer t0k"


def test_an_http_error_carries_the_status_reason_and_message() -> None:
    status = {
        "code": 7,
        "message": "you may only act on your own tenant",
        "details": [{"@type": "type.googleapis.com/google.rpc.ErrorInfo", "reason": "TENANT_FORBIDDEN"}],
    }

    with pytest.raises(cli_cost.CostCliError) as err:
        cli_cost.fetch_reports("http://mesh", "t", {}, answering(403, status))

    assert str(err.value) == "HTTP 403: TENANT_FORBIDDEN: you may only act on your own tenant"


def test_an_unreachable_mesh_exits_non_zero_with_a_clear_message(capsys: pytest.CaptureFixture[str]) -> None:
    args = parse("cost", "report", "--token", "t", "--url", f"http://127.0.0.1:{free_port()}")

    assert cli_cost.cmd_cost_report(args) == 1
    assert "cannot reach http://127.0.0.1:" in capsys.readouterr().err


def test_the_tables_show_totals_pools_days_idle_and_recommendations() -> None:
    text = cli_cost.render(BODY)

    assert text.splitlines()[0] == "Cost report (USD)"
    assert "TENANT  JOBS     TOTAL  BURST SPEND" in text
    assert "acme       3  1.250000     0.000000" in text
    assert "acme    static-general  1.250000" in text
    assert "acme    2026-03-10  1.250000" in text
    assert "IDLE COST (worker time no job used): 0.750000" in text
    assert "static-general  0.750000" in text
    assert "RIGHTSIZE_MEMORY  0.200000  3 attempts used" in text
    assert "__idle__" not in text


def test_a_tenant_sees_no_idle_section_and_an_empty_period_says_so() -> None:
    text = cli_cost.render({"reports": []})

    assert "No tenants with charges in this period." in text
    assert "IDLE" not in text
