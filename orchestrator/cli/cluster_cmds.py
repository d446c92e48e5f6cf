"""Cluster lifecycle and access commands: up, down, init, status, dsn, psql."""

from __future__ import annotations

import json
import os
import subprocess
from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from orchestrator import cluster, metadata_store, pgbin, status, topology
from orchestrator.backup import ops as backup_ops
from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, out, report, setup_logging
from orchestrator.connections import app_target, superuser_target
from orchestrator.exceptions import BuildSmartError
from orchestrator.metadata.mirror import mirror_lag
from orchestrator.runtime import ha
from orchestrator.spec import load_spec


def _split(value: str | None) -> list[str] | None:
    return [p for p in value.split(",")] if value else None


@app.command()
def up(
    directory: DirOpt = DEFAULT_DIR,
    workers: Annotated[int | None, typer.Option(help="Workers of a new cluster [default: 3].")] = None,
    split_at: Annotated[str | None, typer.Option(help="Building split points of a new cluster, comma-separated.")] = None,
    time_interval: Annotated[str, typer.Option(help="Time partition interval on the workers.")] = "1 month",
    replicas: Annotated[int | None, typer.Option(help="Streaming replicas per node of a new cluster [default: 1].")] = None,
    synchronous: Annotated[str, typer.Option(help="Patroni synchronous mode: on, strict or off.")] = "on",
    mongo_uri: Annotated[
        str | None, typer.Option(help="Mirror device metadata to this MongoDB replica set instead of a local server.")
    ] = None,
    no_mongo: Annotated[bool, typer.Option("--no-mongo", help="Start no local MongoDB-protocol server.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Create and start a local cluster (coordinator + workers), or restart the one in DIR."""
    setup_logging(directory, verbose)
    topo = cluster.up(
        directory, workers, _split(split_at), time_interval, report=report, replicas=replicas, synchronous=synchronous
    )
    creds = topology.load_credentials(directory.resolve())
    metadata_store.start(directory.resolve(), topo, creds, mongo_uri=mongo_uri, local_server=not no_mongo, report=report)
    report(f"[green]cluster up[/]: coordinator at {topo.coordinator.address}, {len(topo.workers)} workers")
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


def _fmt_bytes(n: int | None) -> str:
    if n is None:
        return "-"
    value = float(n)
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if value < 1024 or unit == "TB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return str(n)


def _members_and_mirror(directory: Path, data: dict[str, Any]) -> None:
    """Add each group's members (role, timeline, lag, sync) and the mirror lag to the status."""
    for node in data["nodes"]:
        try:
            node["members"] = ha.group_members_status(directory, node["name"])
        except BuildSmartError as exc:
            node["members"] = []
            node["members_error"] = str(exc)
    try:
        data["mirror"] = mirror_lag(directory)
    except BuildSmartError as exc:
        data["mirror"] = {"error": str(exc)}
    try:
        data["backup"] = asdict(backup_ops.status(directory))
    except BuildSmartError as exc:
        data["backup"] = {"error": str(exc)}


@app.command("status")
def status_cmd(
    directory: DirOpt = DEFAULT_DIR,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
) -> None:
    """Nodes (up/down, role, address, size, members), fragments (range, node, rows, bytes), mirror lag."""
    setup_logging(directory)
    directory = directory.resolve()
    data = status.collect(topology.load(directory), topology.load_credentials(directory))
    _members_and_mirror(directory, data)
    if as_json:
        out.print_json(json.dumps(data, default=str))
        return
    nodes = Table(title=f"cluster {data['cluster']}: nodes")
    for col in ("node", "role", "address", "state", "size"):
        nodes.add_column(col)
    members = Table(title="members of each node group")
    for col in ("node", "member", "address", "role", "state", "timeline", "lag", "sync"):
        members.add_column(col)
    for n in data["nodes"]:
        state = ("[green]up[/]" + (" (replica)" if n["in_recovery"] else " (primary)")) if n["up"] else "[red]down[/]"
        nodes.add_row(n["name"], n["role"], n["address"], state, _fmt_bytes(n["size_bytes"]))
        for m in n.get("members", []):
            lag = "-" if m.get("lag_bytes") is None else _fmt_bytes(m["lag_bytes"])
            members.add_row(
                n["name"], m["name"], f"{m['host']}:{m['port']}", m.get("role") or "-", m.get("state") or "-",
                str(m.get("timeline") or "-"), lag, "yes" if m.get("sync") else "",
            )  # fmt: skip
    frags = Table(title="fragments of readings")
    for col in ("fragment", "buildings", "node", "rows", "bytes", "time partitions"):
        frags.add_column(col, justify="right" if col in ("rows", "bytes", "time partitions") else "left")
    for f in data["fragments"]:
        rng = f"[{f['range_from'] or 'MIN'}, {f['range_to'] or 'MAX'})"
        rows = "-" if f["rows"] is None else f"{f['rows']:,}"
        parts = "-" if f["time_partitions"] is None else f"{f['time_partitions']} × {f['time_interval']}"
        frags.add_row(f["shard_name"], rng, f["node"], rows, _fmt_bytes(f["bytes"]), parts)
    out.print(nodes)
    out.print(members)
    out.print(frags)
    mirror = data.get("mirror")
    if mirror and "error" not in mirror:
        out.print(f"metadata mirror: {mirror.get('events', 0)} event(s), {mirror.get('seconds') or 0:.1f} s behind")
    elif mirror:
        out.print(f"metadata mirror: {mirror['error']}")
    backup = data.get("backup") or {}
    if backup.get("configured"):
        age = backup.get("last_good_backup_age_s")
        when = "none" if age is None else f"{age / 3600:.1f} h ago"
        out.print(f"backups: {backup['repository']}, last good base backup {when}, last point {backup.get('last_point') or '-'}")
    for problem in backup.get("problems", ()) if backup.get("configured") else ():
        out.print(f"[bold red]{problem}[/]")  # a failing archive is said loudly


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
