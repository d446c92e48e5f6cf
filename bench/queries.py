"""Dashboard queries in plain SQL: a BuildSmartDB cluster vs one plain PostgreSQL server, one run.

Both hold the same rows (the Cambridge file by default). The plain server is what a careful
single-server user would run: PostgreSQL 18 with default settings (parallel query on), readings
partitioned by month, PRIMARY KEY (building, meter, ts), VACUUM ANALYZE after the load. The cluster
is `buildsmart up` (coordinator + 3 workers, 1 synchronous replica each unless --replicas) loaded
with `buildsmart ingest`, then ANALYZE. The balancer (if any) is paused during the runs.

For every query: the median of --runs timed runs after one warm-up run on each side, the ratio
cluster/plain, and whether the answers are equal (floats to 1e-9 relative: sums run in another
order). Then the geometric mean of the ratios over the queries that take the plain server 50 ms or
more, backend CPU-seconds per query on both sides, and pgbench (-M prepared -c 8 -j 2) for the
current value of one meter and for single-row INSERTs.

Usage:
  python bench/queries.py                         # everything, fresh servers (~15 minutes)
  python bench/queries.py --replicas 0 --pgbench-seconds 10
  python bench/queries.py --plain-dsn DSN --cluster-dir DIR   # reuse running servers (development)
"""

from __future__ import annotations

import argparse
import gzip
import math
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator import cluster, pgbin, topology  # noqa: E402
from orchestrator.catalog import load_fragments  # noqa: E402
from orchestrator.connections import app_target, connect, superuser_target  # noqa: E402
from orchestrator.osuser import service_user  # noqa: E402
from orchestrator.runtime import local  # noqa: E402
from orchestrator.runtime.ports import free_port  # noqa: E402
from orchestrator.topology import Credentials, Member  # noqa: E402

CAMBRIDGE = (
    next((p for p in (REPO.parent / "shared" / "data", Path("/work/shared/data")) if p.is_dir()), REPO.parent / "shared" / "data")
    / "cambridge-estates"
    / "readings-2019-2023.csv.gz"
)
HEAVY_MS = 50.0


@dataclass(frozen=True)
class Query:
    name: str
    what: str
    sql: str


# The shapes of the TSBS time-series benchmark on the building/meter schema, in plain SQL as users,
# Grafana and ORMs write it (no project functions).
QUERIES: tuple[Query, ...] = (
    Query(
        "latest-per-meter",
        "latest reading of every meter (DISTINCT ON)",
        "SELECT DISTINCT ON (building, meter) building, meter, ts, kwh FROM readings ORDER BY building, meter, ts DESC",
    ),
    Query(
        "hourly-profile-day",
        "one building's hourly profile of a local day",
        "SELECT date_trunc('hour', ts AT TIME ZONE 'Europe/London') AS hour, meter, sum(kwh) FROM readings "
        "WHERE building = 'b2' AND ts >= '2023-06-14 23:00+00' AND ts < '2023-06-15 23:00+00' GROUP BY 1, 2 ORDER BY 1, 2",
    ),
    Query(
        "daily-per-building-month",
        "daily totals per building over a month, local days (DST change inside)",
        "SELECT building, date_trunc('day', ts AT TIME ZONE 'Europe/London') AS day, sum(kwh) FROM readings "
        "WHERE ts >= '2023-03-01 00:00+00' AND ts < '2023-04-01 00:00+01' GROUP BY 1, 2 ORDER BY 1, 2",
    ),
    Query(
        "top10-buildings-year",
        "top 10 buildings of a year",
        "SELECT building, sum(kwh) AS total FROM readings WHERE ts >= '2022-01-01 00:00+00' AND ts < '2023-01-01 00:00+00' "
        "GROUP BY building ORDER BY total DESC LIMIT 10",
    ),
    Query(
        "threshold-week",
        "readings above a threshold in a week",
        "SELECT building, meter, ts, kwh FROM readings WHERE ts >= '2023-01-09 00:00+00' AND ts < '2023-01-16 00:00+00' "
        "AND kwh > 200 ORDER BY building, meter, ts",
    ),
    Query(
        "monthly-all",
        "monthly totals per building and meter over all data",
        "SELECT building, meter, date_trunc('month', ts AT TIME ZONE 'UTC') AS month, sum(kwh) FROM readings GROUP BY 1, 2, 3",
    ),
    Query(
        "daily-profile-year",
        "a building's daily profile over a year, local days",
        "SELECT date_trunc('day', ts AT TIME ZONE 'Europe/London') AS day, sum(kwh) FROM readings "
        "WHERE building = 'b2' AND meter = 'electricity' AND ts >= '2022-01-01 00:00+00' AND ts < '2023-01-01 00:00+00' "
        "GROUP BY 1 ORDER BY 1",
    ),
    Query(
        "distinct-buildings-month",
        "buildings that reported in a month (count DISTINCT)",
        "SELECT count(DISTINCT building) FROM readings WHERE ts >= '2023-12-01 00:00+00'",
    ),
    Query(
        "latest-24-building",
        "one building's latest 24 readings (ORDER BY ts DESC LIMIT)",
        "SELECT meter, ts, kwh FROM readings WHERE building = 'b2' ORDER BY ts DESC, meter LIMIT 24",
    ),
    Query(
        "meters-per-building-extract",
        "readings per building and hour of day in winter (extract)",
        "SELECT building, extract(hour FROM ts AT TIME ZONE 'Europe/London') AS hod, count(*), avg(kwh) FROM readings "
        "WHERE ts >= '2023-01-01 00:00+00' AND ts < '2023-03-01 00:00+00' GROUP BY 1, 2",
    ),
)


# ---------------------------------------------------------------- servers


def plain_server(workdir: Path, path: Path) -> tuple[str, local.LocalMember]:
    """One plain PostgreSQL 18 with default settings, readings partitioned by month, loaded and analyzed."""
    user = service_user()
    base = workdir / "plain"
    member = local.LocalMember(Member("plain", "127.0.0.1", free_port()), base / "data", base / "log")
    creds = Credentials("bench", "bench-secret", "x", "x")
    local.initdb(member, user, creds)
    local.start(member, user)
    dsn = f"host=127.0.0.1 port={member.member.port} dbname=postgres user=bench password=bench-secret"
    with psycopg.connect(dsn, autocommit=True) as conn:
        conn.execute(
            'CREATE TABLE readings (building text COLLATE "C" NOT NULL, meter text NOT NULL, ts timestamptz NOT NULL, '
            "kwh double precision NOT NULL, PRIMARY KEY (building, meter, ts)) PARTITION BY RANGE (ts)"
        )
        for year in range(2019, 2025):
            for month in range(1, 13):
                nxt = (year, month + 1) if month < 12 else (year + 1, 1)
                conn.execute(
                    f"CREATE TABLE readings_{year}{month:02d} PARTITION OF readings FOR VALUES FROM "
                    f"('{year}-{month:02d}-01 00:00+00') TO ('{nxt[0]}-{nxt[1]:02d}-01 00:00+00')"
                )
        conn.execute("CREATE TABLE readings_default PARTITION OF readings DEFAULT")
        started = time.monotonic()
        with conn.cursor().copy("COPY readings FROM STDIN (FORMAT csv, HEADER)") as copy, gzip.open(path, "rb") as src:
            while chunk := src.read(1 << 20):
                copy.write(chunk)
        print(f"  plain server loaded in {time.monotonic() - started:.1f} s")
        conn.execute("VACUUM ANALYZE readings")
    return dsn, member


def cluster_dsn(directory: Path, admin: bool = False) -> str:
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    target = superuser_target(topo.coordinator, creds) if admin else app_target(topo.coordinator, creds)
    return target.conninfo("bench", search_path=None)  # a client session: the default search_path


def start_cluster(directory: Path, path: Path, replicas: int, split_at: Sequence[str] | None) -> None:
    cluster.up(directory, workers=3, replicas=replicas, split_points=split_at or None)
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "orchestrator", "ingest", str(path), "--dir", str(directory)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise SystemExit(f"buildsmart ingest failed: {proc.stderr}")
    print(f"  cluster loaded in {time.monotonic() - started:.1f} s")
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    # steady state, as a dashboard sees the cluster: the rollups task catches up on a bulk load of
    # history once (its refresh would otherwise compete with the timed queries for the 2 cores)
    done = time.monotonic()
    while rollup_changes_waiting(topo, creds) > 0:
        if time.monotonic() - done > 1800:
            raise SystemExit("rollups not caught up after 30 minutes")
        time.sleep(1.0)
    print(f"  rollups caught up {time.monotonic() - done:.0f} s after the load")
    with psycopg.connect(cluster_dsn(directory, admin=True), autocommit=True) as conn:
        conn.execute("ANALYZE readings")
    for worker in topo.workers:
        with connect(superuser_target(worker, creds), "bench", autocommit=True) as conn:
            conn.execute("VACUUM ANALYZE")


def rollup_changes_waiting(topo: topology.Topology, creds: Credentials) -> int:
    total = 0
    for worker in topo.workers:
        with connect(superuser_target(worker, creds), "bench", autocommit=True) as conn:
            row = conn.execute("SELECT count(*) FROM buildsmart.rollup_changes").fetchone()
            total += int(row[0]) if row else 0
    return total


def quantile_split_points(path: Path, fragments: int) -> list[str]:
    """Row-weighted building quantiles of the file (used only with --split-from-data)."""
    counts: dict[str, int] = {}
    with gzip.open(path, "rt") as fh:
        next(fh)
        for line in fh:
            b = line.split(",", 1)[0]
            counts[b] = counts.get(b, 0) + 1
    keys = sorted(counts, key=lambda b: b.encode())
    total, run, points = sum(counts.values()), 0, []
    for b in keys:
        if len(points) < fragments - 1 and run >= total * (len(points) + 1) / fragments:
            points.append(b)
        run += counts[b]
    return points


# ---------------------------------------------------------------- measuring


def server_pids(dsn_or_dirs: list[Path]) -> list[int]:
    """Postmaster PIDs of the given data directories."""
    pids = []
    for data in dsn_or_dirs:
        pidfile = data / "postmaster.pid"
        if pidfile.exists():
            pids.append(int(pidfile.read_text().split()[0]))
    return pids


def cpu_seconds(postmasters: list[int]) -> float:
    total = 0.0
    for pid in postmasters:
        try:
            parent = psutil.Process(pid)
        except psutil.NoSuchProcess:
            continue
        for proc in [parent, *parent.children(recursive=True)]:
            try:
                t = proc.cpu_times()
                total += t.user + t.system + t.children_user + t.children_system
            except psutil.NoSuchProcess:
                pass
    return total


def run_query(conn: psycopg.Connection, sql: str) -> tuple[float, list[tuple[Any, ...]]]:
    started = time.perf_counter()
    rows = conn.execute(sql).fetchall()
    return time.perf_counter() - started, rows


def canonical(rows: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    return sorted(rows, key=lambda r: tuple(repr(v) if not isinstance(v, float) else "" for v in r))


def same_answers(a: list[tuple[Any, ...]], b: list[tuple[Any, ...]]) -> bool:
    if len(a) != len(b):
        return False
    for ra, rb in zip(canonical(a), canonical(b), strict=True):
        for va, vb in zip(ra, rb, strict=True):
            if isinstance(va, float) and isinstance(vb, float):
                if not math.isclose(va, vb, rel_tol=1e-9, abs_tol=1e-9):
                    return False
            elif hasattr(va, "__float__") and hasattr(vb, "__float__") and not isinstance(va, bool):
                if not math.isclose(float(va), float(vb), rel_tol=1e-9, abs_tol=1e-9):
                    return False
            elif va != vb:
                return False
    return True


@dataclass(frozen=True)
class Result:
    query: Query
    plain_ms: float
    cluster_ms: float
    equal: bool
    rows: int
    plain_cpu_ms: float
    cluster_cpu_ms: float

    @property
    def ratio(self) -> float:
        return self.cluster_ms / self.plain_ms


def measure(
    query: Query, plain: psycopg.Connection, clus: psycopg.Connection, runs: int, plain_pm: list[int], cluster_pm: list[int]
) -> Result:
    _, plain_rows = run_query(plain, query.sql)  # warm-up (and the answer)
    _, cluster_rows = run_query(clus, query.sql)
    times: dict[str, list[float]] = {"plain": [], "cluster": []}
    cpu: dict[str, float] = {}
    for side, conn, pms in (("plain", plain, plain_pm), ("cluster", clus, cluster_pm)):
        before = cpu_seconds(pms)
        for _ in range(runs):
            times[side].append(run_query(conn, query.sql)[0])
        cpu[side] = (cpu_seconds(pms) - before) / runs
    return Result(
        query,
        statistics.median(times["plain"]) * 1000,
        statistics.median(times["cluster"]) * 1000,
        same_answers(plain_rows, cluster_rows),
        len(plain_rows),
        cpu["plain"] * 1000,
        cpu["cluster"] * 1000,
    )


def pairs(conn: psycopg.Connection) -> list[tuple[str, str]]:
    return [(str(b), str(m)) for b, m in conn.execute("SELECT DISTINCT building, meter FROM readings ORDER BY 1, 2").fetchall()]


def pgbench(dsn_parts: dict[str, str], script: str, seconds: int, workdir: Path) -> float:
    """Transactions/s of one pgbench run (-M prepared -c 8 -j 2)."""
    path = workdir / "pgbench.sql"
    path.write_text(script)
    env = {**os.environ, "PGPASSWORD": dsn_parts["password"]}
    cmd = [
        pgbin.tool("pgbench"), "-n", "-M", "prepared", "-c", "8", "-j", "2", "-T", str(seconds), "-f", str(path),
        "-h", dsn_parts["host"].split(",")[0], "-p", dsn_parts["port"].split(",")[0],
        "-U", dsn_parts["user"], dsn_parts["dbname"],
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    match = re.search(r"tps = ([0-9.]+)", proc.stdout)
    if proc.returncode != 0 or match is None or "aborted" in proc.stdout:
        raise SystemExit(f"pgbench failed:\n{proc.stdout}\n{proc.stderr}")
    return float(match.group(1))


def worker_insert_ceiling(directory: Path, seconds: int, workdir: Path) -> tuple[str, float]:
    """pgbench of the INSERT straight into the fragment of one building on its worker's primary."""
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    with connect(superuser_target(topo.coordinator, creds), "bench:ceiling", autocommit=True) as coord:
        frag = next(f for f in load_fragments(coord) if f.ts_from is None and f.ts_to is None)
        row = coord.execute(
            "SELECT building FROM public.readings WHERE building >= coalesce(%s, '') "
            "AND (%s::text IS NULL OR building < %s) LIMIT 1",
            (frag.range_from, frag.range_to, frag.range_to),
        ).fetchone()
    assert row is not None
    target = superuser_target(topo.group(frag.node), creds)
    parts = parse_dsn(target.conninfo("bench", search_path=None))
    script = (
        "\\set u random(1, 2500000000000)\n"
        f"INSERT INTO bsdata.{frag.shard_name} (building, meter, ts, kwh) VALUES ('{row[0]}', 'pgbench', "
        "'2024-06-01 00:00+00'::timestamptz + :u * interval '1 microsecond', 1.5);\n"
    )
    tps = pgbench(parts, script, seconds, workdir)
    with connect(superuser_target(topo.group(frag.node), creds), "bench:ceiling", autocommit=True) as conn:
        conn.execute(f"DELETE FROM bsdata.{frag.shard_name} WHERE meter = 'pgbench'")
    return frag.node, tps


def parse_dsn(dsn: str) -> dict[str, str]:
    return dict(psycopg.conninfo.conninfo_to_dict(dsn))  # type: ignore[arg-type]


def point_read_script(keys: list[tuple[str, str]]) -> str:
    buildings = "{" + ",".join(b for b, _ in keys) + "}"
    meters = "{" + ",".join(m for _, m in keys) + "}"
    return (
        f"\\set i random(1, {len(keys)})\n"
        f"SELECT ts, kwh FROM readings WHERE building = ('{buildings}'::text[])[:i] "
        f"AND meter = ('{meters}'::text[])[:i] ORDER BY ts DESC LIMIT 1;\n"
    )


def insert_script(buildings: list[str]) -> str:
    arr = "{" + ",".join(buildings) + "}"
    # random keys in one month: a collision (which a plain INSERT would refuse) is about 1 in 10^7
    return (
        f"\\set b random(1, {len(buildings)})\n"
        "\\set u random(1, 2500000000000)\n"
        f"INSERT INTO readings (building, meter, ts, kwh) VALUES (('{arr}'::text[])[:b], 'pgbench', "
        "'2024-06-01 00:00+00'::timestamptz + :u * interval '1 microsecond', 1.5);\n"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, default=CAMBRIDGE)
    ap.add_argument("--replicas", type=int, default=1)
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--pgbench-seconds", type=int, default=30)
    ap.add_argument("--skip-pgbench", action="store_true")
    ap.add_argument("--only", default="", help="comma-separated query names")
    ap.add_argument("--split-from-data", action="store_true", help="pass row-quantile split points to `up`")
    ap.add_argument("--plain-dsn", help="reuse a loaded plain server")
    ap.add_argument("--plain-data", type=Path, help="its data directory (for CPU-seconds)")
    ap.add_argument("--cluster-dir", type=Path, help="reuse a loaded cluster")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="bs-queries-"))
    os.chmod(workdir, 0o755)
    started_plain: local.LocalMember | None = None
    started_cluster: Path | None = None
    try:
        if args.plain_dsn:
            plain_dsn = args.plain_dsn
            plain_pm = server_pids([args.plain_data]) if args.plain_data else []
        else:
            print("starting and loading the plain server ...")
            plain_dsn, started_plain = plain_server(workdir, args.file)
            plain_pm = server_pids([started_plain.data_dir])
        if args.cluster_dir:
            directory = args.cluster_dir.resolve()
        else:
            directory = started_cluster = workdir / "cluster"
            split = quantile_split_points(args.file, 6) if args.split_from_data else None
            print(f"starting and loading a cluster (3 workers, {args.replicas} replica(s) per node) ...")
            start_cluster(directory, args.file, args.replicas, split)
        topo = topology.load(directory)
        root = cluster.data_root(directory, service_user(topo.service_user))
        cluster_pm = server_pids([root / (m.data_dir or m.name) / "data" for g in topo.groups for m in g.members])
        clus_dsn = cluster_dsn(directory)
        tls = topology.load_credentials(directory).ca_file is not None
        cluster_transport = "TLS (verify-full) for the client and between nodes" if tls else "no TLS"
        print(f"transport: TCP on 127.0.0.1; plain server: no TLS; cluster: {cluster_transport}; client TimeZone UTC")

        selected = [q for q in QUERIES if not args.only or q.name in args.only.split(",")]
        results = []
        with psycopg.connect(plain_dsn, autocommit=True) as plain, psycopg.connect(clus_dsn, autocommit=True) as clus:
            for conn in (plain, clus):
                conn.execute("SET TimeZone = 'UTC'")
            for q in selected:
                r = measure(q, plain, clus, args.runs, plain_pm, cluster_pm)
                results.append(r)
                print(
                    f"  {q.name:28} plain {r.plain_ms:9.1f} ms  cluster {r.cluster_ms:9.1f} ms  x{r.ratio:5.2f}  "
                    f"{'equal' if r.equal else 'DIFFERENT'} ({r.rows} rows)  cpu {r.plain_cpu_ms:.0f} / {r.cluster_cpu_ms:.0f} ms"
                )
            keys = pairs(plain)
        report(results)

        if not args.skip_pgbench:
            print(f"pgbench -M prepared -c 8 -j 2 -T {args.pgbench_seconds} ...")
            read = point_read_script(keys)
            plain_parts, clus_parts = parse_dsn(plain_dsn), parse_dsn(clus_dsn)
            tps_plain = pgbench(plain_parts, read, args.pgbench_seconds, workdir)
            tps_cluster = pgbench(clus_parts, read, args.pgbench_seconds, workdir)
            print(
                f"  current value of one meter: plain {tps_plain:,.0f} tps, cluster {tps_cluster:,.0f} tps, "
                f"x{tps_cluster / tps_plain:.2f}"
            )
            ins = insert_script(sorted({b for b, _ in keys}))
            tps_plain = pgbench(plain_parts, ins, args.pgbench_seconds, workdir)
            tps_cluster = pgbench(clus_parts, ins, args.pgbench_seconds, workdir)
            for dsn in (plain_dsn, clus_dsn):  # leave the servers as they were loaded
                with psycopg.connect(dsn, autocommit=True) as conn:
                    conn.execute("DELETE FROM readings WHERE meter = 'pgbench'")
            print(
                f"  single-row INSERT:          plain {tps_plain:,.0f} tps, cluster {tps_cluster:,.0f} tps, "
                f"x{tps_cluster / tps_plain:.2f}"
            )
            node, tps_worker = worker_insert_ceiling(directory, args.pgbench_seconds, workdir)
            print(
                f"  the same INSERT straight into one fragment on worker {node} (no coordinator; its "
                f"synchronous replica, trigger and TLS as in the cluster): {tps_worker:,.0f} tps, "
                f"x{tps_worker / tps_plain:.2f} of plain: the ceiling for any coordinator write path on this machine"
            )
    finally:
        if started_cluster is not None:
            cluster.down(started_cluster, purge=True)
        if started_plain is not None:
            local.stop(started_plain, service_user(), mode="immediate")
        shutil.rmtree(workdir, ignore_errors=True)


def report(results: list[Result]) -> None:
    heavy = [r for r in results if r.plain_ms >= HEAVY_MS]
    print(f"\n{'query':28} {'plain ms':>9} {'cluster ms':>10} {'ratio':>6}  answers   target")
    for r in results:
        ok = r.ratio <= 1.0 or (r.plain_ms < HEAVY_MS and r.cluster_ms <= r.plain_ms + 3.0)
        print(
            f"{r.query.name:28} {r.plain_ms:9.1f} {r.cluster_ms:10.1f} {r.ratio:6.2f}  "
            f"{'equal' if r.equal else 'DIFFERENT':8}  {'met' if ok else 'MISSED'}"
        )
    if heavy:
        gm = math.exp(sum(math.log(r.ratio) for r in heavy) / len(heavy))
        print(
            f"geometric mean over the {len(heavy)} queries taking the plain server >= {HEAVY_MS:.0f} ms: "
            f"{gm:.2f} (target <= 0.70)"
        )


if __name__ == "__main__":
    main()
