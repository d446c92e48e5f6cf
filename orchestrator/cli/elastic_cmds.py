"""Elasticity commands: node add/remove/drain, fragment move/split, rebalance, jobs, time partitions, migrate."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import typer
from rich.table import Table

from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, out, report, setup_logging
from orchestrator.elastic import balancer, jobs, maintenance, move, nodes, runner, split
from orchestrator.elastic.context import open_cluster
from orchestrator.elastic.rebalance import DEFAULT_TOLERANCE, plan_rebalance, simulate
from orchestrator.exceptions import ConfigError

node_app = typer.Typer(help="Add, drain and remove worker nodes.", no_args_is_help=True)
fragment_app = typer.Typer(help="Move and split fragments online.", no_args_is_help=True)
jobs_app = typer.Typer(help="Long operations queued by SQL (citus_*) or left by a killed orchestrator.", no_args_is_help=True)
app.add_typer(node_app, name="node")
app.add_typer(fragment_app, name="fragment")
app.add_typer(jobs_app, name="jobs")

Verbose = Annotated[bool, typer.Option("-v", "--verbose")]


def _fragment_id(value: str) -> int:
    digits = value.removeprefix("bsdata.").removeprefix("readings_f")
    if not digits.isdigit():
        raise ConfigError(f"{value!r} is not a fragment (give its id, e.g. 3, or readings_f3)")
    return int(digits)


@node_app.command("add")
def node_add(
    name: Annotated[str | None, typer.Argument(help="Node name [default: next wN].")] = None,
    host: Annotated[str | None, typer.Option(help="Register a server running elsewhere instead of starting one.")] = None,
    port: Annotated[int, typer.Option(help="Port of the remote server.")] = 5432,
    dbname: Annotated[str | None, typer.Option(help="Database of the remote server [default: the coordinator's].")] = None,
    directory: DirOpt = DEFAULT_DIR,
    verbose: Verbose = False,
) -> None:
    """Start a new worker (or register a remote one) and set it up; it holds no fragments until a move or rebalance."""
    setup_logging(directory, verbose)
    with open_cluster(directory, "node-add") as el:
        group = nodes.add_node(el, name, host, port if host else None, dbname, report)
    report(f"[green]added[/] worker {group.name} at {group.address}; run `buildsmart rebalance` to give it fragments")


@node_app.command("drain")
def node_drain(name: str, directory: DirOpt = DEFAULT_DIR, verbose: Verbose = False) -> None:
    """Move every fragment off a node (online) and stop placing fragments there."""
    setup_logging(directory, verbose)
    with open_cluster(directory, "node-drain") as el:
        moved = nodes.drain_node(el, name, report)
    report(f"[green]drained[/] {name}: {moved} fragment(s) moved")


@node_app.command("remove")
def node_remove(
    name: str,
    drain: Annotated[bool, typer.Option(help="Move the node's fragments off first.")] = False,
    directory: DirOpt = DEFAULT_DIR,
    verbose: Verbose = False,
) -> None:
    """Remove a worker; refused while it holds fragments unless --drain."""
    setup_logging(directory, verbose)
    with open_cluster(directory, "node-remove") as el:
        nodes.remove_node(el, name, drain, report)
    report(f"[green]removed[/] {name}")


@fragment_app.command("move")
def fragment_move(
    fragment: Annotated[str, typer.Argument(help="Fragment id (3) or name (readings_f3).")],
    node: Annotated[str, typer.Argument(help="Target worker.")],
    resume: Annotated[bool, typer.Option(help="Resume (or roll back and redo) an interrupted move of this fragment.")] = True,
    directory: DirOpt = DEFAULT_DIR,
    verbose: Verbose = False,
) -> None:
    """Copy a fragment to another worker while writes go on, verify, switch, drop the source."""
    setup_logging(directory, verbose)
    with open_cluster(directory, "move") as el:
        r = move.move_fragment(el, _fragment_id(fragment), node, resume=resume)
    report(
        f"[green]moved[/] fragment {r.fragment_id} {r.source} -> {r.target}: {r.rows:,} rows, "
        f"copy {r.copy_seconds:.2f} s ({r.rows_per_second:,.0f} rows/s), "
        f"write pause {r.pause_seconds * 1000:.0f} ms (job {r.job_id})"
    )


@fragment_app.command("split")
def fragment_split(
    fragment: Annotated[str, typer.Argument(help="Fragment id (3) or name (readings_f3).")],
    at: Annotated[str | None, typer.Option(help="First building of the new upper fragment [default: the median].")] = None,
    at_time: Annotated[
        str | None, typer.Option("--at-time", help="Split by time instead: first instant of the new fragment (with offset).")
    ] = None,
    directory: DirOpt = DEFAULT_DIR,
    verbose: Verbose = False,
) -> None:
    """Split a fragment in two on its node while writes go on: by building, or by time (--at-time)."""
    setup_logging(directory, verbose)
    try:
        when = datetime.fromisoformat(at_time) if at_time else None
    except ValueError as exc:
        raise ConfigError(f"--at-time {at_time!r}: {exc}") from exc
    with open_cluster(directory, "split") as el:
        r = split.split_fragment(el, _fragment_id(fragment), at, at_ts=when)
    where = f"at {r.at!r}" if r.at is not None else f"at {r.at_ts}"
    report(
        f"[green]split[/] fragment {r.fragment_id} {where}: new fragment {r.new_fragment_id} with {r.rows_moved:,} rows, "
        f"write pause {r.pause_seconds * 1000:.0f} ms (job {r.job_id})"
    )


@app.command()
def rebalance(
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan only.")] = False,
    tolerance: Annotated[float, typer.Option(help="Allowed deviation of bytes per node from the mean (fraction).")] = (
        DEFAULT_TOLERANCE
    ),
    directory: DirOpt = DEFAULT_DIR,
    verbose: Verbose = False,
) -> None:
    """Move and split fragments until bytes per node are even within --tolerance."""
    setup_logging(directory, verbose)
    with open_cluster(directory, "rebalance") as el:
        observed = balancer.observe_load(el)
        steps = plan_rebalance(observed, tolerance)  # dry run: with split points, as a run may need them
        if dry_run:
            for i, step in enumerate(steps, 1):
                out.print(f"{i}. {step.describe()}")
            after = simulate(observed, steps)
            out.print("bytes per node after: " + ", ".join(f"{n}={b:,}" for n, b in sorted(after.items())))
            if not steps:
                out.print("balanced within tolerance: nothing to do")
            return
        done = balancer.run(el, tolerance, report=report)
    report(f"[green]rebalanced[/]: {done} step(s)")


@app.command()
def retention(
    older_than: Annotated[str, typer.Option("--older-than", help="PostgreSQL interval, e.g. '13 months'.")],
    apply: Annotated[bool, typer.Option("--apply", help="Do it (the default is a dry run that lists partitions).")] = False,
    detach_only: Annotated[bool, typer.Option(help="Detach but keep the tables.")] = False,
    directory: DirOpt = DEFAULT_DIR,
    verbose: Verbose = False,
) -> None:
    """Drop (or detach) time partitions whose whole range is older than --older-than, on every fragment."""
    setup_logging(directory, verbose)
    with open_cluster(directory, "retention") as el:
        expired = maintenance.plan_retention(el, older_than)
        for p in expired:
            out.print(("" if apply else "would drop: ") + p.describe())
        if not apply:
            out.print(f"{len(expired)} partition(s); rerun with --apply to {'detach' if detach_only else 'drop'} them")
            return
        n = maintenance.apply_retention(el, expired, drop=not detach_only)
    report(f"[green]{'detached' if detach_only else 'dropped'}[/] {n} partition(s)")


@app.command()
def maintain(
    ahead: Annotated[int, typer.Option(help="Intervals of future partitions to keep.")] = maintenance.DEFAULT_AHEAD,
    directory: DirOpt = DEFAULT_DIR,
    verbose: Verbose = False,
) -> None:
    """Create future time partitions on every fragment (run it from cron)."""
    setup_logging(directory, verbose)
    with open_cluster(directory, "maintain") as el:
        created = maintenance.ensure_future_partitions(el, ahead)
    report(f"[green]ok[/]: {sum(created.values())} partition(s) created on {len(created)} fragment(s)")


@app.command()
def migrate(
    revision: Annotated[str, typer.Argument(help="Alembic revision (head, +1, an id).")] = "head",
    down: Annotated[bool, typer.Option("--down", help="Downgrade to REVISION instead.")] = False,
    directory: DirOpt = DEFAULT_DIR,
    verbose: Verbose = False,
) -> None:
    """Run alembic on the coordinator and every fragment of every node; all commit or none (2PC)."""
    from orchestrator.elastic import migrate as mig

    setup_logging(directory, verbose)
    mig.run(directory, revision, downgrade=down)
    report(f"[green]migrated[/] {'down' if down else 'up'} to {revision}")


@jobs_app.command("list")
def jobs_list(
    all_jobs: Annotated[bool, typer.Option("--all", help="Include finished jobs.")] = False,
    directory: DirOpt = DEFAULT_DIR,
) -> None:
    """Jobs with their step and state."""
    with open_cluster(directory, "jobs") as el:
        rows = el.coord.execute(
            "SELECT job_id, kind, state, step, args::text, coalesce(error, '') FROM buildsmart.jobs "
            "WHERE %s OR state IN ('scheduled', 'running') ORDER BY job_id",
            (all_jobs,),
        ).fetchall()
    table = Table(title="jobs")
    for col in ("job", "kind", "state", "step", "args", "error"):
        table.add_column(col)
    for r in rows:
        table.add_row(*(str(v) for v in r))
    out.print(table)


@jobs_app.command("run")
def jobs_run(
    job_id: Annotated[int | None, typer.Argument(help="One job [default: every open job].")] = None,
    directory: DirOpt = DEFAULT_DIR,
    verbose: Verbose = False,
) -> None:
    """Run queued jobs and resume interrupted ones."""
    setup_logging(directory, verbose)
    with open_cluster(directory, "jobs") as el:
        ran = runner.run_pending(el, job_id, report)
        states = [jobs.get(el.coord, j) for j in ran]
    report(f"[green]ran[/] {len(ran)} job(s): " + ", ".join(f"{j.job_id} {j.state}" for j in states))
