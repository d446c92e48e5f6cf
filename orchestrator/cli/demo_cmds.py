"""``buildsmart demo``: the main job — a local cluster, a real sample, a few answers."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path
from typing import Annotated
from zoneinfo import ZoneInfo

import typer
from rich.table import Table

from orchestrator import demo
from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, out, report, setup_logging
from orchestrator.cli.ingest_cmds import summary
from orchestrator.serve import daemon as serve_daemon


@app.command("demo")
def demo_cmd(
    directory: DirOpt = DEFAULT_DIR,
    workers: Annotated[int, typer.Option(help="Workers of a new cluster.")] = 3,
    serve: Annotated[
        int | None, typer.Option("--serve", help="Also run `buildsmart serve` on this port (dashboard, Haystack API).")
    ] = None,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Bring a local cluster up, load 12 real Cambridge buildings (2023), print answers; it stays up."""
    setup_logging(directory, verbose)
    answers = demo.run(directory, workers=workers, report=report)
    if serve is not None:
        pid = serve_daemon.start_daemon(directory, port=serve)
        report(f"buildsmart serve running (pid {pid}): http://127.0.0.1:{serve}/ui/ (add a user: `buildsmart users add NAME`)")
    out.print(summary(answers.ingest))

    month = answers.month_start.strftime("%B %Y")
    top = Table(title=f"Top consumers in the last month of data ({month})")
    for col in ("building", "kWh", "kWh per m²"):
        top.add_column(col, justify="left" if col == "building" else "right")
    for building, kwh, per_m2 in answers.top_consumers:
        top.add_row(building, f"{kwh:,}", f"{per_m2}")
    out.print(top)

    prof = Table(title=f"Daily profile of {answers.profile_building}, last 14 days ({demo.DEMO_TZ} days, from the rollups)")
    for col in ("day", "meter", "kWh", "complete", ""):
        prof.add_column(col, justify="right" if col in ("kWh", "complete") else "left")
    peak = max((float(k or 0) for _, _, k, _ in answers.daily_profile), default=1.0) or 1.0
    for day, meter, kwh, complete in answers.daily_profile:
        prof.add_row(
            day.astimezone(ZoneInfo(demo.DEMO_TZ)).strftime("%a %d %b"), meter, f"{kwh:,}",
            "" if complete is None else f"{100 * complete:.0f} %", "█" * int(30 * float(kwh or 0) / peak),
        )  # fmt: skip
    out.print(prof)

    latest = Table(title="Last reading of each meter")
    for col in ("building", "meter", "time (UTC)", "kWh"):
        latest.add_column(col, justify="right" if col == "kWh" else "left")
    for building, meter, ts, kwh in answers.latest:
        latest.add_row(building, meter, ts.strftime("%Y-%m-%d %H:%M"), f"{kwh}")
    out.print(latest)

    d = f" --dir {directory}" if str(directory) != str(DEFAULT_DIR) else ""
    # the full path unless the venv is on PATH
    exe = "buildsmart" if shutil.which("buildsmart") else str(Path(sys.executable).parent / "buildsmart")
    out.print(f"\n[bold]Connect[/] (the cluster stays up; `{exe} down{d}` stops it):")
    out.print(f"  psql '{answers.uri}'")
    out.print(f"  {exe} psql{d}        # the same, with the bundled psql")
    out.print(f"  {exe} status{d}      # nodes, members, fragments, mirror lag")
    out.print(f"  {exe} dsn --mongo{d} # the MongoDB URI of the device metadata mirror")
