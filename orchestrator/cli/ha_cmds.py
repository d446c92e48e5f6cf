"""High-availability commands: switchover and failover of a node group (wrapping Patroni's)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from orchestrator import runtime, topology
from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, report, setup_logging
from orchestrator.exceptions import ConfigError
from orchestrator.runtime import ha

GroupArg = Annotated[str, typer.Argument(help="Node group: coordinator, w1, w2, ...")]


def _check_member(topo: topology.Topology, group: str, member: str | None) -> None:
    names = [m.name for m in topo.group(group).members]
    if member is not None and member not in names:
        raise ConfigError(f"{member!r} is not a member of {group} (members: {', '.join(names)})")


def _change_leader(directory: Path, group: str, to: str | None, planned: bool, force: bool = False) -> str:
    """Switch over (planned) or fail over GROUP, wait for the new leader; returns the sentence to show."""
    directory = directory.resolve()
    topo = topology.load(directory)
    _check_member(topo, group, to)
    settings = runtime.for_cluster(directory, topo).ha()
    if settings is None:
        raise ConfigError(f"{group} is not a Patroni group (this cluster runs plain servers): there is no replica to promote")
    before = ha.leader_of(topo, topo.group(group), settings)
    if planned:
        result = ha.switchover(topo, topo.group(group), settings, to)
    else:
        result = ha.failover(topo, topo.group(group), settings, to, force)
    new = ha.wait_new_leader(topo, topo.group(group), settings, before)
    verb = "switched over" if planned else "failed over"
    return f"{group}: {verb} from {before or 'no leader'} to {new} ({result})"


@app.command()
def switchover(
    group: GroupArg,
    to: Annotated[str | None, typer.Option("--to", help="Member to promote [default: the synchronous standby].")] = None,
    directory: DirOpt = DEFAULT_DIR,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Planned switchover: the primary of GROUP hands over cleanly (Patroni's switchover)."""
    setup_logging(directory, verbose)
    report(_change_leader(directory, group, to, planned=True))


@app.command()
def failover(
    group: GroupArg,
    to: Annotated[str | None, typer.Option("--to", help="Member to promote [default: the synchronous standby].")] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Promote a member that is not the sync standby (may lose acknowledged commits).")
    ] = False,
    directory: DirOpt = DEFAULT_DIR,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Unplanned failover: promote a replica of GROUP now, even without a healthy primary (Patroni's failover).
    Only the synchronous standby is promoted unless --force (another replica may lack acknowledged commits)."""
    setup_logging(directory, verbose)
    report(_change_leader(directory, group, to, planned=False, force=force))
