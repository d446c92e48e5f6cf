"""Project Haystack's value kinds as Python values, shared by the Zinc and JSON codecs.

Str, Bool, date, time and aware datetime (tz a ``zoneinfo.ZoneInfo``) are plain Python values; the
other kinds are small frozen dataclasses. A grid is meta + columns + rows of dicts; a missing
cell is absent from the row dict (Haystack's null).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any


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


def error_grid(message: str, trace: str | None = None) -> Grid:
    """Haystack's error grid: meta ``err``, ``dis`` and optionally ``errTrace``."""
    meta: dict[str, Any] = {"err": MARKER, "dis": message}
    if trace:
        meta["errTrace"] = trace
    return Grid.of([], meta)
