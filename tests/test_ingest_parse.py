"""The vectorised parser against the careful one (pure, no servers): a chunk the fast path accepts
gives exactly the rows, texts and instants the careful path gives, and any chunk holding a line
the careful path rejects is left to it. Also the fast-path split of new rows, and chunking."""

from __future__ import annotations

import json
import random
from datetime import datetime

import numpy as np
import pytest

from orchestrator.ingest import source
from orchestrator.ingest.fastpath import NO_ROWS, split_new_rows
from orchestrator.ingest.parse import CsvParser, JsonParser, Parsed, Reject
from orchestrator.ingest.validate import EPOCH, ONE_US, FieldError, ts_micros

GOOD_TS = [
    "2023-01-31 23:00:00+00",
    "2023-01-31T23:00:00Z",
    "2024-02-29 12:30+05:30",
    "1999-12-31 23:59:59.123456-0800",
    "2023-06-01 00:00:00.5+01",
    "2100-01-01 00:00-15:59",
]
BAD_TS = [
    "2023-02-29 00:00:00+00",  # not a leap year
    "2023-13-01 00:00:00+00",
    "2023-01-01 24:00:00+00",
    "2023-01-01 00:00:00",  # no offset
    "2023-01-01 00:00:00+16:00",  # beyond PostgreSQL's offsets
    "2023-01-01X00:00:00+00",
    "２023-01-01 00:00:00+00",  # a non-ASCII digit
    "2023-01-01 00:00:00.1234567+00",
]
GOOD_KWH = ["1.5", "0", "-0.0", ".5", "5.", "+3", "1e3", "2.5E-3", "0.30000000000000004", "1e-320", "12345678901234567890"]
BAD_KWH = ["abc", "inf", "nan", "1e999", "1e-400", "1_000", " 1", "٣", "", "0x10"]


def _line(rnd: random.Random, bad: bool) -> str:
    b = rnd.choice(["b1", "b2", "bâtiment", "x" * 200])
    m = rnd.choice(["el", "gas", "water"])
    t = rnd.choice(GOOD_TS)
    k = rnd.choice(GOOD_KWH)
    if bad:
        what = rnd.randrange(6)
        if what == 0:
            t = rnd.choice(BAD_TS)
        elif what == 1:
            k = rnd.choice(BAD_KWH)
        elif what == 2:
            b = rnd.choice(["", "x" * 201, "a\x00b"])
        elif what == 3:
            m = ""
        elif what == 4:
            return f"{b},{m},{t}"
        else:
            return f"{b},{m},{t},{k},1"
    return f"{b},{m},{t},{k}"


def _careful(parser: CsvParser | JsonParser, data: bytes, first: int) -> Parsed:
    """The chunk through the careful path only (the reference)."""
    if isinstance(parser, CsvParser):
        batch, rejects = parser._careful(data, first)
        return Parsed(batch, rejects, first, first + len(data.splitlines()), True)
    saved = parser._fast
    parser._fast = lambda *a: None  # type: ignore[method-assign]
    try:
        return parser.parse(data, first)
    finally:
        parser._fast = saved  # type: ignore[method-assign]


def _same(a: Parsed, b: Parsed, kwh_as_number: bool = False) -> None:
    """Same rows; the same texts, or for JSON numbers the same double (texts may differ: 3 / 3.0)."""
    assert a.batch.rows == b.batch.rows
    for col in ("building", "meter", "ts") if kwh_as_number else ("building", "meter", "ts", "kwh"):
        assert getattr(a.batch, col).to_pylist() == getattr(b.batch, col).to_pylist(), col
    if kwh_as_number:
        got, want = ([float(k) for k in x.batch.kwh.to_pylist()] for x in (a, b))
        assert [(k, str(k)[0] == "-") for k in got] == [(k, str(k)[0] == "-") for k in want]
    assert a.batch.instant.tolist() == b.batch.instant.tolist()
    assert a.batch.line.tolist() == b.batch.line.tolist()
    assert [(r.line, r.column, r.reason) for r in a.rejects] == [(r.line, r.column, r.reason) for r in b.rejects]


@pytest.mark.parametrize("seed", range(40))
def test_csv_fast_path_equals_careful_path(seed: int) -> None:
    rnd = random.Random(seed)
    lines = [_line(rnd, bad=rnd.random() < 0.05) for _ in range(rnd.randrange(1, 60))]
    data = ("\n".join(lines) + "\n").encode()
    fast_parser, careful_parser = CsvParser("f.csv"), CsvParser("f.csv")
    for p in (fast_parser, careful_parser):
        p.header(b"building,meter,ts,kwh\n")
    got = fast_parser.parse(data, 2)
    want = _careful(careful_parser, data, 2)
    _same(got, want)
    assert got.careful == bool(want.rejects)  # good chunks never need the careful path


def test_csv_any_column_order_quotes_and_crlf() -> None:
    parser = CsvParser("f.csv")
    data = b'kwh,ts,building,meter\r\n1.5,2023-01-01 00:00:00+00,b1,el\r\n2.5,2023-01-01 01:00:00+00,"b,2",el\r\n'
    parsed = parser.parse(data, 1)
    assert parsed.careful and not parsed.rejects  # the quoted field took the careful path
    assert parsed.batch.building.to_pylist() == ["b1", "b,2"] and parsed.batch.kwh.to_pylist() == ["1.5", "2.5"]
    assert not parsed.batch.plain
    crlf = parser.parse(b"3,2023-01-02 00:00:00Z,b3,el\r\n", 4)
    assert not crlf.careful and crlf.batch.plain and crlf.batch.line.tolist() == [4]
    assert crlf.batch.meter.to_pylist() == ["el"]


def test_timestamp_instants_are_exact() -> None:
    parser = CsvParser("f.csv")
    parser.header(b"building,meter,ts,kwh")
    data = "".join(f"b,m,{t},1\n" for t in GOOD_TS).encode()
    parsed = parser.parse(data, 2)
    assert not parsed.careful
    assert parsed.batch.instant.tolist() == [(datetime.fromisoformat(t) - EPOCH) // ONE_US for t in GOOD_TS]
    for bad in BAD_TS:
        with pytest.raises(FieldError):
            ts_micros(bad, 2)
        one = parser.parse(f"b,m,{bad},1\n".encode(), 9)
        assert one.careful and len(one.rejects) == 1 and one.rejects[0].line == 9


def test_bad_kwh_is_rejected_and_good_kwh_passes_through_as_text() -> None:
    parser = CsvParser("f.csv")
    parser.header(b"building,meter,ts,kwh")
    good = parser.parse("".join(f"b,m,2023-01-01 00:00+00,{k}\n" for k in GOOD_KWH).encode(), 2)
    assert not good.careful and good.batch.kwh.to_pylist() == GOOD_KWH
    for k in BAD_KWH:
        parsed = parser.parse(f"b,m,2023-01-01 00:00+00,{k}\n".encode(), 2)
        assert parsed.careful and [r.column for r in parsed.rejects] == [len("b,m,2023-01-01 00:00+00,") + 1], k


@pytest.mark.parametrize("seed", range(30))
def test_json_fast_path_equals_careful_path(seed: int) -> None:
    rnd = random.Random(seed)
    lines = []
    unusual = False  # a line the fast path must leave to the careful one
    for _ in range(rnd.randrange(1, 40)):
        obj: dict[str, object] = {"building": rnd.choice(["b1", "b,2", "b\u00e2"]), "meter": "el", "ts": rnd.choice(GOOD_TS)}
        obj["kwh"] = rnd.choice([1.5, 0.1, 3, 1e22, 0.30000000000000004, 5e-324, -0.5, 0])
        if rnd.random() < 0.03:
            obj[rnd.choice(["kwh", "extra"])] = rnd.choice([None, True, "abc", [1], "2.5", -0.0])
            unusual = True
        if rnd.random() < 0.01:
            lines.append("{broken")
            unusual = True
        else:
            lines.append(json.dumps(obj))
    data = ("\n".join(lines) + "\n").encode()
    got = JsonParser("f.jsonl").parse(data, 1)
    want = _careful(JsonParser("f.jsonl"), data, 1)
    _same(got, want, kwh_as_number=True)
    if not unusual:
        assert not got.careful


def test_stored_kwh_of_json_numbers_round_trips() -> None:
    values = [0.1, 1e22, 5e-324, 1.7976931348623157e308, 123456789.12345679, 2.5]
    data = "".join(json.dumps({"building": "b", "meter": "m", "ts": GOOD_TS[0], "kwh": v}) + "\n" for v in values).encode()
    parsed = JsonParser("f.jsonl").parse(data, 1)
    assert not parsed.careful
    assert [float(k) for k in parsed.batch.kwh.to_pylist()] == values


def test_split_new_rows() -> None:
    marks = np.array([100, NO_ROWS], dtype=np.int64)  # pair 0 stored through 100, pair 1 unknown
    pair = np.array([0, 0, 0, 1, 1, 1, 0], dtype=np.int64)
    instant = np.array([99, 100, 101, 5, 5, 6, 102], dtype=np.int64)
    split = split_new_rows(pair, instant, marks)
    # at or below the mark: upsert; a repeat (pair 1 at 5) both to the upsert; the rest by COPY
    assert split.fast.tolist() == [False, False, True, False, False, True, True]
    assert split.pair_max.tolist() == [102, 6]
    empty = split_new_rows(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.int64))
    assert empty.fast.tolist() == [] and empty.pair_max.tolist() == []


def test_chunks_cut_whole_lines_with_their_numbers() -> None:
    blocks = [b"h\nl2\nl3", b"\nl4\nl5 without newline"]
    chunks = list(source._cut(iter(blocks), max_lines=2, max_bytes=1 << 20))
    assert [(c.first_line, c.data, c.lines) for c in chunks] == [
        (1, b"h\nl2\n", 2),
        (3, b"l3\nl4\n", 2),
        (5, b"l5 without newline", 1),
    ]
    long_line = [b"x" * 50 + b"\n", b"y\n"]
    assert [c.data for c in source._cut(iter(long_line), max_lines=10, max_bytes=16)] == [b"x" * 50 + b"\n", b"y\n"]


def test_careful_rejects_keep_their_raw_line() -> None:
    parser = CsvParser("f.csv")
    parser.header(b"building,meter,ts,kwh")
    parsed = parser.parse(b"b,m,2023-01-01 00:00+00,1\nb,m,bad,1\n", 2)
    assert parsed.rejects == (Reject(3, 5, parsed.rejects[0].reason, b"b,m,bad,1\n"),)
