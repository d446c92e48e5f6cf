"""Concurrent load for elastic tests: writers through the coordinator and through the write gate
(the ingest protocol), and a reader that checks every total it sees."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

import psycopg
from psycopg import sql

from orchestrator.connections import app_target, connect, superuser_target
from orchestrator.elastic.gate import RoutingChanged, WriteGate, is_retryable
from orchestrator.fragments import Router
from tests.harness import ClusterHandle

T0 = datetime(2025, 1, 1, tzinfo=UTC)
_RUN = iter(range(1, 10_000))


@dataclass
class Load:
    handle: ClusterHandle
    buildings: list[str]
    committed: dict[str, tuple[int, float]] = field(default_factory=lambda: defaultdict(lambda: (0, 0.0)))
    started_rows: int = 0
    errors: list[str] = field(default_factory=list)
    bad_reads: list[str] = field(default_factory=list)
    reads: int = 0
    max_gate_wait: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _threads: list[threading.Thread] = field(default_factory=list)
    _seq: int = 0
    _base: int = field(default_factory=lambda: next(_RUN) * 1_000_000)  # keys unique across loads

    def _next(self) -> int:
        with self._lock:
            self._seq += 1
            return self._seq

    def _record(self, rows: list[tuple[str, str, datetime, float]]) -> None:
        with self._lock:
            for b, _m, _t, k in rows:
                n, s = self.committed[b]
                self.committed[b] = (n + 1, s + k)

    def _batch(self, tag: str) -> list[tuple[str, str, datetime, float]]:
        i = self._next() + self._base
        with self._lock:
            self.started_rows += 20
        return [
            (self.buildings[(i + j) % len(self.buildings)], tag, T0 + timedelta(minutes=i * 20 + j), float(j + 1))
            for j in range(20)
        ]

    def _coordinator_writer(self) -> None:
        topo, creds = self.handle.topology, self.handle.creds
        conn = connect(app_target(topo.coordinator, creds), "test-writer", autocommit=True, search_path=None)
        try:
            while not self._stop.is_set():
                rows = self._batch("mc")
                for _attempt in range(20):
                    try:
                        with conn.transaction(), conn.cursor() as cur:
                            cur.executemany(
                                "INSERT INTO public.readings (building, meter, ts, kwh) VALUES (%s, %s, %s, %s)", rows
                            )
                        self._record(rows)
                        break
                    except psycopg.Error as exc:
                        if not is_retryable(exc):
                            self.errors.append(f"coordinator writer: {exc}")
                            return
                        time.sleep(0.05)
                time.sleep(0.005)
        finally:
            conn.close()

    def _gate_writer(self) -> None:
        topo, creds = self.handle.topology, self.handle.creds
        gate = WriteGate(superuser_target(topo.coordinator, creds), "test-gate")
        workers: dict[str, psycopg.Connection] = {}
        router = Router(gate.fragments())
        try:
            while not self._stop.is_set():
                rows = self._batch("mg")
                pending = rows
                while pending:
                    by_frag: dict[int, list[tuple[str, str, datetime, float]]] = defaultdict(list)
                    for r in pending:
                        by_frag[router.route(r[0]).fragment_id].append(r)
                    fid, part = next(iter(by_frag.items()))
                    frag = next(f for f in router.fragments if f.fragment_id == fid)
                    t = time.monotonic()
                    try:
                        with gate.batch([fid]):
                            self.max_gate_wait = max(self.max_gate_wait, time.monotonic() - t)
                            if frag.node not in workers:
                                workers[frag.node] = connect(
                                    superuser_target(topo.group(frag.node), creds), "test-gate-w", search_path=None
                                )
                            w = workers[frag.node]
                            with w.transaction(), w.cursor() as cur:
                                cur.executemany(
                                    sql.SQL("INSERT INTO {} (building, meter, ts, kwh) VALUES (%s, %s, %s, %s)").format(
                                        sql.Identifier("bsdata", frag.shard_name)
                                    ),
                                    part,
                                )
                    except RoutingChanged:
                        topo = self.handle.topology
                        router = Router(gate.fragments())
                        continue
                    self._record(part)
                    pending = [r for r in pending if r not in part]
                time.sleep(0.005)
        except Exception as exc:
            self.errors.append(f"gate writer: {exc!r}")
        finally:
            gate.close()
            for w in workers.values():
                w.close()

    def _reader(self) -> None:
        topo, creds = self.handle.topology, self.handle.creds
        conn = connect(app_target(topo.coordinator, creds), "test-reader", autocommit=True, search_path=None)
        last = 0
        try:
            while not self._stop.is_set():
                with self._lock:
                    before = sum(n for n, _ in self.committed.values())
                try:
                    row = conn.execute(
                        "SELECT count(*) FROM public.readings WHERE building = ANY(%s)", (self.buildings,)
                    ).fetchone()
                except psycopg.Error as exc:
                    self.errors.append(f"reader: {exc}")
                    return
                with self._lock:
                    after = self.started_rows
                n = int(row[0]) if row else 0
                # Never fewer than was committed before the query, never more than was ever started.
                if n < before or n > after or n < last:
                    self.bad_reads.append(f"read {n} rows, committed before {before}, started {after}, last {last}")
                last = n
                self.reads += 1
                time.sleep(0.01)
        finally:
            conn.close()

    def start(self) -> Load:
        for fn in (self._coordinator_writer, self._gate_writer, self._reader):
            t = threading.Thread(target=fn, daemon=True)
            t.start()
            self._threads.append(t)
        time.sleep(0.5)
        return self

    def stop(self) -> None:
        time.sleep(0.3)
        self._stop.set()
        for t in self._threads:
            t.join(timeout=30)

    def check(self) -> None:
        assert not self.errors, self.errors
        assert not self.bad_reads, self.bad_reads[:5]
        with self.handle.coordinator() as conn:
            rows = conn.execute(
                "SELECT building, count(*), sum(kwh) FROM public.readings WHERE building = ANY(%s) GROUP BY building",
                (self.buildings,),
            ).fetchall()
        got = {b: (int(n), float(s)) for b, n, s in rows}
        want = {b: v for b, v in self.committed.items() if v[0]}
        assert got == want
