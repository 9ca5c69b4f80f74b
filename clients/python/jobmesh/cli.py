"""`jobmesh`: submit, inspect, follow and cancel jobs; quotas, burst sessions, pools and cost reports.

Exit codes: 0 ok; 1 the job failed or was cancelled (submit --wait, wait), or the mesh refused the request;
2 usage error (bad flags, unknown verb, missing command, unreadable spec file, an invalid spec); 3 not
authenticated or not allowed; 4 not found; 5 the mesh is unavailable or did not answer in time.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, NoReturn

import click
import yaml
from google.protobuf import json_format
from google.protobuf.message import Message
from rich.console import Console
from rich.live import Live
from rich.table import Column, Table

import jobmesh
from jobmesh import _common as c
from jobmesh import errors
from jobmesh.common.v1 import types_pb2 as t

EXIT_OK, EXIT_JOB_FAILED, EXIT_USAGE, EXIT_AUTH, EXIT_NOT_FOUND, EXIT_UNAVAILABLE = 0, 1, 2, 3, 4, 5
_EXIT_BY_CODE = {
    "UNAUTHENTICATED": EXIT_AUTH,
    "PERMISSION_DENIED": EXIT_AUTH,
    "NOT_FOUND": EXIT_NOT_FOUND,
    "UNAVAILABLE": EXIT_UNAVAILABLE,
    "DEADLINE_EXCEEDED": EXIT_UNAVAILABLE,
    "INVALID_ARGUMENT": EXIT_USAGE,
}
OUTPUTS = ("table", "json", "yaml")
# Piped output is not cut to 80 columns: job ids and messages stay whole for grep and scripts.
out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 200)
err = Console(stderr=True, highlight=False, soft_wrap=True)


class Ctx:
    def __init__(self, url: str | None, token: str | None, output: str):
        self.url, self.token, self.output = url, token, output
        self._client: jobmesh.Client | None = None

    @property
    def client(self) -> jobmesh.Client:
        if self._client is None:
            self._client = jobmesh.Client(self.url, self.token)
        return self._client


pass_ctx = click.make_pass_decorator(Ctx)


def as_dict(message: Message) -> dict[str, Any]:
    return json_format.MessageToDict(message, preserving_proto_field_name=True)


def emit(ctx: Ctx, data: Any, table: Callable[[], None]) -> None:
    """`data` (a message, or a list of them) as the chosen output."""
    if ctx.output == "table":
        table()
        return
    plain = [as_dict(m) for m in data] if isinstance(data, list) else as_dict(data)
    if ctx.output == "json":
        out.print_json(json.dumps(plain)) if sys.stdout.isatty() else print(json.dumps(plain, indent=2))
    else:
        print(yaml.safe_dump(plain, sort_keys=False), end="")


def state_name(state: t.JobState.ValueType) -> str:
    return t.JobState.Name(state).removeprefix("JOB_STATE_")


def fail(error: errors.JobmeshError) -> NoReturn:
    """A server's answer as `reason: message` and its metadata, never a trace; the exit code by status."""
    err.print(f"[bold red]{error.reason}[/]: {error.message}", markup=True)
    if error.metadata:
        err.print("  " + " ".join(f"{k}={v}" for k, v in sorted(error.metadata.items())), markup=False)
    raise SystemExit(_EXIT_BY_CODE.get(error.code, EXIT_JOB_FAILED))


@contextmanager
def answers() -> Iterator[None]:
    try:
        yield
    except errors.JobmeshError as error:
        fail(error)


class Verbs(click.Group):
    """Turns every JobmeshError raised by a verb into its message and exit code."""

    def invoke(self, ctx: click.Context) -> Any:
        with answers():
            return super().invoke(ctx)


@click.group(cls=Verbs, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--url", envvar="JOBMESH_URL", help="The mesh's public URL [env JOBMESH_URL; http://127.0.0.1:8080].")
@click.option("--token", envvar="JOBMESH_TOKEN", help="Bearer token [env JOBMESH_TOKEN].")
@click.option("-o", "--output", type=click.Choice(OUTPUTS), default="table", show_default=True)
@click.version_option(jobmesh.__version__, prog_name="jobmesh")
@click.pass_context
def main(ctx: click.Context, url: str | None, token: str | None, output: str) -> None:
    """Submit, follow and manage jobs on a jobmesh mesh."""
    ctx.obj = Ctx(url, token, output)


main.help = (main.help or "") + "\n\n" + (__doc__ or "").split("\n\n", 1)[1].replace("\n", " ")


# Jobs ---------------------------------------------------------------------------------------------------------


def parse_env(values: tuple[str, ...]) -> dict[str, str]:
    env = {}
    for item in values:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--env")
        env[key] = value
    return env


def read_spec(path: str) -> t.JobSpec:
    try:
        with open(path) as f:
            raw = yaml.safe_load(f)
    except OSError as exc:
        raise click.BadParameter(f"cannot read {path}: {exc.strerror}", param_hint="-f") from None
    except yaml.YAMLError as exc:
        raise click.BadParameter(f"{path} is not YAML or JSON: {exc}", param_hint="-f") from None
    if not isinstance(raw, dict):
        raise click.BadParameter(f"{path} must hold a job spec (a mapping)", param_hint="-f")
    spec = t.JobSpec()
    try:
        json_format.ParseDict(raw, spec)
    except json_format.ParseError as exc:
        raise click.BadParameter(f"{path}: {exc}", param_hint="-f") from None
    return spec


@main.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--name", help="Job name [default: the command's program].")
@click.option("--cpu", "cpu_millis", type=click.IntRange(min=1), help="CPU in thousandths of a core [default 100].")
@click.option("--memory", "memory_mb", type=click.IntRange(min=1), help="Memory in MiB [default 128].")
@click.option("--env", "env", multiple=True, metavar="K=V", help="An environment variable (repeatable).")
@click.option("--pool", help="Run on this pool.")
@click.option("--sla-tier", help="SLA tier (e.g. gold, standard, batch).")
@click.option("--max-runtime", type=click.IntRange(min=1), help="Seconds before it is killed.")
@click.option(
    "--max-retries", type=click.IntRange(0, 10), help="Retries of a failed attempt (any cause, see --retry-on)."
)
@click.option(
    "--retry-on",
    "retry_on",
    multiple=True,
    metavar="REASON",
    help="Retry only attempts that ended so (EXIT_CODE, OOM_KILLED, TIMEOUT, START_FAILED, WORKER_LOST, "
    "INTERRUPTED; repeatable) [default: all of them].",
)
@click.option("--burst", is_flag=True, default=None, help="May run on a burst session beyond the quota.")
@click.option("--idempotency-key", help="The same key always answers the first job [default: a new one].")
@click.option("-f", "spec_file", metavar="SPEC.yaml", help="A job spec (YAML or JSON, the API's fields).")
@click.option("--wait", is_flag=True, help="Wait for the end; exit 0 if it succeeded, 1 if not.")
@click.option("--dry-run", is_flag=True, help="Say what would happen (admission, start, cost); create nothing.")
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@pass_ctx
def submit(
    ctx: Ctx, /, command: tuple[str, ...], spec_file: str | None, wait: bool, dry_run: bool, **flags: Any
) -> None:
    """Submit a job: jobmesh submit [OPTIONS] -- COMMAND [ARGS...]"""
    spec = read_spec(spec_file) if spec_file else t.JobSpec()
    if command:
        del spec.command[:]
        spec.command.extend(command)
    if not spec.command:
        raise click.UsageError("no command: give it after `--` (jobmesh submit -- echo hi) or in -f SPEC")
    if spec.command[0].startswith("-"):
        raise click.UsageError(f"unknown option {spec.command[0]!r} (put the command after `--`)")
    env = parse_env(flags.pop("env"))
    spec.env.update(env)
    retry_on = flags.pop("retry_on")
    if retry_on:
        del spec.retry_on[:]
        spec.retry_on.extend(retry_on)
    for field, value in (
        ("name", flags["name"]),
        ("pool", flags["pool"]),
        ("sla_tier", flags["sla_tier"]),
        ("max_runtime_seconds", flags["max_runtime"]),
        ("max_retries", flags["max_retries"]),
        ("burst", flags["burst"]),
        ("idempotency_key", flags["idempotency_key"]),
    ):
        if value is not None:
            setattr(spec, field, value)
    if flags["cpu_millis"] is not None or not spec.resources.cpu_millis:
        spec.resources.cpu_millis = flags["cpu_millis"] or 100
    if flags["memory_mb"] is not None or not spec.resources.memory_mb:
        spec.resources.memory_mb = flags["memory_mb"] or 128
    if not spec.name:
        spec.name = spec.command[0].rsplit("/", 1)[-1][:60] or "job"
    if dry_run:
        show_dry_run(ctx, ctx.client.dry_run_spec(spec))
        return
    job = ctx.client.submit_spec(spec)
    if not wait:
        emit(ctx, job, lambda: out.print(job.job_id))
        return
    if ctx.output == "table":
        err.print(f"submitted {job.job_id}")
    job = follow_until_done(ctx, job.job_id)
    emit(ctx, job, lambda: show_job(job))
    raise SystemExit(EXIT_OK if job.state == t.JOB_STATE_SUCCEEDED else EXIT_JOB_FAILED)


def live_line(job: t.Job) -> str:
    line = f"{job.job_id}  {state_name(job.state)}"
    if job.state == t.JOB_STATE_PENDING:
        if job.queue_position:
            line += f"  position {job.queue_position} in {job.queue or 'default'}"
        if job.waiting_reason:
            line += f"  ({job.waiting_reason})"
        if job.HasField("next_attempt_time"):
            line += f"  next attempt at {job.next_attempt_time.ToJsonString()}"
    elif job.state == t.JOB_STATE_RUNNING:
        line += f"  on {job.worker_id}  attempt {job.attempt}"
    return line


def follow_until_done(ctx: Ctx, job_id: str) -> t.Job:
    """Watches the job to its end, with a live line on a terminal (state, queue position, why it waits)."""
    last = None
    if err.is_terminal:
        with Live(console=err, transient=True, refresh_per_second=8) as live:
            for last in ctx.client.watch(job_id):
                live.update(live_line(last))
    else:
        last = ctx.client.wait(job_id)
    assert last is not None
    return last


def show_job(job: t.Job) -> None:
    table = Table(show_header=False, box=None, pad_edge=False)
    rows = [
        ("job", job.job_id),
        ("name", job.spec.name),
        ("tenant", job.tenant_id),
        ("state", state_name(job.state)),
        ("command", " ".join(job.spec.command)),
        ("queue", job.queue),
        ("position", str(job.queue_position) if job.queue_position else ""),
        ("waiting", job.waiting_reason if job.state == t.JOB_STATE_PENDING else ""),
        ("pool", job.pool_id),
        ("worker", job.worker_id),
        ("next attempt", job.next_attempt_time.ToJsonString() if job.HasField("next_attempt_time") else ""),
        ("attempt", str(job.attempt) if job.attempt else ""),
        ("retries", f"{job.retries} of {job.spec.max_retries}" if job.retries else ""),
        ("exit code", str(job.exit_code) if job.state in c.TERMINAL and job.attempt else ""),
        ("reason", job.reason),
        ("created", job.create_time.ToJsonString() if job.HasField("create_time") else ""),
        ("started", job.start_time.ToJsonString() if job.HasField("start_time") else ""),
        ("ended", job.end_time.ToJsonString() if job.HasField("end_time") else ""),
        ("cost", f"{job.cost.total.amount} {job.cost.total.currency}" if job.cost.total.currency else ""),
        ("message", job.message),
    ]
    for key, value in rows:
        if value:
            table.add_row(f"[bold]{key}[/]", value)
    out.print(table)


def show_dry_run(ctx: Ctx, answer: Any) -> None:
    def table() -> None:
        out.print(f"[bold]valid[/]      {'yes' if answer.valid else 'no'}")
        for v in answer.violations:
            out.print(f"  {v.reason}: {v.description}", markup=False)
        a = answer.admission
        admitted = "yes" + (" (burst session)" if a.burst else "") if a.admitted else f"no: {a.reason}: {a.message}"
        out.print(f"[bold]admitted[/]   {admitted}")
        if a.metadata:
            out.print("  " + " ".join(f"{k}={v}" for k, v in sorted(a.metadata.items())), markup=False)
        s = answer.start
        start = s.estimated_start_time.ToJsonString() if s.HasField("estimated_start_time") else "unknown"
        out.print(f"[bold]queue[/]      {s.queue}, position {s.position}, estimated start {start}")
        out.print(f"  {s.basis}", markup=False)
        cost = answer.cost
        if cost.low.currency:
            out.print(f"[bold]cost[/]       {cost.low.amount} .. {cost.high.amount} {cost.low.currency}")
        out.print(f"  {cost.basis}", markup=False)
        out.print("nothing was created")

    emit(ctx, answer, table)


@main.command()
@click.argument("job_id")
@pass_ctx
def get(ctx: Ctx, job_id: str) -> None:
    """Show one job: its state, where it ran, why it waits or failed."""
    job = ctx.client.get(job_id)
    emit(ctx, job, lambda: show_job(job))


@main.command(name="list")
@click.option("--state", help="Only jobs in this state (PENDING, RUNNING, SUCCEEDED, FAILED, CANCELLED).")
@click.option("--limit", type=click.IntRange(min=1), default=50, show_default=True, help="At most this many.")
@pass_ctx
def list_jobs(ctx: Ctx, state: str | None, limit: int) -> None:
    """List your jobs, newest first."""
    jobs = []
    for job in ctx.client.list(state, newest_first=True):
        jobs.append(job)
        if len(jobs) >= limit:
            break

    def table() -> None:
        rows = Table("NAME", "STATE", "POOL", "CREATED", "REASON", box=None)
        rows.columns.insert(0, Column("JOB", no_wrap=True, min_width=22))
        for j in jobs:
            rows.add_row(j.job_id, j.spec.name, state_name(j.state), j.pool_id, j.create_time.ToJsonString(), j.reason)
        out.print(rows)

    emit(ctx, jobs, table)


@main.command()
@click.argument("job_ids", nargs=-1, required=True)
@pass_ctx
def cancel(ctx: Ctx, job_ids: tuple[str, ...]) -> None:
    """Cancel pending or running jobs."""
    cancelled = []
    for job_id in job_ids:
        cancelled.append(ctx.client.cancel(job_id))

    def table() -> None:
        for j in cancelled:
            out.print(f"{j.job_id} {state_name(j.state)}")

    emit(ctx, cancelled, table)


@main.command()
@click.argument("job_id")
@click.option("-f", "--follow", is_flag=True, help="Keep printing while the job runs.")
@click.option("--attempt", type=click.IntRange(min=0), default=0, help="Which attempt [default: the latest].")
@pass_ctx
def logs(ctx: Ctx, job_id: str, follow: bool, attempt: int) -> None:
    """Print a job's output (stdout and stderr, as written)."""
    for chunk in ctx.client.logs(job_id, follow=follow, attempt=attempt):
        sys.stdout.write(chunk)
        sys.stdout.flush()


@main.command()
@click.argument("job_id")
@pass_ctx
def watch(ctx: Ctx, job_id: str) -> None:
    """Print the job at each change until it ends (one line each; -o json: one object per line)."""
    last = None
    for last in ctx.client.watch(job_id):
        if ctx.output == "table":
            out.print(live_line(last), markup=False)
        else:
            print(json.dumps(as_dict(last)), flush=True)
    if last is not None and last.state != t.JOB_STATE_SUCCEEDED:
        raise SystemExit(EXIT_JOB_FAILED)


# Tenants, pools, cost -----------------------------------------------------------------------------------------


@main.command()
@click.argument("tenant", required=False)
@pass_ctx
def quota(ctx: Ctx, tenant: str | None) -> None:
    """A tenant's quota, usage and burst session [default: your own]."""
    q = ctx.client.quota(tenant)

    def table() -> None:
        rows = Table("RESOURCE", "LIMIT", "IN USE", "UTILIZATION", box=None, title=f"quota of {q.tenant_id}")
        for name in ("cpu_millis", "memory_mb", "concurrent_jobs"):
            util = q.utilization.get(name)
            pct = f"{util:.0%}" if util is not None else ""
            rows.add_row(name, str(getattr(q.limits, name)), str(getattr(q.usage, name)), pct)
        out.print(rows)
        if q.burst.session_id:
            out.print(f"burst session {q.burst.session_id} until {q.burst.expire_time.ToJsonString()}")

    emit(ctx, q, table)


@main.command()
@click.option("--cpu", "cpu_millis", type=click.IntRange(min=0), default=0, help="Extra CPU (millis).")
@click.option("--memory", "memory_mb", type=click.IntRange(min=0), default=0, help="Extra memory (MiB).")
@click.option("--jobs", "concurrent_jobs", type=click.IntRange(min=0), default=0, help="Extra concurrent jobs.")
@click.option("--duration", "duration_seconds", type=click.IntRange(min=1), default=600, show_default=True)
@click.option("--tenant", help="For this tenant (admins) [default: your own].")
@pass_ctx
def burst(ctx: Ctx, /, **kwargs: Any) -> None:
    """Ask for a time-boxed burst session beyond your quota."""
    session = ctx.client.burst(**kwargs)
    emit(ctx, session, lambda: out.print(f"{session.session_id} until {session.expire_time.ToJsonString()}"))


@main.command()
@pass_ctx
def pools(ctx: Ctx) -> None:
    """The worker pools and their state."""
    found = ctx.client.pools()

    def table() -> None:
        rows = Table("POOL", "KIND", "WORKERS", "IDLE", "BUSY", "RUNNING JOBS", "MIN", "MAX", box=None)
        for p in found:
            kind = t.PoolKind.Name(p.kind).removeprefix("POOL_KIND_")
            cells = (p.workers, p.idle_workers, p.busy_workers, p.running_jobs, p.min_workers, p.max_workers)
            rows.add_row(p.pool_id, kind, *map(str, cells))
        out.print(rows)

    emit(ctx, found, table)


@main.group()
def cost() -> None:
    """Cost reports."""


@cost.command()
@click.option("--start", help="RFC 3339 start [default: 30 days ago].")
@click.option("--end", help="RFC 3339 end [default: now].")
@click.option("--tenant", help="One tenant (admins) [default: all, or your own].")
@pass_ctx
def report(ctx: Ctx, start: str | None, end: str | None, tenant: str | None) -> None:
    """Cost by tenant, pool and day, with recommendations."""
    answer = ctx.client.cost_report(start, end, tenant)

    def table() -> None:
        rows = Table("TENANT", "TOTAL", "BURST", "JOBS", "BY POOL", box=None)
        for r in answer.reports:
            pools = ", ".join(f"{line.key} {line.cost.amount}" for line in r.by_pool)
            rows.add_row(r.tenant_id, f"{r.total.amount} {r.total.currency}", r.burst_spend.amount, str(r.jobs), pools)
        out.print(rows)
        for r in answer.reports:
            for rec in r.recommendations:
                out.print(f"{r.tenant_id}: {rec.description}", markup=False)
        if answer.idle_cost.currency:
            out.print(f"idle cost {answer.idle_cost.amount} {answer.idle_cost.currency}")

    emit(ctx, answer, table)


@main.command()
@click.argument("shell", type=click.Choice(["bash", "zsh", "fish"]))
def completion(shell: str) -> None:
    """Print the shell completion script: eval "$(jobmesh completion bash)"."""
    from click.shell_completion import get_completion_class

    cls = get_completion_class(shell)
    assert cls is not None
    print(cls(main, {}, "jobmesh", "_JOBMESH_COMPLETE").source())


def run(argv: list[str] | None = None, epilog: str = "") -> int:
    """Runs the command line; returns its exit code."""
    if epilog:
        main.epilog = epilog
    try:
        main.main(args=argv, prog_name="jobmesh", standalone_mode=False)
    except click.exceptions.Exit as exc:
        return int(exc.exit_code)
    except click.ClickException as exc:
        exc.show()
        return EXIT_USAGE if isinstance(exc, click.UsageError | click.BadParameter) else exc.exit_code
    except click.exceptions.Abort:
        err.print("aborted")
        return 130
    except SystemExit as exc:
        return int(exc.code or 0) if isinstance(exc.code, int | None) else 1
    except BrokenPipeError:
        return 0
    return EXIT_OK


def entry() -> None:
    raise SystemExit(run())
