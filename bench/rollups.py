"""Dashboard queries from the rollups of a cluster vs raw rows and a materialized view on one plain
PostgreSQL server; ingest with and without rollup upkeep. One run.

Set up as a user would: the Cambridge buildings are in Europe/London and their meter names say
the kind, so the run imports buildings (`buildsmart buildings import`, with time_zone) and meters
(`buildsmart meters import`, kind from the name) before loading.

1. Ingest cost of rollup upkeep: the same file is loaded into two fresh clusters, one with the
   rollups paused (`rollups config --pause`: the loader still notes its changes, nothing refreshes)
   and one with the task runner refreshing every 5 s as it does by default; the ratio of the load
   times is the slowdown. Then the time until the rollups are fresh (no change waiting).
2. On the plain server (bench/queries.py's: default settings, readings partitioned by month,
   PRIMARY KEY, VACUUM ANALYZE): the queries over raw rows, and over materialized views (daily and
   hourly per building and meter, with indexes) refreshed after the load (the refresh time is
   printed: the cost a user pays for each refresh).
3. The cluster answers the same questions from readings_daily / readings_hourly, fresh without a
   manual refresh. Every answer is compared with the raw answer (1e-9 relative).

Usage:
  flock /tmp/bsdb-bench.lock python bench/rollups.py                 # all of the Cambridge file
  flock /tmp/bsdb-bench.lock python bench/rollups.py --since 2023 --replicas 0
"""

from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator import cluster, topology  # noqa: E402
from orchestrator.connections import app_target, connect  # noqa: E402
from orchestrator.energy.model import kind_from_name  # noqa: E402
from orchestrator.osuser import service_user  # noqa: E402
from orchestrator.runtime import local  # noqa: E402

_spec = importlib.util.spec_from_file_location("bench_queries", REPO / "bench" / "queries.py")
assert _spec is not None and _spec.loader is not None
bq = importlib.util.module_from_spec(_spec)
sys.modules["bench_queries"] = bq  # its dataclasses look their module up
_spec.loader.exec_module(bq)  # the plain server and the answer comparison of bench/queries.py

ZONE = "Europe/London"
BUILDINGS_CSV = bq.CAMBRIDGE.parent / "buildings.csv"


@dataclass(frozen=True)
class Question:
    name: str
    raw: str  # plain server, raw rows
    mv: str  # plain server, materialized views
    rollup: str  # cluster, rollups


def _local(text: str) -> str:
    return f"(timestamp '{text}' AT TIME ZONE '{ZONE}')"


def questions(building: str, year: int, month: str, day: str) -> list[Question]:
    y0, y1 = f"{year}-01-01", f"{year + 1}-01-01"
    d1 = (date.fromisoformat(day) + timedelta(days=1)).isoformat()
    first = date.fromisoformat(month)
    m1 = (first.replace(year=first.year + 1, month=1) if first.month == 12 else first.replace(month=first.month + 1)).isoformat()
    return [
        Question(
            "daily-profile-year",
            f"SELECT (ts AT TIME ZONE '{ZONE}')::date AS day, sum(kwh) FROM readings WHERE building = '{building}' "
            f"AND ts >= {_local(y0)} AND ts < {_local(y1)} GROUP BY 1 ORDER BY 1",
            f"SELECT day, sum(kwh) FROM daily_mv WHERE building = '{building}' AND day >= '{y0}' AND day < '{y1}' "
            "GROUP BY 1 ORDER BY 1",
            f"SELECT day, sum(kwh) FROM readings_daily WHERE building = '{building}' AND day >= '{y0}' AND day < '{y1}' "
            "GROUP BY 1 ORDER BY 1",
        ),
        Question(
            "monthly-all-buildings",
            f"SELECT building, date_trunc('month', ts AT TIME ZONE '{ZONE}')::date AS month, sum(kwh) FROM readings "
            "GROUP BY 1, 2",
            "SELECT building, month, sum(kwh) FROM daily_mv GROUP BY 1, 2",
            "SELECT building, month, sum(kwh) FROM readings_daily GROUP BY 1, 2",
        ),
        Question(
            "top10-month",
            f"SELECT building, sum(kwh) AS total FROM readings WHERE ts >= {_local(month)} AND ts < {_local(m1)} "
            "GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
            f"SELECT building, sum(kwh) AS total FROM daily_mv WHERE month = '{month}' GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
            f"SELECT building, sum(kwh) AS total FROM readings_daily WHERE month = '{month}' GROUP BY 1 ORDER BY 2 DESC LIMIT 10",
        ),
        Question(
            "hourly-profile-day",
            f"SELECT date_trunc('hour', ts) AS hour, sum(kwh) FROM readings WHERE building = '{building}' "
            f"AND ts >= {_local(day)} AND ts < {_local(d1)} GROUP BY 1 ORDER BY 1",
            f"SELECT hour, sum(kwh) FROM hourly_mv WHERE building = '{building}' AND hour >= {_local(day)} "
            f"AND hour < {_local(d1)} GROUP BY 1 ORDER BY 1",
            f"SELECT ts, sum(kwh) FROM readings_hourly WHERE building = '{building}' AND ts >= {_local(day)} "
            f"AND ts < {_local(d1)} GROUP BY 1 ORDER BY 1",
        ),
    ]


def subset(path: Path, since: int | None, workdir: Path) -> Path:
    if since is None:
        return path
    out = workdir / f"readings-since-{since}.csv.gz"
    with gzip.open(path, "rt") as src, gzip.open(out, "wt", compresslevel=1) as dst:
        dst.write(next(src))
        for line in src:
            if int(line.split(",", 3)[2][:4]) >= since:
                dst.write(line)
    return out


def metadata_files(path: Path, workdir: Path) -> tuple[Path, Path]:
    """What a facilities engineer writes down once: zone and area per building, kind per meter."""
    pairs: set[tuple[str, str]] = set()
    with gzip.open(path, "rt") as src:
        next(src)
        for line in src:
            b, m, _ = line.split(",", 2)
            pairs.add((b, m))
    buildings = workdir / "buildings.csv"
    lines = ["code,time_zone,floor_area_m2,floors"]
    with BUILDINGS_CSV.open() as fh:
        next(fh)
        for row in fh:
            code, area, floors = row.strip().split(",")[:3]
            lines.append(f"{code},{ZONE},{area},{floors}")
    known = {ln.split(",")[0] for ln in lines[1:]}
    lines += [f"{b},{ZONE},," for b in sorted({b for b, _ in pairs} - known)]
    buildings.write_text("\n".join(lines) + "\n")
    meters = workdir / "meters.csv"
    rows = "".join(f"{b},{m},{kind_from_name(m)},kWh,interval\n" for b, m in sorted(pairs))
    meters.write_text("building,meter,kind,unit,reading_type\n" + rows)
    return buildings, meters


def cli(directory: Path, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", *args, "--dir", str(directory)], capture_output=True, text=True, check=False
    )
    if proc.returncode != 0:
        raise SystemExit(f"buildsmart {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc.stdout + proc.stderr


def pending(directory: Path) -> int:
    return bq.rollup_changes_waiting(topology.load(directory), topology.load_credentials(directory))


def load_cluster(directory: Path, path: Path, replicas: int, paused: bool, meta: tuple[Path, Path]) -> tuple[float, float]:
    """Returns (load seconds, seconds from the end of the load until the rollups are fresh)."""
    cluster.up(directory, workers=3, replicas=replicas)
    cli(directory, "buildings", "import", str(meta[0]))
    cli(directory, "meters", "import", str(meta[1]))
    if paused:
        cli(directory, "rollups", "config", "--pause")
    started = time.monotonic()
    cli(directory, "ingest", str(path))
    loaded = time.monotonic() - started
    if paused:
        return loaded, float("nan")
    done = time.monotonic()
    while pending(directory) > 0:
        time.sleep(0.5)
        if time.monotonic() - done > 3600:
            raise SystemExit("rollups not fresh after an hour")
    return loaded, time.monotonic() - done


def materialize(conn: psycopg.Connection) -> float:
    conn.execute(
        f"CREATE MATERIALIZED VIEW daily_mv AS SELECT building, meter, (ts AT TIME ZONE '{ZONE}')::date AS day, "
        f"date_trunc('month', ts AT TIME ZONE '{ZONE}')::date AS month, sum(kwh) AS kwh, count(*) AS n "
        "FROM readings GROUP BY 1, 2, 3, 4 WITH NO DATA"
    )
    conn.execute("CREATE UNIQUE INDEX ON daily_mv (building, meter, day)")
    conn.execute("CREATE INDEX ON daily_mv (month)")
    conn.execute(
        "CREATE MATERIALIZED VIEW hourly_mv AS SELECT building, meter, date_trunc('hour', ts) AS hour, sum(kwh) AS kwh, "
        "count(*) AS n FROM readings GROUP BY 1, 2, 3 WITH NO DATA"
    )
    conn.execute("CREATE UNIQUE INDEX ON hourly_mv (building, meter, hour)")
    started = time.monotonic()
    conn.execute("REFRESH MATERIALIZED VIEW daily_mv")
    conn.execute("REFRESH MATERIALIZED VIEW hourly_mv")
    conn.execute("ANALYZE daily_mv")
    conn.execute("ANALYZE hourly_mv")
    return time.monotonic() - started


def timed(conn: psycopg.Connection, query: str, runs: int) -> tuple[float, list[tuple[Any, ...]]]:
    _, rows = bq.run_query(conn, query)
    return statistics.median(bq.run_query(conn, query)[0] for _ in range(runs)) * 1000, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, default=bq.CAMBRIDGE)
    ap.add_argument("--since", type=int, help="only readings from this year on (a shorter run)")
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=2, help="loads with rollups paused and live, alternating")
    ap.add_argument("--building", default="b2")
    ap.add_argument("--year", type=int, default=2023)
    ap.add_argument("--month", default="2023-06-01")
    ap.add_argument("--day", default="2023-06-15")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bs-rollups-"))
    os.chmod(workdir, 0o755)
    plain_member: local.LocalMember | None = None
    dirs: list[Path] = []
    try:
        path = subset(args.file, args.since, workdir)
        meta = metadata_files(path, workdir)
        load = os.getloadavg()[0]
        print(f"input: {path.name}; cluster: 3 workers, {args.replicas} replica(s) per node; load average at start {load:.2f}")

        # paused, live, paused, live: the best of each, so a neighbour's burst does not decide it
        paused_s: list[float] = []
        live_s: list[float] = []
        fresh_s = float("nan")
        live_dir = workdir / "live"
        for i, paused in enumerate((True, False) * args.rounds):
            d = workdir / f"load{i}"
            dirs.append(d)
            loaded, fresh = load_cluster(d, path, args.replicas, paused, meta)
            (paused_s if paused else live_s).append(loaded)
            print(f"  load {i + 1}: {loaded:.1f} s with rollups {'paused' if paused else f'live, fresh {fresh:.1f} s after it'}")
            if not paused and i == 2 * args.rounds - 1:
                live_dir, fresh_s = d, fresh  # the last live cluster answers the queries
            else:
                cluster.down(d, purge=True)
                dirs.remove(d)
        best_paused, best_live = min(paused_s), min(live_s)
        print(
            f"ingest: {best_paused:.1f} s with rollups paused, {best_live:.1f} s with rollups refreshed every 5 s (best of "
            f"{args.rounds}; slowdown {100 * (best_live / best_paused - 1):+.1f} %); rollups fresh {fresh_s:.1f} s after the load"
        )

        plain_dsn, plain_member = bq.plain_server(workdir, path)
        with psycopg.connect(plain_dsn, autocommit=True) as plain:
            plain.execute("SET TimeZone = 'UTC'")
            mv_s = materialize(plain)
            print(f"plain server: materialized views refreshed in {mv_s:.1f} s (each refresh recomputes everything)")
            topo, creds = topology.load(live_dir), topology.load_credentials(live_dir)
            with connect(app_target(topo.coordinator, creds), "bench", autocommit=True, search_path=None) as clus:
                clus.execute("SET TimeZone = 'UTC'")
                for q in questions(args.building, args.year, args.month, args.day):
                    raw_ms, raw_rows = timed(plain, q.raw, args.runs)
                    mv_ms, mv_rows = timed(plain, q.mv, args.runs)
                    r_ms, r_rows = timed(clus, q.rollup, args.runs)
                    equal = bq.same_answers(raw_rows, r_rows) and bq.same_answers(raw_rows, mv_rows)
                    print(
                        f"  {q.name:22} raw {raw_ms:9.1f} ms  matview {mv_ms:8.1f} ms  rollups {r_ms:8.1f} ms  "
                        f"x{raw_ms / r_ms:7.1f} faster than raw, {r_ms / mv_ms:5.2f}x the matview  "
                        f"{'equal' if equal else 'DIFFERENT'} ({len(raw_rows)} rows); targets >=20x raw "
                        f"{'met' if raw_ms / r_ms >= 20 else 'MISSED'}, <=2x matview {'met' if r_ms <= 2 * mv_ms else 'MISSED'}"
                    )
    finally:
        if plain_member is not None:
            local.stop(plain_member, service_user(), mode="immediate")
        for d in dirs:
            if topology.exists(d):
                cluster.down(d, purge=True)
        shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    main()
