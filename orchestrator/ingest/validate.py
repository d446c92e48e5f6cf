"""Validation of one reading's fields. Strict on purpose: what passes here, PostgreSQL accepts."""

from __future__ import annotations

import math
import re
from datetime import datetime

# ISO 8601 extended format with a mandatory UTC offset (Z, +HH, +HHMM, +HH:MM).
TS_RE = re.compile(r"\d{4}-\d{2}-\d{2}[T ]\d{2}:\d{2}(?::\d{2}(?:\.\d{1,6})?)?(?:Z|[+-]\d{2}(?::?\d{2})?)")
NUMBER_RE = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
MAX_TEXT = 200


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
    return value


def parse_ts(value: str, field: int) -> datetime:
    if not TS_RE.fullmatch(value):
        raise FieldError(field, f"bad timestamp {value!r}: expected ISO 8601 with offset, e.g. 2023-01-31 23:00:00+00")
    try:
        return datetime.fromisoformat(value)
    except ValueError as exc:
        raise FieldError(field, f"bad timestamp {value!r}: {exc}") from exc


def parse_kwh(value: str, field: int) -> float:
    if not NUMBER_RE.fullmatch(value):
        raise FieldError(field, f"kwh {value!r} is not a number")
    number = float(value)
    if not math.isfinite(number):
        raise FieldError(field, f"kwh {value!r} is not finite")
    return number
