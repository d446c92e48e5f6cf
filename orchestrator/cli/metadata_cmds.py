"""Device metadata commands: `devices import`, `mirror` (continuous or --once), `mirror verify`, `mirror target`."""

from __future__ import annotations

import json
import logging
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import psycopg
import typer

from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, out, report, setup_logging
from orchestrator.exceptions import BuildSmartError, NodeError
from orchestrator.metadata import importer, verify
from orchestrator.metadata.mirror import DEFAULT_BATCH, Mirror, pg_connect, run_once
from orchestrator.runtime import mongo

log = logging.getLogger(__name__)

devices_app = typer.Typer(help="Device metadata (Project Haystack / Brick) in public.devices.", no_args_is_help=True)
mirror_app = typer.Typer(help="Mirror public.devices to a MongoDB replica set.", invoke_without_command=True)
app.add_typer(devices_app, name="devices")
app.add_typer(mirror_app, name="mirror")


@devices_app.command("import")
def devices_import(
    file: Annotated[Path, typer.Argument(help="Haystack JSON grid (.json) or Brick Turtle (.ttl).")],
    directory: DirOpt = DEFAULT_DIR,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Upsert the file's entities by id in one transaction: changed ones updated, the rest kept."""
    setup_logging(directory, verbose)
    entities = importer.parse(file)  # a bad file fails here, before any connection
    with pg_connect(directory, "devices-import") as conn:
        try:
            result = importer.import_entities(conn, entities, str(file))
        except psycopg.Error as exc:
            raise NodeError(f"import of {file} failed, nothing was imported: {exc}") from exc
    linked = ", ".join(result.linked_buildings) or "none"
    report(
        f"[green]imported[/] {file}: {result.entities} entities, {result.inserted} inserted, "
        f"{result.updated} updated, {result.unchanged} unchanged; linked to buildings: {linked}"
    )


class _StopOnSignal:
    """SIGINT/SIGTERM set an event: the mirror finishes its batch and exits cleanly."""

    def __init__(self) -> None:
        self.event = threading.Event()

    def __enter__(self) -> threading.Event:
        self._old = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGINT, signal.SIGTERM)}
        return self.event

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        log.info("mirror received signal %d: stopping after the current batch", signum)
        self.event.set()

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


@mirror_app.callback()
def mirror(
    ctx: typer.Context,
    directory: DirOpt = DEFAULT_DIR,
    once: Annotated[bool, typer.Option("--once", help="Catch up and exit instead of running continuously.")] = False,
    batch_size: Annotated[int, typer.Option(help="Events per MongoDB transaction.", min=1)] = DEFAULT_BATCH,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Apply every device change to MongoDB in commit order; continuous until Ctrl-C unless --once."""
    if ctx.invoked_subcommand is not None:
        return
    setup_logging(directory, verbose)
    if once:
        applied = run_once(directory, batch_size)
        report(f"[green]mirror caught up[/]: {applied} events applied")
        return
    runner = Mirror(directory, batch_size)
    try:
        with _StopOnSignal() as stop:
            report(f"mirror running (database {runner.config.database}); Ctrl-C to stop")
            log.info("mirror started for %s", directory.resolve())
            runner.run(stop)
    finally:
        runner.close()
    log.info("mirror stopped after applying %d events", runner.applied)
    report(f"mirror stopped: {runner.applied} events applied")


@mirror_app.command("verify")
def mirror_verify(
    directory: DirOpt = DEFAULT_DIR,
    repair: Annotated[bool, typer.Option("--repair", help="Queue corrections and apply them (if no mirror runs).")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Machine-readable output.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose")] = False,
) -> None:
    """Compare PostgreSQL and MongoDB (counts, per-document hashes); exit 1 if they differ."""
    setup_logging(directory, verbose)
    run = verify.run_verify(directory, repair)
    if as_json:
        out.print_json(json.dumps({
            "before": run.before.as_dict(), "queued_repairs": run.queued, "applied": run.applied,
            "after": run.after.as_dict() if run.after else None,
        }))  # fmt: skip
    else:
        _print_verify(run.before, run.queued, run.applied)
        if run.after is not None:
            _print_verify(run.after, 0, None)
    # Exit 1 while differences remain; a repair handed to a running mirror counts as done.
    # (A BuildSmartError, not typer.Exit: app.main() runs click with standalone_mode=False,
    # which drops typer.Exit codes.)
    final = run.after or run.before
    if (run.after is not None and not run.after.ok) or (not run.queued and not run.before.ok):
        raise BuildSmartError(
            f"PostgreSQL and MongoDB differ: {len(final.missing)} missing, {len(final.extra)} extra,"
            f" {len(final.different)} different" + ("" if repair else " (run with --repair)")
        )


def _print_verify(result: verify.VerifyReport, queued: int, applied: int | None) -> None:
    def sample(ids: list[str]) -> str:
        return ", ".join(ids[:5]) + (" ..." if len(ids) > 5 else "")

    state = "[green]in sync[/]" if result.ok else "[red]differences found[/]"
    report(f"{state}: {result.postgres_count} documents in PostgreSQL, {result.mongo_count} in MongoDB, {result.pending} pending")
    for label, ids in (
        ("missing in MongoDB", result.missing),
        ("extra in MongoDB", result.extra),
        ("different", result.different),
    ):
        if ids:
            report(f"  {len(ids)} {label}: {sample(ids)}")
    if queued:
        tail = f"applied {applied} events" if applied is not None else "a running mirror will apply them"
        report(f"[green]repair[/]: queued {queued} corrective events; {tail}")


@mirror_app.command("target")
def mirror_target(
    uri: Annotated[str, typer.Argument(help="mongodb://host1,host2,host3/?replicaSet=rs0 of any replica set.")],
    directory: DirOpt = DEFAULT_DIR,
    database: Annotated[str, typer.Option(help="Database for the devices collection.")] = mongo.DEFAULT_DATABASE,
) -> None:
    """Mirror to an existing MongoDB replica set instead of the local server (stored in DIR/mongo.json)."""
    setup_logging(directory)
    mongo.use_external(directory, uri, database)
    report(f"[green]mirror target set[/]: database {database} on the given replica set")
