"""Benchmark: rows/s of an online fragment move and the longest write pause a concurrent writer sees.

    /opt/bsdb-venv/bin/python bench/rebalance.py [--rows 500000]

Starts its own local cluster (2 workers), loads ROWS rows (one a minute, in monthly time partitions,
as ingest makes them) into one fragment, then moves it to the other worker while a writer inserts
small batches through the coordinator; prints the copy rate, the switch's measured write pause and
the longest gap between two committed batches of the writer. Stops the cluster at the end.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.connections import app_target, connect
from orchestrator.elastic import move
from orchestrator.elastic.context import open_cluster
from tests.harness import start_cluster, stop_cluster


def _writer(handle, stop: threading.Event, gaps: list[tuple[float, float]]) -> None:  # type: ignore[no-untyped-def]
    topo, creds = handle.topology, handle.creds
    conn = connect(app_target(topo.coordinator, creds), "bench-writer", autocommit=True)
    last, i = time.monotonic(), 0
    while not stop.is_set():
        i += 1
        try:
            conn.execute(
                "INSERT INTO public.readings SELECT 'a' || (g %% 50), 'bench', "
                "timestamptz '2030-01-01' + (%s * 10 + g) * interval '1 s', 1 "
                "FROM generate_series(1, 10) g",
                (i,),
            )
        except Exception:
            continue
        now = time.monotonic()
        gaps.append((now - last, now))
        last = now
        time.sleep(0.002)
    conn.close()


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", type=int, default=500_000)
    args = ap.parse_args()
    handle = start_cluster("bs-bench-", workers=2, split_points=["b", "m"])  # the harness starts the balancer paused
    print("the background balancer is paused for this benchmark (only the measured move runs)")
    try:
        with open_cluster(handle.directory) as el:
            # Monthly time partitions for the loaded range and the writer's, as `buildsmart ingest`
            # makes them (rows inserted through the coordinator would otherwise sit in DEFAULT).
            frag = el.fragment(1)
            months = (args.rows // (60 * 24 * 28)) + 1
            el.nodes.get(frag.node).execute(
                "SELECT buildsmart.ensure_time_partitions(%s::regclass, '1 month', '2025-01-01', "
                "timestamptz '2025-01-01' + %s * interval '1 month'), "
                "buildsmart.ensure_time_partitions(%s::regclass, '1 month', '2030-01-01', '2030-01-01')",
                (f"bsdata.{frag.shard_name}", months, f"bsdata.{frag.shard_name}"),
            )
        with handle.coordinator() as conn:
            t = time.monotonic()
            conn.execute(
                "INSERT INTO public.readings SELECT 'a' || (i %% 50), 'm' || (i %% 10), "
                "timestamptz '2025-01-01' + i * interval '1 min', i "
                "FROM generate_series(1, %s) i",
                (args.rows,),
            )
            print(f"loaded {args.rows:,} rows in {time.monotonic() - t:.1f} s")
        stop, gaps = threading.Event(), []  # type: ignore[var-annotated]
        th = threading.Thread(target=_writer, args=(handle, stop, gaps))
        th.start()
        time.sleep(1.0)
        with open_cluster(handle.directory) as el:
            src = el.fragment(1).node
            dst = "w2" if src == "w1" else "w1"
            started = time.monotonic()
            r = move.move_fragment(el, 1, dst)
            took = time.monotonic() - started
        time.sleep(0.5)
        stop.set()
        th.join()
        print(f"move of fragment 1 {src} -> {dst}: {r.rows:,} rows in {months + 1} monthly time partitions")
        print(f"  copy + catch-up {r.copy_seconds:.2f} s = {r.rows_per_second:,.0f} rows/s")
        print(f"  write pause measured by the switch: {r.pause_seconds * 1000:.0f} ms")
        gap, at = max(gaps)
        print(
            f"  longest gap between committed writes of a concurrent writer: {gap * 1000:.0f} ms ({len(gaps)} batches), "
            f"ending {at - started:.2f} s into the move ({took:.2f} s in all)"
        )
    finally:
        stop_cluster(handle)
    return 0


if __name__ == "__main__":
    sys.exit(main())
