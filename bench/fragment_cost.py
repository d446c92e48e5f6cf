"""Benchmark: what one more fragment costs a query that cannot prune it (for docs/scaling.md).

    flock /tmp/bsdb-bench.lock /opt/bsdb-venv/bin/python bench/fragment_cost.py [--fragments 96]

A plain cluster (coordinator + 3 workers, no replicas) with FRAGMENTS + 1 building-range fragments
(given split points, so no automatic layout; the background balancer is paused for this benchmark),
10 buildings per fragment with a day of hourly readings each. The same aggregate over one day is
run over building ranges covering 1, 4, 16, ... fragments; the median latency per range size and
the fitted cost per extra fragment are printed, planning time separately (EXPLAIN ANALYZE).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from orchestrator.connections import app_target, connect
from tests.harness import start_cluster, stop_cluster

QUERY = (
    "SELECT count(*), sum(kwh) FROM public.readings WHERE building >= %s AND building < %s "
    "AND ts >= '2023-01-01' AND ts < '2023-01-02'"
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--fragments", type=int, default=96)
    ap.add_argument("--runs", type=int, default=30)
    args = ap.parse_args()
    points = [f"f{i:03d}" for i in range(1, args.fragments + 1)]
    handle = start_cluster("bs-bench-fc-", workers=3, split_points=points)  # the harness pauses the balancer
    print(f"{args.fragments + 1} fragments on 3 workers; the background balancer is paused for this benchmark")
    try:
        with handle.coordinator() as conn:
            conn.execute(
                "INSERT INTO public.readings SELECT 'f' || lpad(f::text, 3, '0') || '-' || b, 'el', "
                "timestamptz '2023-01-01' + h * interval '1 hour', 1 "
                "FROM generate_series(1, %s) f, generate_series(1, 10) b, generate_series(0, 23) h",
                (args.fragments,),
            )
            conn.execute("ANALYZE public.readings")
        topo, creds = handle.topology, handle.creds
        sizes = [n for n in (1, 4, 16, 32, 64, args.fragments) if n <= args.fragments]
        results = []
        with connect(app_target(topo.coordinator, creds), "bench", autocommit=True) as conn:
            for n in sizes:
                lo, hi = "f001", f"f{n + 1:03d}"
                for _ in range(3):  # warm the remote connections and caches
                    conn.execute(QUERY, (lo, hi)).fetchone()
                lat = []
                for _ in range(args.runs):
                    t = time.perf_counter()
                    row = conn.execute(QUERY, (lo, hi)).fetchone()
                    lat.append(time.perf_counter() - t)
                assert row is not None and row[0] == n * 10 * 24, row
                plan = conn.execute("EXPLAIN (ANALYZE, FORMAT JSON) " + QUERY, (lo, hi)).fetchone()
                planning = plan[0][0]["Planning Time"] if plan else 0.0
                results.append((n, statistics.median(lat) * 1000, planning))
                print(f"  {n:3d} fragment(s): median {statistics.median(lat) * 1000:7.2f} ms  (planning {planning:.2f} ms)")
        (n0, t0, p0), (n1, t1, p1) = results[0], results[-1]
        print(
            f"cost per extra fragment: {(t1 - t0) / (n1 - n0):.3f} ms of latency, {(p1 - p0) / (n1 - n0):.3f} ms of it planning "
            f"(from {n0} to {n1} fragments; {args.runs} runs each; other work on the machine may skew figures)"
        )
    finally:
        stop_cluster(handle)


if __name__ == "__main__":
    main()
