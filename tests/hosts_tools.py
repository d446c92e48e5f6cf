"""Clusters on network-namespace hosts (tests/netns.py), built the way a user builds one: a hosts
spec for the namespaces' addresses, ``buildsmart host plan`` (the CA, certificates, etcd and
Patroni members, agent plans and secrets: runtime/hostfiles.py), an agent per host started inside
its namespace (what ``buildsmart host up`` runs), and ``buildsmart host init`` (etcd
authentication, every group's primary and synchronous standby, and, with a coordinator, the
BuildSmartDB setup: orchestrator/hostinit.py). The harness keeps only the namespaces and waiting."""

from __future__ import annotations

import itertools
import json
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from orchestrator import topology
from orchestrator.runtime import agent, etcd, hostfiles, identity, memberconf, procs, tls
from orchestrator.runtime.hostplan import ClusterPlan, plan
from orchestrator.runtime.hostspec import load
from tests import netns

CLUSTER = "hosts-test"
NAMESPACE = f"/{CLUSTER}/"
# ttl and loop_wait at Patroni's floors; retry_timeout 5 s: 3 s is safe by the rule too but showed
# no steady gain over hosts (docs/hosts.md). Written into the spec's [patroni] table.
TIMING = memberconf.Timing()
# a client's connect attempt to a lost host gives up after this (libpq: whole seconds, >= 2)
CONNECT_TIMEOUT_S = 2


class HostCa:
    """The cluster CA ``host plan`` made (DIR/tls) and the orchestrator's client certificate."""

    def __init__(self, directory: Path) -> None:
        self.dir = hostfiles.tls_dir(directory)
        self.context = tls.client_context(self.ca, tls.CertPaths(self.dir / f"{tls.CLIENT}.crt", self.dir / f"{tls.CLIENT}.key"))

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"


class EtcdHosts:
    """The planned etcd members, reached from the test's namespace."""

    def __init__(self, p: ClusterPlan, ca: HostCa) -> None:
        self.ca, self.hosts = ca, tuple(e.host for e in p.etcd)
        self.members = p.etcd

    def url(self, host: str) -> str:
        return self.members[self.hosts.index(host)].url

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.endpoint for m in self.members)

    def client(self, hosts: Sequence[str] | None = None) -> etcd.Client:
        """A client without an etcd user (authentication is on: it is refused)."""
        return etcd.Client(tuple(self.url(h) for h in (hosts or self.hosts)), self.ca.context)


@dataclass
class HostGroup:
    """One Patroni group over namespace hosts, and how to reach its members."""

    net: netns.Network
    ca: HostCa
    etcd: EtcdHosts
    superuser: tuple[str, str]
    members: dict[str, str] = field(default_factory=dict)  # member -> host
    specs: dict[str, agent.PatroniSpec] = field(default_factory=dict)
    pg_port: int = 5432
    rest_port: int = 8008

    def rest(self, member: str, path: str) -> tuple[int, dict[str, object]]:
        url = f"https://{self.net.address(self.members[member])}:{self.rest_port}{path}"
        try:
            with urllib.request.urlopen(url, timeout=2, context=self.ca.context) as resp:
                return int(resp.status), json.loads(resp.read() or b"{}")
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"{}")
        except (OSError, ValueError):
            return 0, {}

    def conninfo(self, member: str | None = None, dbname: str = "postgres") -> str:
        hosts = [self.members[member]] if member else list(self.members.values())
        addrs = ",".join(self.net.address(h) for h in hosts)
        ports = ",".join(str(self.pg_port) for _ in hosts)
        return (
            f"host={addrs} port={ports} dbname={dbname} user={self.superuser[0]} password={self.superuser[1]} "
            f"sslmode=verify-full sslrootcert={self.ca.ca} sslcertmode=disable connect_timeout={CONNECT_TIMEOUT_S} "
            # a cut-off server never answers: without these a client waits on its socket forever
            "tcp_user_timeout=3000 keepalives_idle=2 keepalives_interval=1 keepalives_count=2"
            + ("" if member else " target_session_attrs=read-write")
        )

    def wait(self, what: str, check: object, timeout_s: float) -> float:
        started = time.monotonic()
        while time.monotonic() - started < timeout_s:
            if callable(check) and check():
                return time.monotonic() - started
            time.sleep(0.2)
        logs = {m: _tail(Path(self.specs[m].directory) / "patroni.log") for m in self.specs}
        raise AssertionError(f"timed out after {timeout_s} s waiting for {what}: {logs}")


@dataclass
class HostCluster:
    """etcd on some hosts, Patroni groups over them, an agent on every host; DIR = ``base``."""

    net: netns.Network
    base: Path
    plan: ClusterPlan
    ca: HostCa
    etcd: EtcdHosts
    groups: dict[str, HostGroup]

    def agent_log(self, host: str) -> str:
        return _tail(self.base / agent.LOG_FILE.format(host=host))


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return "(no log)"


def spec_text(net: netns.Network, etcd_on: Sequence[str], layout: dict[str, tuple[str, ...]], split_points: Sequence[str]) -> str:
    """The hosts spec a user would write for these namespace hosts (docs/hosts.md)."""
    lines = ["[cluster]", f'name = "{CLUSTER}"', f"split_points = {json.dumps(list(split_points))}", "", "[hosts]"]
    lines += [f'{h} = "{net.address(h)}"' for h in net.hosts]
    lines += ["", "[etcd]", f"hosts = {json.dumps(list(etcd_on))}", ""]
    for g, hosts in layout.items():
        lines += [f"[groups.{g}]", f"hosts = {json.dumps(list(hosts))}", ""]
    lines += ["[network]", f'allow = ["{net.subnet}"]', ""]
    t = TIMING
    lines += ["[patroni]", f"ttl = {t.ttl}", f"loop_wait = {t.loop_wait}", f"retry_timeout = {t.retry_timeout}", ""]
    return "\n".join(lines)


def host_cli(*args: str, directory: Path) -> str:
    """``buildsmart host ARGS --dir DIR`` as the user runs it; its output (stdout and stderr)."""
    cmd = [sys.executable, "-m", "orchestrator", "host", *args, "--dir", str(directory)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
    said = done.stdout + done.stderr
    if done.returncode != 0:
        raise AssertionError(f"host {' '.join(args)} failed ({done.returncode}):\n{said}")
    return said


def make_cluster(
    net: netns.Network,
    base: Path,
    etcd_on: Sequence[str],
    layout: dict[str, tuple[str, ...]],
    split_points: Sequence[str] = (),
) -> HostCluster:
    """etcd on ``etcd_on``; per group of ``layout`` (group -> hosts of its members, in order) a
    Patroni member on each of those hosts, as ``host plan`` plans them into DIR = ``base``; the
    agent of every host of ``net`` started inside its namespace; then ``host init``, which waits
    until every group has a primary and a synchronous standby (and sets the cluster up when the
    layout has a coordinator and a worker)."""
    spec = base / "spec.toml"
    spec.write_text(spec_text(net, etcd_on, layout, split_points))
    host_cli("plan", "--spec", str(spec), directory=base)
    for h in net.hosts:
        # what `buildsmart host up` (or the unit) runs on a real host: the agent, from DIR/host-NAME.json
        net.start(h, procs.python_module(agent.MARKER, str(base), h), base / agent.LOG_FILE.format(host=h))
    p = plan(load(base / hostfiles.SPEC_FILE))
    ca = HostCa(base)
    e = EtcdHosts(p, ca)
    creds = topology.load_credentials(base)
    specs = {s.name: s for h in net.hosts for s in agent.load_plan(base, h).patroni}
    groups = {
        g.name: HostGroup(
            net, ca, e, (creds.superuser, creds.superuser_password),
            {m.name: m.host for m in g.members}, {m.name: specs[m.name] for m in g.members}, g.pg_port, g.rest_port,
        )
        for g in p.groups
    }  # fmt: skip
    cl = HostCluster(net, base, p, ca, e, groups)
    try:
        host_cli("init", directory=base)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; agents: {[cl.agent_log(h) for h in net.hosts]}") from exc
    return cl


def restart_agent(cl: HostCluster, host: str) -> None:
    """What `buildsmart host down` then `host up` do on a real host after a new plan: the agent
    stops (SIGTERM; its members keep running) and starts again, reading its plan afresh."""
    argv = procs.python_module(agent.MARKER, str(cl.base), host)
    stopped = 0
    for proc in cl.net.hosts[host].procs:
        if proc.poll() is None and list(proc.args)[-len(argv) :] == argv:
            proc.terminate()
            proc.wait(15)
            stopped += 1
    assert stopped == 1, f"{stopped} agents of {host} were running"
    cl.net.start(host, argv, cl.base / agent.LOG_FILE.format(host=host))


def make_group(net: netns.Network, base: Path, hosts: Sequence[str]) -> HostGroup:
    """etcd on every host of ``hosts``; group w1 with members on the first two (either may lead)."""
    return make_cluster(net, base, hosts, {"w1": (hosts[0], hosts[1])}).groups["w1"]


def kill_primary(group: HostGroup) -> float:
    """kill -9 of the primary's Patroni and postmaster, found by verified identity (the host and
    its agent stay up); returns the monotonic time of the kill."""
    pm = agent.patroni_member(group.specs[leader(group)])
    victims = [pm.patroni(), pm.postmaster()]
    killed_at = time.monotonic()
    for v in victims:
        assert v is not None, f"{pm.name}: Patroni or postmaster not running"
        identity.send(v, signal.SIGKILL)
    return killed_at


@dataclass(frozen=True)
class Outcome:
    """One fault of the primary's host under the writer."""

    scenario: str
    resumed_s: float  # fault -> first write acknowledged by the new primary
    pause_s: float  # longest gap between acknowledged writes
    acked: int
    lost: tuple[int, ...]  # acknowledged, missing afterwards
    doubled: int  # rows present more than once


class Writer(threading.Thread):
    """Inserts one row per attempt through a multi-host, read-write conninfo and records what the
    server acknowledged, and when. An attempt that gets no answer within ATTEMPT_S is abandoned
    with its connection (a frozen host's kernel still acknowledges TCP, so no socket timeout
    fires); if that server answers later, its acknowledgement still counts."""

    ATTEMPT_S = 3.0

    def __init__(self, conninfo: str) -> None:
        super().__init__(daemon=True)
        self.conninfo = conninfo
        self.acked: list[tuple[int, float]] = []
        self.by_host: dict[int, str] = {}  # row -> address of the server that acknowledged it
        self.lock = threading.Lock()
        self.stop = threading.Event()

    def _attempt(self, conn: psycopg.Connection, row: int, failed: threading.Event) -> None:
        try:
            conn.execute("INSERT INTO acks (id) VALUES (%s)", (row,))
            with self.lock:
                self.acked.append((row, time.monotonic()))
                self.by_host[row] = conn.info.host
        except psycopg.Error:
            failed.set()

    def run(self) -> None:
        conn: psycopg.Connection | None = None
        row = 0
        while not self.stop.is_set():
            row += 1
            try:
                if conn is None:
                    conn = psycopg.connect(self.conninfo, autocommit=True)
            except psycopg.Error:
                time.sleep(0.1)
                continue
            failed = threading.Event()
            attempt = threading.Thread(target=self._attempt, args=(conn, row, failed), daemon=True)
            attempt.start()
            attempt.join(self.ATTEMPT_S)
            if attempt.is_alive() or failed.is_set():
                conn = None  # abandoned (or broken): the next attempt connects afresh
                time.sleep(0.1)
            time.sleep(0.01)


def leader(group: HostGroup, timeout_s: float = 30.0) -> str:
    """The one primary of the group. Probed until one member, and one only, answers /primary:
    on a loaded machine a REST answer can miss its 2 s timeout, right after a host came back."""
    deadline = time.monotonic() + timeout_s
    while True:
        leaders = [m for m in group.members if group.rest(m, "/primary")[0] == 200]
        if len(leaders) == 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert len(leaders) == 1, f"expected one primary, found {leaders}"
    return leaders[0]


def run_scenario(group: HostGroup, what: str, fault: Callable[[str], None], recover: Callable[[str], None]) -> Outcome:
    """Fault the primary's host under a writer, recover it; check the promotion, the rejoin and
    every acknowledged row."""
    old_leader = leader(group)
    new_leader = next(m for m in group.members if m != old_leader)
    host = group.members[old_leader]
    # only the synchronous standby may be promoted: a replica that rejoined a moment ago is not yet
    group.wait(f"{new_leader} to be the synchronous standby", lambda: group.rest(new_leader, "/sync")[0] == 200, 60)
    with psycopg.connect(group.conninfo(), autocommit=True) as conn:
        conn.execute("CREATE TABLE IF NOT EXISTS acks (id bigint PRIMARY KEY)")
        conn.execute("TRUNCATE acks")
        assert conn.execute("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").fetchone() == (True,)
        streams = conn.execute("SELECT s.ssl FROM pg_stat_replication r JOIN pg_stat_ssl s USING (pid)").fetchall()
        assert streams == [(True,)], f"the replica must stream over TLS: {streams}"
    writer = Writer(group.conninfo())
    writer.start()
    try:
        group.wait("first writes", lambda: len(writer.acked) > 20, 30)
        fault_at = time.monotonic()
        fault(host)
        try:
            group.wait(f"{new_leader} to be promoted", lambda: group.rest(new_leader, "/primary")[0] == 200, 60)
            new_host = group.net.address(group.members[new_leader])

            def resumed_at() -> float | None:
                with writer.lock:
                    return next((t for i, t in writer.acked if t > fault_at and writer.by_host[i] == new_host), None)

            group.wait("writes to resume on the new primary", lambda: resumed_at() is not None, 30)
            resumed = (resumed_at() or 0.0) - fault_at
        finally:
            recover(host)
        group.wait(f"{old_leader} to rejoin as a replica", lambda: group.rest(old_leader, "/replica")[0] == 200, 120)
        group.wait("more writes after the recovery", lambda: writer.acked[-1][1] > time.monotonic() - 1, 30)
    finally:
        writer.stop.set()
        writer.join(10)
    with writer.lock:
        acked = [i for i, _ in writer.acked]
    times = sorted(t for _, t in writer.acked)
    pause = max(b - a for a, b in itertools.pairwise(times))
    with psycopg.connect(group.conninfo(), autocommit=True) as conn:
        present = [r[0] for r in conn.execute("SELECT id FROM acks").fetchall()]
    lost = sorted(set(acked) - set(present))
    old = group.conninfo(old_leader)

    def rejoined_with_every_row() -> bool:
        try:
            with psycopg.connect(old, autocommit=True) as c:
                rows = {r[0] for r in c.execute("SELECT id FROM acks").fetchall()}
                return set(acked) <= rows and c.execute("SELECT pg_is_in_recovery()").fetchone() == (True,)
        except psycopg.Error:
            return False

    group.wait("the rejoined old primary to hold every acknowledged row", rejoined_with_every_row, 60)
    return Outcome(what, resumed, pause, len(acked), tuple(lost), len(present) - len(set(present)))
