"""Bytes to validated columnar batches, with rejects located exactly.

Why two paths: checking each row in Python costs about a microsecond, which alone limited the
loader to about 1M rows/s on one core. A chunk (a run of whole lines) is first parsed and checked
vectorised with pyarrow (C++, off the GIL); names and timestamps are checked once per distinct
value with the very functions of :mod:`.validate`. Only when that finds anything it cannot vouch
for (a bad line, a quoted field, a stray CR, ...) is the whole chunk checked line by line by the
careful path, which produces the same ``line:column: reason`` as always. So a chunk is accepted by
the fast path only if every row would pass the careful path too, and with the same values.

What is stored is what was read: the CSV ``ts`` and ``kwh`` texts are passed through to COPY
unchanged (PostgreSQL parses them); a JSON number is re-serialised with the shortest text that
round-trips to the same double. ``instant`` (microseconds since 1970 UTC, exact) serves the
writer's decisions (new key or not) and partition creation, never the stored value.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.json as pajson

from orchestrator.energy.units import DEFAULT_TABLE, UnitError, UnitTable
from orchestrator.exceptions import InputError, InputLocation
from orchestrator.ingest.validate import (
    MAX_OFFSET,
    NUMBER_PATTERN,
    ONE_US,
    TS_PATTERN,
    ZERO_PATTERN,
    FieldError,
    check_text,
    parse_kwh,
    ts_micros,
)

# The system allocator, not pyarrow's default (mimalloc): mimalloc kept about 50 MB more resident
# for the same chunks (measured), and the loader must stay small beside the servers.
pa.set_memory_pool(pa.system_memory_pool())

Format = Literal["csv", "jsonl"]
FORMATS: tuple[Format, ...] = ("csv", "jsonl")
COLUMNS = ("building", "meter", "ts", "kwh")
UNIT_COLUMN = "unit"  # optional (CSV): the reading's unit, converted to its meter's (orchestrator.energy.units)
CACHE_LIMIT = 200_000  # distinct names / timestamps remembered as valid

_NUMBER_FULL = f"^(?:{NUMBER_PATTERN})$"
_ZERO_FULL = f"^(?:{ZERO_PATTERN})$"
_JSON_SCHEMA = pa.schema([("building", pa.string()), ("meter", pa.string()), ("ts", pa.string()), ("kwh", pa.float64())])


@dataclass(frozen=True, slots=True)
class Reject:
    """A bad line: 1-based line, column (0 = the whole line), reason, and the raw bytes."""

    line: int
    column: int
    reason: str
    raw: bytes


@dataclass(frozen=True, eq=False)
class ReadingBatch:
    """Validated readings in input order. ``building``, ``meter``, ``ts`` and ``kwh`` are the texts
    to store; ``instant`` is ``ts`` in microseconds since 1970 UTC; ``line`` is the input line (or
    any increasing sequence number, for sources without lines)."""

    building: pa.Array
    meter: pa.Array
    ts: pa.Array
    kwh: pa.Array
    instant: np.ndarray
    line: np.ndarray
    plain: bool = False  # no building or meter holds a comma, quote, CR or LF: CSV needs no quoting

    @property
    def rows(self) -> int:
        return len(self.line)

    def table(self) -> pa.Table:
        """The four stored columns in ``readings`` order (for COPY)."""
        return pa.table([self.building, self.meter, self.ts, self.kwh], names=list(COLUMNS))

    def take(self, indices: np.ndarray) -> ReadingBatch:
        idx = pa.array(indices, type=pa.int64())
        return ReadingBatch(
            self.building.take(idx),
            self.meter.take(idx),
            self.ts.take(idx),
            self.kwh.take(idx),
            self.instant[indices],
            self.line[indices],
            self.plain,
        )

    def before_line(self, line: int) -> ReadingBatch:
        """The rows read before ``line``."""
        return self.take(np.flatnonzero(self.line < line))

    def building_counts(self) -> dict[str, int]:
        counts = pc.value_counts(self.building)
        return dict(zip(counts.field("values").to_pylist(), counts.field("counts").to_pylist(), strict=True))

    @staticmethod
    def concat(batches: Sequence[ReadingBatch]) -> ReadingBatch:
        if not batches:
            return EMPTY
        if len(batches) == 1:
            return batches[0]
        return ReadingBatch(
            pa.concat_arrays([b.building for b in batches]),
            pa.concat_arrays([b.meter for b in batches]),
            pa.concat_arrays([b.ts for b in batches]),
            pa.concat_arrays([b.kwh for b in batches]),
            np.concatenate([b.instant for b in batches]),
            np.concatenate([b.line for b in batches]),
            all(b.plain for b in batches),
        )


def _strings(values: Sequence[str]) -> pa.Array:
    return pa.array(values, type=pa.string())


EMPTY = ReadingBatch(_strings([]), _strings([]), _strings([]), _strings([]), np.zeros(0, np.int64), np.zeros(0, np.int64), True)
_QUOTED = (",", '"', "\r", "\n")


def plain_texts(values: Iterable[str]) -> bool:
    """No value needs quoting in CSV."""
    return not any(c in v for v in values for c in _QUOTED)


Row = tuple[int, str, str, str, str]  # line, building, meter, ts text, kwh text (all valid)


def batch_of(rows: Sequence[Row], instants: Sequence[int]) -> ReadingBatch:
    """A batch from rows that passed the careful checks (``instants`` from :func:`ts_micros`)."""
    if not rows:
        return EMPTY
    lines, buildings, meters, tss, kwhs = zip(*rows, strict=True)
    return ReadingBatch(
        _strings(buildings),
        _strings(meters),
        _strings(tss),
        _strings(kwhs),
        np.asarray(instants, dtype=np.int64),
        np.asarray(lines, dtype=np.int64),
        plain_texts(buildings) and plain_texts(meters),
    )


@dataclass(frozen=True)
class Parsed:
    """One chunk: its good rows, its bad lines, and whether it was checked line by line."""

    batch: ReadingBatch
    rejects: tuple[Reject, ...]
    first_line: int
    next_line: int  # the line after the chunk
    careful: bool

    @property
    def lines(self) -> int:
        return self.next_line - self.first_line


def count_lines(chunk: bytes) -> int:
    return chunk.count(b"\n") + (0 if not chunk or chunk.endswith(b"\n") else 1)


def split_lines(chunk: bytes) -> list[bytes]:
    """Lines with their newline, as the careful path and the rejects file see them."""
    parts = chunk.split(b"\n")
    tail = parts.pop()  # b"" when the chunk ends with a newline
    lines = [p + b"\n" for p in parts]
    if tail:
        lines.append(tail)
    return lines


def decode_line(source: str, number: int, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        col = len(raw[: exc.start].decode("utf-8", errors="replace")) + 1
        raise InputError(InputLocation(source, number, col), f"invalid UTF-8 byte 0x{raw[exc.start]:02x}") from exc
    return text.rstrip("\r\n")


class ValueChecks:
    """Values already known to be valid, so the vectorised path checks each distinct value once."""

    def __init__(self) -> None:
        self.names: set[str] = set()
        self.dates: dict[str, int] = {}
        self.times: dict[str, int] = {}

    def names_ok(self, values: list[str]) -> bool:
        names = self.names
        for v in values:
            if v not in names:
                try:
                    check_text(v, "name", 0)
                except FieldError:
                    return False
                if len(names) >= CACHE_LIMIT:
                    names.clear()
                names.add(v)
        return True

    def _parts(self, values: list[str], known: dict[str, int], micros: Callable[[str], int]) -> np.ndarray | None:
        out = np.empty(len(values), dtype=np.int64)
        for i, v in enumerate(values):
            hit = known.get(v)
            if hit is None:
                try:
                    hit = micros(v)
                except (FieldError, ValueError):
                    return None
                if len(known) >= CACHE_LIMIT:
                    known.clear()
                known[v] = hit
            out[i] = hit
        return out

    def instants(self, ts: pa.Array) -> np.ndarray | None:
        """Instants of valid timestamps, or None if any is not valid. A timestamp that matches
        TS_RE is a date (10 characters), T or a space, and a time of day with its offset, and
        ``datetime.fromisoformat`` parses the two halves independently; so each distinct date
        and each distinct time is checked once, and the instant is their sum (exact)."""
        encoded = pc.dictionary_encode(ts)
        distinct = encoded.dictionary
        seps = pc.unique(pc.utf8_slice_codeunits(distinct, 10, 11)).to_pylist()
        if not set(seps) <= {"T", " "}:
            return None
        dates = pc.dictionary_encode(pc.utf8_slice_codeunits(distinct, 0, 10))
        times = pc.dictionary_encode(pc.utf8_slice_codeunits(distinct, 11))
        day_us = self._parts(dates.dictionary.to_pylist(), self.dates, _date_micros)
        time_us = self._parts(times.dictionary.to_pylist(), self.times, _time_micros)
        if day_us is None or time_us is None:
            return None
        di = dates.indices.to_numpy(zero_copy_only=False)
        ti = times.indices.to_numpy(zero_copy_only=False)
        return (day_us[di] + time_us[ti])[encoded.indices.to_numpy(zero_copy_only=False)]

    def columns(self, building: pa.Array, meter: pa.Array, ts: pa.Array) -> np.ndarray | None:
        """Instants of the rows if every building, meter and timestamp is valid, else None."""
        if building.null_count or meter.null_count or ts.null_count:
            return None
        for col in (building, meter):
            if not self.names_ok(pc.unique(col).to_pylist()):
                return None
        return self.instants(ts)


_DATE_RE = re.compile(r"\d{4}-\d{2}-\d{2}", re.ASCII)
_TIME_RE = re.compile(TS_PATTERN[TS_PATTERN.index("[T ]") + 4 :], re.ASCII)
_DAY0 = date(1970, 1, 1)
_MIDNIGHT_2000 = datetime(2000, 1, 1, tzinfo=UTC)


def _date_micros(text: str) -> int:
    """Microseconds from 1970-01-01 to the start of the day (UTC); ValueError if not a date."""
    if not _DATE_RE.fullmatch(text):
        raise ValueError(text)
    return (date.fromisoformat(text) - _DAY0).days * 86_400_000_000


def _time_micros(text: str) -> int:
    """Microseconds from midnight UTC to ``text`` (a time of day with its offset) on any day."""
    if not _TIME_RE.fullmatch(text):
        raise ValueError(text)
    parsed = datetime.fromisoformat("2000-01-01T" + text)
    offset = parsed.utcoffset()
    if offset is None or abs(offset) > MAX_OFFSET:
        raise ValueError(text)
    return (parsed - _MIDNIGHT_2000) // ONE_US


def _array(col: pa.ChunkedArray | pa.Array) -> pa.Array:
    return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col


class CsvParser:
    """CSV with the header ``building,meter,ts,kwh`` in any column order, optionally with a
    ``unit`` column: each value is then converted to its meter's canonical unit (``units``, from
    public.meters) and stored as that number; an unknown or incompatible unit rejects the line
    at the unit's column. Files with a unit column take the careful path (they are the rare ones)."""

    fmt: Format = "csv"

    def __init__(self, source: str, threads: bool = False, units: UnitTable = DEFAULT_TABLE) -> None:
        self.source = source
        self.threads = threads
        self.units = units
        self.order: tuple[int, int, int, int] | None = None
        self.unit_col: int | None = None
        self._checks = ValueChecks()
        # A quoted field still open at the end of a line: its record's first line and raw lines.
        # Such a record is one reject (at its first line); its later lines are never records.
        self._span: tuple[int, list[bytes]] | None = None

    # -- header ------------------------------------------------------------------------------

    def header(self, raw: bytes) -> None:
        text = decode_line(self.source, 1, raw).lstrip("\ufeff")
        names = [n.strip().lower() for n in text.split(",")]
        core = [n for n in names if n != UNIT_COLUMN]
        if sorted(core) != sorted(COLUMNS) or len(core) != len(COLUMNS) or len(names) - len(core) > 1:
            raise InputError(
                InputLocation(self.source, 1, 1),
                f"wrong header {text!r}: expected the columns building,meter,ts,kwh (and optionally unit)",
            )
        self.order = (names.index("building"), names.index("meter"), names.index("ts"), names.index("kwh"))
        self.unit_col = names.index(UNIT_COLUMN) if UNIT_COLUMN in names else None

    def parse(self, chunk: bytes, first_line: int, lines: int | None = None) -> Parsed:
        """Parse whole lines starting at ``first_line`` (``lines`` of them, if known); line 1 is
        the header."""
        if first_line == 1:
            end = chunk.find(b"\n") + 1 or len(chunk)
            self.header(chunk[:end])
            chunk, first_line = chunk[end:], 2
            lines = None
        if self.order is None:
            raise InputError(InputLocation(self.source, 1), "empty input: missing header building,meter,ts,kwh")
        n = count_lines(chunk) if lines is None else lines
        fast = self._fast(chunk, first_line, n) if self._span is None else None
        if fast is not None:
            return Parsed(fast, (), first_line, first_line + n, False)
        batch, rejects = self._careful(chunk, first_line)
        return Parsed(batch, rejects, first_line, first_line + n, True)

    def finish(self) -> tuple[Reject, ...]:
        """At the end of the input: a quoted field never closed is one reject at its first line."""
        if self._span is None:
            return ()
        first, raws = self._span
        self._span = None
        last = first + len(raws) - 1
        return (Reject(first, 0, f"quoted field opened on line {first} is never closed (lines {first}-{last})", b"".join(raws)),)

    # -- vectorised --------------------------------------------------------------------------

    def _fast(self, chunk: bytes, first_line: int, n: int) -> ReadingBatch | None:
        if not n:
            return EMPTY
        if b'"' in chunk or b"\x00" in chunk or self.unit_col is not None:
            return None
        if b"\r" in chunk and not _crs_end_lines(chunk):
            return None  # a lone CR ends a line for pyarrow, not for the careful path
        names = [f"c{i}" for i in range(4)]
        try:
            table = pacsv.read_csv(
                pa.py_buffer(chunk),
                read_options=pacsv.ReadOptions(column_names=names, use_threads=self.threads, block_size=max(len(chunk), 1 << 20)),
                parse_options=pacsv.ParseOptions(quote_char=False, newlines_in_values=False, ignore_empty_lines=False),
                convert_options=pacsv.ConvertOptions(
                    column_types=dict.fromkeys(names, pa.string()), strings_can_be_null=False, check_utf8=True
                ),
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError):
            return None  # wrong field count, bad UTF-8, ...: the careful path says where
        if table.num_rows != n:
            return None
        assert self.order is not None
        b, m, t, k = (_array(table.column(i)) for i in self.order)
        instants = self._checks.columns(b, m, t)
        if instants is None or not _kwh_texts_ok(k):
            return None
        # Split on commas with no quote character and no CR but in CRLF: nothing to quote.
        return ReadingBatch(b, m, t, k, instants, np.arange(first_line, first_line + n, dtype=np.int64), True)

    # -- line by line ------------------------------------------------------------------------

    def _careful(self, chunk: bytes, first_line: int) -> tuple[ReadingBatch, tuple[Reject, ...]]:
        rows: list[Row] = []
        instants: list[int] = []
        rejects: list[Reject] = []
        for number, raw in enumerate(split_lines(chunk), first_line):
            if self._span is not None:  # inside a record whose quoted field spans lines
                first, raws = self._span
                raws.append(raw)
                if _ends_in_quote(raw, inside=True):
                    continue
                self._span = None
                reason = f"a quoted field spans lines {first}-{number}: a field cannot contain a line break"
                rejects.append(Reject(first, 0, reason, b"".join(raws)))
                continue
            if b'"' in raw and raw.endswith(b"\n") and _ends_in_quote(raw, inside=False):
                self._span = (number, [raw])
                continue
            row = self.check_line(number, raw)
            if isinstance(row, Reject):
                rejects.append(row)
            else:
                rows.append(row)
                instants.append(ts_micros(row[3], 2))
        return batch_of(rows, instants), tuple(rejects)

    def check_line(self, number: int, raw: bytes) -> Row | Reject:
        """The careful check of one CSV line (the definition of a good line)."""
        try:
            text = decode_line(self.source, number, raw)
        except InputError as exc:
            return Reject(number, exc.location.column, exc.reason, raw)
        quoted = '"' in text
        try:
            fields = next(csv.reader([text], strict=True)) if quoted else text.split(",")
        except csv.Error as exc:  # e.g. a field beyond the csv module's size limit, a stray quote
            return Reject(number, 0, f"malformed CSV: {exc}", raw)
        width = 4 if self.unit_col is None else 5
        if len(fields) != width:
            what = "missing" if len(fields) < width else "extra"
            named = "building,meter,ts,kwh" + ("" if self.unit_col is None else ",unit")
            return Reject(number, 0, f"{what} fields: expected {width} ({named}), got {len(fields)}", raw)
        assert self.order is not None
        o = self.order
        kwh_text = fields[o[3]]
        try:
            building = check_text(fields[o[0]], "building", o[0])
            meter = check_text(fields[o[1]], "meter", o[1])
            ts_micros(fields[o[2]], o[2])
            kwh = parse_kwh(kwh_text, o[3])
            if self.unit_col is not None:
                try:
                    factor = self.units.factor(building, meter, fields[self.unit_col])
                except UnitError as exc:
                    raise FieldError(self.unit_col, str(exc)) from None
                if factor != 1.0:
                    kwh_text = repr(kwh * factor)  # shortest text of the converted double
        except FieldError as exc:
            return Reject(number, 0 if quoted else _column_of(fields, exc.field), exc.reason, raw)
        return number, building, meter, fields[o[2]], kwh_text


def _ends_in_quote(raw: bytes, inside: bool) -> bool:
    """Whether a CSV line ends inside a quoted field, given whether it starts inside one. A quote
    opens a field only at its start; inside, ``""`` is a quote and a lone ``"`` closes it."""
    at_start = not inside
    i, n = 0, len(raw)
    while i < n:
        c = raw[i]
        if inside:
            if c == 34:  # "
                if i + 1 < n and raw[i + 1] == 34:
                    i += 1
                else:
                    inside = False
        else:
            if c == 34 and at_start:
                inside = True
            at_start = c == 44  # ,
        i += 1
    return inside


def _crs_end_lines(chunk: bytes) -> bool:
    """Every CR is followed by LF (CRLF line ends, which pyarrow and the careful path agree on)."""
    data = np.frombuffer(chunk, dtype=np.uint8)
    after = np.flatnonzero(data == 13) + 1
    return bool(len(after) == 0 or (after[-1] < len(data) and (data[after] == 10).all()))


def _kwh_texts_ok(kwh: pa.Array) -> bool:
    """Every kwh text is a plain decimal number, finite and not an underflow to zero. Checked
    once per distinct text: meters repeat their values a lot."""
    if kwh.null_count:
        return False
    kwh = pc.unique(kwh)
    if not pc.all(pc.match_substring_regex(kwh, _NUMBER_FULL)).as_py():
        return False
    try:
        values = pc.cast(kwh, pa.float64())
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return False
    if not pc.all(pc.is_finite(values)).as_py():
        return False
    zeros = pc.equal(values, 0.0)
    if pc.any(zeros).as_py():
        return bool(pc.all(pc.match_substring_regex(kwh.filter(zeros), _ZERO_FULL)).as_py())
    return True


def _column_of(fields: list[str], index: int) -> int:
    """1-based character column where field ``index`` starts (unquoted layout)."""
    return sum(len(f) + 1 for f in fields[:index]) + 1


class JsonParser:
    """JSON lines: one object ``{"building", "meter", "ts", "kwh"}`` per line."""

    fmt: Format = "jsonl"

    def __init__(self, source: str, threads: bool = False) -> None:
        self.source = source
        self.threads = threads
        self._checks = ValueChecks()

    def parse(self, chunk: bytes, first_line: int, lines: int | None = None) -> Parsed:
        n = count_lines(chunk) if lines is None else lines
        fast = self._fast(chunk, first_line, n)
        if fast is not None:
            return Parsed(fast, (), first_line, first_line + n, False)
        rows: list[Row] = []
        instants: list[int] = []
        rejects: list[Reject] = []
        for number, raw in enumerate(split_lines(chunk), first_line):
            row = self.check_line(number, raw)
            if isinstance(row, Reject):
                rejects.append(row)
            else:
                rows.append(row)
                instants.append(ts_micros(row[3], 2))
        return Parsed(batch_of(rows, instants), tuple(rejects), first_line, first_line + n, True)

    def _fast(self, chunk: bytes, first_line: int, n: int) -> ReadingBatch | None:
        if not n:
            return EMPTY
        try:
            table = pajson.read_json(
                pa.py_buffer(chunk),
                read_options=pajson.ReadOptions(use_threads=self.threads, block_size=max(len(chunk), 1 << 20)),
                parse_options=pajson.ParseOptions(
                    explicit_schema=_JSON_SCHEMA, unexpected_field_behavior="error", newlines_in_values=False
                ),
            )
        except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError):
            return None
        if table.num_rows != n:
            return None  # pyarrow skips blank lines; the careful path rejects them
        b, m, t, k = (_array(table.column(c)) for c in COLUMNS)
        if k.null_count:
            return None  # a missing or null field
        values = k.to_numpy(zero_copy_only=False)
        if not np.isfinite(values).all() or (np.signbit(values) & (values == 0)).any():
            return None  # -0 may be the integer 0, which the careful path stores as 0.0
        instants = self._checks.columns(b, m, t)
        if instants is None:
            return None
        plain = plain_texts(pc.unique(b).to_pylist()) and plain_texts(pc.unique(m).to_pylist())
        lines = np.arange(first_line, first_line + n, dtype=np.int64)
        return ReadingBatch(b, m, t, pc.cast(k, pa.string()), instants, lines, plain)

    def check_line(self, number: int, raw: bytes) -> Row | Reject:
        """The careful check of one JSON line."""
        try:
            text = decode_line(self.source, number, raw)
        except InputError as exc:
            return Reject(number, exc.location.column, exc.reason, raw)
        if not text.strip():
            return Reject(number, 0, "empty line: expected a JSON object", raw)
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            return Reject(number, exc.colno, f"invalid JSON: {exc.msg}", raw)
        except RecursionError:
            return Reject(number, 0, "invalid JSON: nested too deeply (a reading is one flat object)", raw)
        return check_object(obj, number, raw)


def check_object(obj: object, number: int, raw: bytes) -> Row | Reject:
    """The careful check of one reading given as a JSON-like object (also for network sources)."""
    if not isinstance(obj, dict):
        return Reject(number, 1, "expected a JSON object with building, meter, ts, kwh", raw)
    missing = [c for c in COLUMNS if c not in obj]
    extra = sorted(set(obj) - set(COLUMNS))
    if missing:
        return Reject(number, 0, f"missing fields: {', '.join(missing)}", raw)
    if extra:
        return Reject(number, 0, f"extra fields: {', '.join(extra)}", raw)
    try:
        b, m, t, k = obj["building"], obj["meter"], obj["ts"], obj["kwh"]
        if not isinstance(b, str) or not isinstance(m, str) or not isinstance(t, str):
            raise FieldError(0, "building, meter and ts must be strings")
        if isinstance(k, bool) or not isinstance(k, int | float | str):
            raise FieldError(3, f"kwh {k!r} is not a number")
        building = check_text(b, "building", 0)
        meter = check_text(m, "meter", 1)
        for value in (building, meter, t):
            value.encode("utf-8")  # a lone surrogate from a \ud800 escape cannot be stored
        ts_micros(t, 2)
        try:
            number_text = k if isinstance(k, str) else repr(float(k))
        except OverflowError:
            raise FieldError(3, f"kwh {k!r} is not finite") from None
        kwh = parse_kwh(number_text, 3)
    except FieldError as exc:
        return Reject(number, 0, exc.reason, raw)
    except UnicodeEncodeError:
        return Reject(number, 0, "a text field holds an unpaired surrogate (\\ud800-\\udfff)", raw)
    return number, building, meter, t, repr(kwh)


def rows_to_batch(objects: Iterable[tuple[int, object]], raw_of: dict[int, bytes] | None = None) -> Parsed:
    """Readings given as objects (network sources: MQTT, HTTP, hisWrite), checked one by one with
    the same rules as a JSON line. ``objects`` are ``(sequence number, object)`` in order."""
    rows: list[Row] = []
    instants: list[int] = []
    rejects: list[Reject] = []
    first = nxt = 0
    for i, (number, obj) in enumerate(objects):
        if i == 0:
            first = number
        nxt = number + 1
        row = check_object(obj, number, (raw_of or {}).get(number, b""))
        if isinstance(row, Reject):
            rejects.append(row)
        else:
            rows.append(row)
            instants.append(ts_micros(row[3], 2))
    return Parsed(batch_of(rows, instants), tuple(rejects), first, nxt, True)


Parser = CsvParser | JsonParser


def parser_for(fmt: Format, source: str, threads: bool = False, units: UnitTable = DEFAULT_TABLE) -> Parser:
    return CsvParser(source, threads, units) if fmt == "csv" else JsonParser(source, threads)


def format_of(path: str, fmt: str | None) -> Format:
    """The format named by ``fmt``, else guessed from the file name."""
    if fmt is None:
        lowered = path.lower().removesuffix(".gz")
        return "jsonl" if lowered.endswith((".jsonl", ".ndjson", ".json")) else "csv"
    if fmt == "csv":
        return "csv"
    if fmt == "jsonl":
        return "jsonl"
    raise InputError(InputLocation(path, 0), f"unknown format {fmt!r}: use csv or jsonl")
