"""Mirror benchmark: documents per second mirrored to MongoDB, and end-to-end lag under a steady
stream of updates (commit in PostgreSQL -> change visible in a MongoDB change stream).

    /opt/bsdb-venv/bin/python bench/mirror.py [--docs 5000] [--rate 100] [--seconds 10]

Starts its own cluster (coordinator + 1 worker) and SecantusDB server in a temp dir and stops both
(by PID) at the end. Documents are real Ghausi Hall Haystack entities (shared/data, BSD-3-Clause),
copied under new ids to reach --docs.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from psycopg.types.json import Jsonb  # noqa: E402
from pymongo import MongoClient  # noqa: E402

from orchestrator import cluster  # noqa: E402
from orchestrator.metadata import haystack  # noqa: E402
from orchestrator.metadata.mirror import Mirror, pg_connect, run_once  # noqa: E402
from orchestrator.runtime import mongo  # noqa: E402
from tests.harness import SHARED_DATA, make_tmp_dir  # noqa: E402


def _load(directory: Path, n: int) -> None:
    entities = haystack.parse_file(SHARED_DATA / "haystack" / "ghausi.json")
    with (
        pg_connect(directory, "bench-load") as conn,
        conn.cursor().copy("COPY public.devices (id, building, kind, metadata) FROM STDIN") as copy,
    ):
        for i in range(n):
            e = entities[i % len(entities)]
            copy.write_row((f"bench-{i}", e.site_ref, e.kind, Jsonb(e.metadata)))
        # the COPY commits with the connection block


def throughput(directory: Path, n: int, batch: int) -> float:
    _load(directory, n)
    started = time.perf_counter()
    applied = run_once(directory, batch)
    elapsed = time.perf_counter() - started
    assert applied == n, (applied, n)
    return n / elapsed


def lag_under_load(directory: Path, uri: str, rate: float, seconds: float, n: int) -> list[float]:
    client: MongoClient[dict[str, Any]] = MongoClient(uri)
    col = client[mongo.DEFAULT_DATABASE]["devices"]
    stop = threading.Event()
    mirror = Mirror(directory)
    runner = threading.Thread(target=mirror.run, args=(stop,), daemon=True)
    runner.start()
    lags: list[float] = []
    stream = col.watch([{"$match": {"operationType": "replace"}}])

    def watch() -> None:
        while not stop.is_set():
            change = stream.try_next()
            if change is None:
                time.sleep(0.002)
                continue
            sent = change["fullDocument"]["metadata"].get("bench_t")
            if sent is not None:
                lags.append(time.time() - sent)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    with pg_connect(directory, "bench-updates", autocommit=True) as conn:
        interval, next_at, k = 1.0 / rate, time.perf_counter(), 0
        end = next_at + seconds
        while next_at < end:
            conn.execute(
                "UPDATE public.devices SET metadata = jsonb_set(metadata, '{bench_t}', to_jsonb(%s::float8)) WHERE id = %s",
                (time.time(), f"bench-{k % n}"),
            )
            k += 1
            next_at += interval
            time.sleep(max(0.0, next_at - time.perf_counter()))
    deadline = time.monotonic() + 30
    while len(lags) < k and time.monotonic() < deadline:
        time.sleep(0.05)
    stop.set()
    runner.join(10)
    watcher.join(5)
    stream.close()
    mirror.close()
    client.close()
    print(f"  updates sent {k}, seen in MongoDB {len(lags)}")
    return lags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=5000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--rate", type=float, default=100.0, help="updates per second during the lag test")
    parser.add_argument("--seconds", type=float, default=10.0)
    args = parser.parse_args()
    base = make_tmp_dir("bs-bench-mirror-")
    directory = base / "cluster"
    try:
        cluster.up(directory, workers=1, balancer_paused=True)
        print("the background balancer is paused for this benchmark")
        uri = mongo.ensure_started(directory)
        docs_s = throughput(directory, args.docs, args.batch)
        print(f"initial mirror: {args.docs} Ghausi documents in batches of {args.batch}: {docs_s:,.0f} documents/s")
        lags = lag_under_load(directory, uri, args.rate, args.seconds, args.docs)
        if lags:
            q = statistics.quantiles(lags, n=100)
            print(
                f"lag at {args.rate:.0f} updates/s for {args.seconds:.0f} s: p50 {q[49] * 1000:.0f} ms,"
                f" p95 {q[94] * 1000:.0f} ms, max {max(lags) * 1000:.0f} ms"
            )
    finally:
        mongo.stop(directory)
        cluster.down(directory, purge=True)
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    main()
