"""The `jobmesh` command: run the dev stack, mint dev tokens, cost reports, etcd maintenance."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import time
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server

from devtools.cli_admin import add_admin_parser
from devtools.cli_cost import add_cost_parser
from devtools.launcher import REPO, Ports, Stack
from devtools.supervisor import CrashLoop, StackProcesses, Supervisor
from libs.auth import ensure_dev_keys, issue_token, jwks_document, key_paths
from libs.config import ConfigError, load_config

DEFAULT_DATA = Path(os.environ.get("JOBMESH_DATA_DIR", REPO / ".jobmesh"))
DEFAULT_CONFIG = Path(os.environ.get("JOBMESH_CONFIG", REPO / "config" / "dev.toml"))


def cmd_token(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    if args.tenant not in config.tenants:
        print(f"unknown tenant {args.tenant!r}; known: {', '.join(sorted(config.tenants))}", file=sys.stderr)
        return 2
    ensure_dev_keys(args.data_dir)
    print(
        issue_token(
            args.data_dir,
            tenant=args.tenant,
            issuer=config.issuer,
            audience=config.audience,
            admin=args.admin,
            ttl=args.ttl,
        )
    )
    return 0


def cmd_jwks(args: argparse.Namespace) -> int:
    """The JWKS of a public key file (the dev key by default): for the jobmesh-jwt-keys Secret (docs/kubernetes.md)."""
    path = args.keys or key_paths(args.data_dir)[1]
    try:
        print(jwks_document(path), end="")
    except FileNotFoundError:
        print(f"no public key at {path}: pass --keys, or run `jobmesh token` or `make run` once", file=sys.stderr)
        return 2
    return 0


TELEMETRY_VARIABLES = ("JOBMESH_OTEL_EXPORTER", "JOBMESH_OTEL_ENDPOINT", "JOBMESH_LOG_LEVEL")


def cmd_run(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    # The stack's processes get none of this shell's JOBMESH_* variables (a JOBMESH_TOKEN exported for the CLI is
    # not theirs) but its telemetry settings: JOBMESH_OTEL_EXPORTER=console make run traces every process.
    telemetry = {k: v for k, v in os.environ.items() if k.startswith("OTEL_") or k in TELEMETRY_VARIABLES}
    # Three etcd members (a quorum survives one's loss, as on Kubernetes) on fixed ports next to the first's:
    # a member's data dir remembers its peers, so a data dir keeps the member count it was made with.
    more = tuple((2381 + 2 * i, 2382 + 2 * i) for i in range(args.etcd_members - 1))
    ports = Ports(envoy=args.port, etcd_more=more)
    stack = Stack(data_dir=args.data_dir, config_path=args.config, ports=ports, env=telemetry)
    stop = {"now": False}

    def on_signal(signum: int, _frame: object) -> None:
        stop["now"] = True

    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGTERM, on_signal)
    print(f"starting jobmesh (data in {stack.data_dir}, logs in {stack.log_dir}) ...", flush=True)
    # The launcher's own /metrics (restarts of the processes it supervises) joins the mesh-wide scrape.
    registry = CollectorRegistry()
    for name in stack.SERVICES:  # the services keep their ports (9101-9112); the launcher takes the next
        stack.metrics_port(name)
    launcher_metrics = stack.metrics_port("launcher")
    stack.env["JOBMESH_METRICS_TARGETS"] = f"{stack.metrics_targets()},127.0.0.1:{launcher_metrics}"
    start_http_server(launcher_metrics, addr="127.0.0.1", registry=registry)
    supervisor = Supervisor(StackProcesses(stack), time.monotonic, registry=registry, say=_say)
    try:
        stack.start()
    except (RuntimeError, TimeoutError) as exc:
        print(f"jobmesh failed to start: {exc}", file=sys.stderr)
        stack.stop()
        return 1
    token = issue_token(stack.data_dir, tenant="acme", issuer=config.issuer, audience=config.audience, ttl=86400)
    print(
        f"\njobmesh is up: {stack.url}  (REST under /api/v1, native gRPC on the same port)\n"
        f"processes: {', '.join(stack.procs)}\n\n"
        f"dev token for tenant acme (24 h):\n{token}\n\n"
        f"console (signs in with that token): {stack.url}/console/#token={token}\n\n"
        f"try the CLI (in another shell):\n"
        f"  export JOBMESH_URL={stack.url} JOBMESH_TOKEN=$(.venv/bin/jobmesh token --tenant acme)\n"
        f"  .venv/bin/jobmesh submit --name hello --wait -- sh -c 'echo hi'\n"
        f"  .venv/bin/jobmesh list\n"
        f"  .venv/bin/jobmesh logs <job_id>\n"
        f'or REST: curl -H "Authorization: Bearer $JOBMESH_TOKEN" {stack.url}/api/v1/jobs'
        f"  (the API: docs/api.md, {stack.url}/api/v1/openapi.yaml)\n"
        f"the client elsewhere: pip install ./clients/python (docs/api.md)\n\n"
        "Ctrl-C stops everything.",
        flush=True,
    )
    code = 0
    try:
        while not stop["now"]:
            try:
                supervisor.tick()
            except CrashLoop as exc:
                print(f"jobmesh: {exc}", file=sys.stderr, flush=True)
                code = 1
                break
            time.sleep(0.25)
    finally:
        print("stopping jobmesh ...", flush=True)
        stack.stop()
        print("stopped.", flush=True)
    return code


def _say(line: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {line}", file=sys.stderr, flush=True)


def cmd_pki_k8s_secrets(args: argparse.Namespace) -> int:
    from devtools.k8s_secrets import build_secrets, render

    sys.stdout.write(render(build_secrets(args.ca_dir, args.namespace)))
    return 0


def cmd_join_token(args: argparse.Namespace) -> int:
    """Mints join tokens as an operator: JOBMESH_TLS_CERT/KEY/CA (e.g. the jobmesh-tls-operator Secret's files,
    through `kubectl port-forward`), else the dev stack's own PKI in the data dir."""
    import asyncio

    import grpc

    from jobmesh.poolmanager.v1 import poolmanager_pb2 as pm
    from jobmesh.poolmanager.v1 import poolmanager_pb2_grpc
    from libs.meshpki import MeshPki
    from libs.settings import SettingsError, TlsSettings
    from libs.tls import RenewingChannel

    try:
        tls = TlsSettings.from_env(os.environ, "operator")
    except SettingsError as exc:
        print(exc, file=sys.stderr)
        return 2
    if tls is None:
        tls = MeshPki(args.data_dir / "pki").service("client-operator", "operator")

    async def mint() -> list[str]:
        async with RenewingChannel(args.addr, tls) as ch:
            stub = poolmanager_pb2_grpc.PoolManagerServiceStub(ch)
            request = pm.CreateJoinTokenRequest(pool_id=args.pool, ttl_seconds=args.ttl)
            return [(await stub.CreateJoinToken(request, timeout=10)).token for _ in range(args.count)]

    try:
        tokens = asyncio.run(mint())
    except grpc.aio.AioRpcError as exc:
        print(f"refused: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    print("\n".join(tokens))
    return 0


# What this checkout's `jobmesh` does itself; every other verb (submit, get, list, logs, ...) is the client
# package's (clients/python, on the dev venv's path), so that one `jobmesh` serves both.
DEV_VERBS = ("token", "jwks", "run", "cost", "join-token", "pki", "admin")
DEV_EPILOG = (
    "In a jobmesh checkout also: token (a dev JWT), jwks, run (start the mesh here), cost report (as tables, with "
    "--tenant-token), join-token, pki, admin etcd (status, compact, defrag, disarm, recover): see `jobmesh token "
    "--help` etc."
)


def _first_verb(argv: list[str]) -> str | None:
    """The first argument that is not an option of the dev parser (nor the value of one)."""
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg in ("--data-dir", "--config"):
            skip = True
        elif not arg.startswith("-"):
            return arg
    return None


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if _first_verb(argv) not in DEV_VERBS:
        from jobmesh.cli import run as client_cli

        return client_cli(argv, epilog=DEV_EPILOG)
    parser = argparse.ArgumentParser(prog="jobmesh", description=__doc__)
    parser.add_argument("--data-dir", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    sub = parser.add_subparsers(dest="command", required=True)
    token = sub.add_parser("token", help="print a JWT the dev stack accepts")
    token.add_argument("--tenant", required=True)
    token.add_argument("--admin", action="store_true", help="add the admin role")
    token.add_argument("--ttl", type=int, default=3600, help="lifetime in seconds")
    token.set_defaults(func=cmd_token)
    jwks = sub.add_parser("jwks", help="print the JWKS of a PEM public key (default: the dev signing key's)")
    jwks.add_argument("--keys", type=Path, help="a PEM public key or a JWKS file")
    jwks.set_defaults(func=cmd_jwks)
    run = sub.add_parser("run", help="start the whole mesh here, in the foreground")
    run.add_argument("--port", type=int, default=8080)
    run.add_argument(
        "--etcd-members", type=int, default=1, choices=(1, 3), help="etcd cluster size (3: survives a member's loss)"
    )
    run.set_defaults(func=cmd_run)
    add_cost_parser(sub)
    add_admin_parser(sub)
    join = sub.add_parser(
        "join-token", help="mint single-use join tokens that admit workers started elsewhere to a pool (operators)"
    )
    join.add_argument("--pool", required=True)
    join.add_argument("--count", type=int, default=1, choices=range(1, 101), metavar="1..100")
    join.add_argument("--ttl", type=int, default=600, help="seconds a token stays usable (at most 3600)")
    join.add_argument("--addr", default="127.0.0.1:50055", help="a pool-manager's internal port")
    join.set_defaults(func=cmd_join_token)
    pki = sub.add_parser("pki", help="the mesh's certificates").add_subparsers(dest="pki_command", required=True)
    secrets = pki.add_parser(
        "k8s-secrets", help="print the CAs' and every identity's Secrets for `kubectl apply -f -` (no cert-manager)"
    )
    secrets.add_argument("--ca-dir", type=Path, required=True, help="where the CAs' keys are kept (made on first use)")
    secrets.add_argument("--namespace", default="jobmesh")
    secrets.set_defaults(func=cmd_pki_k8s_secrets)
    args = parser.parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
