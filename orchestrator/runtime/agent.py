"""The per-host agent: one process per host that starts and watches the members the topology
places on that host (its etcd member, its Patroni members) and fails a crashed primary over within
a second, the way the local supervisor does on one machine.

Why a second process and not Patroni alone: when a primary's PostgreSQL and Patroni die (kill -9,
OOM), nothing releases its leader key, and the replica on another host waits for the lease (ttl,
20 s at least). The agent runs on the primary's host, so it can tell *for certain* that the primary
is gone: its Patroni and its postmaster fail the process-identity check (runtime/identity.py).
It then deletes the leader key in one etcd transaction that succeeds only while the key still
names the dead member; the synchronous standby's Patroni watches that key and promotes at once.

Decisions are the supervisor's pure ``decide`` (runtime/supervisor.py), not a second copy. What
differs is the snapshot: the agent sees processes of its own host only. A member on another host
is seen through etcd alone: a non-leader is alive while its Patroni member key (held by Patroni's
lease) exists; a remote leader is always treated as alive (only its own host, or the lease, may
decide it is gone), and a remote member is never restarted from here (``since_restart_s`` 0).
:func:`host_snapshot` builds that view and is unit-tested without servers.

The host plan (``DIR/host-NAME.json``, :class:`HostPlan`) names what runs on the host; it is
written by ``buildsmart host plan`` (runtime/hostfiles.py), for the tests too, and shipped to the
host with its files. Run in the foreground as ``python -I -m
orchestrator.runtime.agent DIR NAME`` (systemd: ``buildsmart host unit``) or as a daemon with
``buildsmart host up --dir DIR --host NAME``.
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import FrameType

from orchestrator.exceptions import BuildSmartError, ConfigError
from orchestrator.osuser import ServiceUser, service_user
from orchestrator.runtime import etcd, identity, patroni, procs, tls
from orchestrator.runtime.local import LocalMember
from orchestrator.runtime.patroni import PatroniMember
from orchestrator.runtime.supervisor import RESTART_BACKOFF_S, Action, GroupSnapshot, MemberView, decide
from orchestrator.topology import Group, Member

log = logging.getLogger(__name__)

MARKER = "orchestrator.runtime.agent"
# A tick reads /proc only while the host's Patroni members live (no DCS request), so it can be short:
# the detection of a dead primary is part of the 1 s failover budget.
TICK_S = 0.1
PID_FILE = "agent-{host}.pid"
LOG_FILE = "agent-{host}.log"
PLAN_FILE = "host-{host}.json"


@dataclass(frozen=True)
class PatroniSpec:
    """A Patroni member on this host; its files live in ``directory`` (patroni.yml, data/, pid, log)."""

    name: str
    group: str
    directory: str
    address: str  # host:port of its PostgreSQL, for messages
    leader_key: str  # /namespace/scope/leader
    members_prefix: str  # /namespace/scope/members/
    peers: tuple[str, ...]  # the group's members on other hosts


@dataclass(frozen=True)
class EtcdSpec:
    """This host's etcd member: its command line (runtime/etcdcluster.py member_argv)."""

    name: str
    directory: str
    data_dir: str
    argv: tuple[str, ...]


@dataclass(frozen=True)
class DcsAccess:
    """How the agent reaches etcd: endpoints, the cluster CA, a client certificate, an etcd user
    confined to the cluster's prefix (password in a 0600 file, never in the plan)."""

    urls: tuple[str, ...]
    ca: str
    cert: str
    key: str
    user: str | None = None
    password_file: str | None = None

    def client(self) -> etcd.Client:
        password = Path(self.password_file).read_text().strip() if self.password_file else None
        context = tls.client_context(Path(self.ca), tls.CertPaths(Path(self.cert), Path(self.key)))
        return etcd.Client(self.urls, context, self.user, password)


@dataclass(frozen=True)
class HostPlan:
    host: str
    service_user: str
    dcs: DcsAccess
    etcd: EtcdSpec | None
    patroni: tuple[PatroniSpec, ...]


def plan_path(directory: Path, host: str) -> Path:
    return directory / PLAN_FILE.format(host=host)


def write_plan(directory: Path, plan: HostPlan) -> Path:
    """Write the plan of one host atomically (0644: it holds paths and names, no secret)."""
    path = plan_path(directory, plan.host)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(asdict(plan), indent=2) + "\n")
    tmp.replace(path)
    return path


def load_plan(directory: Path, host: str) -> HostPlan:
    path = plan_path(directory, host)
    try:
        raw = json.loads(path.read_text())
        etcd_raw = raw.get("etcd")
        return HostPlan(
            host=raw["host"],
            service_user=raw["service_user"],
            dcs=DcsAccess(**{**raw["dcs"], "urls": tuple(raw["dcs"]["urls"])}),
            etcd=EtcdSpec(**{**etcd_raw, "argv": tuple(etcd_raw["argv"])}) if etcd_raw else None,
            patroni=tuple(PatroniSpec(**{**p, "peers": tuple(p["peers"])}) for p in raw["patroni"]),
        )
    except FileNotFoundError as exc:
        raise ConfigError(f"{path}: no plan for host {host!r} (write it first: docs/hosts.md)") from exc
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path}: not a host plan: {exc}") from exc


# ---------------------------------------------------------------- the decision's input (pure)


def host_snapshot(
    group: str,
    leader: str | None,
    local: tuple[MemberView, ...],
    peers: tuple[str, ...],
    peers_registered: frozenset[str],
) -> GroupSnapshot:
    """The group as this host can know it: its own members from process identity (``local``);
    members on other hosts from etcd only. A remote leader counts as alive (its own host's agent
    or the lease decides otherwise); a remote non-leader is alive while its Patroni member key
    exists; a remote member looks freshly restarted, so ``decide`` never restarts it from here."""
    remote = tuple(
        MemberView(p, p == leader or p in peers_registered, None, 0.0, 0.0)
        for p in peers
    )
    return GroupSnapshot(group, leader, local + remote)


def needs_dcs(local: MemberView) -> bool:
    """Whether this host's member gives ``decide`` anything to do: with its Patroni alive it is
    neither fenced, released nor restarted, and members of other hosts are never acted on here."""
    return not local.patroni_alive


def acts_here(action: Action, local_names: frozenset[str]) -> bool:
    """Only members of this host are fenced, released or restarted by this host's agent."""
    return action.kind != "none" and action.member in local_names


# ---------------------------------------------------------------- the agent


class Agent:
    def __init__(self, plan: HostPlan, user: ServiceUser) -> None:
        self.plan = plan
        self.user = user
        self.members = {p.name: (p, patroni_member(p)) for p in plan.patroni}
        self.dcs = plan.dcs.client()
        self.dead_since: dict[str, float] = {}
        self.restarted_at: dict[str, float] = {}
        self.stopping = False

    # etcd member ---------------------------------------------------------------

    def etcd_running(self) -> identity.Verified | None:
        e = self.plan.etcd
        if e is None:
            return None
        return procs.running(Path(e.directory) / "etcd.pid", e.argv[0], [("--data-dir", e.data_dir)], f"etcd {e.name}")

    def keep_etcd(self) -> None:
        e = self.plan.etcd
        if e is None or self.etcd_running() is not None:
            return
        now = time.monotonic()
        if now - self.restarted_at.get(e.name, float("-inf")) < RESTART_BACKOFF_S:
            return
        self.restarted_at[e.name] = now
        directory = Path(e.directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.user.chown(directory)
        pid = procs.spawn(e.argv, directory / "etcd.pid", directory / "etcd.log", self.user)
        log.info("%s: etcd member %s was not running; started it (pid %d)", self.plan.host, e.name, pid)

    # Patroni members -----------------------------------------------------------

    def local_view(self, spec: PatroniSpec, pm: PatroniMember, now: float) -> MemberView:
        alive = pm.patroni() is not None
        if alive:
            self.dead_since.pop(spec.name, None)
        else:
            self.dead_since.setdefault(spec.name, now)
        return MemberView(
            spec.name,
            alive,
            pm.postmaster_pid(),
            0.0 if alive else now - self.dead_since[spec.name],
            now - self.restarted_at.get(spec.name, float("-inf")),
        )

    def snapshot(self, spec: PatroniSpec, pm: PatroniMember) -> GroupSnapshot | None:
        """The group as this host sees it; None while the member's own Patroni lives, because
        ``decide`` acts on a member of this host only when its Patroni is dead (see
        :func:`needs_dcs`), so a healthy host sends etcd nothing."""
        view = self.local_view(spec, pm, time.monotonic())
        if not needs_dcs(view):
            return None
        leader = etcd.get(self.dcs, spec.leader_key)
        registered = frozenset(p for p in spec.peers if etcd.get(self.dcs, spec.members_prefix + p) is not None)
        return host_snapshot(spec.group, leader, (view,), spec.peers, registered)

    def act(self, spec: PatroniSpec, pm: PatroniMember, action: Action) -> None:
        if not acts_here(action, frozenset({spec.name})):
            return
        log.info("%s: %s: %s", self.plan.host, action.kind, action.reason)
        if action.kind == "fence":
            patroni.fence(pm, self.user)
        elif action.kind == "release_leader":
            released = etcd.delete_if_value(self.dcs, spec.leader_key, spec.name)
            outcome = "released" if released else "had already changed hands"
            log.info("%s: leader key of %s %s", self.plan.host, spec.group, outcome)
        elif action.kind == "restart":
            self.restarted_at[spec.name] = time.monotonic()
            patroni.start(pm, self.user)

    def tick(self) -> None:
        try:
            self.keep_etcd()
        except (BuildSmartError, OSError) as exc:
            log.warning("%s: cannot start its etcd member: %s", self.plan.host, exc)
        for spec, pm in self.members.values():
            try:
                snap = self.snapshot(spec, pm)  # no DCS answer: decide nothing (the lease rules)
                if snap is not None:
                    self.act(spec, pm, decide(snap))
            except BuildSmartError as exc:
                log.warning("%s: %s: supervision step failed: %s", self.plan.host, spec.group, exc)

    def run(self) -> None:
        log.info(
            "agent of host %s: etcd member %s, Patroni members %s",
            self.plan.host,
            self.plan.etcd.name if self.plan.etcd else "none",
            ", ".join(self.members) or "none",
        )
        while not self.stopping:
            self.tick()
            time.sleep(TICK_S)
        log.info("agent of host %s stopped (its members keep running)", self.plan.host)


def patroni_member(spec: PatroniSpec) -> PatroniMember:
    """The Patroni member in the local runtime's shape (DIR/<member>/{patroni.yml,data,...}), so
    start, fence and identity checks are the same functions the local runtime uses."""
    host, _, port = spec.address.rpartition(":")
    member = Member(spec.name, host, int(port))
    base = Path(spec.directory)
    return PatroniMember(Group(spec.group, "worker", (member,)), LocalMember(member, base / "data", base / "postgres.log"))


# ---------------------------------------------------------------- daemon management and units


def running(directory: Path, host: str) -> identity.Verified | None:
    return procs.running(
        directory / PID_FILE.format(host=host), sys.executable, [("-m", MARKER), (str(directory), host)], f"agent of {host}"
    )


def start_daemon(directory: Path, host: str) -> int:
    """Start the agent of ``host`` for DIR unless it runs (isolated Python, from /); its PID."""
    load_plan(directory, host)  # refuse early, with the file's name, when there is no valid plan
    v = running(directory, host)
    if v is not None:
        return v.pid
    argv = procs.python_module(MARKER, str(directory), host)
    pid = procs.spawn(argv, directory / PID_FILE.format(host=host), directory / LOG_FILE.format(host=host))
    log.info("started the agent of host %s (pid %d)", host, pid)
    return pid


def stop_daemon(directory: Path, host: str) -> bool:
    """Stop the agent (verified); the members it started keep running (stop them with their units)."""
    return procs.stop(running(directory, host), 10)


def systemd_unit(directory: Path, host: str, python: str | None = None) -> str:
    """The unit a real host runs the agent under (``buildsmart host unit``). The agent itself
    starts the members as the service user; it restarts after a crash of its own."""
    argv = " ".join(procs.python_module(MARKER, str(directory), host, python=python))
    return (
        "[Unit]\n"
        f"Description=BuildSmartDB host agent ({host}): etcd and Patroni members, fast failover\n"
        "After=network-online.target\n"
        "Wants=network-online.target\n\n"
        "[Service]\n"
        "Type=simple\n"
        f"ExecStart={argv}\n"
        "WorkingDirectory=/\n"
        "Restart=always\n"
        "RestartSec=1\n"
        # stopping the agent must not stop the members it started (they are not its cgroup's job)
        "KillMode=process\n\n"
        "[Install]\n"
        "WantedBy=multi-user.target\n"
    )


def main(argv: list[str]) -> int:
    directory, host = Path(argv[0]).resolve(), argv[1]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    plan = load_plan(directory, host)
    agent = Agent(plan, service_user(plan.service_user))

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        agent.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    agent.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
