"""The main job: a local cluster with a real sample of Cambridge buildings, and a few answers."""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from orchestrator import cluster, metadata_store, resources, topology
from orchestrator.connections import app_target, connect, superuser_target
from orchestrator.ingest.loader import IngestResult, ingest

log = logging.getLogger(__name__)

SAMPLES = resources.path("samples")
SAMPLE_READINGS = SAMPLES / "cambridge-2023-sample.csv.gz"
SAMPLE_BUILDINGS = SAMPLES / "buildings.csv"
DEMO_TZ = "Europe/London"

PERIOD_SQL = """
SELECT buildsmart.month_bucket(max(ts), %(tz)s) AS month_start,
       buildsmart.month_bucket(max(ts), %(tz)s) + interval '1 month' AS month_end,
       buildsmart.time_bucket('1 day', max(ts) - interval '13 days', %(tz)s) AS profile_start
  FROM public.readings
"""
TOP_CONSUMERS_SQL = """
SELECT r.building, round(sum(r.kwh)::numeric) AS kwh,
       round((sum(r.kwh) / nullif(b.floor_area_m2, 0))::numeric, 2) AS kwh_per_m2
  FROM public.readings r JOIN public.buildings b ON b.code = r.building
 WHERE r.ts >= %(from)s AND r.ts < %(to)s
 GROUP BY r.building, b.floor_area_m2
 ORDER BY kwh DESC
 LIMIT 5
"""
# From the daily rollups (local days of the building, maintained on the workers as rows arrive),
# with how complete each day is.
DAILY_PROFILE_SQL = """
SELECT ts AS day, meter, round(kwh::numeric, 1) AS kwh, completeness
  FROM public.readings_daily
 WHERE building = %(building)s AND ts >= %(from)s AND ts < %(to)s
 ORDER BY day, meter
"""
LATEST_SQL = "SELECT building, meter, ts, kwh FROM public.latest_readings ORDER BY building, meter"


@dataclass
class DemoAnswers:
    ingest: IngestResult
    month_start: datetime
    top_consumers: list[tuple[Any, ...]]
    profile_building: str
    daily_profile: list[tuple[Any, ...]]
    latest: list[tuple[Any, ...]]
    uri: str


def load_buildings(directory: Path, path: Path = SAMPLE_BUILDINGS) -> list[str]:
    """Upsert the sample's buildings (floor area, floors) into public.buildings."""
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    with path.open() as fh:
        rows = list(csv.DictReader(fh))
    with connect(superuser_target(topo.coordinator, creds), "demo", autocommit=True) as conn, conn.transaction():
        for r in rows:
            conn.execute(
                "INSERT INTO public.buildings (code, floor_area_m2, floors, time_zone, attributes) "
                "VALUES (%s, %s, %s, %s, jsonb_build_object('approx_room_area_m2', %s::float8, 'source', 'Cambridge Estates')) "
                "ON CONFLICT (code) DO UPDATE SET floor_area_m2 = EXCLUDED.floor_area_m2, floors = EXCLUDED.floors, "
                "attributes = EXCLUDED.attributes",
                (r["Building ID"], float(r["GIA (m2)"]), int(r["Number of floors"]), DEMO_TZ, float(r["Approx RA (m2)"])),
            )
    log.info("loaded %d buildings", len(rows))
    return [r["Building ID"] for r in rows]


def _meters_and_rollups(topo: topology.Topology, creds: topology.Credentials) -> None:
    """The sample's meters as a user sets them up (their names say the kind), then the rollups
    brought up to date now rather than by the task runner a few seconds later."""
    from orchestrator import catalog
    from orchestrator.energy import imports, reference, rollups
    from orchestrator.energy.model import MeterSpec, kind_from_name
    from orchestrator.nodeconn import NodeConnections

    with NodeConnections(topo, creds, "demo") as nodes:
        pairs = nodes.coordinator.execute("SELECT DISTINCT building, meter FROM public.readings").fetchall()
        imports.upsert_meters(nodes.coordinator, [MeterSpec(str(b), str(m), kind_from_name(str(m))) for b, m in pairs])
        reference.sync(nodes, catalog.load_fragments(nodes.coordinator))
        rollups.reconcile(nodes)
        rollups.refresh(nodes)


def run(directory: Path, workers: int = 3, report: Callable[[str], None] | None = None) -> DemoAnswers:
    directory = directory.resolve()
    say = report or (lambda _m: None)
    # No split points: the first load lays the fragments out from the sample's own buildings.
    topo = cluster.up(directory, workers=workers, report=say)
    # as `buildsmart up` does: the devices outbox and the local MongoDB-protocol server for the mirror
    metadata_store.start(directory, topo, topology.load_credentials(directory), mongo_uri=None, local_server=True, report=say)
    load_buildings(directory)
    say(f"loading {SAMPLE_READINGS.name} (12 Cambridge buildings, 2023) ...")
    result = ingest(directory, str(SAMPLE_READINGS))
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    _meters_and_rollups(topo, creds)
    target = app_target(topo.coordinator, creds)
    with connect(target, "demo", autocommit=True) as conn:
        period = conn.execute(PERIOD_SQL, {"tz": DEMO_TZ}).fetchone()
        assert period is not None and period[0] is not None, "the sample loaded no rows"
        month_start, month_end, profile_start = period
        top = conn.execute(TOP_CONSUMERS_SQL, {"from": month_start, "to": month_end}).fetchall()
        building = top[0][0]
        profile = conn.execute(
            DAILY_PROFILE_SQL, {"tz": DEMO_TZ, "building": building, "from": profile_start, "to": month_end}
        ).fetchall()
        latest = conn.execute(LATEST_SQL).fetchall()
    return DemoAnswers(result, month_start, top, building, profile, latest, target.uri())
