"""The planner of a multi-host cluster: hosts spec (runtime/hostspec.py) -> frozen plan.

Why pure: every decision about *where* things run (member names ``<group>-<i>``, ports, which
members and which etcd member each host runs, the order in which each host tries the etcd
endpoints, each member's peers) is made here from the spec alone, without a file or a server, so
it is unit-tested (tests/test_hostplan.py) and ``buildsmart host plan`` (runtime/hostfiles.py, which
writes the files) and ``buildsmart host init`` (runtime/hostinit.py) see the same plan: both re-plan
from the same spec, and the same spec always gives the same plan.

Rules (each fault a ConfigError ``FILE: KEY: ...``):
* ports: a group's PostgreSQL port is 5432 + i and its REST API port 8008 + i, i = the group's
  position in the spec (as the tests' harness always did), unless the group sets ``port`` /
  ``rest_port``; no two services on one host share a port;
* etcd: 3 or more members on distinct hosts (an even count gains nothing over one fewer: a
  warning); 2 is refused (losing either stops the DCS, worse than one); 1 is allowed with a warning
  (a trial: the DCS does not survive that host);
* a group's members are on different hosts (a primary and its synchronous replica must not be
  lost together); a group of one member is allowed with a warning (no failover);
* every host's address is inside ``network.allow`` (members replicate from each other);
* a coordinator group and at least one worker make a BuildSmartDB cluster; without them
  ``host init`` only starts the groups (a warning says so).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from ipaddress import ip_address, ip_network

from orchestrator.runtime.hostspec import GroupSpec, HostsSpec
from orchestrator.topology import COORDINATOR, WORKER, Group, Layout, Member, Topology

PG_PORT = 5432
REST_PORT = 8008
ORCHESTRATOR_ETCD_USER = "buildsmart"


@dataclass(frozen=True)
class EtcdPlan:
    name: str  # etcd-<host>
    host: str
    address: str
    client_port: int
    peer_port: int

    @property
    def endpoint(self) -> str:
        return f"{self.address}:{self.client_port}"

    @property
    def url(self) -> str:
        return f"https://{self.endpoint}"


@dataclass(frozen=True)
class MemberPlan:
    name: str  # <group>-<i>
    group: str
    host: str
    address: str
    pg_port: int
    rest_port: int
    peers: tuple[str, ...]  # the group's other members (all on other hosts)

    @property
    def pg_address(self) -> str:
        return f"{self.address}:{self.pg_port}"

    @property
    def rest_address(self) -> str:
        return f"{self.address}:{self.rest_port}"


@dataclass(frozen=True)
class GroupPlan:
    name: str
    role: str  # COORDINATOR or WORKER
    members: tuple[MemberPlan, ...]
    pg_port: int
    rest_port: int
    dbname: str


@dataclass(frozen=True)
class HostView:
    """What one host runs, and how its agent reaches etcd (its own member first)."""

    name: str
    address: str
    etcd: EtcdPlan | None
    members: tuple[MemberPlan, ...]
    etcd_urls: tuple[str, ...]

    @property
    def agent_user(self) -> str:
        return f"agent-{self.name}"


@dataclass(frozen=True)
class ClusterPlan:
    spec: HostsSpec
    etcd: tuple[EtcdPlan, ...]
    groups: tuple[GroupPlan, ...]
    hosts: tuple[HostView, ...]
    warnings: tuple[str, ...]

    @property
    def namespace(self) -> str:
        """Patroni's etcd namespace (runtime/patroni.py namespace: the cluster's name)."""
        return f"/{self.spec.cluster}/"

    @property
    def members(self) -> tuple[MemberPlan, ...]:
        return tuple(m for g in self.groups for m in g.members)

    @property
    def etcd_users(self) -> tuple[str, ...]:
        """Every etcd user of the cluster: each Patroni member, each host's agent, the orchestrator;
        each confined to the cluster's prefix."""
        return (*(m.name for m in self.members), *(h.agent_user for h in self.hosts), ORCHESTRATOR_ETCD_USER)

    @property
    def is_cluster(self) -> bool:
        """A coordinator and at least one worker: ``host init`` sets up BuildSmartDB on them."""
        roles = [g.role for g in self.groups]
        return COORDINATOR in roles and WORKER in roles

    def host(self, name: str) -> HostView:
        return next(h for h in self.hosts if h.name == name)

    def group(self, name: str) -> GroupPlan:
        return next(g for g in self.groups if g.name == name)

    def topology(self) -> Topology:
        """The topology ``init_remote`` records (runtime ``hosts``: the orchestrator starts nothing)."""
        groups = tuple(
            Group(g.name, g.role, tuple(Member(m.name, m.address, m.pg_port) for m in g.members), g.dbname, managed=False)
            for g in self.groups
        )
        return Topology(
            self.spec.cluster,
            groups,
            Layout(self.spec.split_points, self.spec.time_interval),
            service_user=self.spec.service_user,
            runtime="hosts",
        )


def plan(spec: HostsSpec) -> ClusterPlan:
    """The plan of ``spec``, or a ConfigError naming the spec's key that is wrong."""
    addresses = dict(spec.hosts)
    warnings: list[str] = []
    _check_addresses(spec)

    def known(key: str, host: str) -> str:
        if host not in addresses:
            raise spec.error(key, f"unknown host {host!r} (the [hosts] table names {', '.join(addresses)})")
        return host

    etcd_hosts = [known(f"etcd.hosts[{i}]", h) for i, h in enumerate(spec.etcd)]
    for i, h in enumerate(etcd_hosts):
        if h in etcd_hosts[:i]:
            raise spec.error(f"etcd.hosts[{i}]", f"host {h!r} is named twice: one etcd member per host")
    n = len(etcd_hosts)
    if n == 2:
        raise spec.error(
            "etcd.hosts", "2 members: losing either host stops the DCS (no majority is left); name 3 hosts (or 1 for a trial)"
        )
    if n == 1:
        warnings.append(
            f"etcd runs on {etcd_hosts[0]} only: the DCS (and every failover) does not survive that host; "
            "name 3 hosts in etcd.hosts for a cluster that must"
        )
    elif n % 2 == 0:
        warnings.append(f"etcd on {n} hosts tolerates the loss of as many as {n - 1} would; an odd count is the rule")
    etcd = tuple(EtcdPlan(f"etcd-{h}", h, addresses[h], spec.etcd_client_port, spec.etcd_peer_port) for h in etcd_hosts)

    groups = tuple(_group(spec, i, g, known, warnings) for i, g in enumerate(spec.groups))
    _check_ports(spec, etcd, groups)
    _check_network(spec)

    roles = [g.role for g in groups]
    if COORDINATOR not in roles or WORKER not in roles:
        missing = "a [groups.coordinator] table" if COORDINATOR not in roles else "a worker group"
        warnings.append(f"no BuildSmartDB cluster without {missing}: `host init` starts the groups and sets up nothing else")

    hosts = []
    for name, address in spec.hosts:
        mine = next((e for e in etcd if e.host == name), None)
        # this host's own etcd member first: a cut-off link elsewhere does not delay its agent
        urls = tuple(e.url for e in sorted(etcd, key=lambda e: e.host != name))
        members = tuple(m for g in groups for m in g.members if m.host == name)
        if mine is None and not members:
            warnings.append(f"host {name} runs nothing (no etcd member, no group member)")
        hosts.append(HostView(name, address, mine, members, urls))
    return ClusterPlan(spec, etcd, groups, tuple(hosts), tuple(warnings))


def _group(spec: HostsSpec, i: int, g: GroupSpec, known: Callable[[str, str], str], warnings: list[str]) -> GroupPlan:
    key = f"groups.{g.name}.hosts"
    hosts = [known(f"{key}[{j}]", h) for j, h in enumerate(g.hosts)]
    for j, h in enumerate(hosts):
        if h in hosts[:j]:
            raise spec.error(
                f"{key}[{j}]",
                f"host {h!r} already holds {g.name}-{hosts.index(h)}: a group's members must be on different hosts "
                "(a primary and its synchronous replica must not be lost together)",
            )
    if len(hosts) == 1:
        warnings.append(f"group {g.name} has one member: no replica, no failover when {hosts[0]} is lost")
    pg_port = g.port if g.port is not None else PG_PORT + i
    rest_port = g.rest_port if g.rest_port is not None else REST_PORT + i
    addresses = dict(spec.hosts)
    names = [f"{g.name}-{j}" for j in range(len(hosts))]
    members = tuple(
        MemberPlan(name, g.name, h, addresses[h], pg_port, rest_port, tuple(n for n in names if n != name))
        for name, h in zip(names, hosts, strict=True)
    )
    role = COORDINATOR if g.name == COORDINATOR else WORKER
    return GroupPlan(g.name, role, members, pg_port, rest_port, g.dbname)


def _check_addresses(spec: HostsSpec) -> None:
    seen: dict[str, str] = {}
    for name, address in spec.hosts:
        if address in seen:
            raise spec.error(f"hosts.{name}", f"address {address} is also host {seen[address]}'s")
        seen[address] = name


def _check_ports(spec: HostsSpec, etcd: tuple[EtcdPlan, ...], groups: tuple[GroupPlan, ...]) -> None:
    """No two services of one host on one port."""
    used: dict[tuple[str, int], str] = {}

    def take(host: str, port: int, what: str, key: str) -> None:
        other = used.get((host, port))
        if other is not None:
            raise spec.error(key, f"port {port} on host {host} is taken twice: {other} and {what}")
        used[(host, port)] = what

    if spec.etcd_client_port == spec.etcd_peer_port:
        raise spec.error("etcd.peer_port", f"{spec.etcd_peer_port} is also the client port")
    for e in etcd:
        take(e.host, e.client_port, f"{e.name} (clients)", "etcd.client_port")
        take(e.host, e.peer_port, f"{e.name} (peers)", "etcd.peer_port")
    for g in groups:
        for m in g.members:
            take(m.host, m.pg_port, f"{m.name} (PostgreSQL)", f"groups.{g.name}.port")
            take(m.host, m.rest_port, f"{m.name} (Patroni REST API)", f"groups.{g.name}.rest_port")


def _check_network(spec: HostsSpec) -> None:
    """Members connect to each other (replication, pg_rewind, the coordinator's FDW servers), so
    pg_hba must admit every host of the cluster."""
    networks = [ip_network(n) for n in spec.allow]
    for name, address in spec.hosts:
        ip = ip_address(address)
        if not any(ip.version == n.version and ip in n for n in networks):
            raise spec.error(
                "network.allow",
                f"host {name} ({address}) is in none of {', '.join(spec.allow)}: its members could not replicate "
                "or be reached by the coordinator",
            )
