"""Bad input: a clear error naming file, line, column and reason; nothing from the bad line on is
committed; with --rejects every bad line is recorded and every good row loads."""

from __future__ import annotations

import gzip
from pathlib import Path

import pytest

from orchestrator.exceptions import InputError
from orchestrator.ingest.loader import ingest
from tests.harness import ClusterHandle

GOOD = "{b},el,2023-01-01 0{h}:00:00+00,1.5"
CASES = [
    ("bad timestamp", "{b},el,2023-13-45 00:00:00+00,1", 3, "bad timestamp"),
    ("timestamp without offset", "{b},el,2023-01-01 05:00:00,1", 3, "expected ISO 8601 with offset"),
    ("non-numeric kwh", "{b},el,2023-01-01 05:00:00+00,abc", 4, "is not a number"),
    ("non-finite kwh", "{b},el,2023-01-01 05:00:00+00,inf", 4, "is not a number"),
    ("huge kwh", "{b},el,2023-01-01 05:00:00+00,1e999", 4, "is not finite"),
    ("missing field", "{b},el,2023-01-01 05:00:00+00", 0, "missing fields"),
    ("extra field", "{b},el,2023-01-01 05:00:00+00,1,2", 0, "extra fields"),
    ("empty building", ",el,2023-01-01 05:00:00+00,1", 1, "empty building"),
    ("empty meter", "{b},,2023-01-01 05:00:00+00,1", 2, "empty meter"),
]


def _file(tmp_path: Path, b: str, bad: str) -> Path:
    lines = ["building,meter,ts,kwh", GOOD.format(b=b, h=1), GOOD.format(b=b, h=2), bad.format(b=b), GOOD.format(b=b, h=3)]
    path = tmp_path / "in.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def _count(cluster: ClusterHandle, b: str) -> int:
    with cluster.coordinator() as conn:
        row = conn.execute("SELECT count(*) FROM readings WHERE building = %s", (b,)).fetchone()
    assert row is not None
    return int(row[0])


@pytest.mark.parametrize(("case", "bad", "field", "reason"), CASES, ids=[c[0] for c in CASES])
def test_bad_row_stops_with_location(
    main_cluster: ClusterHandle, token: str, tmp_path: Path, case: str, bad: str, field: int, reason: str
) -> None:
    b = f"t{token}"
    path = _file(tmp_path, b, bad)
    with pytest.raises(InputError) as info:
        ingest(main_cluster.directory, str(path))
    err = info.value
    assert err.location.path == str(path) and err.location.line == 4
    assert reason in err.reason
    if field:
        expected_col = sum(len(f) + 1 for f in bad.format(b=b).split(",")[: field - 1]) + 1
        assert err.location.column == expected_col
    assert f"{path}:4" in str(err) and "lines 2-3 (2 rows) are committed" in str(err)
    assert _count(main_cluster, b) == 2  # exactly the lines before the bad one


def test_non_utf8_byte(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> None:
    b = f"t{token}"
    path = tmp_path / "latin1.csv"
    path.write_bytes(
        f"building,meter,ts,kwh\n{b},el,2023-01-01 00:00:00+00,1\n{b},m\xe9ter,2023-01-01 00:00:00+00,1\n".encode("latin-1")
    )
    with pytest.raises(InputError) as info:
        ingest(main_cluster.directory, str(path))
    assert info.value.location.line == 3 and info.value.location.column == len(b) + 3
    assert "invalid UTF-8 byte 0xe9" in info.value.reason
    assert _count(main_cluster, b) == 1


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ("", 1, "missing header"),
        ("building,meter,time,kwh\nb1,el,2023-01-01 00:00:00+00,1\n", 1, "wrong header"),
        ("b1,el,2023-01-01 00:00:00+00,1\n", 1, "wrong header"),
    ],
    ids=["empty", "wrong-header", "no-header"],
)
def test_header_errors_load_nothing(main_cluster: ClusterHandle, tmp_path: Path, content: str, line: int, reason: str) -> None:
    path = tmp_path / "h.csv"
    path.write_text(content)
    with pytest.raises(InputError) as info:
        ingest(main_cluster.directory, str(path))
    assert info.value.location.line == line and reason in info.value.reason


def test_rejects_file_keeps_going(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> None:
    b = f"t{token}"
    bad_lines = [c[1].format(b=b) for c in CASES]
    good = [f"{b},el,2023-02-01 {h:02d}:00:00+00,{h}" for h in range(10)]
    body = [good[0], *bad_lines[:4], *good[1:6], *bad_lines[4:], *good[6:]]
    path = tmp_path / "mixed.csv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("building,meter,ts,kwh\n" + "\n".join(body) + "\n")
    rejects = tmp_path / "rejects.tsv"
    result = ingest(main_cluster.directory, str(path), rejects=rejects)
    assert result.rows == len(body)
    assert result.loaded == len(good) and result.rejected == len(bad_lines)
    assert result.loaded + result.rejected == result.rows
    recorded = rejects.read_text().splitlines()[1:]
    assert len(recorded) == len(bad_lines)
    for rec, raw in zip(recorded, bad_lines, strict=True):
        line, _col, reason, verbatim = rec.split("\t", 3)
        assert verbatim == raw and reason
        assert body[int(line) - 2] == raw
    assert _count(main_cluster, b) == len(good)


def test_cli_reports_location_and_exit_code(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> None:
    b = f"t{token}"
    path = _file(tmp_path, b, CASES[2][1])
    proc = main_cluster.run_cli("ingest", str(path), check=False)
    assert proc.returncode == InputError.exit_code
    assert f"{path}:4:" in proc.stderr and "is not a number" in proc.stderr
    ok = main_cluster.run_cli("ingest", "-", stdin=f"building,meter,ts,kwh\n{b},el,2023-01-09 00:00:00+00,4\n")
    assert "loaded 1" in ok.stdout and "rejected 0" in ok.stdout
