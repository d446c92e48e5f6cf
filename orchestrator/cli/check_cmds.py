"""``buildsmart check``: integrity of the running cluster (see orchestrator/check.py)."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer
from rich.markup import escape

from orchestrator import check
from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, console, out, setup_logging

FINDINGS_EXIT = 6


@app.command(name="check")
def check_cmd(
    directory: DirOpt = DEFAULT_DIR,
    replicas: Annotated[bool, typer.Option("--replicas/--no-replicas", help="Compare every replica with its primary.")] = True,
    pages: Annotated[bool, typer.Option("--pages/--no-pages", help="Check heap pages and indexes with amcheck.")] = True,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
    verbose: Annotated[bool, typer.Option("-v", help="Show the log on the terminal.")] = False,
) -> None:
    """Check the catalog, where rows are, replicas against primaries and pages; exit 6 on findings."""
    setup_logging(directory, verbose)
    report = check.run_check(
        directory, replicas=replicas, pages=pages, progress=lambda m: console.print(f"[dim]checking {escape(m)}[/]")
    )
    if as_json:
        data = asdict(report)
        data["started_at"] = report.started_at.isoformat()
        data["ok"] = report.ok
        out.print_json(json.dumps(data))
    else:
        for finding in report.findings:
            out.print(f"[red]{escape(str(finding))}[/]")
        out.print(report.summary())
    if not report.ok:
        raise typer.Exit(FINDINGS_EXIT)
