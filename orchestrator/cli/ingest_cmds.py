"""``buildsmart ingest``: load readings with a progress bar and a summary (MQTT: :mod:`.ingest_mqtt`)."""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Annotated

import typer
from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

from orchestrator.cli import ingest_mqtt as mqtt_cli
from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, console, out, setup_logging
from orchestrator.exceptions import ConfigError
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
    path: Annotated[
        str | None, typer.Argument(help="CSV (plain or .gz) or JSON lines file; - for standard input; none with --mqtt.")
    ] = None,
    directory: DirOpt = DEFAULT_DIR,
    rejects: Annotated[
        Path | None, typer.Option(help="Write bad lines here (line, column, reason, raw) and go on. MQTT: JSON lines, appended.")
    ] = None,
    fmt: Annotated[str | None, typer.Option("--format", help="csv or jsonl [default: from the file name].")] = None,
    batch_rows: Annotated[int | None, typer.Option(help="Rows per committed batch [files 100000; MQTT: at most 20000].")] = None,
    streams: Annotated[int, typer.Option(help="Parallel connections per fragment.")] = DEFAULT_STREAMS,
    follow: Annotated[bool, typer.Option("--follow", "-f", help="Keep reading a growing file or stdin until Ctrl-C.")] = False,
    commit_interval: Annotated[
        float, typer.Option(help="With --follow or --mqtt: commit what arrived at least this often (s).")
    ] = 1.0,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
    mqtt: mqtt_cli.UrlOpt = None,
    topic: mqtt_cli.TopicOpt = None,
    topic_levels: mqtt_cli.LevelsOpt = "building,meter",
    client_id: mqtt_cli.ClientIdOpt = None,
    username: mqtt_cli.UserOpt = None,
    password_file: mqtt_cli.PasswordOpt = None,
    ca_file: mqtt_cli.CaOpt = None,
    cert_file: mqtt_cli.CertOpt = None,
    key_file: mqtt_cli.KeyOpt = None,
    mqtt_version: mqtt_cli.VersionOpt = "5",
    session_expiry: mqtt_cli.ExpiryOpt = mqtt_cli.DEFAULT_SESSION_EXPIRY_S,
    max_inflight: mqtt_cli.InflightOpt = mqtt_cli.DEFAULT_RECEIVE_MAXIMUM,
    rejects_topic: mqtt_cli.RejectsTopicOpt = None,
) -> None:
    """Load readings from a file, standard input or an MQTT broker; each row goes straight to the
    worker that holds its fragment."""
    setup_logging(directory, verbose)
    if mqtt is not None:
        if path is not None or follow or fmt is not None:
            raise ConfigError("--mqtt reads from the broker: give no FILE, --follow or --format with it")
        mqtt_cli.run(
            directory, mqtt, topic or [], topic_levels=topic_levels, client_id=client_id, username=username,
            password_file=password_file, ca_file=ca_file, cert_file=cert_file, key_file=key_file,
            mqtt_version=mqtt_version, session_expiry=session_expiry, max_inflight=max_inflight, rejects=rejects,
            rejects_topic=rejects_topic, batch_rows=batch_rows, commit_interval=commit_interval, streams=streams,
            verbose=verbose,
        )  # fmt: skip
        return
    if path is None:
        raise ConfigError("give a FILE to load (- for standard input), or --mqtt URL --topic FILTER")
    if topic:
        raise ConfigError("--topic needs --mqtt URL")
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
                directory, path, rejects=rejects, fmt=fmt, batch_rows=batch_rows or DEFAULT_BATCH_ROWS, progress=progress,
                follow=follow, commit_interval=commit_interval, streams=streams,
            )  # fmt: skip
        finally:
            signal.signal(signal.SIGTERM, previous)
    out.print(summary(result))
    if result.rejected and rejects:
        out.print(f"{result.rejected:,} rejected line(s) written to {rejects}")
    sys.stdout.flush()
