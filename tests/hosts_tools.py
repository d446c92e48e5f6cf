"""Members on network-namespace hosts (tests/netns.py), made the way a host would make them: etcd
members from runtime/etcdcluster.py, Patroni members from runtime/memberconf.py, TLS material from
runtime/tls.py (one certificate per host, for its address)."""

from __future__ import annotations

import itertools
import json
import os
import secrets
import signal
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psycopg

from orchestrator import pgbin
from orchestrator.osuser import ServiceUser
from orchestrator.runtime import agent, etcd, etcdcluster, identity, memberconf, procs, tls
from orchestrator.runtime.hasettings import HaSettings
from orchestrator.runtime.local import hba_rules, tls_settings
from orchestrator.runtime.patroni import dcs_parameters
from tests import netns


class HostCa:
    """The cluster CA, a certificate per host (key owned by the service user) and the
    orchestrator's client certificate."""

    def __init__(self, base: Path, user: ServiceUser) -> None:
        self.dir = base / "ca"
        self.user = user
        tls.make_ca(self.dir, "hosts-test")
        os.chmod(self.dir, 0o755)
        self.client = tls.issue(self.dir, self.dir, tls.CLIENT, (), server=False)
        self.context = tls.client_context(self.ca, self.client)

    @property
    def ca(self) -> Path:
        return self.dir / "ca.crt"

    def host_material(self, host: str, address: str, into: Path) -> tls.Material:
        into.mkdir(parents=True, exist_ok=True)
        os.chmod(into, 0o755)
        return tls.Material(self.ca, tls.issue(self.dir, into, host, [address], self.user))


class EtcdHosts:
    """One etcd member on each of ``hosts``, TLS with client-certificate auth, run as the service
    user by each host's agent (``specs``: what goes into the host plans)."""

    def __init__(self, net: netns.Network, base: Path, ca: HostCa, hosts: Sequence[str], user: ServiceUser) -> None:
        self.net, self.ca, self.hosts = net, ca, tuple(hosts)
        self.members = [etcdcluster.EtcdMember(f"etcd-{h}", net.address(h), base / f"etcd-{h}") for h in hosts]
        self.specs: dict[str, agent.EtcdSpec] = {}
        for h, m in zip(hosts, self.members, strict=True):
            m.directory.mkdir(parents=True)
            material = tls.Material(ca.ca, tls.issue(ca.dir, m.directory, m.name, [m.address], user))
            argv = etcdcluster.member_argv(etcd.binary(), m, self.members, material, f"t-{net.tag}")
            self.specs[h] = agent.EtcdSpec(m.name, str(m.directory), str(m.data_dir), tuple(argv))

    def url(self, host: str) -> str:
        return self.members[self.hosts.index(host)].client_url(True)

    @property
    def endpoints(self) -> tuple[str, ...]:
        return tuple(m.endpoint for m in self.members)

    def client(self, hosts: Sequence[str] | None = None) -> etcd.Client:
        return etcd.Client(tuple(self.url(h) for h in (hosts or self.hosts)), self.ca.context)

    def wait_healthy(self, hosts: Sequence[str] | None = None, timeout_s: float = 30.0) -> None:
        hosts = tuple(hosts or self.hosts)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(etcd.healthy(self.url(h), self.ca.context) for h in hosts):
                return
            time.sleep(0.2)
        logs = {m.name: (m.directory / "etcd.log").read_text()[-800:] for m in self.members}
        raise AssertionError(f"etcd members on {hosts} not healthy within {timeout_s} s: {logs}")


NAMESPACE = "/hosts-test/"
REST_PORT = 8008
PG_PORT = 5432
SUPERUSER = ("buildsmart_admin", "hosts-test-secret")
REST = ("buildsmart", "rest-secret")
# ttl and loop_wait at Patroni's floors; retry_timeout 5 s: 3 s is safe by the rule too but showed
# no steady gain over hosts (docs/hosts.md)
TIMING = memberconf.Timing()
# a client's connect attempt to a lost host gives up after this (libpq: whole seconds, >= 2)
CONNECT_TIMEOUT_S = 2


def plan_patroni(
    net: netns.Network,
    host: str,
    name: str,
    scope: str,
    base: Path,
    ca: HostCa,
    etcd_hosts: EtcdHosts,
    user: ServiceUser,
    ports: tuple[int, int],
    peers: tuple[str, ...],
    etcd_user: tuple[str, str],
) -> agent.PatroniSpec:
    """Render one Patroni member of ``host`` (config, TLS files); its host's agent starts it as
    the service user. ``ports``: (PostgreSQL, REST API)."""
    address = net.address(host)
    member_dir = base / name
    member_dir.mkdir(parents=True)
    material = ca.host_material(host, address, member_dir / "tls")
    files = memberconf.TlsFiles(str(material.ca), str(material.own.cert), str(material.own.key))
    client = tls.issue(ca.dir, member_dir / "tls", f"{name}-etcd", (), user, server=False)
    etcd_client = memberconf.TlsFiles(str(material.ca), str(client.cert), str(client.key))
    pg = f"{address}:{ports[0]}"
    conf = memberconf.MemberConf(
        scope=scope,
        namespace=NAMESPACE,
        name=name,
        restapi_listen=f"{address}:{ports[1]}",
        restapi_address=f"{address}:{ports[1]}",
        restapi_user=REST[0],
        restapi_password=REST[1],
        etcd_hosts=etcd_hosts.endpoints,
        synchronous="on",
        pg_listen=pg,
        pg_address=pg,
        data_dir=str(member_dir / "data"),
        bin_dir=str(pgbin.bin_dir()),
        pgpass=str(member_dir / "pgpass"),
        superuser=SUPERUSER[0],
        superuser_password=SUPERUSER[1],
        dcs_parameters=dcs_parameters(hosts=True),
        local_parameters={k: memberconf.pg_value(v) for k, v in tls_settings(material).items()},
        hba=tuple(hba_rules(networks=(net.subnet,), use_tls=True)),
        tls=files,
        etcd_tls=True,
        etcd_client=etcd_client,
        etcd_user=etcd_user[0],
        etcd_password=etcd_user[1],
        timing=TIMING,
    )
    config = member_dir / "patroni.yml"
    fd = os.open(config, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(memberconf.render(conf))
    user.chown(member_dir)
    return agent.PatroniSpec(
        name, scope, str(member_dir), pg, f"{NAMESPACE}{scope}/leader", f"{NAMESPACE}{scope}/members/", peers
    )


@dataclass
class HostGroup:
    """One Patroni group over namespace hosts, and how to reach its members."""

    net: netns.Network
    ca: HostCa
    etcd: EtcdHosts
    members: dict[str, str] = field(default_factory=dict)  # member -> host
    specs: dict[str, agent.PatroniSpec] = field(default_factory=dict)
    pg_port: int = PG_PORT
    rest_port: int = REST_PORT

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
            f"host={addrs} port={ports} dbname={dbname} user={SUPERUSER[0]} password={SUPERUSER[1]} "
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


@dataclass(frozen=True)
class Outcome:
    """One fault of the primary's host under the writer."""

    scenario: str
    resumed_s: float  # fault -> first write acknowledged by the new primary
    pause_s: float  # longest gap between acknowledged writes
    acked: int
    lost: tuple[int, ...]  # acknowledged, missing afterwards
    doubled: int  # rows present more than once


@dataclass
class HostCluster:
    """etcd on some hosts, Patroni groups over them, an agent on every host."""

    net: netns.Network
    base: Path
    ca: HostCa
    etcd: EtcdHosts
    groups: dict[str, HostGroup]
    orchestrator_etcd: tuple[str, str] = ("", "")  # the orchestrator's etcd user and password

    def ha_settings(self) -> HaSettings:
        """What DIR/ha.json holds for this cluster (runtime ``hosts``): how the orchestrator reaches
        every member's REST API and etcd, over TLS with the cluster CA and its client certificate."""
        rest = {m: g.rest_port for g in self.groups.values() for m in g.members}
        hosts = {m: self.net.address(h) for g in self.groups.values() for m, h in g.members.items()}
        user, password = self.orchestrator_etcd
        return HaSettings(
            1, "on", 0, 0, rest, REST[0], REST[1], restapi_hosts=hosts, etcd_endpoints=list(self.etcd.endpoints),
            etcd_user=user, etcd_password=password, tls_dir=str(self.ca.dir),
        )  # fmt: skip

    def agent_log(self, host: str) -> str:
        return _tail(self.base / f"agent-{host}.log")


def _tail(path: Path, n: int = 1500) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except FileNotFoundError:
        return "(no log)"


def make_cluster(
    net: netns.Network, base: Path, user: ServiceUser, etcd_on: Sequence[str], layout: dict[str, tuple[str, ...]]
) -> HostCluster:
    """etcd on ``etcd_on``; per group of ``layout`` (group -> hosts of its members, in order) a
    Patroni member on each of those hosts; a host plan and an agent on every host of ``net``, which
    start the members (etcd, then Patroni once the DCS answers its user). Waits until every group
    has a primary and a synchronous standby."""
    ca = HostCa(base, user)
    e = EtcdHosts(net, base, ca, etcd_on, user)
    members = {f"{g}-{i}": (g, h) for g, hosts in layout.items() for i, h in enumerate(hosts)}
    passwords = {m: secrets.token_urlsafe(16) for m in members}
    agents = {h: secrets.token_urlsafe(16) for h in net.hosts}
    groups: dict[str, HostGroup] = {}
    specs: dict[str, list[agent.PatroniSpec]] = {h: [] for h in net.hosts}
    for gi, (g, hosts) in enumerate(layout.items()):
        grp = HostGroup(net, ca, e, pg_port=PG_PORT + gi, rest_port=REST_PORT + gi)
        names = [f"{g}-{i}" for i in range(len(hosts))]
        for name, h in zip(names, hosts, strict=True):
            peers = tuple(n for n in names if n != name)
            spec = plan_patroni(net, h, name, g, base, ca, e, user, (grp.pg_port, grp.rest_port), peers, (name, passwords[name]))
            grp.members[name], grp.specs[name] = h, spec
            specs[h].append(spec)
        groups[g] = grp
    for h in net.hosts:
        # the agent's own etcd user and client certificate (its own member's endpoint first)
        adir = base / f"agent-{h}"
        client = tls.issue(ca.dir, adir, f"agent-{h}", (), server=False)
        secret = adir / "etcd-password"
        fd = os.open(secret, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(agents[h])
        urls = sorted((m.client_url(True) for m in e.members), key=lambda u: u != e.url(h) if h in e.hosts else False)
        dcs = agent.DcsAccess(tuple(urls), str(ca.ca), str(client.cert), str(client.key), f"agent-{h}", str(secret))
        agent.write_plan(base, agent.HostPlan(h, user.name, dcs, e.specs.get(h), tuple(specs[h])))
        net.start(h, procs.python_module(agent.MARKER, str(base), h), base / f"agent-{h}.log")
    orchestrator_etcd = ("buildsmart", secrets.token_urlsafe(16))
    cl = HostCluster(net, base, ca, e, groups, orchestrator_etcd)
    try:
        e.wait_healthy()
    except AssertionError as exc:
        raise AssertionError(f"{exc}; agents: {[cl.agent_log(h) for h in e.hosts]}") from exc
    # etcd authentication: each Patroni member and each agent a user confined to the cluster's prefix
    users = {m: (passwords[m], NAMESPACE) for m in members} | {f"agent-{h}": (agents[h], NAMESPACE) for h in net.hosts}
    users[orchestrator_etcd[0]] = (orchestrator_etcd[1], NAMESPACE)
    etcdcluster.enable_auth(e.client(), secrets.token_urlsafe(16), users)
    for g, grp in groups.items():
        grp.wait(f"{g} to elect a primary", lambda grp=grp: _primaries(grp) == 1, 120)
        grp.wait(f"{g} to have a synchronous standby", lambda grp=grp: _synchronous(grp), 120)
    return cl


def _synchronous(group: HostGroup) -> bool:
    return any(group.rest(m, "/sync")[0] == 200 for m in group.members)


def _primaries(group: HostGroup) -> int:
    return sum(group.rest(m, "/primary")[0] == 200 for m in group.members)


def make_group(net: netns.Network, base: Path, user: ServiceUser, hosts: Sequence[str]) -> HostGroup:
    """etcd on every host of ``hosts``; group w1 with members on the first two (either may lead)."""
    return make_cluster(net, base, user, hosts, {"w1": (hosts[0], hosts[1])}).groups["w1"]


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
