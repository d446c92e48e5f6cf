"""Ingest benchmark (issue 11's definition), all routes in one run on the same rows.

  baseline  ONE plain PostgreSQL 18 server (the embedded binaries, default settings), ONE
            `COPY ... FROM STDIN` stream of the decompressed file into a table with
            PRIMARY KEY (building, meter, ts): what a user would do (no upsert, no staging)
  (b)       `buildsmart ingest FILE` into a default cluster: `up --workers 3`, one synchronous
            replica per node (Patroni)
  (b0)      the same with `--replicas 0` (one plain server per node)
  (c)       `COPY readings FROM STDIN` through the coordinator of the (b) cluster, autocommit as
            `psql \\copy` runs it: the extension's COPY router streams to every fragment's worker
            (the workers' per-row BEFORE INSERT replace trigger keeps latest-wins)

The clusters are default clusters (`up` with no layout): `buildsmart ingest` pre-splits the
empty cluster from the file's building counts (issue 9's automatic layout). The balancer is paused
(as every benchmark but bench/distribution.py does) so that only the ingest is timed;
`--balancer-running` leaves it on. The resulting rows per worker are printed.
Transport: TCP on 127.0.0.1 for every route (the baseline's client streams the decompressed file;
(b) reads the file itself, as a user runs it).

Usage:
  python bench/ingest.py                          # the Cambridge file (6.7M rows)
  python bench/ingest.py --limit 1000000          # its first million rows
  python bench/ingest.py --synthetic 60x4x4000    # generated 15-minute readings (about 2-3 minutes)
  python bench/ingest.py --skip c,b0              # leave routes out
Run it under `flock /tmp/bsdb-bench.lock` so two benchmarks never overlap.
"""

from __future__ import annotations

import argparse
import gzip
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from contextlib import ExitStack
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psutil
import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator import cluster, pgbin, topology  # noqa: E402
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


def synthetic_lines(buildings: int, meters: int, intervals: int, seed: int = 1) -> list[str]:
    """Readings sorted by building, meter, time (as the Cambridge file is)."""
    rnd = random.Random(seed)
    start = datetime(2024, 1, 1, tzinfo=UTC)
    stamps = [(start + timedelta(minutes=15 * t)).strftime("%Y-%m-%d %H:%M:%S+00") for t in range(intervals)]
    return [f"bld{b:05d},m{m},{ts},{rnd.uniform(0, 100):.3f}\n" for b in range(buildings) for m in range(meters) for ts in stamps]


def write_input(args: argparse.Namespace, workdir: Path) -> tuple[Path, int, Counter[str]]:
    """The input as a gzip file (as the Cambridge file comes), with its building row counts."""
    path = workdir / "input.csv.gz"
    rows = 0
    counts: Counter[str] = Counter()
    with gzip.open(path, "wt", compresslevel=6) as out, ExitStack() as stack:
        out.write(HEADER)
        lines: Iterable[str]
        if args.synthetic:
            b, m, t = (int(x) for x in args.synthetic.split("x"))
            lines = synthetic_lines(b, m, t)
        else:
            src = stack.enter_context(gzip.open(args.file, "rt"))
            next(src)
            lines = src
        for line in lines:
            if args.limit and rows >= args.limit:
                break
            out.write(line)
            counts[line.split(",", 1)[0]] += 1
            rows += 1
    os.chmod(workdir, 0o755)
    os.chmod(path, 0o644)
    return path, rows, counts


def copy_stream(copy: psycopg.Copy, path: Path) -> None:
    with gzip.open(path, "rb") as fh:
        fh.readline()  # the header
        while chunk := fh.read(1 << 20):
            copy.write(chunk)


def baseline_copy(path: Path, workdir: Path) -> float:
    """ONE plain server, default settings, ONE COPY stream into the keyed table."""
    user = service_user()
    base = workdir / "baseline"
    member = local.LocalMember(Member("baseline", "127.0.0.1", free_port()), base / "data", base / "log")
    creds = Credentials("bench", "bench-secret", "x", "x")
    local.initdb(member, user, creds)
    # Default settings: only what connecting needs, none of the cluster's tuning (max_wal_size, wal_level, ...).
    (base / "data" / "postgresql.buildsmart.conf").write_text(
        f"listen_addresses = '127.0.0.1'\nport = {member.member.port}\nunix_socket_directories = ''\n"
        "password_encryption = 'scram-sha-256'\n"
    )
    local.start(member, user)
    try:
        conninfo = f"host=127.0.0.1 port={member.member.port} dbname=postgres user=bench password=bench-secret"
        with psycopg.connect(conninfo, autocommit=True) as conn:
            conn.execute(
                'CREATE TABLE readings (building text COLLATE "C" NOT NULL, meter text NOT NULL, ts timestamptz NOT NULL, '
                "kwh double precision NOT NULL, PRIMARY KEY (building, meter, ts))"
            )
            started = time.monotonic()
            with conn.cursor().copy("COPY readings FROM STDIN (FORMAT csv)") as copy:
                copy_stream(copy, path)
            return time.monotonic() - started
    finally:
        local.stop(member, user, mode="fast")


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
            conn.execute("CHECKPOINT")


def buildsmart_ingest(directory: Path, path: Path, extra: tuple[str, ...] = ()) -> tuple[float, int, float]:
    """`buildsmart ingest` as a user runs it. Returns seconds, the peak RSS summed over the ingest's
    processes (the CLI and any children, sampled every 50 ms) and its CPU seconds."""
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "orchestrator", "ingest", str(path), "--dir", str(directory), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    peak = 0
    cpu = 0.0
    watched = psutil.Process(proc.pid)
    while proc.poll() is None:
        try:
            procs = [watched, *watched.children(recursive=True)]
            peak = max(peak, sum(p.memory_info().rss for p in procs))
            t = watched.cpu_times()
            cpu = t.user + t.system + t.children_user + t.children_system
        except psutil.NoSuchProcess:
            break
        time.sleep(0.25)  # RSS moves slowly; a tighter poll costs the run itself CPU (3% measured)
    out, err = proc.communicate()
    elapsed = time.monotonic() - started
    if proc.returncode != 0:
        raise SystemExit(f"buildsmart ingest failed: {err}")
    print("   ", out.strip())
    return elapsed, peak, cpu


def coordinator_copy(directory: Path, path: Path) -> float:
    """(c) COPY into the coordinator's readings as `psql \\copy` runs it (a statement of its own,
    autocommit): the extension's COPY router streams the rows to every fragment's worker. (Inside a
    transaction block PostgreSQL's COPY routes them through postgres_fdw instead.)"""
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    with connect(app_target(topo.coordinator, creds), "bench:copy", autocommit=True) as conn:
        started = time.monotonic()
        with conn.cursor().copy("COPY public.readings FROM STDIN (FORMAT csv)") as copy:
            copy_stream(copy, path)
        return time.monotonic() - started


def server_cpu(directory: Path) -> float:
    """CPU seconds used so far by the cluster's PostgreSQL servers: each postmaster with the
    backends it has reaped (children_*) and those still running."""
    total = 0.0
    for pidfile in directory.glob("**/postmaster.pid"):
        try:
            master = psutil.Process(int(pidfile.read_text().split()[0]))
            t = master.cpu_times()
            total += t.user + t.system + t.children_user + t.children_system
            for child in master.children(recursive=True):
                ct = child.cpu_times()
                total += ct.user + ct.system
        except (OSError, ValueError, IndexError, psutil.Error):
            continue
    return total


def _kind(proc: psutil.Process, directory: Path) -> str:
    """What a process of the cluster is: a PostgreSQL process by its title (backend by application),
    else Patroni, etcd or an orchestrator process."""
    cmd = " ".join(proc.cmdline())
    if cmd.startswith("postgres:"):
        title = cmd.split(":", 2)[-1].strip()
        for word in (
            "walsender",
            "walreceiver",
            "startup",
            "checkpointer",
            "walwriter",
            "autovacuum",
            "archiver",
            "background writer",
            "logical replication",
            "io worker",
            "walsummarizer",
        ):
            if title.startswith(word) or word in title.split(" ")[:3]:
                return f"pg {word}"
        return "pg backend of " + title.split(" ")[0]  # the user: ingest, app, tasks ...
    if "patroni" in cmd:
        return "patroni"
    if "etcd" in cmd:
        return "etcd"
    if "orchestrator" in cmd:
        return "orchestrator " + " ".join(a for a in proc.cmdline()[2:4] if not a.startswith("-"))
    return proc.name()


class CpuSampler:
    """Samples the cluster's processes every second during a run, so the CPU of processes that
    exit before the end (the ingest's backends, autovacuum workers) is told apart by kind."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.start = cpu_by_pid(directory)
        self.last: dict[int, tuple[str, float]] = dict(self.start)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(1.0):
            self.last.update(cpu_by_pid(self.directory))

    def stop(self) -> dict[str, float]:
        self._stop.set()
        self._thread.join()
        self.last.update(cpu_by_pid(self.directory))
        out: dict[str, float] = {}
        for pid, (kind, cpu) in self.last.items():
            used = cpu - (self.start[pid][1] if pid in self.start else 0.0)
            out[kind] = out.get(kind, 0.0) + used
        return out


def cpu_by_pid(directory: Path) -> dict[int, tuple[str, float]]:
    """Kind and CPU seconds so far of every live process working for the cluster."""
    out: dict[int, tuple[str, float]] = {}
    for proc in psutil.process_iter():
        try:
            cmd = " ".join(proc.cmdline())
            if cmd.startswith("postgres:"):
                parent = proc.parent()
                if parent is None or str(directory) not in " ".join(parent.cmdline()):
                    continue
            elif str(directory) not in cmd:
                continue
            t = proc.cpu_times()
            kind = "pg postmaster" if proc.name() == "postgres" and not cmd.startswith("postgres:") else _kind(proc, directory)
            out[proc.pid] = (kind, t.user + t.system)
        except (psutil.Error, OSError):
            continue
    return out


def print_cpu_delta(before: dict[str, float], after: dict[str, float]) -> None:
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    shown = sorted(((v, k) for k, v in delta.items() if v >= 0.2), reverse=True)
    print("    cpu by process kind: " + ", ".join(f"{k} {v:.1f} s" for v, k in shown))


def rows_per_worker(directory: Path) -> dict[str, int]:
    """Rows each worker holds (its primary's bsdata tables), to show where the data landed."""
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    out: dict[str, int] = {}
    for worker in topo.workers:
        with connect(superuser_target(worker, creds), "bench", autocommit=True) as conn:
            tables = conn.execute(
                "SELECT c.oid::regclass::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
                "WHERE n.nspname = 'bsdata' AND c.relkind = 'p' AND NOT c.relispartition"
            ).fetchall()
            total = 0
            for (table,) in tables:
                row = conn.execute(f"SELECT count(*) FROM {table}").fetchone()
                total += int(row[0]) if row else 0
        out[worker.name] = total
    return out


def run_cluster(
    label: str, workdir: Path, args: argparse.Namespace, path: Path, keys: int
) -> dict[str, tuple[float, int, float, float]]:
    directory = workdir / f"cluster-{label}"
    replicas = 0 if label == "b0" else args.replicas
    print(f"starting a cluster: coordinator + {args.workers} workers, {replicas} replica(s) per node ...", flush=True)
    cluster.up(directory, workers=args.workers, replicas=replicas, balancer_paused=not args.balancer_running)
    out: dict[str, tuple[float, int, float, float]] = {}
    try:
        time.sleep(2)
        before = server_cpu(directory)
        sampler = CpuSampler(directory) if args.cpu_breakdown else None
        print(f"({label}) buildsmart ingest ...", flush=True)
        seconds, peak, cpu = buildsmart_ingest(directory, path, tuple(args.ingest_args.split()))
        out[label] = (seconds, peak, cpu, server_cpu(directory) - before)
        if sampler is not None:
            print_cpu_delta({}, sampler.stop())
        if count_rows(directory) != keys:
            raise SystemExit(f"({label}) buildsmart ingest lost or duplicated rows")
        spread = rows_per_worker(directory)
        print(f"    rows per worker: {', '.join(f'{w} {n:,}' for w, n in spread.items())}")
        if label == "b0" and args.follow_latency:
            lat = sorted(follow_latency(directory, workdir))
            median, worst = lat[len(lat) // 2], lat[-1]
            print(f"(e) --follow, {len(lat)} readings appended singly: visible after median {median:.2f} s, max {worst:.2f} s")
        if label == "b" and "c" not in args.skip:
            truncate(directory)
            time.sleep(2)
            before = server_cpu(directory)
            print("(c) COPY through the coordinator ...", flush=True)
            seconds = coordinator_copy(directory, path)
            out["c"] = (seconds, 0, 0.0, server_cpu(directory) - before)
            if count_rows(directory) != keys:
                raise SystemExit("(c) COPY through the coordinator lost or duplicated rows")
    finally:
        cluster.down(directory, purge=True)
    return out


def follow_latency(directory: Path, workdir: Path, readings: int = 20) -> list[float]:
    """`buildsmart ingest --follow` on a growing file: append one reading at a time and time how
    long until a query on the coordinator returns it."""
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
        time.sleep(2.0)
        with connect(app_target(topo.coordinator, creds), "bench:follow", autocommit=True) as conn:
            for i in range(readings):
                ts = (datetime(2030, 1, 1, tzinfo=UTC) + timedelta(hours=i)).strftime("%Y-%m-%d %H:%M:%S+00")
                with live.open("a") as fh:
                    fh.write(f"follow-bench,el,{ts},{i}\n")
                written = time.monotonic()
                while time.monotonic() - written < 30:
                    query = "SELECT 1 FROM public.readings WHERE building = 'follow-bench' AND ts = %s"
                    if conn.execute(query, (ts,)).fetchone():
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
    ap.add_argument("--workers", type=int, default=3)
    ap.add_argument("--replicas", type=int, default=1, help="replicas per node for (b) (synchronous)")
    ap.add_argument("--balancer-running", action="store_true", help="leave the balancer on during the ingest")
    ap.add_argument("--skip", default="", help="comma-separated routes to leave out: base,b,b0,c")
    ap.add_argument("--ingest-args", default="", help="more options for buildsmart ingest, e.g. '--streams 1'")
    ap.add_argument("--cpu-breakdown", action="store_true", help="print the CPU of each kind of cluster process")
    ap.add_argument("--follow-latency", action="store_true", help="also time --follow (append -> visible) on the (b0) cluster")
    args = ap.parse_args()
    args.skip = set(args.skip.split(",")) if args.skip else set()

    workdir = Path(tempfile.mkdtemp(prefix="bs-bench-"))
    os.chmod(workdir, 0o755)
    try:
        path, rows, counts = write_input(args, workdir)
        keys = rows  # the benchmark inputs hold each key once
        print(f"input: {rows:,} rows of {len(counts)} buildings ({path.stat().st_size / 2**20:.0f} MB gzip)")
        times: dict[str, tuple[float, int, float, float]] = {}
        if "base" not in args.skip:
            print("baseline: one plain PostgreSQL server, one COPY into a keyed table ...", flush=True)
            times["base"] = (baseline_copy(path, workdir), 0, 0.0, 0.0)
        for label in ("b", "b0"):
            if label not in args.skip or (label == "b" and "c" not in args.skip):
                times.update(run_cluster(label, workdir, args, path, keys))
        report(rows, times, args)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def report(rows: int, times: dict[str, tuple[float, int, float, float]], args: argparse.Namespace) -> None:
    names = {
        "base": "baseline: 1 plain server, 1 COPY stream",
        "b": f"(b) buildsmart ingest, {args.workers} workers, {args.replicas} sync replica",
        "b0": f"(b0) buildsmart ingest, {args.workers} workers, no replicas",
        "c": "(c) COPY through the coordinator",
    }
    targets = {"b": 0.9, "b0": 1.2, "c": 0.5}
    base = rows / times["base"][0] if "base" in times else None
    print(f"\n{'route':56} {'seconds':>8} {'rows/s':>10} {'x base':>7} {'target':>7} {'peak RSS':>9} {'cpu ingest/servers':>19}")
    for key, (seconds, peak, cpu, srv) in times.items():
        rate = rows / seconds
        ratio = f"{rate / base:.2f}" if base else "-"
        target = f">={targets[key]}" if key in targets else ""
        rss = f"{peak / 2**20:.0f} MB" if peak else ""
        cpus = f"{cpu:.1f} / {srv:.1f} s" if key != "base" else ""
        print(f"{names[key]:56} {seconds:>8.1f} {rate:>10,.0f} {ratio:>7} {target:>7} {rss:>9} {cpus:>19}")
    tls = "the clusters use TLS (verify-full) between all processes" if pgbin.has_ssl() else "no TLS anywhere"
    print(f"transport: TCP over 127.0.0.1 for every route; the baseline has no TLS, {tls}")
    print("peak RSS: summed over the ingest's processes")


if __name__ == "__main__":
    main()
