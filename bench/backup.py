"""Backup benchmark on the Cambridge data, one run, the same servers:

  (a) `buildsmart backup create` (Barman, pg_basebackup underneath, up to 4 groups at once, each
      until its WAL is archived): MB/s overall;
  (b) plain `pg_basebackup -X stream -c fast` of the same primaries into a scratch directory: MB/s;
  (c) the write pause of cluster restore points made while `buildsmart ingest` loads rows;
  (d) `buildsmart backup restore --to POINT` of the whole cluster (Barman recover + WAL replay to the
      point + rewrite + start, replicas included) vs starting the plain pg_basebackup copies with
      pg_ctl (no point, no rewrite: a floor, not the same work).

Usage (always under the shared bench lock):
  flock /tmp/bsdb-bench.lock /opt/bsdb-venv/bin/python bench/backup.py              # whole file (6.7M rows)
  flock /tmp/bsdb-bench.lock /opt/bsdb-venv/bin/python bench/backup.py --limit 1000000 --replicas 0
"""

from __future__ import annotations

import argparse
import gzip
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator import cluster, pgbin, topology  # noqa: E402
from orchestrator.backup import ops, points, restore  # noqa: E402
from orchestrator.backup import repo as brepo  # noqa: E402
from orchestrator.connections import superuser_target  # noqa: E402
from orchestrator.elastic.context import open_cluster  # noqa: E402
from orchestrator.exceptions import NodeError  # noqa: E402
from orchestrator.osuser import run_as, service_user  # noqa: E402
from orchestrator.runtime.ports import free_port  # noqa: E402

CAMBRIDGE = (
    next((p for p in (REPO.parent / "shared" / "data", Path("/work/shared/data")) if p.is_dir()), REPO.parent / "shared" / "data")
    / "cambridge-estates"
    / "readings-2019-2023.csv.gz"
)
BUILDSMART = str(Path(sys.executable).parent / "buildsmart")


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())


def _write_input(path: Path, limit: int | None) -> int:
    n = 0
    with gzip.open(CAMBRIDGE, "rt") as src, path.open("w") as dst:
        for line in src:
            if limit is not None and n > limit:
                break
            dst.write(line)
            n += 1
    return n - 1


def _synthetic(path: Path, rows: int) -> None:
    """Readings of 2024 (after the Cambridge data) for the ingest that runs during the points."""
    start = datetime(2024, 1, 1, tzinfo=UTC)
    with path.open("w") as fh:
        fh.write("building,meter,ts,kwh\n")
        for i in range(rows):
            b = f"b{i % 120}"
            t = start + timedelta(minutes=15 * (i // 120))
            fh.write(f"{b},electricity,{t:%Y-%m-%d %H:%M:%S}+00,{(i % 97) / 10}\n")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--limit", type=int, default=None, help="load only the first N rows of the Cambridge file")
    parser.add_argument("--workers", type=int, default=3)
    parser.add_argument("--replicas", type=int, default=1)
    parser.add_argument("--points", type=int, default=10, help="restore points made during the ingest")
    parser.add_argument("--ingest-rows", type=int, default=5_000_000, help="rows loaded while the points are made")
    args = parser.parse_args()

    scratch = Path(tempfile.mkdtemp(prefix="bs-bench-backup-", dir="/var/tmp"))
    scratch.chmod(0o755)
    directory, restored = scratch / "cluster", scratch / "restored"
    user = service_user()
    try:
        t = time.monotonic()
        cluster.up(directory, workers=args.workers, split_points=["b3", "b6"], replicas=args.replicas)
        print(f"cluster up ({args.workers} workers, {args.replicas} replica(s) per node): {time.monotonic() - t:.1f} s")
        data = scratch / "readings.csv"
        rows = _write_input(data, args.limit)
        t = time.monotonic()
        subprocess.run([BUILDSMART, "ingest", str(data), "--dir", str(directory)], check=True, capture_output=True)
        print(f"loaded {rows:,} Cambridge rows in {time.monotonic() - t:.1f} s")

        ops.init(directory, None, brepo.Retention(3, 7))
        settings = brepo.load(directory)
        topo, creds = topology.load(directory), topology.load_credentials(directory)
        t = time.monotonic()
        ops.create(directory, print)
        create_s = time.monotonic() - t
        backups = {b.group: b for b in ops.all_backups(settings.repo)}
        total = sum(b.size_bytes for b in backups.values())
        print(f"(a) buildsmart backup create: {total / 1e6:,.0f} MB in {create_s:.1f} s = {total / 1e6 / create_s:,.1f} MB/s")

        plain = scratch / "plain"
        plain.mkdir()
        user.chown(plain)
        t = time.monotonic()
        for g in topo.groups:
            target = superuser_target(g, creds)
            env_conninfo = target.conninfo("bench:basebackup")
            run_as(user, [pgbin.tool("pg_basebackup"), "-d", env_conninfo, "-D", str(plain / g.name), "-X", "stream",
                          "-c", "fast"])  # fmt: skip
        plain_s = time.monotonic() - t
        plain_bytes = sum(_dir_bytes(plain / g.name) - _dir_bytes(plain / g.name / "pg_wal") for g in topo.groups)
        print(f"(b) pg_basebackup -X stream of the same primaries, one after the other: {plain_bytes / 1e6:,.0f} MB "
              f"(without pg_wal) in {plain_s:.1f} s = "
              f"{plain_bytes / 1e6 / plain_s:,.1f} MB/s")  # fmt: skip

        more = scratch / "more.csv"
        _synthetic(more, args.ingest_rows)
        ingest = subprocess.Popen([BUILDSMART, "ingest", str(more), "--dir", str(directory)], stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE, text=True)  # fmt: skip
        pauses: list[float] = []
        takes: list[float] = []
        last = ""
        time.sleep(2.0)
        with open_cluster(directory, "bench:point") as el:
            for i in range(args.points):
                if ingest.poll() is not None:
                    break
                t = time.monotonic()
                p = points.make_restore_point(el, f"bench{i}", "schedule")
                takes.append(time.monotonic() - t)
                pauses.append(p.pause_ms)
                last = p.name
                time.sleep(0.5)
        ingest_running = ingest.poll() is None
        ingest.wait(900)
        print(f"(c) restore point write pause under ingest ({len(pauses)} points, ingest still running after the last: "
              f"{ingest_running}): median {statistics.median(pauses):.1f} ms, max {max(pauses):.1f} ms (target <= 100 ms); "
              f"time to make a point (waiting for a moment with the batches in flight nearly done, checksums): "
              f"median {statistics.median(takes):.1f} s, max {max(takes):.1f} s")  # fmt: skip

        t = time.monotonic()
        result = restore.restore(settings.repo, points.load_point(settings.repo, last), restored, report=lambda _s: None)
        restore_s = time.monotonic() - t
        copies = scratch / "plain-started"
        t = time.monotonic()
        shutil.copytree(plain, copies, symlinks=True)
        user.chown(copies)
        for g in topo.groups:
            d = copies / g.name
            (d / "postgresql.auto.conf").write_text(f"port = {free_port()}\nlisten_addresses = '127.0.0.1'\narchive_mode = off\n")
            try:
                run_as(user, [pgbin.tool("pg_ctl"), "-D", str(d), "-l", str(copies / f"{g.name}.log"), "-w", "start"])
            except NodeError:
                print((copies / f"{g.name}.log").read_text()[-2000:])
                raise
        plain_restore_s = time.monotonic() - t
        for g in topo.groups:
            if (copies / g.name / "postmaster.pid").exists():
                run_as(user, [pgbin.tool("pg_ctl"), "-D", str(copies / g.name), "-m", "immediate", "stop"])
        print(f"(d) buildsmart backup restore --to {last} (whole cluster, {len(result.topology.groups)} groups, "
              f"{args.replicas} replica(s) each): {restore_s:.1f} s; "
              f"copy + start of the pg_basebackup copies: {plain_restore_s:.1f} s")  # fmt: skip
    finally:
        for d in (restored, directory):
            if topology.exists(d):
                cluster.down(d, purge=True)
        shutil.rmtree(scratch, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
