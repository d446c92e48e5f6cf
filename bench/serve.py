"""The front door's cost: Haystack hisRead of one meter over a day and over a year through
``buildsmart serve``, against the same query through psycopg directly, with 8 concurrent clients;
then the dashboard's page load times in headless Chromium.

For each case: p50 and p99 latency and requests per second over --seconds of closed-loop load
(each client sends its next request when the previous answer has arrived), and the ratio HTTP/SQL.
The HTTP clients keep one connection each (http.client) and a bearer token from a SCRAM login by
phable; the answer is JSON (Hayson), read in full but not decoded, as a client that forwards it
would. The SQL clients run the query a direct client writes (orchestrator/serve/history.py HIS_SQL: ts, kwh)
and fetch every row, as psycopg does.

Usage (a fresh local cluster, no replicas, the real meter b0 electricity 2019-2023):
  flock /tmp/bsdb-bench.lock python bench/serve.py
  python bench/serve.py --cluster-dir DIR --url http://127.0.0.1:8470   # reuse (development)
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import json
import shutil
import statistics
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from zoneinfo import ZoneInfo

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator import cluster, demo, topology  # noqa: E402
from orchestrator.connections import app_target, connect, superuser_target  # noqa: E402
from orchestrator.ingest.loader import ingest  # noqa: E402
from orchestrator.runtime.ports import free_port  # noqa: E402
from orchestrator.serve import daemon, users  # noqa: E402
from orchestrator.serve.history import HIS_SQL  # noqa: E402

SHARED = next(
    (p for p in (REPO.parent / "shared" / "data", Path("/work/shared/data")) if p.is_dir()), REPO.parent / "shared" / "data"
)
CAMBRIDGE = SHARED / "cambridge-estates"
USER, PASSWORD = "bench", "bench-password-1"
LONDON = ZoneInfo("Europe/London")
CASES = (("day", "2023-06-15", datetime(2023, 6, 15, tzinfo=LONDON), datetime(2023, 6, 16, tzinfo=LONDON)),
         ("year", "2023-01-01,2023-12-31", datetime(2023, 1, 1, tzinfo=LONDON), datetime(2024, 1, 1, tzinfo=LONDON)))  # fmt: skip


@dataclass(frozen=True)
class Result:
    requests: int
    seconds: float
    latencies_ms: list[float]

    @property
    def rps(self) -> float:
        return self.requests / self.seconds

    def pct(self, p: float) -> float:
        xs = sorted(self.latencies_ms)
        return xs[min(len(xs) - 1, int(p / 100 * len(xs)))]


def closed_loop(make_client: Callable[[], Callable[[], int]], clients: int, seconds: float) -> Result:
    """``clients`` threads, each calling its own request function in a loop for ``seconds``."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    start_gate = threading.Barrier(clients + 1)
    stop = threading.Event()

    def run(i: int) -> None:
        call = make_client()
        call()  # warm-up: connection, plan cache
        start_gate.wait()
        while not stop.is_set():
            t0 = time.perf_counter()
            call()
            latencies[i].append((time.perf_counter() - t0) * 1000)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    start_gate.wait()
    t0 = time.perf_counter()
    time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    flat = [x for xs in latencies for x in xs]
    return Result(len(flat), elapsed, flat)


def http_client(url: str, token: str, range_text: str) -> Callable[[], Callable[[], int]]:
    parsed = urllib.parse.urlsplit(url)
    query = urllib.parse.urlencode({"id": "@pt:b0:electricity", "range": range_text})

    def make() -> Callable[[], int]:
        conn = http.client.HTTPConnection(parsed.hostname or "127.0.0.1", parsed.port or 80, timeout=60)
        headers = {"Authorization": f"BEARER authToken={token}", "Accept": "application/json"}

        def call() -> int:
            conn.request("GET", f"/api/hisRead?{query}", headers=headers)
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200 or b'"err"' in body[:200]:
                raise RuntimeError(f"hisRead failed: {resp.status} {body[:200]!r}")
            return len(body)

        return call

    return make


def sql_client(directory: Path, start: datetime, end: datetime) -> Callable[[], Callable[[], int]]:
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    params = {"b": "b0", "m": "electricity", "start": start, "end": end}

    def make() -> Callable[[], int]:
        conn = connect(app_target(topo.coordinator, creds), "bench-serve", autocommit=True)

        def call() -> int:
            return len(conn.execute(HIS_SQL, params).fetchall())

        return call

    return make


def page_loads(url: str, runs: int) -> dict[str, float] | None:
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        return None
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
             "--disable-sync"]  # fmt: skip
    out: dict[str, list[float]] = {"cluster": [], "building": []}
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=flags, headless=True)
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(f"{url}/ui/login")
        page.fill("#username", USER)
        page.fill("#password", PASSWORD)
        page.click("#login")
        page.wait_for_url(f"{url}/ui/")
        for _ in range(runs):
            t0 = time.perf_counter()
            page.goto(f"{url}/ui/")
            page.wait_for_function("document.querySelectorAll('#fragments tbody tr').length > 0")
            out["cluster"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            page.goto(f"{url}/ui/building?b=b0")
            page.wait_for_function("document.body.dataset.ready === '1'", timeout=60_000)
            out["building"].append(time.perf_counter() - t0)
        browser.close()
    return {k: statistics.median(v) for k, v in out.items()}


def prepare(directory: Path, port: int) -> None:
    cluster.up(directory, workers=2, split_points=None, replicas=0, balancer_paused=True)
    demo.load_buildings(directory, CAMBRIDGE / "buildings.csv")
    meter = directory.parent / "b0.csv"
    with gzip.open(CAMBRIDGE / "readings-2019-2023.csv.gz", "rt") as src, meter.open("w") as out:
        out.write(src.readline())
        for line in src:
            if line.startswith("b0,electricity,"):
                out.write(line)
    ingest(directory, str(meter))
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    with connect(superuser_target(topo.coordinator, creds), "bench", autocommit=True) as conn:
        users.add(conn, USER, PASSWORD, "read")
        conn.execute("ANALYZE")
    daemon.start_daemon(directory, port=port)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cluster-dir", type=Path, help="reuse this cluster (with b0 loaded and user bench)")
    ap.add_argument("--url", help="reuse this running `buildsmart serve`")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--page-runs", type=int, default=5)
    args = ap.parse_args()

    tmp = None
    if args.cluster_dir:
        directory = args.cluster_dir.resolve()
        url = args.url or daemon.address(directory)
        if url is None:
            sys.exit("no `buildsmart serve` runs for that directory: pass --url")
    else:
        tmp = Path(tempfile.mkdtemp(prefix="bs-bench-serve-"))
        tmp.chmod(0o755)
        directory = tmp / "cluster"
        port = free_port()
        print("starting a cluster (coordinator + 2 workers, no replicas) and loading b0 electricity 2019-2023 ...")
        prepare(directory, port)
        url = f"http://127.0.0.1:{port}"
    try:
        from phable import HaystackClient

        token = HaystackClient.open(f"{url}/api", USER, PASSWORD)._auth_token
        print(f"{args.clients} concurrent clients, {args.seconds:.0f} s of closed-loop load per case\n")
        print(f"{'case':<6} {'path':<14} {'rows':>5} {'p50 ms':>8} {'p99 ms':>8} {'req/s':>8}")
        ratios = []
        for name, range_text, start, end in CASES:
            rows = sql_client(directory, start, end)()()
            h = closed_loop(http_client(url, token, range_text), args.clients, args.seconds)
            s = closed_loop(sql_client(directory, start, end), args.clients, args.seconds)
            for label, r in (("HTTP hisRead", h), ("psycopg SQL", s)):
                print(f"{name:<6} {label:<14} {rows:>5} {r.pct(50):>8.2f} {r.pct(99):>8.2f} {r.rps:>8.1f}")
            ratios.append((name, h.pct(50) / s.pct(50), s.rps / h.rps))
        print()
        for name, lat, thr in ratios:
            print(f"{name}: HTTP/SQL p50 latency x{lat:.2f}; SQL/HTTP throughput x{thr:.2f}")
        pages = page_loads(url, args.page_runs)
        if pages is not None:
            print(f"\ndashboard page load (median of {args.page_runs}, until data is drawn): "
                  f"cluster {pages['cluster'] * 1000:.0f} ms, building {pages['building'] * 1000:.0f} ms")  # fmt: skip
        print(json.dumps({"ratios": ratios, "pages": pages}))
    finally:
        if tmp is not None:
            cluster.down(directory, purge=True)
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
