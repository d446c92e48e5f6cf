"""Fragments: building ranges in C (byte) order, their names and routing. Pure functions only."""

from __future__ import annotations

import bisect
import itertools
import string
from collections.abc import Sequence
from dataclasses import dataclass

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

    @property
    def shard_name(self) -> str:
        return shard_name(self.fragment_id)

    def holds(self, building: str) -> bool:
        return (self.range_from is None or c_order(building) >= c_order(self.range_from)) and (
            self.range_to is None or c_order(building) < c_order(self.range_to)
        )

    def describe_range(self) -> str:
        return f"[{self.range_from or 'MINVALUE'}, {self.range_to or 'MAXVALUE'})"


def shard_name(fragment_id: int) -> str:
    return f"{DISTRIBUTED_TABLE}_f{fragment_id}"


def c_order(text: str) -> bytes:
    """PostgreSQL's C collation compares UTF-8 bytes; so do we."""
    return text.encode("utf-8")


def validate_split_points(points: Sequence[str]) -> tuple[str, ...]:
    """Split points must be non-empty and strictly increasing in C order."""
    cleaned = tuple(p.strip() for p in points)
    for p in cleaned:
        if not p:
            raise ConfigError("a fragment split point is empty")
    for a, b in itertools.pairwise(cleaned):
        if c_order(a) >= c_order(b):
            raise ConfigError(f"fragment split points must increase in byte order: {a!r} is not before {b!r}")
    return cleaned


def quantile_split_points(buildings: Sequence[str], fragments: int) -> tuple[str, ...]:
    """Split points that put about the same number of known buildings in each of ``fragments`` ranges."""
    codes = sorted(set(buildings), key=c_order)
    if fragments < 1:
        raise ConfigError("need at least one fragment")
    if len(codes) < fragments:
        raise ConfigError(f"cannot split {len(codes)} buildings into {fragments} fragments")
    return tuple(codes[(i * len(codes)) // fragments] for i in range(1, fragments))


def even_split_points(fragments: int) -> tuple[str, ...]:
    """Split points spread over two-character codes of [0-9a-z] when no buildings are known yet."""
    alphabet = string.digits + string.ascii_lowercase
    space = len(alphabet) ** 2
    points = []
    for i in range(1, fragments):
        k = (i * space) // fragments
        points.append(alphabet[k // len(alphabet)] + alphabet[k % len(alphabet)])
    return validate_split_points(points)


def initial_fragments(split_points: Sequence[str], workers: Sequence[str], time_interval: str) -> tuple[Fragment, ...]:
    """Fragments for the split points, placed round-robin on the workers (fragment ids from 1)."""
    if not workers:
        raise ConfigError("a cluster needs at least one worker")
    points = validate_split_points(split_points)
    bounds: list[str | None] = [None, *points, None]
    return tuple(
        Fragment(i + 1, bounds[i], bounds[i + 1], workers[i % len(workers)], time_interval) for i in range(len(bounds) - 1)
    )


class Router:
    """Maps a building to its fragment with a binary search over the lower bounds."""

    def __init__(self, fragments: Sequence[Fragment]) -> None:
        ordered = sorted(fragments, key=lambda f: b"" if f.range_from is None else c_order(f.range_from))
        if not ordered:
            raise ConfigError("no fragments: the cluster has not been initialised")
        self._check_contiguous(ordered)
        self.fragments = tuple(ordered)
        self._lower = [c_order(f.range_from) for f in ordered[1:] if f.range_from is not None]
        self._cache: dict[str, Fragment] = {}
        self._bytes_cache: dict[bytes, Fragment] = {}

    @staticmethod
    def _check_contiguous(ordered: Sequence[Fragment]) -> None:
        if ordered[0].range_from is not None or ordered[-1].range_to is not None:
            raise ConfigError("fragments do not cover every building (MINVALUE..MAXVALUE)")
        for a, b in itertools.pairwise(ordered):
            if a.range_to != b.range_from:
                raise ConfigError(f"fragments {a.fragment_id} and {b.fragment_id} leave a gap or overlap")

    def route_bytes(self, building: bytes) -> Fragment:
        """Route a UTF-8 encoded building code (the ingest hot path; no decoding)."""
        hit = self._bytes_cache.get(building)
        if hit is None:
            hit = self.fragments[bisect.bisect_right(self._lower, building)]
            if len(self._bytes_cache) < 100_000:
                self._bytes_cache[building] = hit
        return hit

    def route(self, building: str) -> Fragment:
        hit = self._cache.get(building)
        if hit is None:
            hit = self.fragments[bisect.bisect_right(self._lower, c_order(building))]
            if len(self._cache) < 100_000:
                self._cache[building] = hit
        return hit
