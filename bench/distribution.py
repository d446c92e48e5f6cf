"""Benchmark: does the data distribute itself? From a fresh `up` (default shape: coordinator + 3
workers, one synchronous replica each), `buildsmart ingest` of a file, nothing else; then the
background balancer on its own.

    flock /tmp/bsdb-bench.lock /opt/bsdb-venv/bin/python bench/distribution.py [--dataset cambridge|synthetic|both]

For each data set it prints:
  - per-worker bytes (partitions + indexes on the primary) and rows (statistics) every few seconds
    during and after the load;
  - max/mean of bytes per worker right after the load and once the balancer has settled (how long
    to within +-15% and +-10%);
  - the ingest rate against a plain single-server COPY + upsert of the same rows in the same run;
  - the balancer's operations and the write pause each caused;
  - (synthetic) the ingest rate while the balancer works against the same ingest with it paused.

Data sets: the Cambridge file (121 buildings, 6.7M hourly rows, sorted by building), and a
synthetic file of 2,000 buildings whose ids share long prefixes, sizes Zipf-like (s = 1.3: the
biggest building about 28% of all rows, more than twice a fragment's fair share: it is split by
time), sorted by building.
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator import catalog, cluster, topology  # noqa: E402
from orchestrator.connections import connect, superuser_target  # noqa: E402
from orchestrator.elastic import move, observe  # noqa: E402
from orchestrator.elastic.context import open_cluster  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_ingest", REPO / "bench" / "ingest.py")
assert _spec is not None and _spec.loader is not None
bench_ingest = importlib.util.module_from_spec(_spec)
sys.modules["bench_ingest"] = bench_ingest
_spec.loader.exec_module(bench_ingest)

SETTLE_TIMEOUT_S = 900.0
QUIET_S = 90.0  # settled: no balancer operation for this long after the last one


@dataclass
class Series:
    """Bytes and rows per worker over time, sampled by a thread."""

    directory: Path
    every_s: float = 5.0
    points: list[tuple[float, dict[str, tuple[int, int]]]] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _t0: float = field(default_factory=time.monotonic)

    def sample(self) -> dict[str, tuple[int, int]]:
        topo, creds = topology.load(self.directory), topology.load_credentials(self.directory)
        with connect(superuser_target(topo.coordinator, creds), "bench:dist", autocommit=True) as conn:
            frags = catalog.load_fragments(conn)
        out: dict[str, tuple[int, int]] = {w.name: (0, 0) for w in topo.workers}
        for w in topo.workers:
            mine = [f for f in frags if f.node == w.name]
            with connect(superuser_target(w, creds), "bench:dist", autocommit=True) as conn:
                for b, r, _, _ in observe.sample_node(conn, mine).values():
                    out[w.name] = (out[w.name][0] + b, out[w.name][1] + r)
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.points.append((time.monotonic() - self._t0, self.sample()))
            except Exception as exc:  # a switch in progress: next time
                print(f"    (sample failed: {exc})")
            self._stop.wait(self.every_s)

    def start(self) -> Series:
        threading.Thread(target=self._run, daemon=True).start()
        return self

    def stop(self) -> None:
        self._stop.set()

    def print(self, since: float = 0.0) -> None:
        for t, per in self.points:
            if t < since:
                continue
            cells = "  ".join(f"{w} {b / 2**20:8.1f} MB {r:>10,} rows" for w, (b, r) in sorted(per.items()))
            print(f"    t={t:6.0f}s  {cells}  max/mean {max_mean(per):.3f}")


def max_mean(per: dict[str, tuple[int, int]]) -> float:
    sizes = [b for b, _ in per.values()]
    mean = sum(sizes) / len(sizes)
    return max(sizes) / mean if mean else 0.0


def within(per: dict[str, tuple[int, int]], tol: float) -> bool:
    sizes = [b for b, _ in per.values()]
    mean = sum(sizes) / len(sizes)
    return all(abs(s - mean) <= tol * mean for s in sizes)


# ---------------------------------------------------------------- inputs


def cambridge(workdir: Path) -> Path:
    path = workdir / "cambridge.csv"
    with gzip.open(bench_ingest.CAMBRIDGE, "rb") as src, path.open("wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 20)
    return path


def synthetic(workdir: Path, buildings: int, rows: int, s: float, seed: int = 9, name: str = "synthetic.csv",
              start: datetime = datetime(2021, 1, 1, tzinfo=UTC)) -> Path:  # fmt: skip
    """2,000 buildings with ids sharing long prefixes, rows per building ~ 1/rank^s, hourly
    readings over up to three years (big buildings have more meters), sorted by building."""
    rng = random.Random(seed)
    ids = sorted(
        {f"urn:estate:campus-{rng.choice(['north', 'south'])}:site-{i % 40:02d}:building-{rng.getrandbits(48):012x}"
         for i in range(buildings)},
        key=str.encode,
    )  # fmt: skip
    ranks = list(range(1, len(ids) + 1))
    rng.shuffle(ranks)  # the biggest building sits anywhere in byte order
    weights = [1.0 / r**s for r in ranks]
    total = sum(weights)
    max_hours = 3 * 8760
    path = workdir / name
    with path.open("w") as out:
        out.write("building,meter,ts,kwh\n")
        for b, w in zip(ids, weights, strict=True):
            n = max(24, int(rows * w / total))
            meters = -(-n // max_hours)
            hours = n // meters
            for m in range(meters):
                for h in range(hours):
                    out.write(
                        f"{b},m{m:02d},{(start + timedelta(hours=h)).strftime('%Y-%m-%d %H:%M:%S+00')},{(h * 7 + m) % 97}\n"
                    )
    path.chmod(0o644)
    return path


# ---------------------------------------------------------------- running


def run_ingest(directory: Path, path: Path) -> tuple[float, str]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "ingest", str(path), "--dir", str(directory)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if proc.returncode != 0:
        raise SystemExit(f"ingest failed: {proc.stderr}")
    return time.monotonic() - started, proc.stdout.strip()


def balancer_log(directory: Path, since_id: int = 0) -> list[dict[str, Any]]:
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    with connect(superuser_target(topo.coordinator, creds), "bench:dist", autocommit=True) as conn:
        rows = conn.execute(
            "SELECT entry_id, extract(epoch FROM at), action, outcome, fragment_id, reason, detail FROM buildsmart.balancer_log "
            "WHERE entry_id > %s ORDER BY entry_id",
            (since_id,),
        ).fetchall()
    return [dict(zip(("id", "at", "action", "outcome", "fragment", "reason", "detail"), r, strict=True)) for r in rows]


def operations(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in entries if e["action"] in ("split", "time_split", "move", "presplit")]


def settle(directory: Path, series: Series, t_end: float) -> dict[str, float | None]:
    """Wait until the balancer has not operated for QUIET_S (or SETTLE_TIMEOUT_S); returns when
    bytes per worker were first within 15% and 10% after the load ended."""
    first: dict[str, float | None] = {"15": None, "10": None}
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    last_op = time.monotonic()
    seen = 0
    while time.monotonic() < deadline:
        ops = operations(balancer_log(directory))
        running = any(e["outcome"] == "decided" for e in ops)
        if len(ops) != seen or running:
            seen, last_op = len(ops), time.monotonic()
        per = series.points[-1][1] if series.points else series.sample()
        now = time.monotonic() - series._t0
        for key, tol in (("15", 0.15), ("10", 0.10)):
            if first[key] is None and within(per, tol):
                first[key] = max(0.0, now - t_end)
            elif first[key] is not None and not within(per, tol):
                first[key] = None  # left the band again: count from the next time
        if time.monotonic() - last_op >= QUIET_S:
            break
        time.sleep(2)
    return first


def one_dataset(label: str, path: Path, rows: int, workdir: Path, headroom: bool) -> dict[str, Any]:
    print(f"\n=== {label}: {rows:,} rows ({path.stat().st_size / 2**20:.0f} MB of CSV)")
    print("  (a) plain PostgreSQL 18, one server: COPY + upsert of the same rows ...")
    (workdir / label).mkdir(mode=0o755)
    base_s = bench_ingest.baseline_copy(path, workdir / label)
    shutil.rmtree(workdir / label / "baseline", ignore_errors=True)
    directory = workdir / f"cluster-{label}"
    print("  fresh `buildsmart up` (default shape: coordinator + 3 workers, 1 synchronous replica each) ...")
    cluster.up(directory)
    result: dict[str, Any] = {"dataset": label, "rows": rows, "baseline_s": base_s}
    try:
        series = Series(directory).start()
        t_start = time.monotonic() - series._t0
        print("  (b) buildsmart ingest (first load lays out the fragments; the balancer runs as after up) ...")
        ingest_s, summary = run_ingest(directory, path)
        t_end = time.monotonic() - series._t0
        print(f"    {summary}")
        after_load = series.sample()
        first = settle(directory, series, t_end)
        settled = series.sample()
        series.stop()
        log = balancer_log(directory)
        ops = [e for e in operations(log) if e["outcome"] != "decided"]
        result |= {
            "ingest_s": ingest_s,
            "ingest_rows_per_s": rows / ingest_s,
            "baseline_rows_per_s": rows / base_s,
            "ratio_vs_baseline": base_s / ingest_s,
            "max_mean_after_load": max_mean(after_load),
            "max_mean_settled": max_mean(settled),
            "to_15pct_s": first["15"],
            "to_10pct_s": first["10"],
            "settled": {w: {"bytes": b, "rows": r} for w, (b, r) in settled.items()},
            "operations": [
                {"action": e["action"], "outcome": e["outcome"], "fragment": e["fragment"],
                 "seconds": e["detail"].get("seconds"), "pause_s": e["detail"].get("pause_seconds"), "reason": e["reason"]}
                for e in ops
            ],
        }  # fmt: skip
        print(f"  per-worker bytes and rows over time (load from t={t_start:.0f}s to t={t_end:.0f}s):")
        series.print()
        print(f"  ingest: {ingest_s:.1f} s wall = {rows / ingest_s:,.0f} rows/s; baseline {base_s:.1f} s = "
              f"{rows / base_s:,.0f} rows/s; ratio {base_s / ingest_s:.2f}")  # fmt: skip
        print(f"  max/mean bytes per worker: after the load {max_mean(after_load):.3f}, settled {max_mean(settled):.3f}; "
              f"within ±15% {_ago(first['15'])} after the load, within ±10% {_ago(first['10'])}")  # fmt: skip
        print("  balancer operations (write pause each):")
        for e in ops:
            d = e["detail"]
            pause = "-" if d.get("pause_seconds") is None else f"{d['pause_seconds'] * 1000:.0f} ms"
            print(f"    {e['action']:<10} fragment {e['fragment']!s:<4} {e['outcome']:<7} "
                  f"{d.get('seconds', 0) or 0:6.1f} s  pause {pause:>7}  {e['reason'][:110]}")  # fmt: skip
        result["queries"] = measure_queries(directory)
        if headroom:
            result["headroom"] = measure_headroom(directory, workdir)
    finally:
        cluster.down(directory, purge=True)
    return result


def _timed(conn: Any, query: str, params: tuple[Any, ...] = (), runs: int = 5) -> tuple[float, tuple[Any, ...]]:
    conn.execute(query, params).fetchall()  # warm
    times, row = [], ()
    for _ in range(runs):
        t = time.perf_counter()
        rows = conn.execute(query, params).fetchall()
        times.append(time.perf_counter() - t)
        row = rows[0] if rows else ()
    return sorted(times)[len(times) // 2], row


def measure_queries(directory: Path) -> dict[str, Any]:
    """Once settled: a fleet-wide per-building aggregate over one year, one building's month, and the
    whole-building aggregate of the biggest building against the next biggest (which is in one
    fragment). Through the coordinator as the application role, postgres_fdw pushdown as shipped."""
    from orchestrator.connections import app_target

    topo, creds = topology.load(directory), topology.load_credentials(directory)
    out: dict[str, Any] = {}
    with connect(superuser_target(topo.coordinator, creds), "bench", autocommit=True) as admin:
        admin.execute("ANALYZE public.readings")  # the coordinator never analyzes foreign partitions by itself
        frags = catalog.load_fragments(admin)
        (span,) = admin.execute("SELECT max(ts) FROM public.readings").fetchone() or (None,)
    with connect(app_target(topo.coordinator, creds), "bench", autocommit=True) as conn:
        year_end = span
        year = (year_end - timedelta(days=365), year_end)
        t, _ = _timed(conn, "SELECT building, sum(kwh) FROM public.readings WHERE ts >= %s AND ts < %s GROUP BY 1", year, runs=3)
        (n,) = conn.execute("SELECT count(*) FROM public.readings WHERE ts >= %s AND ts < %s", year).fetchone() or (0,)
        out["fleet_year_by_building_s"], out["fleet_year_rows"] = t, n
        print(f"  query: per-building totals over the last year ({n:,} rows, {len(frags)} fragments): {t * 1000:.0f} ms "
              f"= {n / t:,.0f} rows/s")  # fmt: skip
        sizes = conn.execute("SELECT building, count(*) FROM public.readings GROUP BY 1 ORDER BY 2 DESC LIMIT 2").fetchall()
        month = (year_end - timedelta(days=30), year_end)
        t, _ = _timed(conn, "SELECT meter, sum(kwh) FROM public.readings WHERE building = %s AND ts >= %s AND ts < %s GROUP BY 1",
                      (sizes[1][0], *month), runs=11)  # fmt: skip
        out["one_building_month_ms"] = t * 1000
        print(f"  query: one building's last month by meter: {t * 1000:.1f} ms")
        for (b, rows), label in zip(sizes, ("biggest", "second"), strict=True):
            pieces = sum(1 for f in frags if f.holds(b))
            t, _ = _timed(conn, "SELECT count(*), sum(kwh), avg(kwh) FROM public.readings WHERE building = %s", (b,), runs=3)
            out[f"{label}_building"] = {"rows": rows, "fragments": pieces, "seconds": t, "rows_per_s": rows / t}
            print(f"  query: whole-building aggregate of the {label} building ({rows:,} rows in {pieces} fragment(s)): "
                  f"{t * 1000:.0f} ms = {rows / t:,.0f} rows/s")  # fmt: skip
    return out


def _ago(v: float | None) -> str:
    return "never (in the time waited)" if v is None else f"{v:.0f} s"


def _imbalance(directory: Path) -> str:
    """Every fragment of one worker moved to another: that worker is empty, the balancer has work."""
    with open_cluster(directory, "bench") as el:
        frags = el.fragments()
        nodes = sorted({f.node for f in frags})
        for f in [f for f in frags if f.node == nodes[-1]]:
            move.move_fragment(el, f.fragment_id, nodes[0])
    return nodes[-1]


def measure_headroom(directory: Path, workdir: Path) -> dict[str, Any]:
    """The same ingest shape twice from the same imbalanced layout (one worker emptied): balancer
    paused, then balancer working (allowed to act while the load runs, at its busy duty cycle)."""
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    extra = [synthetic(workdir, 2000, 1_500_000, 1.3, seed=9, name=f"extra{i}.csv",
                       start=datetime(2024 + 3 * i, 6, 1, tzinfo=UTC)) for i in (1, 2)]  # fmt: skip
    rows = sum(1 for _ in extra[0].open()) - 1
    with connect(superuser_target(topo.coordinator, creds), "bench", autocommit=True) as conn:
        catalog.set_paused(conn, True, "bench: headroom, paused run")
    emptied = _imbalance(directory)
    print(f"  headroom: every fragment of {emptied} moved away; ingest with the balancer paused ...")
    paused_s, summary = run_ingest(directory, extra[0])
    print(f"    {summary}")
    with connect(superuser_target(topo.coordinator, creds), "bench", autocommit=True) as conn:
        mark = int((conn.execute("SELECT coalesce(max(entry_id), 0) FROM buildsmart.balancer_log").fetchone() or (0,))[0])
        # let it work during the load (it would otherwise wait for the load to end), at its duty cycle
        catalog.set_balancer_settings(conn, {"busy_defer_s": 0})
        catalog.set_paused(conn, False)
    print("  headroom: the same ingest shape with the balancer working ...")
    started = time.time()
    active_s, summary = run_ingest(directory, extra[1])
    ended = time.time()
    print(f"    {summary}")
    with connect(superuser_target(topo.coordinator, creds), "bench", autocommit=True) as conn:
        catalog.set_paused(conn, True, "bench: headroom measured")
    entries = balancer_log(directory, mark)
    during = [e for e in operations(entries) if started <= float(e["at"]) <= ended and e["outcome"] == "done"]
    waits = [e for e in entries if e["action"] == "wait" and started <= float(e["at"]) <= ended]
    busy_s = sum(float(e["detail"].get("seconds") or 0) for e in during)
    print(f"    paused {rows / paused_s:,.0f} rows/s, balancer working {rows / active_s:,.0f} rows/s: "
          f"{paused_s / active_s:.2f} of the paused rate; {len(during)} operation(s) started and finished during it "
          f"({busy_s:.1f} s of {active_s:.1f} s), {len(waits)} wait decision(s) recorded")  # fmt: skip
    for e in during:
        d = e["detail"]
        pause_ms = (d.get("pause_seconds") or 0) * 1000
        print(f"      {e['action']} fragment {e['fragment']}: {d.get('seconds')} s, pause {pause_ms:.0f} ms")
    return {"rows": rows, "paused_s": paused_s, "active_s": active_s, "ratio": paused_s / active_s,
            "operations": [(e["action"], e["detail"].get("seconds"), e["detail"].get("pause_seconds")) for e in during],
            "waits": [e["reason"] for e in waits]}  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", choices=("cambridge", "synthetic", "both"), default="both")
    ap.add_argument("--synthetic-rows", type=int, default=3_000_000)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="bs-bench-dist-"))
    os.chmod(workdir, 0o755)
    results = []
    print(f"started {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {os.cpu_count()} cores; other work on the machine may skew figures")
    try:
        if args.dataset in ("cambridge", "both"):
            path = cambridge(workdir)
            results.append(one_dataset("cambridge", path, sum(1 for _ in path.open()) - 1, workdir, headroom=False))
            path.unlink()
        if args.dataset in ("synthetic", "both"):
            path = synthetic(workdir, 2000, args.synthetic_rows, 1.3)
            results.append(one_dataset("synthetic", path, sum(1 for _ in path.open()) - 1, workdir, headroom=True))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=2, default=str))


if __name__ == "__main__":
    main()
