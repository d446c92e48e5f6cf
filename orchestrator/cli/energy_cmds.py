"""Energy analytics on the command line: `buildsmart rollups ...`, `buildsmart gaps`,
`buildsmart buildings import`, `buildsmart meters import|from-devices`."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from pathlib import Path
from typing import Annotated

import typer

from orchestrator import catalog
from orchestrator.cli.app import DEFAULT_DIR, DirOpt, app, out, report, setup_logging
from orchestrator.energy import gaps as energy_gaps
from orchestrator.energy import imports, model, reference, rollups
from orchestrator.exceptions import ConfigError, InputError, InputLocation
from orchestrator.nodeconn import NodeConnections
from orchestrator.topology import load, load_credentials

rollups_app = typer.Typer(help="Hourly and daily rollups on the workers: status, refresh, rebuild.", no_args_is_help=True)
buildings_app = typer.Typer(help="Buildings' metadata (time zone, area, name).", no_args_is_help=True)
meters_app = typer.Typer(help="Meters' metadata (kind, unit, register type, expected interval).", no_args_is_help=True)
app.add_typer(rollups_app, name="rollups")
app.add_typer(buildings_app, name="buildings")
app.add_typer(meters_app, name="meters")


@contextmanager
def _nodes(directory: Path, purpose: str) -> Iterator[NodeConnections]:
    directory = directory.resolve()
    setup_logging(directory)
    with NodeConnections(load(directory), load_credentials(directory), purpose) as nodes:
        yield nodes


def _ago(ts: datetime | None) -> str:
    if ts is None:
        return "never"
    return ts.isoformat(timespec="seconds")


@rollups_app.command("status")
def rollups_status(directory: DirOpt = DEFAULT_DIR) -> None:
    """Per fragment: when its rollups were built and refreshed, changes waiting, rows (estimated)."""
    with _nodes(directory, "rollups") as nodes:
        conf = rollups.settings(nodes.coordinator)
        rows = rollups.status(nodes)
    state = "paused" if conf.paused else f"refreshed every {conf.refresh_every_s:g} s by the task runner"
    out.print(
        f"rollups {state}; retention: raw {conf.keep_raw or 'for ever'}, hourly {conf.keep_hourly or 'for ever'}, "
        f"daily {conf.keep_daily or 'for ever'}"
    )
    for r in rows:
        pending = f"{r.pending} change(s) waiting since {_ago(r.oldest_pending)}" if r.pending else "fresh"
        out.print(
            f"  {r.shard} on {r.node}: built {_ago(r.built_at)}, refreshed {_ago(r.refreshed_at)}, {pending}; "
            f"~{r.hourly_rows} hourly, ~{r.daily_rows} daily rows"
        )


@rollups_app.command("refresh")
def rollups_refresh(directory: DirOpt = DEFAULT_DIR) -> None:
    """Refresh now what changed (the task runner does this every few seconds)."""
    with _nodes(directory, "rollups") as nodes:
        synced = reference.sync(nodes, catalog.load_fragments(nodes.coordinator))
        rec = rollups.reconcile(nodes)
        done = rollups.refresh(nodes)
    report(
        f"refreshed: {sum(r.changes for r in done)} change(s) on {len(done)} fragment(s), "
        f"{sum(r.hourly_rows for r in done)} hourly and {sum(r.daily_rows for r in done)} daily row(s) written; "
        f"metadata copied to {len(synced.workers)} worker(s); {len(rec.built)} fragment(s) built"
    )
    if rec.waiting:
        report(f"waiting for a lock on {', '.join(rec.waiting)}: run `buildsmart rollups refresh` again")


@rollups_app.command("rebuild")
def rollups_rebuild(directory: DirOpt = DEFAULT_DIR) -> None:
    """Recompute every fragment's rollups from raw rows (each fragment in its own transaction)."""
    with _nodes(directory, "rollups") as nodes:
        frags = catalog.load_fragments(nodes.coordinator)
        reference.sync(nodes, frags, force=True)
        rollups.reconcile(nodes)
        done = []
        for i, frag in enumerate(frags, 1):
            done += rollups.refresh(nodes, [frag], full=True)
            report(f"  [{i}/{len(frags)}] {frag.shard_name} on {frag.node} rebuilt")
    report(
        f"rebuilt {len(done)} fragment(s): {sum(r.hourly_rows for r in done)} hourly and "
        f"{sum(r.daily_rows for r in done)} daily row(s); each fragment committed on its own, rerun to redo all"
    )


@rollups_app.command("config")
def rollups_config(
    directory: DirOpt = DEFAULT_DIR,
    refresh_every: Annotated[str | None, typer.Option(help="How often the task runner refreshes, e.g. '5 seconds'.")] = None,
    keep_raw: Annotated[str | None, typer.Option(help="Drop raw time partitions older than this ('none': keep).")] = None,
    keep_hourly: Annotated[str | None, typer.Option(help="Delete hourly rollups older than this ('none': keep).")] = None,
    keep_daily: Annotated[str | None, typer.Option(help="Delete daily rollups older than this ('none': keep).")] = None,
    pause: Annotated[bool | None, typer.Option("--pause/--resume", help="Stop or restart background refresh.")] = None,
) -> None:
    """Refresh interval, retention of raw rows and of rollups (separately), pause/resume."""
    changes: dict[str, object] = {}
    for key, value in (("refresh_every", refresh_every), ("keep_raw", keep_raw), ("keep_hourly", keep_hourly),
                       ("keep_daily", keep_daily)):  # fmt: skip
        if value is not None:
            changes[key] = None if value.lower() == "none" else value
    if pause is not None:
        changes["paused"] = pause
    with _nodes(directory, "rollups") as nodes:
        conf = rollups.set_settings(nodes.coordinator, **changes)
    report(
        f"rollups: refresh every {conf.refresh_every_s:g} s{' (paused)' if conf.paused else ''}; retention raw "
        f"{conf.keep_raw or 'for ever'}, hourly {conf.keep_hourly or 'for ever'}, daily {conf.keep_daily or 'for ever'}"
    )


@app.command("gaps")
def gaps(
    directory: DirOpt = DEFAULT_DIR,
    building: Annotated[str | None, typer.Option(help="Only this building.")] = None,
    since: Annotated[datetime | None, typer.Option(help="Window start (also a gap before the first reading).")] = None,
    until: Annotated[datetime | None, typer.Option(help="Window end (also a gap after the last reading).")] = None,
) -> None:
    """Missing intervals per meter: where readings are further apart than the meter's expected interval."""
    with _nodes(directory, "gaps") as nodes:
        found = energy_gaps.find(nodes, building, since, until)
    for g in found:
        out.print(f"{g.building}  {g.meter}  {g.gap_from.isoformat()}  {g.gap_to.isoformat()}  {g.missing} missing")
    report(f"{len(found)} gap(s), {sum(g.missing for g in found)} reading(s) missing")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise InputError(InputLocation(str(path), 0), f"cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InputError(InputLocation(str(path), 0), f"not UTF-8 text ({exc.reason})") from None


def _sync_after(nodes: NodeConnections) -> None:
    synced = reference.sync(nodes, catalog.load_fragments(nodes.coordinator))
    if synced.workers:
        report(f"metadata copied to {', '.join(synced.workers)}; the rollups of changed meters refresh in the background")


@buildings_app.command("import")
def buildings_import(path: Path, directory: DirOpt = DEFAULT_DIR) -> None:
    """Buildings from CSV: code,name,time_zone,floor_area_m2,site,floors (code required)."""
    specs = model.parse_buildings(_read(path), str(path))
    with _nodes(directory, "import") as nodes:
        counts = imports.upsert_buildings(nodes.coordinator, specs)
        report(f"{path}: {counts.rows} building(s), {counts.changed} new or changed (committed)")
        _sync_after(nodes)


@meters_app.command("import")
def meters_import(path: Path, directory: DirOpt = DEFAULT_DIR) -> None:
    """Meters from CSV: building,meter,kind,unit,reading_type,multiplier,register_max,calorific_value,expected_interval."""
    specs = model.parse_meters(_read(path), str(path))
    with _nodes(directory, "import") as nodes:
        counts = imports.upsert_meters(nodes.coordinator, specs)
        report(f"{path}: {counts.rows} meter(s), {counts.changed} new or changed (committed)")
        _sync_after(nodes)


@meters_app.command("from-devices")
def meters_from_devices(directory: DirOpt = DEFAULT_DIR) -> None:
    """Buildings' time zone and area, and meters, from the Haystack metadata of `devices import`."""
    with _nodes(directory, "import") as nodes:
        try:
            b, m = imports.from_devices(nodes.coordinator)
        except KeyError as exc:
            raise ConfigError(f"Haystack metadata lacks {exc}") from None
        report(f"from devices: {b.rows} building(s) ({b.changed} changed), {m.rows} meter(s) ({m.changed} changed), committed")
        _sync_after(nodes)
