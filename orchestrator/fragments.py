"""Fragments: building ranges in C (byte) order, their names and routing. Pure functions only.

A fragment holds a building range for all time, or, once one building outgrew a fragment, a time
range of a building range (a *time group*: several fragments with the same building range whose
time ranges tile it; on the coordinator that range is a table partitioned by time)."""

from __future__ import annotations

import bisect
import csv
import itertools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from orchestrator.exceptions import ConfigError

SHARD_SCHEMA = "bsdata"
DISTRIBUTED_TABLE = "readings"


@dataclass(frozen=True, order=True)
class Fragment:
    """A building range [range_from, range_to) of ``readings`` placed on one node."""

    fragment_id: int
    range_from: str | None
    range_to: str | None
    node: str
    time_interval: str = "1 month"
    ts_from: datetime | None = None  # time range inside a time group (None = unbounded)
    ts_to: datetime | None = None
    time_group: str | None = None  # the coordinator table (bsdata.<time_group>) it is a partition of

    @property
    def shard_name(self) -> str:
        return shard_name(self.fragment_id)

    def holds(self, building: str) -> bool:
        return (self.range_from is None or c_order(building) >= c_order(self.range_from)) and (
            self.range_to is None or c_order(building) < c_order(self.range_to)
        )

    def holds_time(self, ts: datetime) -> bool:
        return (self.ts_from is None or ts >= self.ts_from) and (self.ts_to is None or ts < self.ts_to)

    def describe_range(self) -> str:
        text = f"[{self.range_from or 'MINVALUE'}, {self.range_to or 'MAXVALUE'})"
        if self.time_group is not None:
            lo = "MINVALUE" if self.ts_from is None else f"{self.ts_from:%Y-%m-%d %H:%M}"
            hi = "MAXVALUE" if self.ts_to is None else f"{self.ts_to:%Y-%m-%d %H:%M}"
            text += f" x ts [{lo}, {hi})"
        return text


def shard_name(fragment_id: int) -> str:
    return f"{DISTRIBUTED_TABLE}_f{fragment_id}"


def c_order(text: str) -> bytes:
    """PostgreSQL's C collation compares UTF-8 bytes; so do we."""
    return text.encode("utf-8")


def validate_split_points(points: Sequence[str]) -> tuple[str, ...]:
    """Split points must be non-empty and strictly increasing in C order (kept verbatim: building
    ids may start or end with spaces)."""
    cleaned = tuple(points)
    for p in cleaned:
        if not p:
            raise ConfigError("a fragment split point is empty")
    for a, b in itertools.pairwise(cleaned):
        if c_order(a) >= c_order(b):
            raise ConfigError(f"fragment split points must increase in byte order: {a!r} is not before {b!r}")
    return cleaned


def weighted_split_points(counts: Mapping[str, int], fragments: int) -> tuple[str, ...]:
    """Split points that cut buildings, in byte order, into at most ``fragments`` ranges of about
    equal weight (rows). A split point is the first building of a range. Each cut goes before the
    building where the running total is nearest to its target (total * i / fragments); a building
    is never cut, so one heavier than a range's share gets a range to itself and fewer ranges can
    come out."""
    if fragments < 1:
        raise ConfigError("need at least one fragment")
    ordered = sorted(((b, n) for b, n in counts.items() if n > 0), key=lambda item: c_order(item[0]))
    total = sum(n for _, n in ordered)
    if len(ordered) < 2:
        return ()
    before = list(itertools.accumulate((n for _, n in ordered), initial=0))[:-1]  # rows before building j
    cuts: list[int] = []
    for i in range(1, fragments):
        target = total * i / fragments
        j = bisect.bisect_left(before, target)
        candidates = [c for c in (j - 1, j) if 1 <= c < len(ordered)]
        if not candidates:
            continue
        best = min(candidates, key=lambda c: (abs(before[c] - target), c))
        if not cuts or best > cuts[-1]:
            cuts.append(best)
    return validate_split_points([ordered[c][0] for c in cuts])


def initial_fragments(split_points: Sequence[str], workers: Sequence[str], time_interval: str) -> tuple[Fragment, ...]:
    """Fragments for the split points, placed round-robin on the workers (fragment ids from 1)."""
    if not workers:
        raise ConfigError("a cluster needs at least one worker")
    points = validate_split_points(split_points)
    bounds: list[str | None] = [None, *points, None]
    return tuple(
        Fragment(i + 1, bounds[i], bounds[i + 1], workers[i % len(workers)], time_interval) for i in range(len(bounds) - 1)
    )


@dataclass(frozen=True)
class TimeGroup:
    """The fragments of one time-split building range, ordered by time."""

    fragments: tuple[Fragment, ...]

    def __post_init__(self) -> None:
        first, last = self.fragments[0], self.fragments[-1]
        if first.ts_from is not None or last.ts_to is not None:
            raise ConfigError(f"time group {first.time_group} does not cover all time (MINVALUE..MAXVALUE)")
        for a, b in itertools.pairwise(self.fragments):
            if a.ts_to != b.ts_from:
                raise ConfigError(f"fragments {a.fragment_id} and {b.fragment_id} leave a time gap or overlap")
        object.__setattr__(self, "_starts", [f.ts_from for f in self.fragments[1:]])

    def route(self, ts: datetime) -> Fragment:
        starts: list[datetime] = self._starts  # type: ignore[attr-defined]
        return self.fragments[bisect.bisect_right(starts, ts)]


def ts_of_csv_line(csv_line: bytes) -> datetime:
    """The timestamp of a normalised ``building,meter,ts,kwh`` line (validated by the reader)."""
    if b'"' in csv_line:
        fields = next(csv.reader([csv_line.decode()]))
        return datetime.fromisoformat(fields[2])
    return datetime.fromisoformat(csv_line.rsplit(b",", 2)[1].decode())


class Router:
    """Maps a building (and, for time-split building ranges, a timestamp) to its fragment with a
    binary search over the lower bounds."""

    def __init__(self, fragments: Sequence[Fragment]) -> None:
        if not fragments:
            raise ConfigError("no fragments: the cluster has not been initialised")
        by_range: dict[tuple[str | None, str | None], list[Fragment]] = {}
        for f in fragments:
            by_range.setdefault((f.range_from, f.range_to), []).append(f)
        entries: list[Fragment | TimeGroup] = []
        for members in by_range.values():
            if len(members) == 1 and members[0].time_group is None:
                entries.append(members[0])
            else:
                entries.append(TimeGroup(tuple(sorted(members, key=time_order))))
        entries.sort(key=lambda e: b"" if _first(e).range_from is None else c_order(_first(e).range_from or ""))
        ordered = [_first(e) for e in entries]
        self._check_contiguous(ordered)
        self.fragments = tuple(sorted(fragments, key=lambda f: (c_order(f.range_from or ""), *time_order(f))))
        self._entries = entries
        self._lower = [c_order(f.range_from) for f in ordered[1:] if f.range_from is not None]
        self._cache: dict[str, Fragment | TimeGroup] = {}
        self._bytes_cache: dict[bytes, Fragment | TimeGroup] = {}

    @staticmethod
    def _check_contiguous(ordered: Sequence[Fragment]) -> None:
        if ordered[0].range_from is not None or ordered[-1].range_to is not None:
            raise ConfigError("fragments do not cover every building (MINVALUE..MAXVALUE)")
        for a, b in itertools.pairwise(ordered):
            if a.range_to != b.range_from:
                raise ConfigError(f"fragments {a.fragment_id} and {b.fragment_id} leave a gap or overlap")

    def _entry_bytes(self, building: bytes) -> Fragment | TimeGroup:
        hit = self._bytes_cache.get(building)
        if hit is None:
            hit = self._entries[bisect.bisect_right(self._lower, building)]
            if len(self._bytes_cache) < 100_000:
                self._bytes_cache[building] = hit
        return hit

    def route_row(self, building: bytes, csv_line: bytes) -> Fragment:
        """Route one normalised CSV line (the ingest hot path: the timestamp is parsed only for
        buildings whose range is split by time)."""
        hit = self._entry_bytes(building)
        return hit.route(ts_of_csv_line(csv_line)) if isinstance(hit, TimeGroup) else hit

    def route_bytes(self, building: bytes, ts: datetime | None = None) -> Fragment:
        """Route a UTF-8 encoded building code; ``ts`` is needed for time-split ranges."""
        return self._resolve(self._entry_bytes(building), ts, building)

    def route(self, building: str, ts: datetime | None = None) -> Fragment:
        hit = self._cache.get(building)
        if hit is None:
            hit = self._entries[bisect.bisect_right(self._lower, c_order(building))]
            if len(self._cache) < 100_000:
                self._cache[building] = hit
        return self._resolve(hit, ts, building)

    @staticmethod
    def _resolve(hit: Fragment | TimeGroup, ts: datetime | None, building: str | bytes) -> Fragment:
        if isinstance(hit, Fragment):
            return hit
        if ts is None:
            raise ConfigError(f"building {building!r} is split by time: routing needs the timestamp")
        return hit.route(ts)


_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def time_order(f: Fragment) -> tuple[bool, datetime]:
    """Sort key inside a time group: the unbounded first fragment, then by start."""
    return (f.ts_from is not None, f.ts_from or _EPOCH)


def _first(entry: Fragment | TimeGroup) -> Fragment:
    return entry if isinstance(entry, Fragment) else entry.fragments[0]
