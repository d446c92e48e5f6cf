"""Ingest benchmark: the same rows, the same key rule, four routes, one run.

  (a) baseline: one plain PostgreSQL server, COPY into one table keyed on (building, meter, ts)
  (b) `buildsmart ingest` into an N-worker cluster (routed per fragment, straight to the workers)
  (c) COPY through the coordinator (postgres_fdw batch inserts into the foreign partitions)
  (d) multi-row INSERTs through the coordinator from C concurrent clients
  (e) follow mode: seconds from appending a reading to a followed file until the coordinator shows it

Usage:
  python bench/ingest.py                                  # the Cambridge file (6.7M rows)
  python bench/ingest.py --limit 1000000                  # its first million rows
  python bench/ingest.py --synthetic 200x4x2000 --shuffle --resend 0.05
Prints rows/s, the ratio of each route to (a), and the peak RSS of the ingest process.
"""

from __future__ import annotations

import argparse
import gzip
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator import cluster, topology  # noqa: E402
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
HEADER = "building,meter,ts,kwh\n"


def synthetic_lines(buildings: int, meters: int, intervals: int, shuffle: bool, resend: float, seed: int = 1) -> list[str]:
    rnd = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    lines = []
    for t in range(intervals):
        ts = (start + timedelta(minutes=15 * t)).strftime("%Y-%m-%d %H:%M:%S+00")
        for b in range(buildings):
            for m in range(meters):
                lines.append(f"bld{b:05d},m{m},{ts},{rnd.uniform(0, 100):.3f}\n")
    if resend:
        lines += [ln.rsplit(",", 1)[0] + f",{rnd.uniform(0, 100):.3f}\n" for ln in rnd.sample(lines, int(len(lines) * resend))]
    if shuffle:
        rnd.shuffle(lines)
    return lines


def write_input(args: argparse.Namespace, workdir: Path) -> tuple[Path, int]:
    """The benchmark input as a plain CSV file (decompression is not what we measure)."""
    path = workdir / "input.csv"
    rows = 0
    with path.open("w") as out:
        out.write(HEADER)
        if args.synthetic:
            b, m, t = (int(x) for x in args.synthetic.split("x"))
            for line in synthetic_lines(b, m, t, args.shuffle, args.resend):
                out.write(line)
                rows += 1
        else:
            with gzip.open(args.file, "rt") as src:
                next(src)
                for line in src:
                    if args.limit and rows >= args.limit:
                        break
                    out.write(line)
                    rows += 1
    os.chmod(workdir, 0o755)
    os.chmod(path, 0o644)
    return path, rows


def distinct_keys(path: Path) -> int:
    seen = set()
    with path.open() as fh:
        next(fh)
        for line in fh:
            b, m, t, _ = line.split(",", 3)
            seen.add((b, m, t))
    return len(seen)


def baseline_copy(path: Path, workdir: Path) -> float:
    """(a) One plain server: COPY into a staging table, then the same upsert rule (latest line wins)
    into the keyed table, in one transaction."""
    user = service_user()
    base = workdir / "baseline"
    member = local.LocalMember(Member("baseline", "127.0.0.1", free_port()), base / "data", base / "log")
    creds = Credentials("bench", "bench-secret", "x", "x")
    local.initdb(member, user, creds)
    local.start(member, user)
    try:
        conninfo = f"host=127.0.0.1 port={member.member.port} dbname=postgres user=bench password=bench-secret"
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(
                'CREATE TABLE readings (building text COLLATE "C" NOT NULL, meter text NOT NULL, ts timestamptz NOT NULL, '
                "kwh double precision NOT NULL, PRIMARY KEY (building, meter, ts))"
            )
            conn.execute("CREATE UNLOGGED TABLE stage (LIKE readings, seq bigint GENERATED ALWAYS AS IDENTITY)")
            started = time.monotonic()
            with conn.transaction():
                with conn.cursor().copy("COPY stage (building, meter, ts, kwh) FROM STDIN (FORMAT csv, HEADER)") as copy:
                    copy_file(copy, path)
                conn.execute(
                    "INSERT INTO readings SELECT DISTINCT ON (building, meter, ts) building, meter, ts, kwh FROM stage "
                    "ORDER BY building, meter, ts, seq DESC ON CONFLICT (building, meter, ts) DO UPDATE SET kwh = EXCLUDED.kwh"
                )
            return time.monotonic() - started
    finally:
        local.stop(member, user, mode="immediate")


def copy_file(copy: psycopg.Copy, path: Path) -> None:
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            copy.write(chunk)


def count_rows(directory: Path) -> int:
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    with connect(superuser_target(topo.coordinator, creds), "bench", autocommit=True) as conn:
        row = conn.execute("SELECT count(*) FROM public.readings").fetchone()
    assert row is not None
    return int(row[0])


def truncate(directory: Path) -> None:
    """Empty every fragment on its worker (the application role may not TRUNCATE)."""
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    for worker in topo.workers:
        with connect(superuser_target(worker, creds), "bench", autocommit=True) as conn:
            tables = conn.execute(
                "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'bsdata' AND c.relkind = 'p' AND NOT c.relispartition"
            ).fetchall()
            if tables:
                conn.execute("TRUNCATE " + ", ".join(t[0] for t in tables))


def buildsmart_ingest(directory: Path, path: Path) -> tuple[float, int]:
    """(b) The CLI as a user runs it; returns seconds and the peak RSS (bytes) of the ingest process,
    sampled every 50 ms (rusage of children would count the benchmark's own pages copied at fork)."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ingest", str(path), "--dir", str(directory)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0
    watched = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            peak = max(peak, watched.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.05)
    out, err = proc.communicate()
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"buildsmart ingest failed: {err}")
    print("   ", out.strip())
    return elapsed, peak


def coordinator_copy(directory: Path, path: Path) -> float:
    """(c) COPY into the coordinator's readings: postgres_fdw routes rows to the foreign partitions."""
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    with connect(app_target(topo.coordinator, creds), "bench:copy") as conn:
        started = time.monotonic()
        with conn.transaction(), conn.cursor().copy("COPY public.readings FROM STDIN (FORMAT csv, HEADER)") as copy:
            copy_file(copy, path)
        return time.monotonic() - started


def _values(lines: list[str]) -> Iterator[tuple[str, ...]]:
    for line in lines:
        b, m, t, k = line.rstrip("\n").split(",")
        yield b, m, t, k


def coordinator_inserts(directory: Path, path: Path, clients: int, rows_per_insert: int = 500) -> float:
    """(d) Multi-row INSERTs through the coordinator from concurrent clients (rows split by building,
    so each key's repeats stay in one client and keep their order)."""
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    target = app_target(topo.coordinator, creds)
    parts: list[list[str]] = [[] for _ in range(clients)]
    with path.open() as fh:
        next(fh)
        for line in fh:
            parts[hash(line.split(",", 1)[0]) % clients].append(line)
    errors: list[BaseException] = []

    def run(lines: list[str]) -> None:
        try:
            with connect(target, "bench:insert", autocommit=True) as conn:
                for i in range(0, len(lines), rows_per_insert):
                    chunk = list(_values(lines[i : i + rows_per_insert]))
                    placeholders = ",".join(["(%s,%s,%s,%s)"] * len(chunk))
                    conn.execute(f"INSERT INTO public.readings VALUES {placeholders}", [v for row in chunk for v in row])
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(p,)) for p in parts]
    started = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise SystemExit(f"INSERT client failed: {errors[0]}")
    return time.monotonic() - started


def follow_latency(directory: Path, workdir: Path, readings: int = 20) -> list[float]:
    """(e) `buildsmart ingest --follow` on a growing file: append one reading at a time and time
    how long until a query on the coordinator returns it."""
    live = workdir / "live.csv"
    live.write_text(HEADER)
    live.chmod(0o644)
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ingest", "--follow", str(live), "--dir", str(directory)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    latencies = []
    try:
        time.sleep(1.5)
        with connect(app_target(topo.coordinator, creds), "bench:follow", autocommit=True) as conn:
            for i in range(readings):
                ts = (datetime(2030, 1, 1, tzinfo=UTC) + timedelta(hours=i)).strftime("%Y-%m-%d %H:%M:%S+00")
                with live.open("a") as fh:
                    fh.write(f"follow-bench,el,{ts},{i}\n")
                written = time.monotonic()
                while time.monotonic() - written < 30:
                    if conn.execute(
                        "SELECT 1 FROM public.readings WHERE building = 'follow-bench' AND ts = %s", (ts,)
                    ).fetchone():
                        break
                    time.sleep(0.01)
                latencies.append(time.monotonic() - written)
                time.sleep(0.2)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=60)
    return latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--file", type=Path, default=CAMBRIDGE)
    ap.add_argument("--limit", type=int, default=0, help="only the first N rows of --file")
    ap.add_argument("--synthetic", help="BUILDINGSxMETERSxINTERVALS of generated 15-minute readings")
    ap.add_argument("--shuffle", action="store_true")
    ap.add_argument("--resend", type=float, default=0.0, help="share of readings sent again with a new value")
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=0, help="replicas per node (synchronous when > 0)")
    ap.add_argument("--clients", type=int, default=4, help="concurrent clients for (d)")
    ap.add_argument("--insert-rows", type=int, default=500_000, help="rows for (d) (multi-row INSERT is the slow path)")
    ap.add_argument("--skip", default="", help="comma-separated routes to skip: a,b,c,d,e")
    args = ap.parse_args()
    skip = set(args.skip.split(",")) if args.skip else set()

    workdir = Path(tempfile.mkdtemp(prefix="bs-bench-"))
    os.chmod(workdir, 0o755)
    try:
        path, rows = write_input(args, workdir)
        keys = distinct_keys(path)
        print(f"input: {rows:,} rows, {keys:,} distinct (building, meter, ts) keys")
        results: dict[str, tuple[int, float]] = {}
        if "a" not in skip:
            print("(a) baseline: plain PostgreSQL COPY + upsert into one keyed table ...")
            results["a"] = (rows, baseline_copy(path, workdir))
        directory = workdir / "cluster"
        print(f"starting a cluster: coordinator + {args.workers} workers, {args.replicas} replica(s) per node ...")
        cluster.up(directory, workers=args.workers, replicas=args.replicas, balancer_paused=True)
        print("the background balancer is paused for this benchmark (the first load still lays the fragments out)")
        try:
            peak_rss = None
            if "b" not in skip:
                print("(b) buildsmart ingest ...")
                seconds, peak_rss = buildsmart_ingest(directory, path)
                assert count_rows(directory) == keys, "buildsmart ingest lost or duplicated rows"
                results["b"] = (rows, seconds)
                truncate(directory)
            if "c" not in skip:
                print("(c) COPY through the coordinator ...")
                results["c"] = (rows, coordinator_copy(directory, path))
                assert count_rows(directory) == keys, "coordinator COPY lost or duplicated rows"
                truncate(directory)
            if "d" not in skip:
                n = min(rows, args.insert_rows)
                sub = workdir / "insert.csv"
                with path.open() as src, sub.open("w") as dst:
                    for i, line in enumerate(src):
                        if i > n:
                            break
                        dst.write(line)
                print(f"(d) multi-row INSERTs through the coordinator, {args.clients} clients, {n:,} rows ...")
                results["d"] = (n, coordinator_inserts(directory, sub, args.clients))
            latencies = []
            if "e" not in skip:
                print("(e) follow mode: append readings one by one, time until the coordinator shows each ...")
                latencies = follow_latency(directory, workdir)
        finally:
            cluster.down(directory, purge=True)
        report(results, peak_rss)
        if latencies:
            ordered = sorted(latencies)
            print(
                f"(e) follow mode, {len(ordered)} readings appended one by one: visible on the coordinator after "
                f"median {ordered[len(ordered) // 2]:.2f} s, max {ordered[-1]:.2f} s"
            )
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report(results: dict[str, tuple[int, float]], peak_rss_bytes: int | None) -> None:
    names = {
        "a": "(a) plain PostgreSQL COPY, one server",
        "b": "(b) buildsmart ingest (routed, direct)",
        "c": "(c) COPY through the coordinator",
        "d": "(d) multi-row INSERT via coordinator",
    }
    base = results["a"][0] / results["a"][1] if "a" in results else None
    out = io.StringIO()
    out.write(f"\n{'route':42} {'rows':>11} {'seconds':>8} {'rows/s':>10} {'x (a)':>6}\n")
    for key, (rows, seconds) in results.items():
        rate = rows / seconds
        ratio = f"{rate / base:.2f}" if base else "-"
        out.write(f"{names[key]:42} {rows:>11,} {seconds:>8.1f} {rate:>10,.0f} {ratio:>6}\n")
    if peak_rss_bytes:
        out.write(f"peak RSS of `buildsmart ingest`: {peak_rss_bytes / 2**20:.0f} MB\n")
    print(out.getvalue())


if __name__ == "__main__":
    main()
