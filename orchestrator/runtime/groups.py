"""Worker groups of the local Patroni runtime, started or deleted while the cluster runs
(`buildsmart node add` / `node remove`, through runtime/localha.py):

* :func:`start_worker` starts a Patroni group with as many replicas as the other nodes (ports
  recorded in DIR/ha.json, configs rendered from patroni/member.yml.tmpl, the first member
  bootstraps, the replicas stream as synchronous standbys: the same path as ``buildsmart up``);
* :func:`confirm_supervised` waits until the running failover supervisor watches the new group
  (after the caller saved the topology that names it);
* :func:`delete_worker` takes the group away from the supervisor (its REST ports leave ha.json and
  the supervisor acknowledges), stops every member (verified identity; replicas first, so nothing
  fails over), deletes the member directories and the group's keys in etcd.

A failed start is rolled back the same way, and leftovers of an interrupted earlier attempt with
the same name (member directories of a group the topology does not name) are stopped and removed
before a new attempt.
"""

from __future__ import annotations

import logging
import re
import shutil
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from orchestrator.exceptions import BuildSmartError, NodeError
from orchestrator.osuser import ServiceUser
from orchestrator.runtime import etcd, ha, hasettings, patroni, supervisor
from orchestrator.runtime.hasettings import HaSettings
from orchestrator.runtime.layout import local_member
from orchestrator.runtime.patroni import PatroniMember
from orchestrator.runtime.plain import new_members
from orchestrator.runtime.ports import free_port
from orchestrator.topology import WORKER, Credentials, Group, Member, Topology

log = logging.getLogger(__name__)

Report = Callable[[str], None]
SUPERVISOR_ACK_TIMEOUT_S = 15.0


def _taken_ports(topo: Topology, settings: HaSettings) -> set[int]:
    used = {m.port for g in topo.groups for m in g.members}
    return used | set(settings.restapi_ports.values()) | {settings.etcd_client_port, settings.etcd_peer_port}


def start_worker(
    directory: Path, root: Path, topo: Topology, name: str, creds: Credentials, user: ServiceUser, report: Report
) -> Group:
    """Start Patroni worker group ``name`` (not yet in ``topo``) and return it; the caller bootstraps
    the database and roles, saves the topology, runs setup, then calls :func:`confirm_supervised`."""
    discard_leftovers(directory, root, topo, name, user)
    return _start_patroni(directory, root, topo, name, creds, user, report)


def _start_patroni(
    directory: Path, root: Path, topo: Topology, name: str, creds: Credentials, user: ServiceUser, report: Report
) -> Group:
    settings = hasettings.load(directory)
    used = _taken_ports(topo, settings)
    group = Group(name, WORKER, new_members(name, settings.replicas + 1, used))
    rest = {}
    for m in group.members:
        rest[m.name] = free_port(exclude=frozenset(used))
        used.add(rest[m.name])
    # Recorded before anything starts: the ports are ours from now on. The supervisor ignores the
    # group until the topology names it (it supervises members of topology groups only).
    settings = replace(
        settings,
        restapi_ports={**settings.restapi_ports, **rest},
        last_leaders={g: m for g, m in settings.last_leaders.items() if g != name},
    )
    hasettings.save(directory, settings)
    log.info(
        "recorded ports of new Patroni group %s in %s: %s",
        name,
        hasettings.HA_FILE,
        ", ".join(f"{m.name} pg {m.port} rest {rest[m.name]}" for m in group.members),
    )
    members = [PatroniMember(group, local_member(root, m)) for m in group.members]
    try:
        ha.start_groups(root, topo.with_group(group), creds, settings, members, user, report)
    except BuildSmartError:
        log.info("starting Patroni group %s failed; stopping and deleting its members", name)
        _delete_patroni(directory, topo.with_group(group), group, members, user, report)
        raise
    log.info("started Patroni group %s: %s", name, ", ".join(pm.name for pm in members))
    return group


def confirm_supervised(directory: Path, group: Group) -> bool:
    """After the topology naming ``group`` was saved: wait until the failover supervisor watches
    its members. False when no supervisor runs (a stopped cluster); raises NodeError when it runs
    but did not pick the group up."""
    names = {m.name for m in group.members}
    acked = supervisor.wait_supervising(directory, names, present=True, timeout_s=SUPERVISOR_ACK_TIMEOUT_S)
    if acked is None:
        log.info("no failover supervisor runs for %s; %s will be supervised from the next `buildsmart up`", directory, group.name)
        return False
    if not acked:
        raise NodeError(
            f"the failover supervisor did not pick up group {group.name} within {SUPERVISOR_ACK_TIMEOUT_S:.0f} s; "
            f"see {directory / supervisor.LOG_FILE}"
        )
    log.info("failover supervisor now watches %s (%s)", group.name, ", ".join(sorted(names)))
    return True


def delete_worker(directory: Path, root: Path, topo: Topology, name: str, user: ServiceUser, report: Report) -> None:
    """Stop every member of Patroni group ``name`` and delete its files, its REST ports in ha.json
    and its keys in etcd. The caller then drops it from the topology."""
    group = topo.group(name)
    members = [PatroniMember(group, local_member(root, m)) for m in group.members]
    _delete_patroni(directory, topo, group, members, user, report)


def _delete_patroni(
    directory: Path, topo: Topology, group: Group, members: list[PatroniMember], user: ServiceUser, report: Report
) -> None:
    settings = hasettings.load(directory)
    try:
        leader = ha.leader_of(topo, group, settings)
    except NodeError:
        leader = None
    names = {pm.name for pm in members}
    # 1. Out of the supervisor's hands first, or it would restart the Patroni we are about to stop.
    released = replace(
        settings,
        restapi_ports={k: v for k, v in settings.restapi_ports.items() if k not in names},
        last_leaders={g: m for g, m in settings.last_leaders.items() if g != group.name},
    )
    hasettings.save(directory, released)
    log.info("removed %s from %s", ", ".join(sorted(names)), hasettings.HA_FILE)
    if supervisor.wait_supervising(directory, names, present=False, timeout_s=SUPERVISOR_ACK_TIMEOUT_S) is False:
        raise NodeError(
            f"the failover supervisor still watches {group.name} after {SUPERVISOR_ACK_TIMEOUT_S:.0f} s; "
            f"nothing was stopped (see {directory / supervisor.LOG_FILE})"
        )
    # 2. Replicas first, the leader last: a leader stopped first would hand its role to a replica.
    errors = []
    for pm in sorted(members, key=lambda p: p.name == leader):
        try:
            stopped = patroni.stop(pm, user)
        except BuildSmartError as exc:
            errors.append(f"{pm.name}: {exc}")
            continue
        log.info("%s: %s", pm.name, "stopped" if stopped else "was not running")
        report(f"{pm.name}: {'stopped' if stopped else 'was not running'}")
    if errors:
        raise NodeError(f"could not stop every member of {group.name}: {'; '.join(errors)}")
    # 3. Files and DCS keys (a later group of the same name must bootstrap afresh, not find an
    #    `initialize` key of this one).
    for pm in members:
        shutil.rmtree(pm.base, ignore_errors=True)
        log.info("deleted %s", pm.base)
    try:
        deleted = etcd.delete_prefix(etcd.Client.of(settings), f"{patroni.namespace(topo)}{patroni.scope(group)}/")
        log.info("deleted %d etcd key(s) of group %s", deleted, group.name)
    except NodeError as exc:
        log.warning("could not delete the etcd keys of %s (%s); a new group of that name would find them", group.name, exc)


_MEMBER_DIR = r"{name}-\d+"


def discard_leftovers(directory: Path, root: Path, topo: Topology, name: str, user: ServiceUser) -> int:
    """Stop by PID and delete member directories of a group ``name`` the topology does not name
    (an interrupted `node add`); returns how many there were."""
    if any(g.name == name for g in topo.groups) or not root.exists():
        return 0
    pattern = re.compile(_MEMBER_DIR.format(name=re.escape(name)))
    found = 0
    for base in sorted(p for p in root.iterdir() if p.is_dir() and pattern.fullmatch(p.name)):
        found += 1
        member = Member(base.name, "127.0.0.1", 0, data_dir=base.name)
        pm = PatroniMember(Group(name, WORKER, (member,)), local_member(root, member))
        log.info("leftover member %s of an interrupted `node add` found; stopping it by PID and deleting it", base.name)
        patroni.stop(pm, user)  # stops a verified Patroni, then any verified postmaster
        shutil.rmtree(base, ignore_errors=True)
    if found:
        settings = hasettings.load(directory)
        stale = {k for k in settings.restapi_ports if pattern.fullmatch(k)}
        kept = {k: v for k, v in settings.restapi_ports.items() if k not in stale}
        hasettings.save(directory, replace(settings, restapi_ports=kept))
        try:
            etcd.delete_prefix(etcd.Client.of(settings), f"{patroni.namespace(topo)}{name}/")
        except NodeError as exc:
            log.warning("could not delete leftover etcd keys of %s: %s", name, exc)
    return found
