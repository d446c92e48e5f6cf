"""Patroni groups of the local runtime: start and stop every group with its etcd, wait for
leaders and synchronous standbys, and report members (role, timeline, lag, sync state)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

from orchestrator.exceptions import BuildSmartError, ClusterStateError, NodeError
from orchestrator.osuser import ServiceUser
from orchestrator.runtime import etcd, patroni
from orchestrator.runtime.hasettings import HaSettings
from orchestrator.runtime.local import LocalMember
from orchestrator.runtime.patroni import PatroniMember
from orchestrator.runtime.ports import free_port
from orchestrator.topology import Credentials, Group, Topology

log = logging.getLogger(__name__)

Report = Callable[[str], None]
LEADER_TIMEOUT_S = 90.0
REPLICA_TIMEOUT_S = 120.0


def new_settings(topo: Topology, replicas: int, synchronous: str, taken: Sequence[int] = ()) -> HaSettings:
    used = {m.port for g in topo.groups for m in g.members} | set(taken)

    def port() -> int:
        p = free_port(exclude=frozenset(used))
        used.add(p)
        return p

    rest = {m.name: port() for g in topo.groups if g.managed for m in g.members}
    return HaSettings(replicas, synchronous, port(), port(), rest)


def local_etcd(root: Path, ha: HaSettings) -> etcd.LocalEtcd:
    return etcd.LocalEtcd(root / "etcd", ha.etcd_client_port, ha.etcd_peer_port)


def as_patroni(members: Sequence[tuple[Group, LocalMember]]) -> list[PatroniMember]:
    return [PatroniMember(g, lm) for g, lm in members]


def leader_of(topo: Topology, group: Group, ha: HaSettings) -> str | None:
    """The member holding the group's leader key (None when no member holds it)."""
    return etcd.get(etcd.Client.of(ha), patroni.leader_key(topo, group))


def member_state(ha: HaSettings, member: str) -> dict[str, Any]:
    try:
        data = patroni.rest(ha, member, "/patroni")
    except NodeError:
        return {}
    return data if isinstance(data, dict) else {}


def _wait(what: str, timeout_s: float, check: Callable[[], bool]) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except BuildSmartError as exc:
            log.debug("waiting for %s: %s", what, exc)
        time.sleep(0.2)
    raise NodeError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def start_groups(
    root: Path,
    topo: Topology,
    creds: Credentials,
    ha: HaSettings,
    members: list[PatroniMember],
    user: ServiceUser,
    report: Report,
) -> None:
    """etcd, then the first member of each group (so it bootstraps or stays primary), then the rest."""
    if etcd.start(local_etcd(root, ha), user):
        report(f"etcd: started on {ha.etcd_url}")
    for pm in members:
        patroni.write_config(topo, pm, creds, ha, user)
    first = _first_members(topo, ha, members)
    for pm in first:
        patroni.start(pm, user)
    for group in {pm.group.name: pm.group for pm in first}.values():
        _wait(f"a primary in group {group.name}", LEADER_TIMEOUT_S, partial(_has_running_primary, topo, group, ha))
        report(f"{group.name}: primary {leader_of(topo, group, ha)} running")
    rest = [pm for pm in members if pm not in first]
    for pm in rest:
        patroni.start(pm, user)
    for pm in rest:
        _wait(f"replica {pm.name} streaming", REPLICA_TIMEOUT_S, partial(_is_streaming, ha, pm.name))
        report(f"{pm.name}: replica streaming")
    if ha.synchronous != "off":
        for group in {pm.group.name: pm.group for pm in rest}.values():
            _wait(f"a synchronous standby in group {group.name}", REPLICA_TIMEOUT_S, partial(_has_sync_standby, ha, group))


def _first_members(topo: Topology, ha: HaSettings, members: list[PatroniMember]) -> list[PatroniMember]:
    """Per group: the recorded leader when there is one (restart), else the first member (bootstrap)."""
    chosen = []
    for group in {pm.group.name: pm.group for pm in members}.values():
        mine = [pm for pm in members if pm.group.name == group.name]
        try:
            leader = leader_of(topo, group, ha)
        except NodeError:
            leader = None
        leader = leader or ha.last_leaders.get(group.name)
        chosen.append(next((pm for pm in mine if pm.name == leader), mine[0]))
    return chosen


def _is_streaming(ha: HaSettings, member: str) -> bool:
    return member_state(ha, member).get("replication_state") == "streaming"


def _has_sync_standby(ha: HaSettings, group: Group) -> bool:
    return bool(_sync_standbys(ha, group))


def _has_running_primary(topo: Topology, group: Group, ha: HaSettings) -> bool:
    leader = leader_of(topo, group, ha)
    if leader is None:
        return False
    state = member_state(ha, leader)
    return state.get("role") in ("primary", "master") and state.get("state") == "running"


def _cluster_view(ha: HaSettings, group: Group) -> dict[str, Any]:
    """GET /cluster from the first member that answers."""
    for m in group.members:
        try:
            data = patroni.rest(ha, m.name, "/cluster")
        except NodeError:
            continue
        if isinstance(data, dict):
            return data
    raise NodeError(f"no Patroni member of group {group.name} answers its REST API")


def _sync_standbys(ha: HaSettings, group: Group) -> list[str]:
    return [m["name"] for m in _cluster_view(ha, group).get("members", []) if m.get("role") == "sync_standby"]


def current_leaders(topo: Topology, ha: HaSettings) -> dict[str, str]:
    out = {}
    for group in topo.groups:
        try:
            leader = leader_of(topo, group, ha)
        except NodeError:
            leader = None
        if leader:
            out[group.name] = leader
    return out


def stop_groups(
    root: Path, topo: Topology, ha: HaSettings, members: list[PatroniMember], user: ServiceUser, report: Report
) -> None:
    """Replicas first, then leaders (a leader stopped first would hand its role to a replica), then etcd."""
    leaders = set(current_leaders(topo, ha).values())
    errors: list[str] = []
    for batch in ([pm for pm in members if pm.name not in leaders], [pm for pm in members if pm.name in leaders]):
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {pm.name: pool.submit(patroni.stop, pm, user) for pm in batch}
        for name, fut in futures.items():
            try:
                report(f"{name}: stopped" if fut.result() else f"{name}: was not running")
            except BuildSmartError as exc:
                errors.append(f"{name}: {exc}")
    if etcd.stop(local_etcd(root, ha)):
        report("etcd: stopped")
    if errors:
        raise NodeError("; ".join(errors))


# ---------------------------------------------------------------- operations and status


def switchover(topo: Topology, group: Group, ha: HaSettings, candidate: str | None) -> str:
    """Planned switchover through Patroni (the leader demotes cleanly, the candidate promotes)."""
    leader = leader_of(topo, group, ha)
    if leader is None:
        raise ClusterStateError(f"group {group.name} has no leader; use `buildsmart failover {group.name}`")
    body: dict[str, Any] = {"leader": leader}
    if candidate:
        body["candidate"] = candidate
    elif ha.synchronous == "off":
        pass
    else:
        sync = _sync_standbys(ha, group)
        if sync:
            body["candidate"] = sync[0]
    result = patroni.rest(ha, leader, "/switchover", body, timeout=60.0)
    log.info("switchover of %s requested (%s): %s", group.name, body, result)
    return str(result).strip()


@dataclass(frozen=True)
class FailoverChoice:
    """Whom ``failover`` promotes, or why it refuses (exactly one of the two is set)."""

    candidate: str | None
    refusal: str | None = None


def choose_failover(
    group: str, leader: str | None, members: Sequence[Mapping[str, Any]], requested: str | None, force: bool
) -> FailoverChoice:
    """Pure: pick the member to promote. Only the synchronous standby is known to hold every
    acknowledged commit; any other replica may lack some, so promoting it needs ``force``.
    ``members``: Patroni's /cluster entries (name, role, state, lag)."""
    sync = [str(m["name"]) for m in members if m.get("role") == "sync_standby"]
    replicas = [m for m in members if m.get("name") != leader and m.get("role") in ("replica", "sync_standby")]
    if requested is not None:
        if requested == leader:
            return FailoverChoice(None, f"{requested} already leads {group}")
        if requested in sync or force:
            return FailoverChoice(requested)
        why = f"the synchronous standby is {sync[0]}" if sync else f"{group} has no synchronous standby now"
        return FailoverChoice(
            None,
            f"refusing to promote {requested}: it is not the synchronous standby ({why}), so it may lack commits "
            "that were acknowledged to clients; rerun with --force to accept that loss",
        )
    if sync:
        return FailoverChoice(sync[0])
    if not replicas:
        return FailoverChoice(None, f"group {group} has no replica to fail over to")
    if not force:
        names = ", ".join(str(m["name"]) for m in replicas)
        return FailoverChoice(
            None,
            f"refusing to fail over {group}: no member is the synchronous standby (replicas: {names}), so any of them "
            "may lack commits that were acknowledged to clients; name one with --to and --force to accept that loss",
        )

    def lag(m: Mapping[str, Any]) -> int:
        value = m.get("lag")
        return value if isinstance(value, int) else 2**62

    return FailoverChoice(str(min(replicas, key=lag)["name"]))


def failover(topo: Topology, group: Group, ha: HaSettings, candidate: str | None, force: bool = False) -> str:
    """Unplanned failover through Patroni: promote ``candidate`` (default: the synchronous standby);
    a member that is not the synchronous standby only with ``force`` (see :func:`choose_failover`)."""
    leader = leader_of(topo, group, ha)
    view = _cluster_view(ha, group).get("members", [])
    choice = choose_failover(group.name, leader, view, candidate, force)
    if choice.candidate is None:
        raise ClusterStateError(choice.refusal or f"no member of {group.name} to fail over to")
    body: dict[str, Any] = {"candidate": choice.candidate}
    if leader is not None:
        body["leader"] = leader
    result = patroni.rest(ha, choice.candidate, "/failover", body, timeout=60.0)
    log.info("failover of %s to %s requested%s: %s", group.name, choice.candidate, " (forced)" if force else "", result)
    return str(result).strip()


def members_status(ha: HaSettings, group: Group) -> list[dict[str, Any]]:
    """One dict per member: name, host, port, role (leader/sync_standby/replica), state, timeline, lag (bytes)."""
    try:
        view = _cluster_view(ha, group)
    except NodeError as exc:
        return [{"name": m.name, "host": m.host, "port": m.port, "role": None, "state": "unreachable", "error": str(exc)}
                for m in group.members]  # fmt: skip
    known = {m["name"]: m for m in view.get("members", [])}
    out = []
    for m in group.members:
        info = known.get(m.name, {})
        lag = info.get("lag")
        out.append(
            {
                "name": m.name,
                "host": m.host,
                "port": m.port,
                "role": info.get("role"),
                "state": info.get("state", "stopped"),
                "timeline": info.get("timeline"),
                "lag_bytes": lag if isinstance(lag, int) else None,
                "sync": info.get("role") == "sync_standby",
            }
        )
    return out


def group_members_status(directory: Path, group: str) -> list[dict[str, Any]]:
    """Members of one group for `buildsmart status`: name, host, port, role, state, timeline, lag_bytes, sync.

    Groups without Patroni (plain or external servers) report each member with role "standalone"."""
    from orchestrator import runtime, topology  # late: runtime.base imports this package

    directory = directory.resolve()
    topo = topology.load(directory)
    grp = topo.group(group)
    settings = runtime.for_cluster(directory, topo).ha()
    if settings is None or not all(m.name in settings.restapi_ports for m in grp.members):
        return [
            {"name": m.name, "host": m.host, "port": m.port, "role": "standalone", "state": None,
             "timeline": None, "lag_bytes": None, "sync": False}
            for m in grp.members
        ]  # fmt: skip
    return members_status(settings, grp)


def wait_new_leader(topo: Topology, group: Group, ha: HaSettings, old: str | None, timeout_s: float = 60.0) -> str:
    """Wait until a member other than ``old`` leads the group and runs as primary; returns its name."""

    def check() -> bool:
        leader = leader_of(topo, group, ha)
        return leader is not None and leader != old and _has_running_primary(topo, group, ha)

    _wait(f"a new primary in group {group.name}", timeout_s, check)
    leader = leader_of(topo, group, ha)
    assert leader is not None
    return leader
