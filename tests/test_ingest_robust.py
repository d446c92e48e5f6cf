"""Input that never crashes the loader or stores a wrong row (issue 12, item 9).

Parser properties (hypothesis, no servers): any byte string gives rows or rejects, never an
exception other than InputError, and every line is accounted for exactly once; any row that
passes holds exactly the texts that were written. Then the faults on a real cluster: damaged
gzip data mid-file, an unwritable --rejects path, quoted fields spanning lines, line breaks in
codes, and names that need escaping, read back exactly as written."""

from __future__ import annotations

import csv
import gzip
import io
import json
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from psycopg import sql

from orchestrator.catalog import load_fragments
from orchestrator.exceptions import InputError, NodeError, RejectsUnwritable
from orchestrator.fragments import Router
from orchestrator.ingest import source
from orchestrator.ingest.loader import ingest
from orchestrator.ingest.parse import CsvParser, JsonParser, Parsed, Reject, count_lines
from orchestrator.ingest.validate import FieldError, check_text
from tests.harness import ClusterHandle

HEADER = b"building,meter,ts,kwh\n"
TS = "2024-03-05 07:00:00+00"
FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _values(parsed: list[Parsed]) -> list[tuple[str, str, str, str]]:
    out: list[tuple[str, str, str, str]] = []
    for p in parsed:
        t = p.batch.table()
        out += zip(*(t.column(c).to_pylist() for c in ("building", "meter", "ts", "kwh")), strict=True)
    return out


def _parse_all(parser: CsvParser | JsonParser, data: bytes, cut: int) -> tuple[list[Parsed], tuple[Reject, ...]]:
    """Parse ``data`` as two chunks split at the line boundary nearest ``cut`` (as the source cuts)."""
    lines = data.split(b"\n")
    k = min(max(cut, 1 if isinstance(parser, CsvParser) else 0), len(lines))
    first, second = b"\n".join(lines[:k]), b"\n".join(lines[k:])
    if k < len(lines):
        first += b"\n"
    out, line = [], 1
    for chunk in (first, second):
        if chunk:
            parsed = parser.parse(chunk, line)
            out.append(parsed)
            line = parsed.next_line
    tail = parser.finish() if isinstance(parser, CsvParser) else ()
    return out, tail


def _accounted(parsed: list[Parsed], tail: tuple[Reject, ...]) -> tuple[int, int]:
    """(lines read, rows + lines the rejects cover): equal when every line is accounted once."""
    lines = sum(p.lines for p in parsed)
    rows = sum(p.batch.rows for p in parsed)
    covered = sum(max(count_lines(r.raw), 1) for p in parsed for r in p.rejects) + sum(count_lines(r.raw) for r in tail)
    return lines, rows + covered


@FAST
@given(st.binary(max_size=400), st.integers(0, 12), st.booleans())
def test_any_bytes_give_rows_or_rejects_csv(body: bytes, cut: int, with_header: bool) -> None:
    data = (HEADER + body) if with_header else body
    parser = CsvParser("fuzz.csv")
    try:
        parsed, tail = _parse_all(parser, data, cut)
    except InputError as exc:
        assert exc.location.line == 1  # only the header stops a parse; rows become rejects
        return
    lines, accounted = _accounted(parsed, tail)
    assert accounted == lines, "a line was lost or read twice"
    for p in parsed:
        for b, m in zip(p.batch.building.to_pylist(), p.batch.meter.to_pylist(), strict=True):
            check_text(b, "building", 0)
            check_text(m, "meter", 1)


@FAST
@given(st.binary(max_size=400), st.integers(0, 12))
def test_any_bytes_give_rows_or_rejects_jsonl(data: bytes, cut: int) -> None:
    parser = JsonParser("fuzz.jsonl")
    parsed, _ = _parse_all(parser, data, cut)
    lines, accounted = _accounted(parsed, ())
    assert accounted == lines


def _valid(text: str) -> bool:
    try:
        check_text(text, "x", 0)
        return True
    except FieldError:
        return False


NAMES = st.text(st.characters(exclude_categories=("Cs",)), min_size=1, max_size=24).filter(_valid)
READING = st.tuples(
    NAMES,
    NAMES,
    st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2090, 1, 1)).map(
        lambda d: d.replace(tzinfo=UTC).isoformat(sep=" ")
    ),
    st.floats(allow_nan=False, allow_infinity=False, min_value=-1e12, max_value=1e12).map(repr),
)


@FAST
@given(st.lists(READING, min_size=1, max_size=20), st.integers(0, 25))
def test_csv_rows_that_pass_hold_what_was_written(readings: list[tuple[str, str, str, str]], cut: int) -> None:
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(["building", "meter", "ts", "kwh"])
    writer.writerows(readings)
    parsed, tail = _parse_all(CsvParser("w.csv"), buf.getvalue().encode(), cut)
    assert not tail and not [r for p in parsed for r in p.rejects]
    got = _values(parsed)
    assert got == [tuple(r) for r in readings]


@FAST
@given(st.lists(READING, min_size=1, max_size=20), st.booleans())
def test_json_rows_that_pass_hold_what_was_written(readings: list[tuple[str, str, str, str]], ascii_only: bool) -> None:
    lines = [
        json.dumps({"building": b, "meter": m, "ts": t, "kwh": float(k)}, ensure_ascii=ascii_only) for b, m, t, k in readings
    ]
    parsed, _ = _parse_all(JsonParser("w.jsonl"), ("\n".join(lines) + "\n").encode(), 3)
    assert not [r for p in parsed for r in p.rejects]
    got = _values(parsed)
    assert [(b, m, t, float(k)) for b, m, t, k in got] == [(b, m, t, float(k)) for b, m, t, k in readings]


def _one(parser: CsvParser | JsonParser, data: bytes) -> tuple[int, list[Reject]]:
    parsed, tail = _parse_all(parser, data, 2)
    return sum(p.batch.rows for p in parsed), [r for p in parsed for r in p.rejects] + list(tail)


def test_quoted_field_beyond_the_csv_module_limit_is_a_reject() -> None:
    line = b'"' + b"a" * (csv.field_size_limit() + 10) + b'",m,' + TS.encode() + b",1\n"
    rows, rejects = _one(CsvParser("big.csv"), HEADER + line)
    assert rows == 0 and [r.line for r in rejects] == [2]


@pytest.mark.parametrize(
    "line",
    [b"a\rb,m,%s,1\n", b'"a\rb",m,%s,1\n', b"a,m\rx,%s,1\n", b"a,m,%s,1\r2\n"],
    ids=["bare-cr", "quoted-cr", "cr-in-meter", "cr-in-kwh"],
)
def test_bare_cr_inside_a_line_is_a_reject(line: bytes) -> None:
    rows, rejects = _one(CsvParser("cr.csv"), HEADER + b"ok,m,%s,1\n" % TS.encode() + line % TS.encode())
    assert rows == 1 and [r.line for r in rejects] == [3]


def test_line_break_in_a_json_code_is_a_reject() -> None:
    data = b"".join(
        json.dumps({"building": b, "meter": m, "ts": TS, "kwh": 1}).encode() + b"\n"
        for b, m in (("ok", "m"), ("a\nb", "m"), ("a", "m\r"), ("a\u2028b", "m"))
    )
    rows, rejects = _one(JsonParser("lf.jsonl"), data)
    assert rows == 2 and [r.line for r in rejects] == [2, 3]
    assert all("line break" in r.reason for r in rejects)


@pytest.mark.parametrize("cut", [1, 2, 3, 4, 5])
def test_quoted_field_spanning_lines_is_one_reject_at_its_first_line(cut: int) -> None:
    data = (
        HEADER
        + (
            f"a,m,{TS},1\n"  # 2
            f'"b\n'  # 3: opens a quoted field
            f"still b\n"  # 4: would be a record of its own if read alone
            f'c",m,{TS},2\n'  # 5: closes it
            f"d,m,{TS},3\n"  # 6
        ).encode()
    )
    parsed, tail = _parse_all(CsvParser("span.csv"), data, cut)
    rejects = [r for p in parsed for r in p.rejects]
    assert not tail and [(r.line, "lines 3-5" in r.reason) for r in rejects] == [(3, True)]
    assert [b for p in parsed for b in p.batch.building.to_pylist()] == ["a", "d"]


def test_quoted_field_never_closed_is_one_reject() -> None:
    parsed, tail = _parse_all(CsvParser("open.csv"), HEADER + f'a,m,{TS},1\n"b\nc,m,{TS},2\n'.encode(), 2)
    assert [p.batch.rows for p in parsed] == [1, 0] or sum(p.batch.rows for p in parsed) == 1
    assert [(r.line, "never closed" in r.reason) for r in tail] == [(3, True)]


def test_deeply_nested_json_is_a_reject() -> None:
    rows, rejects = _one(JsonParser("deep.jsonl"), b"[" * 200_000 + b"\n" + b'{"a":' * 100_000 + b"\n")
    assert rows == 0 and [r.line for r in rejects] == [1, 2]


# ---------------------------------------------------------------- on a real cluster


def _rows(cluster: ClusterHandle, like: str) -> list[tuple[str, str, str, float]]:
    with cluster.coordinator() as conn:
        return [
            (b, m, t, float(k))
            for b, m, t, k in conn.execute(
                "SELECT building, meter, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS+00'), kwh "
                "FROM readings WHERE building LIKE %s ORDER BY building, meter, ts",
                (like,),
            ).fetchall()
        ]


@pytest.mark.parametrize("damage", ["between-members", "inside-deflate"])
def test_corrupt_gzip_mid_file_reports_what_is_committed(
    main_cluster: ClusterHandle, token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, damage: str
) -> None:
    """Damaged bytes between two gzip members (the reader fails there) or inside the deflate data
    (garbage may decode as text first): the error names exactly the lines that are committed."""
    monkeypatch.setattr(source, "READ_BYTES", 1 << 16)  # small reads: the damage is met after many lines
    b = f"t{token}"
    start = datetime(2024, 1, 1, tzinfo=UTC)

    def lines(lo: int, hi: int) -> bytes:
        return "".join(
            f"{b},m{i % 7},{(start + timedelta(minutes=i)).strftime('%Y-%m-%d %H:%M:%S+00')},{i % 97}.5\n" for i in range(lo, hi)
        ).encode()

    garbage = bytes(range(256)) * 64
    if damage == "between-members":
        data = gzip.compress(HEADER + lines(0, 30_000), 1) + garbage + gzip.compress(lines(30_000, 40_000), 1)
    else:
        packed = gzip.compress(HEADER + lines(0, 60_000), compresslevel=1)
        data = packed[: len(packed) // 2] + garbage
    path = tmp_path / "damaged.csv.gz"
    path.write_bytes(data)
    with pytest.raises(InputError) as info:
        ingest(main_cluster.directory, str(path), batch_rows=2000)
    message = str(info.value)
    assert "are committed" in message, message
    committed = int(message.split("lines 2-")[1].split(" ")[0])
    assert committed > 2
    if damage == "between-members":
        # the failing read loses the good bytes it had decoded: the error points at the first line not read
        assert "cannot read" in message and 20_000 < committed <= 30_001 and info.value.location.line == committed + 1, message
    assert len(_rows(main_cluster, b)) == committed - 1  # exactly the lines the message names


def test_unwritable_rejects_path_fails_before_loading(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> None:
    b = f"t{token}"
    path = tmp_path / "in.csv"
    path.write_text(f"building,meter,ts,kwh\n{b},m,{TS},1\n")
    with pytest.raises(RejectsUnwritable):
        ingest(main_cluster.directory, str(path), rejects=tmp_path / "missing" / "rejects.tsv")
    assert _rows(main_cluster, b) == []
    cli = subprocess.run(
        [sys.executable, "-m", "orchestrator", "ingest", str(path), "--rejects", "/proc/rejects.tsv",
         "--dir", str(main_cluster.directory)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert cli.returncode == RejectsUnwritable.exit_code and "Traceback" not in cli.stderr
    assert "rejects file" in cli.stderr + cli.stdout and _rows(main_cluster, b) == []


def test_spans_and_line_breaks_are_rejected_once_and_good_rows_load(
    main_cluster: ClusterHandle, token: str, tmp_path: Path
) -> None:
    b = f"t{token}"
    path = tmp_path / "in.csv"
    path.write_bytes(
        (
            "building,meter,ts,kwh\n"
            f"{b}a,m,{TS},1\n"  # 2
            f'"{b}x\n'  # 3
            f"{b}y,m,{TS},9\n"  # 4: inside the quoted field of line 3
            f'{b}z",m,{TS},9\n'  # 5
            f"{b}b\rc,m,{TS},9\n"  # 6
            f'"{b}c",m,{TS},2\n'  # 7
        ).encode()
    )
    rejects = tmp_path / "rejects.tsv"
    result = ingest(main_cluster.directory, str(path), rejects=rejects)
    assert (result.loaded, result.rejected) == (2, 2)
    recorded = rejects.read_bytes().split(b"\n")[1:-1]  # one entry per LF (a bare CR stays in its raw line)
    assert [r.split(b"\t")[0] for r in recorded] == [b"3", b"6"] and b"lines 3-5" in recorded[0]
    assert _rows(main_cluster, f"{b}%") == [
        (f"{b}a", "m", "2024-03-05 07:00:00+00", 1.0),
        (f"{b}c", "m", "2024-03-05 07:00:00+00", 2.0),
    ]
    # without --rejects the load stops at the span's first line, everything before it committed
    with pytest.raises(InputError) as info:
        ingest(main_cluster.directory, str(path))
    assert info.value.location.line == 3 and "lines 2-2 (1 rows) are committed" in str(info.value)


def test_names_that_need_escaping_are_stored_exactly(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> None:
    b = f"t{token}"
    names = [f"{b}\\N", f"{b}\t", f'{b} ,"q"', f"{b}\\", f"{b}é漢🙂", f" {b}sp ", f"{b}\x01\x7f"]
    rows = [(n, f"m{i}\\x", TS, float(i) + 0.25) for i, n in enumerate(names)]
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerows([["building", "meter", "ts", "kwh"], *rows])
    (tmp_path / "n.csv").write_text(buf.getvalue())
    ingest(main_cluster.directory, str(tmp_path / "n.csv"))
    (tmp_path / "n.jsonl").write_text(
        "".join(json.dumps({"building": n + "j", "meter": m, "ts": t, "kwh": k}) + "\n" for n, m, t, k in rows)
    )
    ingest(main_cluster.directory, str(tmp_path / "n.jsonl"))
    expected = sorted(rows + [(n + "j", m, t, k) for n, m, t, k in rows])
    got = _rows(main_cluster, f"%{b}%")
    assert sorted(got) == expected


def test_database_error_cancels_what_has_not_started_and_reports_what_committed(
    main_cluster: ClusterHandle, token: str, tmp_path: Path
) -> None:
    """A row the worker refuses (a CHECK constraint) in the middle of a load with many batches in
    flight: later batches that had not started are cancelled, and the error names exactly what
    is committed (every row in the cluster is accounted for by the message)."""
    b = f"t{token}"
    with main_cluster.coordinator() as conn:
        frag = Router(load_fragments(conn)).route(b)
    start = datetime(2024, 2, 1, tzinfo=UTC)
    lines = [
        f"{b},m,{(start + timedelta(minutes=i)).strftime('%Y-%m-%d %H:%M:%S+00')},{666.125 if i == 3000 else i % 97 + 0.5}\n"
        for i in range(40_000)
    ]
    path = tmp_path / "poison.csv"
    path.write_text("building,meter,ts,kwh\n" + "".join(lines))
    table = sql.Identifier("bsdata", frag.shard_name)
    with main_cluster.worker(frag.node) as w:
        # refuses the poisoned row, and takes ~0.2 ms per row so later batches queue up behind it
        w.execute(
            "CREATE FUNCTION public.test_poison(v double precision) RETURNS boolean LANGUAGE sql IMMUTABLE "
            "AS $$ SELECT pg_catalog.pg_sleep(0.0002) IS NOT NULL AND v <> 666.125 $$"
        )
        w.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT test_poison CHECK (public.test_poison(kwh))").format(table))
    try:
        with pytest.raises(NodeError) as info:
            ingest(main_cluster.directory, str(path), batch_rows=250)
    finally:
        with main_cluster.worker(frag.node) as w:
            w.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT test_poison").format(table))
            w.execute("DROP FUNCTION public.test_poison(double precision)")
    message = str(info.value)
    assert "test_poison" in message and "cancelled before they started" in message, message
    assert " 0 later batch part(s)" not in message, f"nothing was queued to cancel: {message}"
    committed = int(message.split("lines 2-")[1].split(" (")[0]) - 1
    after = int(message.split("of the lines after it, ")[1].split(" rows")[0]) if "of the lines after it" in message else 0
    stored = len(_rows(main_cluster, b))
    assert committed < 3001 and stored == committed + after, message
    # at most the batches running on the fragment's streams when it failed went in after it
    assert stored - committed <= 4 * 250, f"{stored - committed} rows after line {committed + 1} went in: {message}"
