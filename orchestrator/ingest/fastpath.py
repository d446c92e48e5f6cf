"""Which rows of a batch can be written with a plain COPY: pure functions over a frozen view.

Why: the latest-wins upsert (COPY into staging, DISTINCT ON, INSERT ... ON CONFLICT) costs about
three times a plain COPY, yet in the normal case, a meter sending its next interval, every key is
new. A row is *new* when its instant is after the meter's high-water mark (the latest instant the
writer knows to be stored for that building and meter) and its key appears once in the batch.

The high-water marks are a hint, never a promise: a wrong mark only costs speed. Too low (another
writer stored later readings) and the COPY meets an existing key, fails with unique_violation
inside its savepoint, and the writer upserts the whole part instead; too high and rows take the
upsert although they were new. So exactly-once and latest-wins never depend on this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

NO_ROWS = np.iinfo(np.int64).min  # high-water mark of a meter with no stored rows (or not known)


@dataclass(frozen=True, eq=False)
class Split:
    """``fast``: rows to COPY. ``pair_max``: the latest instant per pair in the batch."""

    fast: np.ndarray  # bool per row
    pair_max: np.ndarray  # int64 per pair


def split_new_rows(pair: np.ndarray, instant: np.ndarray, marks: np.ndarray) -> Split:
    """``pair``: index of each row's (building, meter) into ``marks``, the high-water marks.
    A row goes fast when its instant is after its pair's mark and no other row of the batch has
    the same pair and instant (repeats go to the upsert, where the last line wins)."""
    n = len(pair)
    pair_max = np.full(len(marks), NO_ROWS, dtype=np.int64)
    if n == 0:
        return Split(np.zeros(0, dtype=bool), pair_max)
    # Usually each meter's readings come in time order: a stable sort by pair (runs: linear) and
    # one comparison prove there are no repeats. Otherwise sort by (pair, instant) to find them.
    order = np.argsort(pair, kind="stable")
    p, t = pair[order], instant[order]
    same = p[1:] == p[:-1]
    repeated = np.zeros(n, dtype=bool)
    if (same & (t[1:] <= t[:-1])).any():
        order = np.lexsort((instant, pair))
        p, t = pair[order], instant[order]
        same = p[1:] == p[:-1]
        twice = same & (t[1:] == t[:-1])
        repeated[1:] |= twice
        repeated[:-1] |= twice
    last = np.append(~same, True)  # the last row of each pair holds its latest instant
    pair_max[p[last]] = t[last]
    fast = np.empty(n, dtype=bool)
    fast[order] = ~repeated & (t > marks[p])
    return Split(fast, pair_max)
