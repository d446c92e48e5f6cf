"""Split points from column statistics (pg_stats), not from reading the fragment.

A fragment's split point used to come from ``GROUP BY building`` over all of it: a full scan of
gigabytes to pick one value. ``ANALYZE ONLY`` of the fragment's root samples a fixed number of
rows (PostgreSQL 18: the parent only, the time partitions are not re-analyzed) and leaves, per
column, the most common values with their frequencies and an equi-depth histogram of the rest.
From those the fraction of rows below any value can be estimated; the split point is the
candidate whose estimate is nearest one half. Pure functions over frozen values.

Order: building values compare as UTF-8 bytes (the columns are COLLATE "C", so PostgreSQL's
histogram is sorted the same way); timestamps compare as instants.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from orchestrator.fragments import c_order

V = TypeVar("V", str, datetime)


@dataclass(frozen=True)
class ColumnStats(Generic[V]):
    """pg_stats of one column of a fragment (inherited = true: the whole partition tree)."""

    null_frac: float
    n_distinct: float  # negative: a fraction of the rows (PostgreSQL's convention)
    most_common: tuple[tuple[V, float], ...]  # value, frequency (fraction of all rows)
    histogram: tuple[V, ...]  # bounds of equally filled buckets of the other values, ascending


def _key(value: str | datetime) -> bytes | datetime:
    return c_order(value) if isinstance(value, str) else value


def fraction_below(stats: ColumnStats[V], value: V) -> float:
    """Estimated fraction of non-null rows with a value strictly below ``value``."""
    k: Any = _key(value)
    mcv_total = sum(f for _, f in stats.most_common)
    below: float = sum(f for v, f in stats.most_common if _key(v) < k)
    bounds: list[Any] = [_key(b) for b in stats.histogram]
    rest = max(0.0, 1.0 - stats.null_frac - mcv_total)
    if len(bounds) >= 2:
        # Buckets entirely below the value; a value equal to a bound starts that bucket.
        below += rest * min(bisect.bisect_left(bounds, k), len(bounds) - 1) / (len(bounds) - 1)
    non_null = 1.0 - stats.null_frac
    return below / non_null if non_null > 0 else 0.0


def best_cut(stats: ColumnStats[V], candidates: Sequence[V], target: float = 0.5) -> V | None:
    """The candidate whose estimated fraction below is nearest ``target`` with rows on both sides
    (None when no candidate leaves rows on both sides)."""
    scored: list[tuple[float, Any, V]] = []
    for c in candidates:
        f = fraction_below(stats, c)
        if 0.0 < f < 1.0:
            scored.append((abs(f - target), _key(c), c))
    if not scored:
        return None
    best: V = min(scored, key=lambda s: (s[0], s[1]))[2]
    return best


def building_split_point(stats: ColumnStats[str], range_from: str | None, range_to: str | None) -> str | None:
    """The building that halves a fragment's rows: a sampled value inside (range_from, range_to).

    When one building dominates, the best cut is just before or just after it, which isolates it in
    a fragment of its own at the next split (then it can only be split by time). None when the
    sample shows a single building."""
    lo = None if range_from is None else c_order(range_from)
    hi = None if range_to is None else c_order(range_to)
    values = {v for v, _ in stats.most_common} | set(stats.histogram)
    inside = [v for v in values if (lo is None or c_order(v) > lo) and (hi is None or c_order(v) < hi)]
    return best_cut(stats, sorted(inside, key=c_order))


def time_split_point(
    stats: ColumnStats[datetime], partition_starts: Sequence[datetime], ts_from: datetime | None, ts_to: datetime | None
) -> datetime | None:
    """The time-partition boundary that best halves a fragment's rows by time (a split on a
    boundary moves whole partitions and leaves no partition straddling two fragments)."""
    inside = [p for p in partition_starts if (ts_from is None or p > ts_from) and (ts_to is None or p < ts_to)]
    return best_cut(stats, sorted(inside))
