"""The records the Haystack API serves: the imported devices (``public.devices``, tags as the
importer stored them), one ``site`` per building and one ``point his`` per (building, meter) that
has readings, derived from ``public.buildings`` and the readings themselves.

Which meters exist is a ``GROUP BY building, meter`` over every fragment (run on the workers):
a scan, so it is cached and refreshed in the background (``REFRESH_S``), and a write through
this server adds its meters at once. Filters run in SQL over devices and the derived records
together (orchestrator/serve/filter.py).
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from psycopg import sql
from psycopg_pool import ConnectionPool

from orchestrator.serve import filter as hfilter
from orchestrator.serve import ids, tz
from orchestrator.serve.kinds import MARKER, Coord, Number, Ref

log = logging.getLogger(__name__)

REFRESH_S = 60.0
UNIT = "kWh"
METER_MARKERS = {"electricity": "elec", "elec": "elec", "gas": "naturalGas", "water": "water", "heat": "heat"}
RECS = sql.SQL(
    "(SELECT d.id, d.metadata || jsonb_build_object('id', d.id) AS tags FROM public.devices d "
    "UNION ALL SELECT s ->> 'id', s FROM jsonb_array_elements(%(derived)s::jsonb) s)"
)


@dataclass(frozen=True)
class Building:
    code: str
    time_zone: str  # IANA
    floor_area_m2: float | None
    floors: int | None


@dataclass(frozen=True)
class Catalogue:
    """What the server knows about buildings and meters at one moment."""

    buildings: Mapping[str, Building]
    meters: frozenset[tuple[str, str]]
    loaded_at: float

    def building(self, code: str) -> Building:
        return self.buildings.get(code) or Building(code, "UTC", None, None)


def site_tags(b: Building) -> dict[str, Any]:
    tags: dict[str, Any] = {"id": ids.site_id(b.code), "site": True, "dis": b.code, "tz": tz.haystack_name(b.time_zone)}
    tags["buildsmartBuilding"] = b.code
    if b.floor_area_m2 is not None:
        tags["area"] = {"val": b.floor_area_m2, "unit": "m²"}
    if b.floors is not None:
        tags["floors"] = b.floors
    return tags


def point_tags(b: Building, meter: str) -> dict[str, Any]:
    """A meter as Haystack sees it: a his point of kWh per reading, in its building's zone."""
    tags: dict[str, Any] = {
        "id": ids.point_id(b.code, meter),
        "point": True,
        "his": True,
        "sensor": True,
        "energy": True,
        "dis": f"{b.code} {meter}",
        "siteRef": ids.site_id(b.code),
        "tz": tz.haystack_name(b.time_zone),
        "kind": "Number",
        "unit": UNIT,
        "meter": meter,
        "buildsmartBuilding": b.code,
    }
    marker = METER_MARKERS.get(meter.lower())
    if marker:
        tags[marker] = True
    return tags


def derived(cat: Catalogue) -> list[dict[str, Any]]:
    codes = sorted(set(cat.buildings) | {b for b, _ in cat.meters})
    out = [site_tags(cat.building(c)) for c in codes]
    out.extend(point_tags(cat.building(b), m) for b, m in sorted(cat.meters))
    return out


def to_haystack(tags: Mapping[str, Any], dis_of: Mapping[str, str] | None = None) -> dict[str, Any]:
    """jsonb tags (the importer's shapes) as Haystack values: ``id`` and ``*Ref`` tags are refs, a
    ``true`` a marker, ``{"val", "unit"}`` a number, ``{"lat", "lng"}`` a coordinate."""

    def value(name: str | None, v: Any) -> Any:
        if v is True:
            return MARKER
        if isinstance(v, bool) or v is None:
            return v
        if isinstance(v, str) and name is not None and (name == "id" or name.endswith("Ref")):
            return Ref(v, (dis_of or {}).get(v) if name == "id" else None)
        if isinstance(v, int | float):
            return Number(float(v))
        if isinstance(v, dict):
            if set(v) <= {"val", "unit"} and "val" in v and isinstance(v["val"], int | float):
                return Number(float(v["val"]), v.get("unit"))
            if set(v) == {"lat", "lng"}:
                return Coord(float(v["lat"]), float(v["lng"]))
            return {k: value(k, x) for k, x in v.items()}
        if isinstance(v, list):
            return [value(None, x) for x in v]
        return v

    out = {k: value(k, v) for k, v in tags.items() if v is not None}
    if "id" in out and isinstance(out["id"], Ref) and out["id"].dis is None and isinstance(tags.get("dis"), str):
        out["id"] = Ref(out["id"].val, tags["dis"])
    return out


class Records:
    """Records over a connection pool (the application role)."""

    def __init__(self, pool: ConnectionPool, refresh_s: float = REFRESH_S) -> None:
        self.pool = pool
        self.refresh_s = refresh_s
        self._lock = threading.Lock()
        self._cat: Catalogue | None = None
        self._loading = threading.Lock()

    # -- the catalogue of buildings and meters

    def catalogue(self) -> Catalogue:
        cat = self._cat
        if cat is None:
            return self.reload()
        if time.monotonic() - cat.loaded_at > self.refresh_s and self._loading.acquire(blocking=False):
            threading.Thread(target=self._reload_in_background, name="records-refresh", daemon=True).start()
        return cat

    def _reload_in_background(self) -> None:
        try:
            self.reload(locked=True)
        except Exception:  # a refresh failure keeps the old catalogue; the next request tries again
            log.warning("refreshing the point list failed", exc_info=True)
        finally:
            self._loading.release()

    def reload(self, locked: bool = False) -> Catalogue:
        started = time.monotonic()
        with self.pool.connection() as conn:
            brows = conn.execute("SELECT code, time_zone, floor_area_m2, floors FROM public.buildings").fetchall()
            mrows = conn.execute("SELECT building, meter FROM public.readings GROUP BY building, meter").fetchall()
        buildings = {str(r[0]): Building(str(r[0]), str(r[1] or "UTC"), r[2], r[3]) for r in brows}
        meters = frozenset((str(r[0]), str(r[1])) for r in mrows)
        with self._lock:
            extra = self._cat.meters - meters if self._cat is not None and locked else frozenset()
            self._cat = Catalogue(buildings, meters | extra, time.monotonic())
        log.info("point list: %d buildings, %d meters (%.2f s)", len(buildings), len(meters), time.monotonic() - started)
        return self._cat

    def add_meters(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Meters that a write through this server just created."""
        with self._lock:
            if self._cat is not None:
                new = frozenset(pairs) - self._cat.meters
                if new:
                    self._cat = Catalogue(self._cat.buildings, self._cat.meters | new, self._cat.loaded_at)

    # -- queries

    def _query(self, where: sql.Composable, params: dict[str, Any], limit: int | None) -> list[dict[str, Any]]:
        cat = self.catalogue()
        q = sql.SQL("SELECT r.id, r.tags FROM {recs} r WHERE {where} ORDER BY r.id{limit}").format(
            recs=RECS, where=where, limit=sql.SQL(" LIMIT {}").format(sql.Literal(limit)) if limit else sql.SQL("")
        )
        with self.pool.connection() as conn:
            rows = conn.execute(q, {"derived": json.dumps(derived(cat)), **params}).fetchall()
        return [dict(r[1]) for r in rows]

    def read_filter(self, node: hfilter.Node, limit: int | None = None) -> list[dict[str, Any]]:
        return [to_haystack(t) for t in self._query(hfilter.to_sql(node, RECS), {}, limit)]

    def read_ids(self, wanted: Sequence[str]) -> list[dict[str, Any]]:
        """One row per id in order; an unknown id gives an empty row (Haystack's rule)."""
        found = {t["id"]: t for t in self._query(sql.SQL("r.id = ANY(%(ids)s)"), {"ids": list(wanted)}, None)}
        return [to_haystack(found[i]) if i in found else {} for i in wanted]

    def nav(self, nav_id: str | None) -> list[dict[str, Any]]:
        """Root: the sites; a site: its points and the devices of that building."""
        cat = self.catalogue()
        if nav_id is None:
            rows = [site_tags(cat.building(c)) for c in sorted(set(cat.buildings) | {b for b, _ in cat.meters})]
            return [{**to_haystack(t), "navId": Ref(t["id"])} for t in rows]
        building = ids.parse_site(nav_id)
        if building is None:
            return []
        points = [to_haystack(point_tags(cat.building(building), m)) for b, m in sorted(cat.meters) if b == building]
        with self.pool.connection() as conn:
            devs = conn.execute(
                "SELECT d.metadata || jsonb_build_object('id', d.id) FROM public.devices d WHERE d.building = %s ORDER BY d.id",
                (building,),
            ).fetchall()
        return points + [to_haystack(dict(r[0])) for r in devs]
