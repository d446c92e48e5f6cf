"""MQTT ingest benchmark: `buildsmart ingest --mqtt` fed by 8 publishing gateways through a real
mosquitto (persistence on), into a local plain cluster (2 workers).

  (a) sustained rate: each publisher sends as fast as the broker acknowledges (at most ``--window``
      messages waiting for a PUBACK each) for ``--seconds``; rate = messages / (first PUBLISH ->
      the last reading visible on the coordinator), so a backlog in the broker counts against it;
  (b) end-to-end latency at 20%, 50% and 80% of that rate (paced publishers): PUBLISH -> the reading
      is visible to a query on the coordinator. A poller asks the coordinator every ``--poll-ms``
      for each (building, meter)'s latest ts; a reading is visible once that reaches its ts (a
      meter's readings commit in order). The poll time is taken after the query returns, so the
      figures include up to one poll interval plus the query. Target: p99 <= 1 s at 80%.

Usage (always under the shared bench lock):
  flock /tmp/bsdb-bench.lock /opt/venv-mqtt/bin/python bench/mqtt.py
  flock /tmp/bsdb-bench.lock /opt/venv-mqtt/bin/python bench/mqtt.py --seconds 10 --phase-seconds 10
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import shutil
import statistics
import sys
import threading
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psycopg

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator import cluster, topology  # noqa: E402
from orchestrator.connections import connect, superuser_target  # noqa: E402
from tests.harness import make_tmp_dir  # noqa: E402
from tests.mqtt_tools import STAMP_BASE, Broker, Key, Loader, Publisher, stamp  # noqa: E402

SPLIT_POINTS = ["b3", "b6", "t", "u"]
PREFIXES = ("a", "b1", "b4", "b7", "c", "t", "u", "z")  # 8 publishers over the 5 fragments


class Visibility:
    """Polls the coordinator for each (building, meter)'s latest ts; remembers when each ts was
    first seen.

    The query is the latest reading per meter (``DISTINCT ON (building, meter) ... ORDER BY
    building, meter, ts DESC``: an index skip scan per fragment, one descent per meter), so the
    observer stays cheap however many rows are stored. Each publisher sends its readings in ts
    order, one meter the even ones and the other the odd ones, and a meter's readings commit in
    order, so the latest ts of a meter also tells how many of its readings are visible.
    """

    def __init__(self, directory: Path, suffix: str, poll_s: float) -> None:
        topo = topology.load(directory)
        self.target = superuser_target(topo.coordinator, topology.load_credentials(directory))
        self.suffix = suffix
        self.poll_s = poll_s
        self.seen: dict[tuple[str, str], list[tuple[float, str]]] = {}  # (b, m) -> [(time, max ts)]
        self.stop = threading.Event()
        self.rows = 0
        self.query_s: list[float] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self.stop.is_set():
            try:
                with connect(self.target, "bench-mqtt", autocommit=True, search_path=None) as conn:
                    while not self.stop.is_set():
                        self._poll(conn)
                        time.sleep(self.poll_s)
            except psycopg.Error as exc:  # e.g. terminated by an administrator command: poll again
                print(f"poller: {str(exc).strip()}; reconnecting", file=sys.stderr)
                time.sleep(self.poll_s)

    def _poll(self, conn: psycopg.Connection) -> None:
        started = time.time()
        got = conn.execute(
            "SELECT DISTINCT ON (building, meter) building, meter, ts FROM readings ORDER BY building, meter, ts DESC"
        ).fetchall()
        now = time.time()  # after the query returned: the figures include its time
        self.query_s.append(now - started)
        rows = 0
        for b, m, ts in got:
            if not b.endswith(self.suffix):
                continue
            text = ts.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
            rows += (index_of(text) - int(m[1:])) // 2 + 1
            marks = self.seen.setdefault((b, m), [])
            if not marks or marks[-1][1] != text:
                marks.append((now, text))
        self.rows = rows

    def visible_at(self, key: Key) -> float | None:
        for when, ts in self.seen.get((key[0], key[1]), []):
            if ts >= key[2]:  # ISO stamps of one format sort as their instants
                return when
        return None


def index_of(ts: str) -> int:
    """The n of ``stamp(n)``."""
    return (int(datetime.strptime(ts, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()) - STAMP_BASE) // 900


def stored_rows(directory: Path, suffix: str) -> int:
    """Rows stored for the buildings ending in ``suffix``, counted (the check of what the poller derived)."""
    topo = topology.load(directory)
    target = superuser_target(topo.coordinator, topology.load_credentials(directory))
    with connect(target, "bench-mqtt", autocommit=True, search_path=None) as conn:
        row = conn.execute("SELECT count(*) FROM readings WHERE building LIKE %s", (f"%{suffix}",)).fetchone()
    return int(row[0]) if row else 0


def publishers(broker: Broker, tag: str) -> list[Publisher]:
    return [Publisher(broker.port, f"{p}{tag}", f"bench-{tag}-{i}") for i, p in enumerate(PREFIXES)]


def run_phase(pubs: list[Publisher], per_publisher_s: float | None, seconds: float, window: int) -> int:
    """Publish for ``seconds``: paced at ``per_publisher_s`` each, or as fast as PUBACKs come back."""
    sent = [0] * len(pubs)

    def run(k: int, pub: Publisher) -> None:
        t0 = time.monotonic()
        n = 0
        while (now := time.monotonic()) - t0 < seconds:
            if per_publisher_s is None:
                if len(pub._out) >= window and pub.collect() >= window:
                    time.sleep(0.001)
                    continue
            else:
                due = t0 + n / per_publisher_s
                if due > now:
                    time.sleep(due - now)
            pub.publish([stamp(n)], meter=n % 2, value=float(n))
            n += 1
        sent[k] = n

    threads = [threading.Thread(target=run, args=(k, p)) for k, p in enumerate(pubs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return sum(sent)


def gateway(port: int, building: str, name: str, per_s: float, seconds: float, go: Any, out: Any) -> None:
    """One paced publisher in its own process (``--publisher-processes``): connect, say ready,
    publish from ``go`` on, then report what it sent and its PUBACK times."""
    pub = Publisher(port, building, name)
    out.put(("ready", name))
    go.wait()
    t0 = time.monotonic()
    n = 0
    while (now := time.monotonic()) - t0 < seconds:
        due = t0 + n / per_s
        if due > now:
            time.sleep(due - now)
        pub.publish([stamp(n)], meter=n % 2, value=float(n))
        n += 1
    pub.wait_acked(120)
    out.put(("done", n, pub.sent_at, pub.puback_s()))
    pub.close()


def paced_in_processes(port: int, tag: str, per_s: float, seconds: float) -> tuple[int, list[dict[Key, float]], list[float]]:
    """The 8 paced publishers of a latency phase, each in its own process (as gateways are), so
    their PUBLISH -> PUBACK time is not the bench's own GIL: (sent, sent_at per publisher, PUBACK times)."""
    ctx = multiprocessing.get_context("spawn")
    go, out = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=gateway, args=(port, f"{p}{tag}", f"bench-{tag}-{i}", per_s, seconds, go, out), daemon=True)
        for i, p in enumerate(PREFIXES)
    ]
    for proc in procs:
        proc.start()
    for _ in procs:
        out.get(timeout=120)
    go.set()
    done = [out.get(timeout=seconds + 240) for _ in procs]
    for proc in procs:
        proc.join(30)
    return sum(d[1] for d in done), [d[2] for d in done], [x for d in done for x in d[3]]


def wait_visible(vis: Visibility, total: int, timeout_s: float) -> float:
    deadline = time.monotonic() + timeout_s
    while vis.rows < total:
        if time.monotonic() > deadline:
            raise SystemExit(
                f"only {vis.rows:,} of {total:,} readings visible after {timeout_s:.0f} s (poller alive: {vis.thread.is_alive()})"
            )
        time.sleep(0.01)
    return time.time()


def check_stored(directory: Path, suffix: str, sent: int) -> None:
    """Every message of a phase stored once: counted, not derived from the latest ts per meter."""
    n = stored_rows(directory, suffix)
    if n != sent:
        raise SystemExit(f"{sent:,} readings sent (all acknowledged by the broker), {n:,} stored")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seconds", type=float, default=20.0, help="length of the sustained-rate run")
    ap.add_argument("--phase-seconds", type=float, default=15.0, help="length of each latency run")
    ap.add_argument("--window", type=int, default=100, help="messages waiting for a PUBACK per publisher (sustained run)")
    ap.add_argument("--poll-ms", type=float, default=20.0)
    ap.add_argument("--keep", action="store_true", help="leave the cluster's directory")
    ap.add_argument("--profile", type=Path, help="run the loader under cProfile, writing its stats here")
    ap.add_argument("--rate", type=float, help="base the latency phases on this rate, not the measured one (to compare runs)")
    ap.add_argument("--publisher-processes", action="store_true", help="latency phases: each publisher in its own process")
    ap.add_argument("--loader-arg", action="append", default=[], help="one more argument for the loader (repeatable)")
    args = ap.parse_args()

    work = make_tmp_dir("bs-bench-mqtt-")
    directory = work / "cluster"
    print(f"cluster in {directory}")
    cluster.up(directory, workers=2, split_points=SPLIT_POINTS, replicas=0, balancer_paused=True)
    broker = Broker(work / "broker")
    broker.start()
    python = ("-m", "cProfile", "-o", str(args.profile.resolve())) if args.profile else ()
    loader = Loader(directory, broker, work / "loader", *args.loader_arg, client_id="bench", python=python)
    results: dict[str, object] = {"publishers": len(PREFIXES)}
    try:
        loader.wait_for("subscribed to")
        # (a) sustained
        pubs = publishers(broker, "s")
        vis = Visibility(directory, "s", args.poll_ms / 1000)
        vis.thread.start()
        t0 = time.time()
        sent: list[int] = []
        publishing = threading.Thread(target=lambda: sent.append(run_phase(pubs, None, args.seconds, args.window)))
        publishing.start()
        time.sleep(min(2.0, args.seconds / 4))  # past the start-up
        r1, t1 = vis.rows, time.time()
        publishing.join()
        r2, t2 = vis.rows, time.time()
        total = sent[0]
        for p in pubs:
            p.wait_acked(120)
        t_end = wait_visible(vis, total, 300)
        vis.stop.set()
        vis.thread.join()
        check_stored(directory, "s", total)
        for p in pubs:
            p.close()
        # the rate the loader keeps up with while the publishers run (they share the cores); the
        # backlog left in the broker when they stop is drained faster, so the end-to-end figure is higher
        rate = (r2 - r1) / (t2 - t1)
        results["sustained_msgs_per_s"] = round(rate)
        results["end_to_end_msgs_per_s"] = round(total / (t_end - t0))
        results["sustained_messages"] = total
        print(
            f"(a) sustained: {rate:,.0f} messages/s committed while 8 publishers sent as fast as PUBACKs came back; "
            f"{total:,} messages in {t_end - t0:.1f} s = {total / (t_end - t0):,.0f} messages/s to the last one visible"
        )
        # (b) latency at 20/50/80 %
        if args.rate:
            rate = args.rate
            results["latency_base_msgs_per_s"] = round(rate)
        for share in (0.2, 0.5, 0.8):
            tag = f"l{int(share * 100)}"
            vis = Visibility(directory, tag, args.poll_ms / 1000)
            vis.thread.start()
            target = rate * share
            if args.publisher_processes:
                sent, sent_ats, puback = paced_in_processes(broker.port, tag, target / len(PREFIXES), args.phase_seconds)
            else:
                pubs = publishers(broker, tag)
                sent = run_phase(pubs, target / len(pubs), args.phase_seconds, args.window)
                for p in pubs:
                    p.wait_acked(120)
                sent_ats = [p.sent_at for p in pubs]
                puback = [x for p in pubs for x in p.puback_s()]
                for p in pubs:
                    p.close()
            wait_visible(vis, sent, 120)
            check_stored(directory, tag, sent)
            time.sleep(2 * args.poll_ms / 1000)
            vis.stop.set()
            vis.thread.join()
            lat = []
            for sent_at_of in sent_ats:
                for key, sent_at in sent_at_of.items():
                    seen = vis.visible_at(key)
                    assert seen is not None, f"{key} never seen"
                    lat.append(seen - sent_at)
            lat.sort()
            p50, p99 = statistics.median(lat), lat[min(len(lat) - 1, int(len(lat) * 0.99))]
            puback.sort()
            query = statistics.median(vis.query_s)
            results[f"latency_{tag}"] = {
                "target_msgs_per_s": round(target), "sent": sent, "p50_s": round(p50, 3), "p99_s": round(p99, 3),
                "max_s": round(lat[-1], 3), "poll_query_s": round(query, 3),
                "puback_p50_s": round(statistics.median(puback), 3), "puback_p99_s": round(puback[int(len(puback) * 0.99)], 3),
            }  # fmt: skip
            print(
                f"(b) {share:.0%} of the rate ({target:,.0f}/s, {sent:,} messages): p50 {p50 * 1000:.0f} ms, "
                f"p99 {p99 * 1000:.0f} ms, max {lat[-1] * 1000:.0f} ms (the poller's query: median {query * 1000:.0f} ms; "
                f"PUBLISH -> the broker's PUBACK: p50 {statistics.median(puback) * 1000:.0f} ms, "
                f"p99 {puback[int(len(puback) * 0.99)] * 1000:.0f} ms)"
            )
        code = loader.stop(120)
        print(f"loader exit {code}: {loader.out_path.read_text().strip()}")
        for line in loader.err_path.read_text().splitlines():
            if " batches: " in line:  # the loader's own account of where the time went, every 10 s
                print("  loader:", line.split("; ")[-1])
    except BaseException:
        print(f"loader output (last lines):\n{''.join(loader.text().splitlines(keepends=True)[-20:])}", file=sys.stderr)
        raise
    finally:
        if loader.proc.poll() is None:
            loader.kill9()
        broker.stop()
        if not args.keep:
            cluster.down(directory, purge=True)
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


if __name__ == "__main__":
    main()
