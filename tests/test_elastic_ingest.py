"""Online move, split and rebalance while the real `buildsmart ingest` loads and a client queries.

One cluster for the module: f1 [MIN, b) w1, f2 [b, m) w2, f3 [m, MAX) w1. Each test loads its own
buildings (a token per test) with `python -m orchestrator ingest` as a subprocess, starts the
operation while the ingest is still loading, runs a reader that checks totals it can know, and
afterwards compares the stored rows with a reference computed from the input file.
"""

from __future__ import annotations

import random
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from orchestrator.cli.app import LOG_FILE
from orchestrator.connections import app_target, connect
from orchestrator.elastic import balancer, move, split
from orchestrator.elastic.context import open_cluster
from tests.harness import ClusterHandle, start_cluster, stop_cluster

T0 = datetime(2025, 1, 1, tzinfo=UTC)
SERIES_PER_REGION = 40  # buildings x meters per fragment region
STEPS = 2500  # timestamps per series, 1 h apart (about 3.5 months: time partitions appear during the load)
Key = tuple[str, str, int]  # building, meter, epoch seconds


@pytest.fixture(scope="module")
def icluster() -> Iterator[ClusterHandle]:
    handle = start_cluster("bs-el-ingest-", workers=2, split_points=["b", "m"])
    try:
        yield handle
    finally:
        stop_cluster(handle)


@dataclass
class Workload:
    """An input file whose latest line per key is known, and buildings the ingest never touches."""

    path: Path
    buildings: list[str]
    reference: dict[Key, float]
    stable: dict[str, tuple[int, int]]  # building -> (rows, integer kwh sum), preloaded before the ingest


def _buildings(tok: str) -> list[str]:
    # Ten buildings in each fragment's range: a.. in f1, c.. in f2, n.. in f3.
    return [f"{region}{tok}_{i:02d}" for region in ("a", "c", "n") for i in range(10)]


def make_workload(handle: ClusterHandle, directory: Path, tok: str, seed: int, steps: int = STEPS) -> Workload:
    rng = random.Random(seed)
    buildings = _buildings(tok)
    series = [(b, f"m{j}") for b in buildings for j in range(SERIES_PER_REGION // 10)]
    reference: dict[Key, float] = {}
    recent: list[Key] = []
    lines = ["building,meter,ts,kwh"]

    def emit(key: Key, kwh: float) -> None:
        ts = datetime.fromtimestamp(key[2], UTC).isoformat()
        lines.append(f"{key[0]},{key[1]},{ts},{kwh}")
        reference[key] = kwh

    for step in range(steps):
        epoch = int((T0 + timedelta(hours=step)).timestamp())
        for b, m in series:
            key = (b, m, epoch)
            emit(key, round(rng.uniform(0, 100), 3))
            recent.append(key)
        # Resend readings with new values: some from far back (earlier batches, maybe another
        # fragment's place by now), some from this very step (same batch).
        for _ in range(len(series) // 4):
            emit(rng.choice(recent[-40_000:]), round(rng.uniform(100, 200), 3))
        if len(recent) > 80_000:
            del recent[:40_000]
    path = directory / f"ingest-{tok}.csv"
    path.write_text("\n".join(lines) + "\n")
    stable = {f"{region}{tok}_s{i}": (500, 500 * (i + 1)) for region in ("a", "c", "n") for i in range(3)}
    with handle.coordinator() as conn:
        for b, (n, _) in stable.items():
            conn.execute(
                "INSERT INTO public.readings SELECT %s, 'stable', timestamptz '2025-02-01' + g * interval '1 hour', %s "
                "FROM generate_series(1, %s) g",
                (b, int(b[-1]) + 1, n),
            )
    return Workload(path, buildings, reference, stable)


@dataclass
class Reader:
    """Queries through the coordinator as the app user while the operation runs. Totals of the
    preloaded buildings must be exact every time; the ingest's row count must never go down (a
    fragment not seen would) nor above the number of distinct keys (one seen twice would)."""

    handle: ClusterHandle
    work: Workload
    reads: int = 0
    bad: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _run(self) -> None:
        topo, creds = self.handle.topology, self.handle.creds
        stable = sorted(self.work.stable)
        last = 0
        with connect(app_target(topo.coordinator, creds), "test-reader", autocommit=True, search_path=None) as conn:
            while not self._stop.is_set():
                try:
                    got = {
                        b: (int(n), int(s))
                        for b, n, s in conn.execute(
                            "SELECT building, count(*), sum(kwh)::bigint FROM public.readings "
                            "WHERE building = ANY(%s) GROUP BY building",
                            (stable,),
                        ).fetchall()
                    }
                    row = conn.execute(
                        "SELECT count(*) FROM public.readings WHERE building = ANY(%s)", (self.work.buildings,)
                    ).fetchone()
                except psycopg.Error as exc:
                    self.bad.append(f"query failed: {exc}")
                    return
                n = int(row[0]) if row else 0
                if got != self.work.stable:
                    self.bad.append(f"preloaded totals differ: {sorted(set(got.items()) ^ set(self.work.stable.items()))}")
                if n < last or n > len(self.work.reference):
                    self.bad.append(f"ingest rows {n} after {last} (at most {len(self.work.reference)})")
                last = n
                self.reads += 1
                time.sleep(0.01)

    def start(self) -> Reader:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)


@dataclass
class Ingest:
    """`buildsmart ingest -` fed the workload through its standard input. The feeder holds back
    the last tenth of the lines until ``release()``: the load is still running when the operation
    switches, however fast the loader is, and what comes after the switch must be re-routed."""

    proc: subprocess.Popen[bytes]
    log: Path
    log_offset: int
    released: threading.Event = field(default_factory=threading.Event)
    feeder: threading.Thread | None = None

    @classmethod
    def start(cls, handle: ClusterHandle, path: Path) -> Ingest:
        log = handle.directory / LOG_FILE
        offset = log.stat().st_size if log.exists() else 0
        cmd = [
            sys.executable, "-m", "orchestrator", "ingest", "-",
            "--dir", str(handle.directory), "--batch-rows", "2000",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        ingest = cls(proc, log, offset)
        ingest.feeder = threading.Thread(target=ingest._feed, args=(path.read_bytes(),), daemon=True)
        ingest.feeder.start()
        return ingest

    def _feed(self, data: bytes) -> None:
        assert self.proc.stdin is not None
        held = data.rfind(b"\n", 0, len(data) * 9 // 10) + 1
        try:
            self.proc.stdin.write(data[:held])
            self.proc.stdin.flush()
            self.released.wait(timeout=600)
            self.proc.stdin.write(data[held:])
            self.proc.stdin.close()
        except (BrokenPipeError, ValueError):
            pass  # the ingest was killed

    def release(self) -> None:
        self.released.set()

    def wait_loading(self, handle: ClusterHandle, buildings: list[str], rows: int) -> None:
        """Until at least ``rows`` of its rows are visible (the load is under way)."""
        deadline = time.monotonic() + 60
        with handle.coordinator() as conn:
            while time.monotonic() < deadline:
                assert self.proc.poll() is None, self.finish()
                row = conn.execute("SELECT count(*) FROM public.readings WHERE building = ANY(%s)", (buildings,)).fetchone()
                if row is not None and row[0] >= rows:
                    return
                time.sleep(0.05)
        raise AssertionError("ingest did not get going")

    def finish(self) -> str:
        self.release()
        if self.feeder is not None:
            self.feeder.join(timeout=300)
        self.proc.stdin = None  # closed by the feeder; communicate() must not touch it
        try:
            out, err = self.proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            out, err = self.proc.communicate()
        return f"rc={self.proc.returncode}\n{out.decode()}\n{err.decode()}"

    def new_log(self) -> str:
        with self.log.open("rb") as fh:
            fh.seek(self.log_offset)
            return fh.read().decode(errors="replace")

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.finish()


def check_stored(handle: ClusterHandle, work: Workload) -> None:
    """The stored rows equal the reference: the latest line of each key, no key twice."""
    with handle.coordinator() as conn:
        rows = conn.execute(
            "SELECT building, meter, extract(epoch FROM ts)::bigint, kwh FROM public.readings WHERE building = ANY(%s)",
            (work.buildings,),
        ).fetchall()
        stable = {
            b: (int(n), int(s))
            for b, n, s in conn.execute(
                "SELECT building, count(*), sum(kwh)::bigint FROM public.readings WHERE building = ANY(%s) GROUP BY 1",
                (sorted(work.stable),),
            ).fetchall()
        }
    got = {(b, m, int(t)): float(k) for b, m, t, k in rows}
    assert len(rows) == len(got), f"{len(rows) - len(got)} keys visible twice"
    assert len(got) == len(work.reference)
    missing = work.reference.keys() - got.keys()
    assert not missing, f"{len(missing)} keys missing, e.g. {sorted(missing)[:3]}"
    wrong = [k for k, v in work.reference.items() if got[k] != v]
    assert not wrong, f"{len(wrong)} keys with an older value, e.g. {[(k, got[k], work.reference[k]) for k in wrong[:3]]}"
    assert stable == work.stable


def check_clean(handle: ClusterHandle) -> None:
    with handle.coordinator() as conn:
        assert conn.execute("SELECT count(*) FROM buildsmart.jobs WHERE state IN ('scheduled', 'running')").fetchone() == (0,)
    for node in ("w1", "w2"):
        with handle.worker(node) as w:
            assert w.execute("SELECT count(*) FROM pg_subscription").fetchone() == (0,)
            assert w.execute("SELECT count(*) FROM pg_publication").fetchone() == (0,)
            assert w.execute("SELECT count(*) FROM pg_replication_slots").fetchone() == (0,)
            assert w.execute("SELECT count(*) FROM pg_trigger WHERE tgname = 'bs_split_mirror'").fetchone() == (0,)
            assert w.execute("SELECT count(*) FROM pg_views WHERE schemaname = 'bsdata'").fetchone() == (0,)


def _during_ingest(
    handle: ClusterHandle, tok: str, seed: int, operation: Callable[[], None], steps: int = STEPS
) -> tuple[Workload, str]:
    work = make_workload(handle, handle.directory.parent, tok, seed, steps)
    ingest = Ingest.start(handle, work.path)
    reader = Reader(handle, work)
    try:
        ingest.wait_loading(handle, work.buildings, 5_000)
        reader.start()
        operation()
        ingest.release()
        outcome = ingest.finish()
        time.sleep(0.2)
    finally:
        reader.stop()
        ingest.kill()
        work.path.unlink(missing_ok=True)
    assert ingest.proc.returncode == 0, outcome
    assert not reader.bad, reader.bad[:5]
    assert reader.reads > 5
    log = ingest.new_log()
    assert "re-routing" in log, log[-3000:]
    assert len(re.findall(r"routing \d+ fragments \(catalog version", log)) >= 2, log[-3000:]  # first and new routing
    check_stored(handle, work)
    check_clean(handle)
    return work, log


def test_move_during_ingest(icluster: ClusterHandle) -> None:
    results = []

    def operation() -> None:
        with open_cluster(icluster.directory) as el:
            src = el.fragment(1).node
            results.append(move.move_fragment(el, 1, "w2" if src == "w1" else "w1"))

    _during_ingest(icluster, "x", 1, operation)
    assert results[0].rows > 1_500  # the preloaded rows of f1 and what the ingest had loaded


def test_split_during_ingest(icluster: ClusterHandle) -> None:
    results = []

    def operation() -> None:
        with open_cluster(icluster.directory) as el:
            results.append(split.split_fragment(el, 1, "ay_05"))

    _during_ingest(icluster, "y", 2, operation)
    with icluster.coordinator() as conn:
        per_part = dict(
            conn.execute(
                "SELECT building < 'ay_05', count(DISTINCT tableoid) FROM public.readings WHERE building LIKE 'ay\\_%' GROUP BY 1"
            ).fetchall()
        )
    assert per_part == {True: 1, False: 1}
    assert results[0].rows_moved > 0


def test_rebalance_during_ingest(icluster: ClusterHandle) -> None:
    done = []
    with open_cluster(icluster.directory) as el:
        for f in el.fragments():  # everything on w1: the rebalance has work to do
            if f.node != "w1":
                move.move_fragment(el, f.fragment_id, "w1")

    def operation() -> None:
        with open_cluster(icluster.directory) as el:
            done.append(balancer.run(el, 0.3))

    # Several moves run one after another: three times the readings keep the (faster) loader busy
    # until the first switch.
    _during_ingest(icluster, "z", 3, operation, steps=3 * STEPS)
    assert done[0] >= 1
    with open_cluster(icluster.directory) as el:
        assert {f.node for f in el.fragments()} == {"w1", "w2"}
