"""``buildsmart upgrade``: the extension of every node to the version this code ships."""

from __future__ import annotations

from typing import Annotated

import typer

from orchestrator import EXTENSION_VERSION, topology, upgrade
from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, out, report, setup_logging


@app.command(name="upgrade")
def upgrade_cmd(
    directory: DirOpt = DEFAULT_DIR,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Show each node's version and change nothing.")] = False,
    verbose: Annotated[bool, typer.Option("-v", help="Show the log on the terminal.")] = False,
) -> None:
    """Update the buildsmart extension on every node, all or none (no restart needed)."""
    setup_logging(directory, verbose)
    if dry_run:
        topo, creds = topology.load(directory.resolve()), topology.load_credentials(directory.resolve())
        for v in upgrade.versions(topo, creds):
            action = "up to date" if v.installed == EXTENSION_VERSION else f"would update {v.installed} -> {EXTENSION_VERSION}"
            out.print(f"{v.node}: installed {v.installed}, available {v.available}: {action}")
        return
    for v in upgrade.upgrade(directory, report):
        out.print(f"{v.node}: {v.installed}")
