"""Validation of one reading's fields. Strict on purpose: what passes here, PostgreSQL accepts.

These functions are the definition of a valid reading. The vectorised parser (:mod:`.parse`) only
ever accepts a chunk when every row would pass here too; anything it is unsure of is checked
here, row by row, so the error messages have one source.
"""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

# ISO 8601 extended format with a mandatory UTC offset (Z, +HH, +HHMM, +HH:MM).
# ASCII digits only (re.ASCII): Python's \d also matches other scripts' digits, which float()
# accepts and PostgreSQL does not. The same patterns run vectorised (RE2) in .parse.
TS_PATTERN = r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:Z|[+-]\d{2}(?::?\d{2})?)"
NUMBER_PATTERN = r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?"
TS_RE = re.compile(TS_PATTERN, re.ASCII)
NUMBER_RE = re.compile(NUMBER_PATTERN, re.ASCII)
# A number whose mantissa is all zeros: the only texts for which 0.0 is the exact value.
ZERO_PATTERN = r"[+-]?(?:0+(?:\.0*)?|\.0+)(?:[eE][+-]?\d+)?"
ZERO_RE = re.compile(ZERO_PATTERN, re.ASCII)
MAX_TEXT = 200
# PostgreSQL refuses UTC offsets beyond 15:59:59 ("time zone displacement out of range").
MAX_OFFSET = timedelta(hours=15, minutes=59, seconds=59)
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
ONE_US = timedelta(microseconds=1)


class FieldError(ValueError):
    """A field is invalid: ``field`` names it (0-based index into the header order)."""

    def __init__(self, field: int, reason: str) -> None:
        super().__init__(reason)
        self.field = field
        self.reason = reason


def check_text(value: str, name: str, field: int) -> str:
    if not value:
        raise FieldError(field, f"empty {name}")
    if len(value) > MAX_TEXT:
        raise FieldError(field, f"{name} longer than {MAX_TEXT} characters")
    if "\x00" in value:
        raise FieldError(field, f"{name} contains a NUL character")
    if "\r" in value or "\n" in value:
        # a line break inside a code: CSV rows, logs and the rejects file would be cut there
        raise FieldError(field, f"{name} contains a line break (CR or LF)")
    return value


def parse_ts(value: str, field: int) -> datetime:
    if not TS_RE.fullmatch(value):
        raise FieldError(field, f"bad timestamp {value!r}: expected ISO 8601 with offset, e.g. 2023-01-31 23:00:00+00")
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError as exc:
        raise FieldError(field, f"bad timestamp {value!r}: {exc}") from exc
    offset = parsed.utcoffset()
    if offset is not None and abs(offset) > MAX_OFFSET:
        raise FieldError(field, f"bad timestamp {value!r}: UTC offset beyond ±15:59:59")
    return parsed


def ts_micros(value: str, field: int) -> int:
    """The instant of a valid timestamp as microseconds since 1970-01-01 UTC (exact)."""
    return (parse_ts(value, field) - EPOCH) // ONE_US


def parse_kwh(value: str, field: int) -> float:
    if not NUMBER_RE.fullmatch(value):
        raise FieldError(field, f"kwh {value!r} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise FieldError(field, f"kwh {value!r} is not finite")
    if number == 0.0 and not ZERO_RE.fullmatch(value):
        # PostgreSQL rejects an underflow to zero (e.g. 1e-400) instead of rounding it.
        raise FieldError(field, f"kwh {value!r} is too close to zero for double precision")
    return number
