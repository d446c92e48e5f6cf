"""Cluster lifecycle and access commands: up, down, init, status, dsn, psql."""

from __future__ import annotations

import json
import os
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from orchestrator import catalog, cluster, metadata_store, pgbin, status, topology
from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, out, report, setup_logging
from orchestrator.connections import app_target, superuser_target
from orchestrator.serve import daemon as serve_daemon
from orchestrator.spec import load_spec


def _split(value: str | None) -> list[str] | None:
    return [p.strip() for p in value.split(",")] if value else None


@app.command()
def up(
    directory: DirOpt = DEFAULT_DIR,
    workers: Annotated[int | None, typer.Option(help="Workers of a new cluster [default: 3].")] = None,
    split_at: Annotated[str | None, typer.Option(help="Building split points of a new cluster, comma-separated.")] = None,
    time_interval: Annotated[str, typer.Option(help="Time partition interval on the workers.")] = "1 month",
    replicas: Annotated[int | None, typer.Option(help="Streaming replicas per node of a new cluster [default: 1].")] = None,
    synchronous: Annotated[str, typer.Option(help="Patroni synchronous mode: on, strict or off.")] = "on",
    balancer_paused: Annotated[
        bool, typer.Option("--balancer-paused", help="A new cluster's background balancer starts paused.")
    ] = False,
    mongo_uri: Annotated[
        str | None, typer.Option(help="Mirror device metadata to this MongoDB replica set instead of a local server.")
    ] = None,
    no_mongo: Annotated[bool, typer.Option("--no-mongo", help="Start no local MongoDB-protocol server.")] = False,
    serve: Annotated[
        int | None, typer.Option("--serve", help="Also run `buildsmart serve` on this port (dashboard, Haystack API).")
    ] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Create and start a local cluster (coordinator + workers), or restart the one in DIR."""
    setup_logging(directory, verbose)
    topo = cluster.up(
        directory, workers, _split(split_at), time_interval, report=report, replicas=replicas, synchronous=synchronous,
        balancer_paused=balancer_paused,
    )  # fmt: skip
    creds = topology.load_credentials(directory.resolve())
    metadata_store.start(directory.resolve(), topo, creds, mongo_uri=mongo_uri, local_server=not no_mongo, report=report)
    report(f"[green]cluster up[/]: coordinator at {topo.coordinator.address}, {len(topo.workers)} workers")
    if serve is not None:
        pid = serve_daemon.start_daemon(directory, port=serve)
        report(f"buildsmart serve running (pid {pid}): http://127.0.0.1:{serve}/ui/ (add a user: `buildsmart users add NAME`)")
    out.print(app_target(topo.coordinator, creds).uri())


@app.command()
def down(
    directory: DirOpt = DEFAULT_DIR,
    purge: Annotated[bool, typer.Option(help="Also delete DIR with all data.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Stop every server this cluster started (by PID, through pg_ctl)."""
    setup_logging(None if purge else directory, verbose)
    cluster.down(directory, purge=purge, report=report)


@app.command()
def init(
    spec: Annotated[Path, typer.Option("--spec", help="Cluster spec (TOML) listing existing servers.")],
    directory: DirOpt = DEFAULT_DIR,
    mongo_uri: Annotated[str | None, typer.Option(help="MongoDB replica set for the device metadata mirror.")] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Set up servers that already run elsewhere: extension, catalog, foreign servers, fragments."""
    setup_logging(directory, verbose)
    topo = cluster.init_remote(directory, load_spec(spec), report=report)
    creds = topology.load_credentials(directory.resolve())
    metadata_store.start(directory.resolve(), topo, creds, mongo_uri=mongo_uri, local_server=False, report=report)
    report(f"[green]initialised[/] {topo.cluster_name}: coordinator {topo.coordinator.address}, {len(topo.workers)} workers")
    report(
        "automatic balancing runs in the task runner: `buildsmart tasks start` here, or `buildsmart tasks run` under a "
        "service manager on each orchestrator host (one is elected)"
    )


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _fmt_range(f: status.FragmentStatus) -> str:
    text = f"[{f.range_from if f.range_from is not None else 'MIN'}, {f.range_to if f.range_to is not None else 'MAX'})"
    if f.time_group is not None:
        lo = f"{f.ts_from:%Y-%m-%d}" if f.ts_from else "MIN"
        hi = f"{f.ts_to:%Y-%m-%d}" if f.ts_to else "MAX"
        text += f" ts [{lo}, {hi})"
    return text


def render_status(data: status.ClusterStatus) -> None:
    nodes = Table(title=f"cluster {data.cluster}: nodes")
    for col in ("node", "role", "address", "state", "size"):
        nodes.add_column(col)
    members = Table(title="members of each node group")
    for col in ("node", "member", "address", "role", "state", "timeline", "lag", "sync"):
        members.add_column(col)
    for n in data.nodes:
        state = ("[green]up[/]" + (" (replica)" if n.in_recovery else " (primary)")) if n.up else "[red]down[/]"
        nodes.add_row(n.name, n.role, n.address, state, _fmt_bytes(n.size_bytes))
        for m in n.members:
            lag = "-" if m.lag_bytes is None else _fmt_bytes(m.lag_bytes)
            members.add_row(
                n.name, m.name, f"{m.host}:{m.port}", m.role or "-", m.state or "-", str(m.timeline or "-"), lag,
                "yes" if m.sync else "",
            )  # fmt: skip
    exact = any(f.rows_exact for f in data.fragments)
    frags = Table(title="fragments of readings" + ("" if exact else " (rows from statistics; --exact counts them)"))
    for col in ("fragment", "buildings", "node", "rows", "bytes", "time partitions"):
        frags.add_column(col, justify="right" if col in ("rows", "bytes", "time partitions") else "left")
    for f in data.fragments:
        rows = "-" if f.rows is None else f"{f.rows:,}"
        parts = "-" if f.time_partitions is None else f"{f.time_partitions} × {f.time_interval}"
        frags.add_row(f.shard_name, _fmt_range(f), f.node, rows, _fmt_bytes(f.bytes), parts)
    workers = Table(title="bytes per worker")
    for col in ("worker", "fragments", "rows", "bytes", "vs mean"):
        workers.add_column(col, justify="left" if col == "worker" else "right")
    for w in data.workers:
        vs_mean = "-" if w.vs_mean is None else f"{w.vs_mean:+.1%}"
        workers.add_row(w.node, str(w.fragments), f"{w.rows:,}", _fmt_bytes(w.bytes), vs_mean)
    out.print(nodes)
    out.print(members)
    out.print(frags)
    out.print(workers)
    if data.balancer is not None:
        render_balancer(data.balancer, data.tasks)
    if data.mirror_error:
        out.print(f"metadata mirror: {data.mirror_error}")
    elif data.mirror:
        out.print(f"metadata mirror: {data.mirror.get('events', 0)} event(s), {data.mirror.get('seconds') or 0:.1f} s behind")
    render_backup(data)
    render_check(data)


def render_check(data: status.ClusterStatus) -> None:
    """The newest integrity check: when, and its summary (red with findings)."""
    c = data.last_check
    if c is None:
        out.print("integrity check: never run (the task runner runs one daily; `buildsmart check` now)")
        return
    age_h = (datetime.now(UTC) - c.finished_at).total_seconds() / 3600
    line = f"integrity check {age_h:.1f} h ago: {escape(c.summary)}"
    out.print(line if c.ok else f"[bold red]{line}[/] (`buildsmart check` lists them)")


def render_backup(data: status.ClusterStatus) -> None:
    """One line about backups, and every backup problem in red (a failing archive is said loudly)."""
    b = data.backup
    if data.backup_error:
        out.print(f"[bold red]backups: {data.backup_error}[/]")
    if b is None or not b.configured:
        return
    age = "none" if b.last_good_backup_age_s is None else f"{b.last_good_backup_age_s / 3600:.1f} h ago"
    out.print(f"backups: {b.repository}, {b.space_used_bytes / 1e6:,.0f} MB, last good base backup {age}, "
              f"last point {b.last_point or '-'}")  # fmt: skip
    for problem in b.problems:
        out.print(f"[bold red]{problem}[/]")


def render_balancer(b: status.BalancerStatus, tasks: tuple[catalog.TaskRun, ...]) -> None:
    state = "[green]on[/]"
    if b.paused:
        state = f"[yellow]paused[/] ({b.paused_note})" if b.paused_note else "[yellow]paused[/]"
    runner = f"task runner {b.runner}" if b.runner else "[red]no task runner is running[/] (`buildsmart tasks start`)"
    out.print(f"balancer: {state}; {runner}; first-load layout {'automatic' if b.auto_layout else 'from given split points'}")
    for job_id, kind, jstate, step in b.open_jobs:
        out.print(f"  open job {job_id}: {kind} ({jstate}, step {step})")
    decisions = Table(title="balancer decisions (newest first)")
    for col in ("at", "action", "outcome", "fragment", "reason"):
        decisions.add_column(col)
    for d in b.decisions:
        extra = ""
        if d.detail.get("pause_seconds") is not None:
            extra = f" [{d.detail.get('seconds', 0):.1f} s, pause {float(d.detail['pause_seconds']) * 1000:.0f} ms]"
        if d.detail.get("error"):
            extra = f" [{d.detail['error']}]"
        decisions.add_row(
            f"{d.at:%Y-%m-%d %H:%M:%S}", d.action, d.outcome, "" if d.fragment_id is None else str(d.fragment_id),
            d.reason + extra,
        )  # fmt: skip
    out.print(decisions)
    if tasks:
        table = Table(title="periodic tasks")
        for col in ("task", "runner", "last run", "outcome", "runs", "failures", "summary"):
            table.add_column(col)
        for t in tasks:
            table.add_row(
                t.task, t.runner, f"{t.started_at:%H:%M:%S}", t.outcome, str(t.runs), str(t.failures), t.summary or "",
            )  # fmt: skip
        out.print(table)


@app.command("status")
def status_cmd(
    directory: DirOpt = DEFAULT_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    exact: Annotated[bool, typer.Option("--exact", help="Count every fragment's rows (reads all data).")] = False,
) -> None:
    """Nodes, members, fragments (range, node, rows, bytes), bytes per worker, the balancer and its
    last decisions, periodic tasks, mirror lag. Rows come from statistics unless --exact."""
    setup_logging(directory)
    data = status.collect(directory, exact=exact)
    if as_json:
        out.print_json(json.dumps(data.to_dict(), default=str))
        return
    render_status(data)


@app.command()
def dsn(
    directory: DirOpt = DEFAULT_DIR,
    admin: Annotated[bool, typer.Option(help="The orchestrator superuser instead of the application role.")] = False,
    mongo: Annotated[bool, typer.Option("--mongo", help="The MongoDB URI of the device metadata mirror.")] = False,
) -> None:
    """Print the coordinator's libpq URI (application role)."""
    directory = directory.resolve()
    if mongo:
        out.print(metadata_store.mongo_uri(directory))
        return
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    target = superuser_target(topo.coordinator, creds) if admin else app_target(topo.coordinator, creds)
    out.print(target.uri())


@app.command(context_settings={"allow_extra_args": True, "ignore_unknown_options": True})
def psql(
    ctx: typer.Context,
    directory: DirOpt = DEFAULT_DIR,
    admin: Annotated[bool, typer.Option(help="Connect as the orchestrator superuser.")] = False,
) -> None:
    """Open psql on the coordinator (extra arguments go to psql)."""
    directory = directory.resolve()
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    target = superuser_target(topo.coordinator, creds) if admin else app_target(topo.coordinator, creds)
    env = dict(os.environ, PGPASSWORD=target.password)
    cmd = [pgbin.tool("psql"), "-h", target.hosts, "-p", target.ports, "-U", target.user, "-d", target.dbname, *ctx.args]
    raise typer.Exit(subprocess.call(cmd, env=env))
