"""``buildsmart backup init | create | point | list | status | verify | restore``."""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from orchestrator.backup import check, decide, ops, points, repo, restore
from orchestrator.backup.decide import RestorePoint
from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, out, report, setup_logging
from orchestrator.elastic.context import open_cluster
from orchestrator.exceptions import ClusterStateError, ConfigError

backup_app = typer.Typer(help="Backups and point-in-time recovery of the whole cluster.", no_args_is_help=True)
app.add_typer(backup_app, name="backup")

Verbose = Annotated[bool, typer.Option("-v", "--verbose")]


def _mb(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f} MB"


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 3600:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


@backup_app.command("init")
def init_cmd(
    repo_path: Annotated[Path | None, typer.Option("--repo", help="Repository directory [default: DIR/backups].")] = None,
    keep: Annotated[int | None, typer.Option("--keep", help="Base backups kept per node group, at least [3].")] = None,
    keep_days: Annotated[float | None, typer.Option("--keep-days", help="Base backups younger than this are kept [7].")] = None,
    points_every: Annotated[float | None, typer.Option("--points-every", help="Minutes between points (0: none) [60]")] = None,
    base_every: Annotated[float | None, typer.Option("--base-every", help="Hours between base backups (0: none) [24]")] = None,
    directory: DirOpt = DEFAULT_DIR,
    verbose: Verbose = False,
) -> None:
    """Set the backup repository (WAL of every member is archived there from now on), retention and
    the task runner's schedule. Rerun to change any of them; what is not given stays."""
    setup_logging(directory, verbose)
    current = repo.load(directory.resolve()) if repo.exists(directory.resolve()) else None
    ret, sched = (current.retention, current.schedule) if current else (repo.Retention(), repo.Schedule())
    ret = repo.Retention(ret.keep_count if keep is None else keep, ret.keep_days if keep_days is None else keep_days)
    sched = repo.Schedule(
        sched.points_every_min if points_every is None else points_every, sched.base_every_h if base_every is None else base_every
    )
    if ret.keep_count < 1 or min(ret.keep_days, sched.points_every_min, sched.base_every_h) < 0:
        raise ConfigError("--keep must be at least 1; --keep-days, --points-every and --base-every at least 0")
    ops.init(directory, repo_path, ret, report, sched)
    report("next: `buildsmart backup create` (base backups), then `buildsmart backup point NAME`")


@backup_app.command("create")
def create_cmd(directory: DirOpt = DEFAULT_DIR, verbose: Verbose = False) -> None:
    """A base backup of every node group, then retention."""
    setup_logging(directory, verbose)
    done = ops.create(directory, report)
    report(f"base backups done: {', '.join(f'{g} {b}' for g, b in done.items())}")


@backup_app.command("point")
def point_cmd(
    name: Annotated[str, typer.Argument(help="Name of the restore point (letters, digits, _ . -).")],
    reason: Annotated[str, typer.Option(help="Why (recorded): manual, schedule, migration, move, split ...")] = "manual",
    directory: DirOpt = DEFAULT_DIR,
    verbose: Verbose = False,
) -> None:
    """A cluster-consistent restore point: writes pause for a moment, every node gets the point."""
    setup_logging(directory, verbose)
    ops.ensure_configured(directory)
    with open_cluster(directory, "backup:point") as el:
        p = points.make_restore_point(el, name, reason)
    listing = ops.listing(directory)
    ok = dict((q.name, r) for q, r in listing.points).get(p.name, False)
    report(
        f"restore point {p.name}: {len(p.lsns)} node groups, catalog version {p.catalog_version}, "
        f"{len(p.fragments)} fragments checksummed; write pause {p.pause_ms:.1f} ms"
    )
    if not ok:
        report("[yellow]not restorable yet[/]: a node group has no base backup before it; run `buildsmart backup create`")


def _point_row(p: RestorePoint, restorable: bool) -> dict[str, object]:
    return {
        "name": p.name,
        "created_at": p.created_at.isoformat(),
        "reason": p.reason,
        "catalog_version": p.catalog_version,
        "pause_ms": round(p.pause_ms, 1),
        "fragments": len(p.fragments),
        "restorable": restorable,
    }


@backup_app.command("list")
def list_cmd(
    directory: DirOpt = DEFAULT_DIR,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    verbose: Verbose = False,
) -> None:
    """Base backups per node group and cluster restore points."""
    setup_logging(directory, verbose)
    listing = ops.listing(directory)
    if as_json:
        data = {
            "backups": [{**asdict(b), "end_time": b.end_time.isoformat() if b.end_time else None} for b in listing.backups],
            "points": [_point_row(p, r) for p, r in listing.points],
        }
        out.print_json(json.dumps(data))
        return
    t = Table(title="base backups")
    for col in ("node", "backup", "status", "ended", "end LSN", "timeline", "size"):
        t.add_column(col)
    for b in listing.backups:
        t.add_row(b.group, b.backup_id, b.status, f"{b.end_time:%Y-%m-%d %H:%M:%S}" if b.end_time else "-", b.end_lsn,
                  str(b.timeline), _mb(b.size_bytes))  # fmt: skip
    pt = Table(title="cluster restore points")
    for col in ("point", "created (UTC)", "reason", "catalog version", "pause", "restorable"):
        pt.add_column(col)
    for p, r in listing.points:
        pt.add_row(p.name, f"{p.created_at:%Y-%m-%d %H:%M:%S}", p.reason, str(p.catalog_version), f"{p.pause_ms:.1f} ms",
                   "yes" if r else "[yellow]no (no base backup before it)[/]")  # fmt: skip
    out.print(t)
    out.print(pt)


@backup_app.command("status")
def status_cmd(
    directory: DirOpt = DEFAULT_DIR,
    as_json: Annotated[bool, typer.Option("--json")] = False,
    verbose: Verbose = False,
) -> None:
    """Repository, space used, age of the last good backup, archiving failures (exit 4 when any problem)."""
    setup_logging(directory, verbose)
    st = ops.status(directory)
    if as_json:
        out.print_json(json.dumps(asdict(st), default=str))
    else:
        out.print(f"repository: {st.repository or '-'}  space used: {_mb(st.space_used_bytes)}")
        out.print(f"last good base backup (all node groups): {_age(st.last_good_backup_age_s)} ago; "
                  f"last restore point: {st.last_point or '-'} ({_age(st.last_point_age_s)} ago)")  # fmt: skip
        for problem in st.problems:
            out.print(f"[bold red]{problem}[/]")
        if st.ok:
            out.print("[green]backups ok[/]")
    if not st.ok:
        raise typer.Exit(ClusterStateError.exit_code)


def _source_repo(source: Path, repo_path: Path | None) -> repo.Repository:
    if repo_path is not None:
        return repo.Repository(repo_path.resolve())
    return repo.load(source.resolve()).repo


def resolve_target(r: repo.Repository, to: str) -> tuple[RestorePoint, str]:
    """``--to``: a point's name, or a time (ISO 8601; without offset = UTC) -> the latest point at or before it."""
    known = points.load_points(r)
    for p in known:
        if p.name == to:
            return p, f"restore point {p.name}"
    try:
        when = datetime.fromisoformat(to)
    except ValueError as exc:
        names = ", ".join(p.name for p in known) or "none"
        raise ConfigError(f"--to {to!r} is neither a restore point ({names}) nor an ISO time") from exc
    when = when if when.tzinfo else when.replace(tzinfo=UTC)
    p = decide.point_for_time(known, when)
    return p, f"restore point {p.name} ({p.created_at:%Y-%m-%d %H:%M:%S} UTC), the latest at or before {when.isoformat()}"


@backup_app.command("restore")
def restore_cmd(
    to: Annotated[str, typer.Option("--to", help="Restore point name, or a time: the latest point at or before it.")],
    directory: Annotated[Path, typer.Option("--dir", help="NEW cluster directory (must not hold a cluster).")],
    source: Annotated[Path, typer.Option("--from", help="The original cluster's directory.")] = DEFAULT_DIR,
    repo_path: Annotated[Path | None, typer.Option("--repo", help="Repository (when the original directory is gone).")] = None,
    replicas: Annotated[int | None, typer.Option(help="Replicas per node [default: as at the point].")] = None,
    verbose: Verbose = False,
) -> None:
    """Build a complete new local cluster from the repository at a cluster restore point."""
    setup_logging(directory, verbose)
    r = _source_repo(source, repo_path)
    point, what = resolve_target(r, to)
    report(f"restoring {what} into {directory.resolve()}")
    result = restore.restore(r, point, directory, replicas=replicas, report=report)
    for line in result.jobs_closed:
        report(line)
    report(f"restored in {result.seconds:.1f} s: cluster {result.topology.cluster_name} in {result.directory} is up "
           f"(`buildsmart status --dir {result.directory}`); the original cluster and its repository were only read")  # fmt: skip


@backup_app.command("verify")
def verify_cmd(
    point_name: Annotated[str | None, typer.Argument(help="Restore point [default: the latest restorable one].")] = None,
    directory: DirOpt = DEFAULT_DIR,
    repo_path: Annotated[Path | None, typer.Option("--repo", help="Repository (when DIR is gone).")] = None,
    verbose: Verbose = False,
) -> None:
    """Restore a point into a scratch directory and compare every fragment with the point's checksums."""
    setup_logging(directory, verbose)
    r = _source_repo(directory, repo_path)
    backups = ops.all_backups(r)
    if point_name is None:
        chosen = decide.latest_restorable(points.load_points(r), backups)
        if chosen is None:
            raise ClusterStateError("no restorable point: run `buildsmart backup create`, then `buildsmart backup point NAME`")
    else:
        chosen = points.load_point(r, point_name)
    report(f"verifying restore point {chosen.name}: restoring into a scratch directory ...")
    result = check.verify_point(r, chosen, report=report)
    if result.ok:
        report(f"[green]verified[/] {chosen.name}: {result.fragments} fragments equal the point's checksums "
               f"(restore {result.restore_seconds:.1f} s, total {result.seconds:.1f} s)")  # fmt: skip
        return
    for problem in result.mismatches:
        report(f"[bold red]{problem}[/]")
    raise ClusterStateError(f"restore point {chosen.name} did NOT verify: {len(result.mismatches)} difference(s)")
