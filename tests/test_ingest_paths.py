"""The two write paths of the ingest session on a real cluster: new keys go by plain COPY, resent or
corrected keys by the latest-wins upsert, a batch mixing both splits, repeats inside a batch take
the upsert, a stale high-water mark falls back inside the savepoint, and a batch whose commit
outcome was unknown after the fast path is applied again exactly once. Also the placement hook's
call point, which runs before the first batch of a load."""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path

import psycopg
import pytest

from orchestrator.connections import Target
from orchestrator.elastic import autosplit
from orchestrator.fragments import Fragment
from orchestrator.ingest import loader
from orchestrator.ingest.api import CommitOutcome, IngestSession
from orchestrator.ingest.parse import Parsed, rows_to_batch
from orchestrator.ingest.validate import EPOCH, ONE_US
from orchestrator.ingest.writer import FragmentWriter
from tests.harness import ClusterHandle, write_csv

Key = tuple[str, str, str]


def _batch(rows: list[tuple[str, str, str, float]], first: int = 1) -> Parsed:
    parsed = rows_to_batch((first + i, {"building": b, "meter": m, "ts": t, "kwh": k}) for i, (b, m, t, k) in enumerate(rows))
    assert not parsed.rejects
    return parsed


def _stored(cluster: ClusterHandle, token: str) -> dict[Key, float]:
    with cluster.coordinator() as conn:
        got = conn.execute(
            "SELECT building, meter, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD HH24:MI:SS+00'), kwh FROM readings "
            "WHERE building LIKE %s",
            (f"%{token}%",),
        ).fetchall()
    table = {(b, m, t): v for b, m, t, v in got}
    assert len(table) == len(got), "a key is stored twice"
    return table


def _hours(b: str, meter: str, start: int, n: int, kwh: float = 1.0) -> list[tuple[str, str, str, float]]:
    return [(b, meter, f"2024-05-{1 + h // 24:02d} {h % 24:02d}:00:00+00", kwh + h) for h in range(start, start + n)]


@pytest.fixture
def session(main_cluster: ClusterHandle) -> Iterator[IngestSession]:
    s = IngestSession.open(main_cluster.directory, streams=1)
    yield s
    s.close()


def _submit(s: IngestSession, parsed: Parsed) -> CommitOutcome:
    commit = s.submit(parsed.batch, label=parsed.next_line)
    s.flush()
    assert commit.outcome is not None
    return commit.outcome


def test_new_keys_copy_resent_keys_upsert(main_cluster: ClusterHandle, token: str, session: IngestSession) -> None:
    b = f"t{token}"
    first = _submit(session, _batch(_hours(b, "el", 0, 48)))
    assert (first.copied, first.inserted, first.replaced, first.unchanged) == (48, 48, 0, 0)
    # next intervals: still new
    second = _submit(session, _batch(_hours(b, "el", 48, 24)))
    assert (second.copied, second.inserted) == (24, 24)
    # the same readings again, some corrected: nothing goes by COPY, latest value wins
    resent = _hours(b, "el", 0, 10) + _hours(b, "el", 10, 5, kwh=100.0)
    third = _submit(session, _batch(resent))
    assert (third.copied, third.inserted, third.replaced, third.unchanged) == (0, 0, 5, 10)
    expected = {(bb, m, t): k for bb, m, t, k in _hours(b, "el", 0, 72)}
    expected.update({(bb, m, t): k for bb, m, t, k in _hours(b, "el", 10, 5, kwh=100.0)})
    assert _stored(main_cluster, token) == expected
    assert session.totals.fallbacks == 0  # the marks told new from resent: no COPY failed


def test_batch_mixing_new_and_resent_keys_and_a_repeat(main_cluster: ClusterHandle, token: str, session: IngestSession) -> None:
    b = f"t{token}"
    _submit(session, _batch(_hours(b, "el", 0, 24)))
    mixed = [
        *_hours(b, "el", 20, 4, kwh=50.0),  # resent, corrected (below the mark)
        *_hours(b, "el", 24, 10),  # new
        *_hours(b, "gas", 0, 6),  # a meter never seen: new
        (b, "gas", "2024-05-01 03:00:00+00", 99.0),  # a repeat inside the batch: the later line wins
    ]
    out = _submit(session, _batch(mixed))
    assert out.copied == 10 + 5  # new electricity hours and the gas hours not repeated
    assert out.inserted == 10 + 6 and out.replaced == 4 + 1 and out.unchanged == 0
    expected = {(bb, m, t): k for bb, m, t, k in _hours(b, "el", 0, 34)}
    expected.update({(bb, m, t): k for bb, m, t, k in _hours(b, "el", 20, 4, kwh=50.0)})
    expected.update({(bb, m, t): k for bb, m, t, k in _hours(b, "gas", 0, 6)})
    expected[(b, "gas", "2024-05-01 03:00:00+00")] = 99.0
    assert _stored(main_cluster, token) == expected


def test_stale_mark_falls_back_inside_the_savepoint(main_cluster: ClusterHandle, token: str, session: IngestSession) -> None:
    """Another writer stored later readings of a meter: the session's COPY meets them, the
    savepoint undoes it, the upsert applies the batch, and the stored marks are read back."""
    b = f"t{token}"
    _submit(session, _batch(_hours(b, "el", 0, 5)))
    with main_cluster.coordinator(admin=False) as conn:  # an SQL client, through the coordinator
        conn.execute("INSERT INTO readings VALUES (%s, 'el', '2024-05-01 07:00:00+00', 70)", (b,))
    out = _submit(session, _batch(_hours(b, "el", 5, 5, kwh=10.0)))  # 05..09: 07 exists already
    assert session.totals.fallbacks == 1
    assert (out.copied, out.inserted, out.replaced) == (0, 4, 1)
    expected = {(bb, m, t): k for bb, m, t, k in _hours(b, "el", 0, 5)}
    expected.update({(bb, m, t): k for bb, m, t, k in _hours(b, "el", 5, 5, kwh=10.0)})
    assert _stored(main_cluster, token) == expected
    # the stored mark (09:00) was read back: the next batch after it goes fast again
    after = _submit(session, _batch(_hours(b, "el", 10, 3)))
    assert after.copied == 3 and session.totals.fallbacks == 1


class _LostReply(FragmentWriter):
    """Commits, then loses the reply once: the outcome of the fast-path batch is unknown."""

    lost = 0

    def after_commit(self) -> None:
        if _LostReply.lost == 0:
            _LostReply.lost += 1
            raise psycopg.OperationalError("server closed the connection unexpectedly (injected after COMMIT)")


def test_unknown_outcome_after_fast_path_is_applied_once(
    main_cluster: ClusterHandle, token: str, caplog: pytest.LogCaptureFixture
) -> None:
    class Session(IngestSession):
        def new_writer(self, fragment: Fragment, target: Target) -> FragmentWriter:  # type: ignore[override]
            return _LostReply(fragment, target, self.coordinator)

    b = f"t{token}"
    rows = _hours(b, "el", 0, 30)
    _LostReply.lost = 0
    s = Session.open(main_cluster.directory, streams=1)
    try:
        with caplog.at_level(logging.INFO, logger="orchestrator.ingest.writer"):
            out = _submit(s, _batch(rows))
        nxt = _submit(s, _batch(_hours(b, "el", 30, 5)))
    finally:
        s.close()
    assert _LostReply.lost == 1 and "not confirmed" in caplog.text
    # the first attempt committed by plain COPY; the retry upserted and found every row stored
    assert (out.copied, out.inserted, out.unchanged) == (0, 0, 30) and s.totals.retries == 1
    assert nxt.copied == 5
    assert _stored(main_cluster, token) == {(bb, m, t): k for bb, m, t, k in _hours(b, "el", 0, 35)}


def test_reload_of_a_file_writes_nothing(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> None:
    rows = [r for b in (f"a{token}", f"c{token}", f"t{token}") for m in ("el", "gas") for r in _hours(b, m, 0, 200)]
    path = write_csv(tmp_path / "r.csv", rows)
    first = loader.ingest(main_cluster.directory, str(path), batch_rows=300)
    assert first.copied == first.inserted == len(rows) and first.fallbacks == 0
    again = loader.ingest(main_cluster.directory, str(path), batch_rows=300)
    assert (again.inserted, again.replaced, again.unchanged, again.copied) == (0, 0, len(rows), 0)
    assert _stored(main_cluster, token) == {(b, m, t): k for b, m, t, k in rows}


def test_first_load_layout_gets_building_counts_before_the_first_batch(
    main_cluster: ClusterHandle, token: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A file is counted (only when a first-load layout can happen); a stream's first chunk stands
    for the load. Either way the layout is decided before any row is written."""
    rows = _hours(f"a{token}", "el", 0, 7) + _hours(f"t{token}", "el", 0, 3)
    path = tmp_path / "r.csv.gz"
    with gzip.open(path, "wt") as fh:
        fh.write("kwh,ts,building,meter\n" + "".join(f"{k},{t},{b},{m}\n" for b, m, t, k in rows))
    calls: list[tuple[Path, dict[str, int], int]] = []

    def presplit_for_load(directory: Path, counts: Mapping[str, int]) -> None:
        calls.append((directory, dict(counts), len(_stored(main_cluster, token))))

    def presplit_for_file(directory: Path, path: str, fmt: str | None = None) -> None:
        presplit_for_load(directory, autosplit.count_buildings(path, fmt))

    monkeypatch.setattr(autosplit, "presplit_for_load", presplit_for_load)
    monkeypatch.setattr(autosplit, "presplit_for_file", presplit_for_file)
    result = loader.ingest(main_cluster.directory, str(path))
    assert result.inserted == 10
    assert calls == [(main_cluster.directory.resolve(), {f"a{token}": 7, f"t{token}": 3}, 0)]
    # standard input cannot be read twice: its first chunk stands for the load
    calls.clear()
    monkeypatch.setattr("sys.stdin", _Stdin(path))
    loader.ingest(main_cluster.directory, "-")
    assert [c[1] for c in calls] == [{f"a{token}": 7, f"t{token}": 3}]


class _Stdin:
    def __init__(self, path: Path) -> None:
        self.buffer = gzip.open(path, "rb")  # noqa: SIM115 - the loader reads it to the end


def test_fast_path_stores_exactly_what_was_read(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> None:
    """New rows go to COPY as binary tuples: the stored instant and double equal the texts read."""
    b = f"t{token}"
    texts = ["0.1", "1e-320", "-0.0", "0.30000000000000004", "123456789.12345679", "1.7976931348623157e308", "5e-324", "+3"]
    stamps = [
        "2024-06-01 00:00:00.000001+00",
        "2024-06-01T01:30:00-03:30",
        "2024-06-01 02:00+15:59",
        "1999-12-31 23:59:59.999999Z",
        "2024-02-29 12:00:00+01",
        "1970-01-01 00:00:00+00",
        "2100-01-01 00:00:00+00",
        "2024-06-01 03:00:00.5+00",
    ]
    rows = [(b, f"m{i}", t, k) for i, (t, k) in enumerate(zip(stamps, texts, strict=True))]
    path = tmp_path / "exact.csv"
    path.write_text("building,meter,ts,kwh\n" + "".join(f"{r[0]},{r[1]},{r[2]},{r[3]}\n" for r in rows))
    result = loader.ingest(main_cluster.directory, str(path))
    assert result.copied == len(rows)
    with main_cluster.coordinator() as conn:
        got = dict(
            (m, (int(us), kwh))
            for m, us, kwh in conn.execute(
                "SELECT meter, (extract(epoch FROM ts) * 1000000)::numeric, kwh FROM readings WHERE building = %s", (b,)
            ).fetchall()
        )
    for _, m, t, k in rows:
        us, kwh = got[m]
        assert us == (datetime.fromisoformat(t) - EPOCH) // ONE_US, (t, us)
        assert kwh == float(k) and str(kwh).startswith("-") == k.startswith("-"), (k, kwh)
