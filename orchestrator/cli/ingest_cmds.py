"""``buildsmart ingest``: load readings with a progress bar and a summary."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, console, out, setup_logging
from orchestrator.ingest.loader import DEFAULT_BATCH_ROWS, DEFAULT_STREAMS, IngestResult, ingest


def summary(result: IngestResult) -> str:
    return (
        f"{result.source}: {result.rows:,} rows in {result.seconds:.1f} s ({result.rows_per_second:,.0f} rows/s) — "
        f"loaded {result.loaded:,} (new {result.inserted:,}, replaced {result.replaced:,}, unchanged {result.unchanged:,}), "
        f"rejected {result.rejected:,}"
    )


def _terminate(signum: int, frame: object) -> None:
    """SIGTERM stops an ingest like Ctrl-C: in-flight batches settle and the summary is exact."""
    raise KeyboardInterrupt


@app.command("ingest")
def ingest_cmd(
    path: Annotated[str, typer.Argument(help="CSV (plain or .gz) or JSON lines file; - for standard input.")],
    directory: DirOpt = DEFAULT_DIR,
    rejects: Annotated[Path | None, typer.Option(help="Write bad lines here (line, column, reason, raw) and go on.")] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="csv or jsonl [default: from the file name].")] = None,
    batch_rows: Annotated[int, typer.Option(help="Rows per committed batch.")] = DEFAULT_BATCH_ROWS,
    streams: Annotated[int, typer.Option(help="Parallel connections per fragment.")] = DEFAULT_STREAMS,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep reading a growing file or stdin until Ctrl-C.")] = False,
    commit_interval: Annotated[float, typer.Option(help="With --follow: commit what arrived at least this often (s).")] = 1.0,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Load readings; each row goes straight to the worker that holds its fragment."""
    setup_logging(directory, verbose)
    show_bar = console.is_terminal and not verbose
    with Progress(
        TextColumn("[bold]ingest[/]"),
        BarColumn(),
        TaskProgressColumn(),
        TextColumn("{task.fields[rows]:>12,} rows  {task.fields[rate]:>10,.0f} rows/s"),
        TimeElapsedColumn(),
        console=console,
        disable=not show_bar,
        transient=True,
    ) as bar:
        task = bar.add_task("ingest", total=None, rows=0, rate=0.0)
        started = bar.get_time()

        def progress(rows: int, position: int, size: int | None) -> None:
            elapsed = max(bar.get_time() - started, 1e-6)
            bar.update(task, completed=position, total=size, rows=rows, rate=rows / elapsed)

        previous = signal.signal(signal.SIGTERM, _terminate)
        try:
            result = ingest(
                directory, path, rejects=rejects, fmt=fmt, batch_rows=batch_rows, progress=progress,
                follow=follow, commit_interval=commit_interval, streams=streams,
            )  # fmt: skip
        finally:
            signal.signal(signal.SIGTERM, previous)
    out.print(summary(result))
    if result.rejected and rejects:
        out.print(f"{result.rejected:,} rejected line(s) written to {rejects}")
    sys.stdout.flush()
