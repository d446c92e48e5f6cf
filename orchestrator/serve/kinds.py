"""Project Haystack's value kinds as Python values, shared by the Zinc and JSON codecs.

Str, Bool, date, time and aware datetime (tz a ``zoneinfo.ZoneInfo``) are plain Python values; the
other kinds are small frozen dataclasses. A grid is meta + columns + rows of dicts; a missing
cell is absent from the row dict (Haystack's null).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any
from zoneinfo import ZoneInfo


@dataclass(frozen=True)
class _Singleton:
    name: str

    def __repr__(self) -> str:
        return self.name


MARKER = _Singleton("Marker")
NA = _Singleton("NA")
REMOVE = _Singleton("Remove")


@dataclass(frozen=True)
class Number:
    val: float
    unit: str | None = None


@dataclass(frozen=True)
class Ref:
    val: str
    dis: str | None = None


@dataclass(frozen=True)
class Uri:
    val: str


@dataclass(frozen=True)
class Symbol:
    val: str


@dataclass(frozen=True)
class Coord:
    lat: float
    lng: float


@dataclass(frozen=True)
class XStr:
    type: str
    val: str


@dataclass(frozen=True)
class Col:
    name: str
    meta: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Grid:
    meta: Mapping[str, Any]
    cols: tuple[Col, ...]
    rows: tuple[Mapping[str, Any], ...]

    @staticmethod
    def of(rows: Sequence[Mapping[str, Any]], meta: Mapping[str, Any] | None = None, cols: Sequence[str] = ()) -> Grid:
        """A grid whose columns are ``cols`` then every other tag name in row order."""
        names = list(cols)
        seen = set(names)
        for row in rows:
            for name in row:
                if name not in seen:
                    seen.add(name)
                    names.append(name)
        if not names:
            names = ["empty"]
        return Grid({"ver": "3.0", **(meta or {})}, tuple(Col(n) for n in names), tuple(rows))

    def col_names(self) -> list[str]:
        return [c.name for c in self.cols]


EMPTY = Grid.of([])


@dataclass(frozen=True)
class His:
    """A one-point history grid (columns ts, val) kept as columns: hisRead of a year is 8,760 rows,
    and building a dict and kind objects per row costs more than the query; the codecs write it
    straight to text (zinc.encode_his, hayson.encode_his). ``grid()`` is the general form.

    The times are either aware datetimes (``times``) or already ISO 8601 text in the point's zone
    with its offset (``texts``, as PostgreSQL formats them for hisRead: no datetime objects)."""

    meta: Mapping[str, Any]
    zone: ZoneInfo
    unit: str | None
    values: Sequence[float]
    times: Sequence[datetime] = ()
    texts: Sequence[str] | None = None

    @staticmethod
    def of(meta: Mapping[str, Any], zone: ZoneInfo, unit: str | None, series: Sequence[tuple[datetime, float]]) -> His:
        return His(meta, zone, unit, [v for _, v in series], [ts for ts, _ in series])

    def grid(self) -> Grid:
        times = self.times if self.texts is None else [datetime.fromisoformat(t) for t in self.texts]
        rows = [{"ts": ts.astimezone(self.zone), "val": Number(v, self.unit)} for ts, v in zip(times, self.values, strict=True)]
        return Grid.of(rows, self.meta, cols=["ts", "val"])

    def local_texts(self) -> Sequence[str]:
        """Each ts as ISO 8601 in the point's zone, with its offset (``2023-06-01T01:00:00+01:00``)."""
        if self.texts is not None:
            return self.texts
        out = []
        offsets: dict[Any, str] = {}
        for ts in self.times:
            local = ts.astimezone(self.zone)
            off = local.utcoffset()
            text = offsets.get(off)
            if text is None:
                text = offsets[off] = local.isoformat()[-6:] if off is not None else "+00:00"
            naive = local.replace(tzinfo=None)
            out.append((naive.isoformat(timespec="milliseconds") if naive.microsecond else naive.isoformat()) + text)
        return out


def error_grid(message: str, trace: str | None = None) -> Grid:
    """Haystack's error grid: meta ``err``, ``dis`` and optionally ``errTrace``."""
    meta: dict[str, Any] = {"err": MARKER, "dis": message}
    if trace:
        meta["errTrace"] = trace
    return Grid.of([], meta)
