"""The local failover supervisor: watches the processes the local runtime started and acts long
before Patroni's leader key would expire (ttl cannot go below 20 s).

Each tick reads a frozen snapshot per group (who holds the leader key, which Patroni and postmaster
PIDs live) and ``decide`` returns one Action whose ``reason`` is logged:

* the leader's Patroni is dead but its postmaster runs -> fence: ``pg_ctl stop -m immediate``, so the
  orphaned primary cannot acknowledge a commit once a replica is promoted (no split brain);
* the leader's Patroni and postmaster are dead and a peer's Patroni lives -> release the leader key
  (an etcd transaction that deletes it only if it still names the dead member); the synchronous
  standby's Patroni sees the key vanish and promotes within a loop;
* a member's Patroni is dead (and it no longer holds, or cannot win, the leader key) -> restart it;
  it rejoins as a replica, through pg_rewind when its timeline diverged.

Run as ``python -I -m orchestrator.runtime.supervisor DIR`` from ``/``; ``start_daemon``/``stop_daemon`` manage
it by verified identity (runtime/identity.py). The per-host agent (runtime/agent.py) runs the same
``decide`` over what its host can know of each group.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from orchestrator import topology
from orchestrator.exceptions import BuildSmartError
from orchestrator.osuser import ServiceUser, service_user
from orchestrator.runtime import etcd, hasettings, identity, patroni, procs
from orchestrator.runtime.hasettings import HaSettings
from orchestrator.runtime.layout import local_members
from orchestrator.runtime.patroni import PatroniMember
from orchestrator.topology import Topology

log = logging.getLogger(__name__)

TICK_S = 0.2
RESTART_BACKOFF_S = 3.0
# A dead ex-leader is restarted only once another member leads, or after this long without one.
LEADERLESS_RESTART_S = 30.0
PID_FILE = "supervisor.pid"
LOG_FILE = "supervisor.log"
# What the running supervisor watches, rewritten at start and after every reload, so that
# `node add`/`node remove` can wait until it picked a group up or let it go.
STATE_FILE = "supervisor.state.json"
MARKER = "orchestrator.runtime.supervisor"


@dataclass(frozen=True)
class MemberView:
    name: str
    patroni_alive: bool
    postmaster_pid: int | None
    dead_for_s: float  # how long its Patroni has been seen dead (0 when alive)
    since_restart_s: float  # since the supervisor last started its Patroni (inf if never)


@dataclass(frozen=True)
class GroupSnapshot:
    group: str
    leader: str | None  # member named by the leader key
    members: tuple[MemberView, ...]

    def member(self, name: str) -> MemberView | None:
        return next((m for m in self.members if m.name == name), None)


@dataclass(frozen=True)
class Action:
    kind: str  # "none" | "fence" | "release_leader" | "restart"
    member: str | None
    reason: str


def decide(snap: GroupSnapshot) -> Action:
    leader = snap.member(snap.leader) if snap.leader else None
    healthy_peers = [m.name for m in snap.members if m.patroni_alive and m.name != snap.leader]
    if leader is not None and not leader.patroni_alive:
        if leader.postmaster_pid is not None:
            return Action(
                "fence",
                leader.name,
                f"{snap.group}: leader {leader.name} lost its Patroni while postgres (pid {leader.postmaster_pid}) runs; "
                "stopping postgres immediately so it cannot acknowledge commits after a replica is promoted",
            )
        if healthy_peers:
            return Action(
                "release_leader",
                leader.name,
                f"{snap.group}: leader {leader.name} has neither Patroni nor postgres; releasing its leader key so "
                f"{', '.join(healthy_peers)} can take over now instead of after the 20 s ttl",
            )
    for m in snap.members:
        if m.patroni_alive or m.since_restart_s < RESTART_BACKOFF_S:
            continue
        is_leader = m.name == snap.leader
        if snap.leader is not None and not is_leader:
            reason = f"{snap.group}: Patroni of {m.name} is dead and {snap.leader} leads; restarting it to rejoin"
            return Action("restart", m.name, reason)
        if is_leader and not healthy_peers:
            return Action("restart", m.name, f"{snap.group}: leader {m.name} is down and no peer can take over; restarting it")
        if snap.leader is None and (not healthy_peers or m.dead_for_s >= LEADERLESS_RESTART_S):
            return Action("restart", m.name, f"{snap.group}: no leader and Patroni of {m.name} is dead; restarting it")
    return Action("none", None, f"{snap.group}: nothing to do")


class Supervisor:
    def __init__(self, directory: Path, topo: Topology, ha: HaSettings, members: list[PatroniMember], user: ServiceUser) -> None:
        self.directory = directory
        self.topo = topo
        self.ha = ha
        self.members = {pm.name: pm for pm in members}
        self.user = user
        self.dead_since: dict[str, float] = {}
        self.restarted_at: dict[str, float] = {}
        self.stopping = False
        self._etcd: etcd.Client | None = None

    def etcd_client(self) -> etcd.Client:
        """One client (and TLS context) per supervisor, not one per tick: building the context
        reads the CA and our certificate from disk."""
        if self._etcd is None:
            self._etcd = etcd.Client.of(self.ha)
        return self._etcd

    def snapshot(self, group_name: str) -> GroupSnapshot:
        """What `decide` needs. The leader key is read from etcd only when a member's Patroni is
        down: with every Patroni alive `decide` returns "none" whoever leads, and a steady-state
        tick then costs a few /proc reads instead of an HTTPS request per group five times a second
        (which took most of a core's 8% on a 2-core machine)."""
        group = self.topo.group(group_name)
        now = time.monotonic()
        views = []
        for m in group.members:
            pm = self.members[m.name]
            alive = pm.patroni_pid() is not None
            if alive:
                self.dead_since.pop(m.name, None)
            else:
                self.dead_since.setdefault(m.name, now)
            views.append(
                MemberView(
                    m.name,
                    alive,
                    pm.postmaster_pid(),
                    0.0 if alive else now - self.dead_since[m.name],
                    now - self.restarted_at.get(m.name, float("-inf")),
                )
            )
        leader = None
        if not all(v.patroni_alive for v in views):
            leader = etcd.get(self.etcd_client(), patroni.leader_key(self.topo, group))
        return GroupSnapshot(group.name, leader, tuple(views))

    def act(self, snap: GroupSnapshot, action: Action) -> None:
        if action.kind == "none" or action.member is None:
            return
        log.info("%s: %s", action.kind, action.reason)
        pm = self.members[action.member]
        if action.kind == "fence":
            patroni.fence(pm, self.user)
        elif action.kind == "release_leader":
            deleted = etcd.delete_if_value(etcd.Client.of(self.ha), patroni.leader_key(self.topo, pm.group), pm.name)
            log.info("leader key of %s %s", pm.group.name, "released" if deleted else "had already changed hands")
        elif action.kind == "restart":
            self.restarted_at[pm.name] = time.monotonic()
            patroni.start(pm, self.user)

    def supervised(self, group_name: str) -> bool:
        """Groups whose members all run under Patroni (a group added later without Patroni is left alone)."""
        group = self.topo.group(group_name)
        return group.managed and all(m.name in self.ha.restapi_ports and m.name in self.members for m in group.members)

    def reload(self) -> None:
        """Re-read topology and HA settings (nodes added or removed while we run)."""
        self.topo = topology.load(self.directory)
        self.ha = hasettings.load(self.directory)
        self._etcd = None
        self.members = {lm.name: PatroniMember(g, lm) for g, lm in local_members(self.directory, self.topo, self.user)}
        log.info("reloaded topology: supervising %s", ", ".join(g.name for g in self.topo.groups if self.supervised(g.name)))
        self.publish()

    def supervised_members(self) -> list[str]:
        return sorted(m.name for g in self.topo.groups if self.supervised(g.name) for m in g.members)

    def publish(self) -> None:
        """Write STATE_FILE: our PID and the members we watch from now on."""
        path = self.directory / STATE_FILE
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({"pid": os.getpid(), "members": self.supervised_members()}) + "\n")
        os.replace(tmp, path)

    def tick(self) -> None:
        for group in self.topo.groups:
            if not self.supervised(group.name):
                continue
            try:
                snap = self.snapshot(group.name)
                self.act(snap, decide(snap))
            except BuildSmartError as exc:
                log.warning("%s: supervision step failed: %s", group.name, exc)

    def run(self) -> None:
        log.info("supervising %d members of %s", len(self.members), self.directory)
        seen = _mtime(self.directory)
        self.publish()
        while not self.stopping:
            if not topology.exists(self.directory):
                log.info("%s is gone; supervisor exits", self.directory)
                return
            now = _mtime(self.directory)
            if now != seen:
                seen = now
                try:
                    self.reload()
                except BuildSmartError as exc:
                    log.warning("cannot reload the topology (%s); keeping the previous one", exc)
            self.tick()
            time.sleep(TICK_S)
        log.info("supervisor stopped")


def _mtime(directory: Path) -> tuple[float, float]:
    """Change stamps of topology.json and ha.json (0 when missing)."""

    def one(name: str) -> float:
        try:
            return (directory / name).stat().st_mtime
        except FileNotFoundError:
            return 0.0

    return one(topology.TOPOLOGY_FILE), one(hasettings.HA_FILE)


# ---------------------------------------------------------------- daemon management


def _running(directory: Path) -> identity.Verified | None:
    """The supervisor of DIR, verified: our interpreter, ``-m orchestrator.runtime.supervisor DIR``
    and the start time recorded with its PID."""
    return procs.module_daemon(directory / PID_FILE, MARKER, directory, "failover supervisor")


def start_daemon(directory: Path) -> int:
    """Start the supervisor for DIR unless it runs (isolated Python, from /); returns its PID."""
    v = _running(directory)
    if v is not None:
        return v.pid
    pid = procs.spawn(procs.python_module(MARKER, str(directory)), directory / PID_FILE, directory / LOG_FILE)
    log.info("started failover supervisor for %s (pid %d)", directory, pid)
    return pid


def stop_daemon(directory: Path) -> bool:
    return procs.stop(_running(directory), 10)


def supervising(directory: Path) -> set[str] | None:
    """Members the running supervisor of DIR watches (None when none runs)."""
    v = _running(directory)
    if v is None:
        return None
    try:
        state = json.loads((directory / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return set()
    if state.get("pid") != v.pid:
        return set()  # written by an earlier supervisor; the current one has not published yet
    return set(state.get("members", []))


def wait_supervising(directory: Path, members: set[str], present: bool, timeout_s: float = 15.0) -> bool | None:
    """Wait until the running supervisor watches all of ``members`` (``present``) or none of them.
    True when it does, False on timeout, None when no supervisor runs."""
    deadline = time.monotonic() + timeout_s
    while True:
        watched = supervising(directory)
        if watched is None:
            return None
        if (members <= watched) if present else not (members & watched):
            return True
        if time.monotonic() > deadline:
            log.warning("supervisor of %s: %s %s after %.0f s", directory, sorted(members),
                        "not yet watched" if present else "still watched", timeout_s)  # fmt: skip
            return False
        time.sleep(TICK_S / 2)


def main(argv: list[str]) -> int:
    directory = Path(argv[0]).resolve()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    topo = topology.load(directory)
    user = service_user(topo.service_user)
    ha = hasettings.load(directory)
    members = [PatroniMember(g, lm) for g, lm in local_members(directory, topo, user)]
    sup = Supervisor(directory, topo, ha, members, user)

    def on_term(_signum: int, _frame: FrameType | None) -> None:
        sup.stopping = True

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    sup.run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
