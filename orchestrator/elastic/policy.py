"""The balancer's policy: thresholds and limits as one frozen value, with defaults that can be
overridden per cluster (``buildsmart balancer config KEY=VALUE``, stored in buildsmart.balancer).

Why these defaults: a fragment costs every query that cannot prune it a little (one more remote
scan), so fragments are not made small for their own sake; ``fragments_per_worker`` (3) gives a
rebalance enough pieces to even bytes out to a few percent, and a fragment is split once it is
twice its fair share (or past ``split_bytes`` in any case). Small clusters are left alone: below
``min_cluster_bytes`` a move costs more than the imbalance it removes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from typing import Any

from orchestrator.exceptions import ConfigError

MIB = 1024 * 1024
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*(b|kb|mb|gb|tb|kib|mib|gib|tib)?\s*", re.IGNORECASE)
_UNITS = {None: 1, "b": 1, "kb": 1024, "kib": 1024, "mb": MIB, "mib": MIB, "gb": 1024 * MIB, "gib": 1024 * MIB}
_UNITS |= {"tb": 1024 * 1024 * MIB, "tib": 1024 * 1024 * MIB}


@dataclass(frozen=True)
class BalancerPolicy:
    fragments_per_worker: int = 3  # first-load layout, and the unit of a fragment's fair share
    max_fragments_per_worker: int = 12  # a split or move never takes a worker past this
    split_bytes: int = 1024 * MIB  # a fragment above this is split whatever its share
    min_split_bytes: int = 64 * MIB  # a fragment below this is never split
    min_cluster_bytes: int = 64 * MIB  # below this in total, bytes per worker are not balanced
    tolerance: float = 0.10  # bytes per worker within this fraction of the mean count as even
    hot_share: float = 0.5  # a fragment taking this share of all writes (sustained) is split
    hot_min_rows_per_s: float = 2000.0  # ... when the cluster writes at least this much
    busy_rows_per_s: float = 20000.0  # above this the cluster is loading: the balancer yields
    busy_duty: float = 0.25  # share of wall time the balancer may spend operating while busy
    busy_defer_s: float = 900.0  # while busy, evening bytes out waits this long (a bulk load ends)
    rate_window_s: float = 60.0  # write rates are averaged over this window
    interval_s: float = 5.0  # between two looks at the cluster
    min_time_split: str = "1 month"  # informational: time splits fall on time-partition bounds

    def split_threshold(self, total_bytes: int, workers: int) -> int:
        """Bytes above which a fragment is split: twice its fair share of the cluster, at least
        ``min_split_bytes`` and at most ``split_bytes``."""
        fair = total_bytes / max(1, workers * self.fragments_per_worker)
        return int(max(self.min_split_bytes, min(self.split_bytes, 2 * fair)))

    def with_settings(self, settings: Mapping[str, Any]) -> BalancerPolicy:
        return replace(self, **parse_settings(settings))

    def as_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


def parse_size(value: object) -> int:
    """Bytes from 123, "64MB", "1.5 GiB" (binary units either way)."""
    if isinstance(value, bool):
        raise ConfigError(f"not a size: {value!r}")
    if isinstance(value, int | float):
        return int(value)
    m = _SIZE_RE.fullmatch(str(value))
    if m is None:
        raise ConfigError(f"not a size: {value!r} (e.g. 67108864, 64MB, 1GB)")
    unit = m.group(2).lower() if m.group(2) else None
    return int(float(m.group(1)) * _UNITS[unit])


def parse_settings(settings: Mapping[str, Any]) -> dict[str, Any]:
    """Validated overrides: known keys only, converted to the field's type."""
    known = {f.name: f.type for f in fields(BalancerPolicy)}
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key not in known:
            raise ConfigError(f"unknown balancer setting {key!r}; known: {', '.join(sorted(known))}")
        kind = known[key]
        try:
            if key.endswith("_bytes"):
                out[key] = parse_size(value)
            elif kind in ("int", int):
                out[key] = int(value)
            elif kind in ("float", float):
                out[key] = float(value)
            else:
                out[key] = str(value)
        except (TypeError, ValueError) as exc:
            raise ConfigError(f"balancer setting {key}: {value!r} is not a {kind}") from exc
        if isinstance(out[key], int | float) and out[key] < 0:
            raise ConfigError(f"balancer setting {key} must not be negative")
    return out


def policy_from(settings: Mapping[str, Any]) -> BalancerPolicy:
    return BalancerPolicy().with_settings(settings)
