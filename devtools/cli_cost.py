"""`jobmesh cost report`: the cost report of GET /api/v1/cost-optimization/reports, printed as tables."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx

from libs.auth import ensure_dev_keys, issue_token
from libs.config import load_config

REPORTS_PATH = "/api/v1/cost-optimization/reports"
IDLE_ROW = "__idle__"  # the all-tenants view's idle cost row (services/cost/reports.py)
_REPO = Path(__file__).resolve().parent.parent


class CostCliError(Exception):
    """A failure to explain to the user in one line (and exit non-zero)."""


def add_cost_parser(subparsers: Any) -> None:
    """Registers `cost report` on the `jobmesh` command's subparsers."""
    cost = subparsers.add_parser("cost", help="cost reports")
    commands = cost.add_subparsers(dest="cost_command", required=True)
    report = commands.add_parser(
        "report",
        help="cost by tenant, pool and day over a period, with recommendations",
        description="Prints the cost report of the REST API as tables. Admins see every tenant and idle cost.",
    )
    report.add_argument("--start", default="", help="RFC 3339 start, e.g. 2026-11-01T00:00:00Z (default: 30 days ago)")
    report.add_argument("--end", default="", help="RFC 3339 end (default: now)")
    report.add_argument("--tenant", default="", help="the tenant to report on (admins; default: all, or your own)")
    report.add_argument("--url", default="http://127.0.0.1:8080", help="the mesh's public URL")
    auth = report.add_mutually_exclusive_group()
    auth.add_argument("--token", default=os.environ.get("JOBMESH_TOKEN", ""), help="bearer token ($JOBMESH_TOKEN)")
    auth.add_argument("--tenant-token", metavar="TENANT", help="mint a dev token for TENANT, like `jobmesh token`")
    report.add_argument("--admin", action="store_true", help="with --tenant-token: give the token the admin role")
    # Also accepted after the subcommand; the main parser's values are used otherwise.
    report.add_argument("--data-dir", type=Path, default=argparse.SUPPRESS, help="where the dev signing key is")
    report.add_argument("--config", type=Path, default=argparse.SUPPRESS, help="the mesh config (issuer, tenants)")
    report.set_defaults(func=cmd_cost_report)


def cmd_cost_report(args: argparse.Namespace) -> int:
    try:
        body = fetch_reports(args.url, bearer_token(args), query(args))
    except CostCliError as exc:
        print(f"jobmesh cost report: {exc}", file=sys.stderr)
        return 1
    print(render(body), end="")
    return 0


def bearer_token(args: argparse.Namespace) -> str:
    if args.tenant_token:
        data_dir = Path(getattr(args, "data_dir", None) or os.environ.get("JOBMESH_DATA_DIR") or _REPO / ".jobmesh")
        config_path = Path(
            getattr(args, "config", None) or os.environ.get("JOBMESH_CONFIG") or _REPO / "config" / "dev.toml"
        )
        config = load_config(config_path)
        if args.tenant_token not in config.tenants:
            raise CostCliError(f"unknown tenant {args.tenant_token!r}; known: {', '.join(sorted(config.tenants))}")
        ensure_dev_keys(data_dir)
        return issue_token(
            data_dir, tenant=args.tenant_token, issuer=config.issuer, audience=config.audience, admin=args.admin
        )
    if not args.token:
        raise CostCliError("needs --token (or $JOBMESH_TOKEN) or --tenant-token TENANT")
    return str(args.token)


def query(args: argparse.Namespace) -> dict[str, str]:
    wanted = {"tenant_id": args.tenant, "start": args.start, "end": args.end}
    return {k: v for k, v in wanted.items() if v}


def fetch_reports(
    url: str, token: str, params: dict[str, str], transport: httpx.BaseTransport | None = None
) -> dict[str, Any]:
    try:
        with httpx.Client(base_url=url, transport=transport, timeout=30.0) as client:
            resp = client.get(REPORTS_PATH, params=params, headers={"Authorization": f"Bearer {token}"})
    except httpx.HTTPError as exc:
        raise CostCliError(f"cannot reach {url}: {exc}") from exc
    if resp.status_code != 200:
        raise CostCliError(f"HTTP {resp.status_code}: {error_text(resp)}")
    try:
        return dict(resp.json())
    except ValueError as exc:
        raise CostCliError(f"the answer from {url} is not JSON") from exc


def error_text(resp: httpx.Response) -> str:
    """The google.rpc.Status message and ErrorInfo reason of an error answer, or its raw text."""
    try:
        status = resp.json()
    except ValueError:
        return resp.text.strip()[:200] or resp.reason_phrase
    reasons = [d.get("reason", "") for d in status.get("details", []) if isinstance(d, dict)]
    reason = next((r for r in reasons if r), "")
    message = str(status.get("message", "")) or resp.reason_phrase
    return f"{reason}: {message}" if reason else message


def _amount(money: dict[str, Any] | None) -> str:
    return str((money or {}).get("amount") or "0.000000")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]], right: Sequence[int] = ()) -> str:
    """Columns as wide as their widest cell; the columns in `right` (numbers) aligned right."""
    widths = [max(len(str(x)) for x in col) for col in zip(headers, *rows, strict=False)]

    def line(cells: Sequence[str]) -> str:
        out = [c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)]) + "\n"


def render(body: dict[str, Any]) -> str:
    reports = [r for r in body.get("reports", []) if r.get("tenant_id") != IDLE_ROW]
    idle = next((r for r in body.get("reports", []) if r.get("tenant_id") == IDLE_ROW), None)
    currency = next((r["total"].get("currency", "") for r in reports if r.get("total")), "")
    out = [f"Cost report{f' ({currency})' if currency else ''}\n\n"]
    if not reports:
        out.append("No tenants with charges in this period.\n")
    else:
        rows = [
            [r.get("tenant_id", ""), str(r.get("jobs", 0)), _amount(r.get("total")), _amount(r.get("burst_spend"))]
            for r in reports
        ]
        out.append(table(["TENANT", "JOBS", "TOTAL", "BURST SPEND"], rows, right=(1, 2, 3)))
        for title, field in (("BY POOL", "by_pool"), ("BY DAY", "by_day")):
            lines = [
                [r.get("tenant_id", ""), x.get("key", ""), _amount(x.get("cost"))]
                for r in reports
                for x in r.get(field, [])
            ]
            if lines:
                out.append(f"\n{title}\n" + table(["TENANT", field[3:].upper(), "COST"], lines, right=(2,)))
    if "idle_cost" in body:
        out.append(f"\nIDLE COST (worker time no job used): {_amount(body['idle_cost'])}\n")
        if idle:
            pools = [[x.get("key", ""), _amount(x.get("cost"))] for x in idle.get("by_pool", [])]
            out.append(table(["POOL", "IDLE"], pools, right=(1,)))
    recommendations = [
        [r.get("tenant_id", ""), x.get("kind", ""), _amount(x.get("estimated_savings")), x.get("description", "")]
        for r in [*reports, *([idle] if idle else [])]
        for x in r.get("recommendations", [])
    ]
    if recommendations:
        out.append("\nRECOMMENDATIONS\n" + table(["TENANT", "KIND", "SAVINGS", "WHY"], recommendations, right=(2,)))
    return "".join(out)
