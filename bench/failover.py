"""Failover benchmark: seconds from a fault to the first successful write through the coordinator,
and rows lost (acknowledged but missing afterwards; must be 0), for crash (kill -9 of a primary's
postgres and Patroni), Patroni-only kill, and planned switchover, on a local HA cluster.

    /opt/bsdb-venv/bin/python bench/failover.py [--rounds 3]
    /opt/bsdb-venv/bin/python bench/failover.py --hosts [--rounds 3]    (as root)

``--hosts``: one Patroni group over three hosts made of network namespaces (tests/netns.py; etcd
on all three, primary and synchronous replica on two, TLS everywhere, every member started and
watched by its host's agent, runtime/agent.py) and, per scenario: kill -9 of the primary's Patroni
and postgres with the host and its agent alive (the agent releases the leader key); the primary's
host cut off then healed, crashed (every process killed) then restarted, frozen then thawed; the
same measurements, from the writer in tests/hosts_tools.py.

It starts its own cluster (coordinator + 2 workers, 1 synchronous replica each) in a temp dir and
stops it at the end. The writer inserts 500-row batches through the coordinator, retrying a
failed batch on a new connection (a reading written twice replaces itself).
"""

from __future__ import annotations

import argparse
import shutil
import signal
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orchestrator import cluster, topology  # noqa: E402
from orchestrator.connections import connect, superuser_target  # noqa: E402
from orchestrator.runtime import ha, hasettings  # noqa: E402
from tests import ha_tools  # noqa: E402
from tests.harness import make_tmp_dir  # noqa: E402


def _rows(directory: Path, prefix: str) -> int:
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    for _ in range(100):
        try:
            with connect(superuser_target(topo.coordinator, creds), "bench", autocommit=True) as conn:
                return ha_tools.count_rows(conn, prefix)[0]
        except Exception:
            time.sleep(0.3)
    raise RuntimeError("coordinator unreachable")


def _round(directory: Path, group_of: Callable[[str], str], fault: Callable[[Path, str], float]) -> tuple[float, float, int]:
    prefix = f"t{uuid.uuid4().hex[:8]}_"
    group = group_of(prefix)
    writer = ha_tools.Writer(directory, prefix, rows=500).start()
    writer.wait_acked(10)
    t0 = fault(directory, group)
    deadline = time.monotonic() + 60
    while writer.recovery_after(t0) is None and time.monotonic() < deadline:
        time.sleep(0.05)
    writer.wait_acked(writer.acked + 5)
    writer.finish()
    recovery = writer.recovery_after(t0)
    pause = writer.max_pause_after(t0)
    lost = writer.acked * writer.rows - _rows(directory, prefix)
    ha_tools.wait_healthy(directory)
    return (recovery if recovery is not None else float("nan")), pause, lost


def _summary(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} [{min(values):.2f}-{max(values):.2f}]"


def crash(directory: Path, group: str) -> float:
    return ha_tools.kill9(ha_tools.members(directory)[ha_tools.leader(directory, group)])


def patroni_only(directory: Path, group: str) -> float:
    return ha_tools.kill9(ha_tools.members(directory)[ha_tools.leader(directory, group)], postgres=False)


def switchover(directory: Path, group: str) -> float:
    topo = topology.load(directory)
    t0 = time.monotonic()
    settings = hasettings.load(directory)
    old = ha.leader_of(topo, topo.group(group), settings)
    ha.switchover(topo, topo.group(group), settings, None)
    ha.wait_new_leader(topo, topo.group(group), settings, old)
    return t0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--hosts", action="store_true", help="one group over network-namespace hosts")
    parser.add_argument("--only", default="", help="--hosts: comma-separated parts of the names of the scenarios to run")
    parser.add_argument("--retry-timeout", type=int, default=None, help="--hosts: Patroni retry_timeout (s)")
    args = parser.parse_args()
    # a timeout's SIGTERM must still run the cleanups below (cluster, namespaces and their processes)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.hosts:
        return hosts_mode(args.rounds, args.only, args.retry_timeout)
    directory = make_tmp_dir("bs-bench-ha-") / "cluster"
    t = time.monotonic()
    cluster.up(directory, workers=2, split_points=["b3", "b6", "t", "u"], replicas=1, balancer_paused=True)
    print(f"HA cluster up in {time.monotonic() - t:.1f} s (coordinator + 2 workers, 1 sync replica each)")
    print("the background balancer is paused for this benchmark (no fragment moves during the faults)")
    try:
        ha_tools.wait_healthy(directory)

        def worker(prefix: str) -> str:
            return ha_tools.worker_of(directory, prefix)

        scenarios: list[tuple[str, Callable[[str], str], Callable[[Path, str], float]]] = [
            ("crash worker primary (kill -9 postgres+Patroni)", worker, crash),
            ("crash coordinator primary", lambda _: "coordinator", crash),
            ("kill -9 Patroni alone on worker primary", worker, patroni_only),
            ("switchover worker", worker, switchover),
            ("switchover coordinator", lambda _: "coordinator", switchover),
        ]
        print(f"{'scenario':48} {'first write after fault (s)':28} {'longest write pause (s)':28} rows lost")
        print(f"{'':48} {'median [min-max]':28} {'median [min-max]':28}")
        for name, group_of, fault in scenarios:
            results = [_round(directory, group_of, fault) for _ in range(args.rounds)]
            cols = [_summary([r[i] for r in results]) for i in (0, 1)]
            print(f"{name:48} {cols[0]:28} {cols[1]:28} {sum(r[2] for r in results)}", flush=True)
    finally:
        cluster.down(directory, purge=True)
        shutil.rmtree(directory.parent, ignore_errors=True)
    return 0


def hosts_mode(rounds: int, only: str = "", retry_timeout: int | None = None) -> int:
    from orchestrator.runtime import memberconf
    from tests import hosts_tools, netns

    why = netns.available()
    if why is not None:
        print(f"--hosts: {why}")
        return 2
    if retry_timeout is not None:
        hosts_tools.TIMING = memberconf.Timing(retry_timeout=retry_timeout)
        hosts_tools.TIMING.check()
    names = ("h1", "h2", "h3")
    net = netns.Network(names)
    base = make_tmp_dir("bs-bench-hosts-")
    try:
        group = hosts_tools.make_group(net, base, names)
        print("group w1 over 3 namespace hosts (etcd on each; primary and sync replica on two; TLS; an agent per host)")
        t = hosts_tools.TIMING
        print(f"Patroni ttl {t.ttl} s, loop_wait {t.loop_wait} s, retry_timeout {t.retry_timeout} s; "
              f"client connect_timeout {hosts_tools.CONNECT_TIMEOUT_S} s, attempt deadline {hosts_tools.Writer.ATTEMPT_S} s")
        print(f"{'scenario':40} {'first write after fault (s)':28} {'longest write pause (s)':28} rows lost/doubled")
        print(f"{'':40} {'median [min-max]':28} {'median [min-max]':28}")
        scenarios: list[tuple[str, Callable[[str], None], Callable[[str], None]]] = [
            ("kill -9 postgres+Patroni, agent alive", lambda _h: hosts_tools.kill_primary(group), lambda _h: None),
            ("primary's host cut off, healed", net.cut, net.heal),
            ("primary's host crashed, restarted", net.crash, net.restart),
            ("primary's host frozen, thawed", net.freeze, net.thaw),
        ]
        for name, fault, recover in scenarios:
            if only and not any(part in name for part in only.split(",")):
                continue
            outcomes = [hosts_tools.run_scenario(group, name, fault, recover) for _ in range(rounds)]
            cols = [_summary([o.resumed_s for o in outcomes]), _summary([o.pause_s for o in outcomes])]
            bad = f"{sum(len(o.lost) for o in outcomes)}/{sum(o.doubled for o in outcomes)}"
            print(f"{name:40} {cols[0]:28} {cols[1]:28} {bad}", flush=True)
    finally:
        net.close()
        shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
