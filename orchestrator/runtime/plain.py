"""The ``plain`` runtime: one PostgreSQL server per node on this host, started with pg_ctl
(``buildsmart up --replicas 0``); no Patroni, no etcd, no failover."""

from __future__ import annotations

import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

from orchestrator import extension
from orchestrator.exceptions import BuildSmartError, NodeError
from orchestrator.osuser import ServiceUser, service_user
from orchestrator.runtime import local, tls
from orchestrator.runtime.base import Report, Runtime, register
from orchestrator.runtime.layout import data_root, local_member, local_members
from orchestrator.runtime.ports import free_port, is_listening
from orchestrator.topology import WORKER, Credentials, Group, Member, Topology

log = logging.getLogger(__name__)


def taken_ports(topo: Topology) -> set[int]:
    return {m.port for g in topo.groups for m in g.members}


def new_members(name: str, count: int, used: set[int]) -> tuple[Member, ...]:
    members = []
    for i in range(count):
        port = free_port(exclude=frozenset(used))
        used.add(port)
        members.append(Member(f"{name}-{i}", "127.0.0.1", port, data_dir=f"{name}-{i}"))
    return tuple(members)


def ensure_port_free(
    topo: Topology, group: Group, lm: local.LocalMember, user: ServiceUser
) -> tuple[Topology, local.LocalMember]:
    """If our recorded port is now used by someone else, move the member to a free port."""
    if local.pid_of(lm.data_dir) is not None or not is_listening(lm.member.host, lm.member.port):
        return topo, lm
    new_member = replace(lm.member, port=free_port(exclude=frozenset(taken_ports(topo))))
    log.info("port %d of %s is taken by another process; moving it to %d", lm.member.port, lm.name, new_member.port)
    members = tuple(new_member if m.name == lm.member.name else m for m in group.members)
    new_lm = replace(lm, member=new_member)
    if local.is_initialized(new_lm):
        local.set_port(new_lm, user)
    return topo.with_group(replace(group, members=members)), new_lm


def material(topo: Topology, creds: Credentials, user: ServiceUser) -> tls.Material | None:
    """The local TLS material (CA, server certificate for 127.0.0.1) when the cluster uses TLS."""
    return tls.ensure_local(Path(creds.ca_file).parent, topo.cluster_name, user) if creds.ca_file else None


def _start_member(lm: local.LocalMember, user: ServiceUser, creds: Credentials, tls_files: tls.Material | None) -> str:
    if not local.is_initialized(lm):
        local.initdb(lm, user, creds, tls_files)
        started = local.start(lm, user)
        return f"{lm.name}: initialised and started on port {lm.member.port}" if started else f"{lm.name}: running"
    started = local.start(lm, user)
    return f"{lm.name}: started on port {lm.member.port}" if started else f"{lm.name}: already running on port {lm.member.port}"


@register
class PlainRuntime(Runtime):
    kind = "plain"
    owns_processes = True

    def _user(self, topo: Topology) -> ServiceUser:
        return service_user(topo.service_user)

    def start(self, topo: Topology, creds: Credentials, report: Report) -> Topology:
        user = self._user(topo)
        checked = []
        for group, lm in local_members(self.directory, topo, user):
            topo, lm = ensure_port_free(topo, topo.group(group.name), lm, user)
            checked.append(lm)
        extension.copy_files()
        tls_files = material(topo, creds, user)
        with ThreadPoolExecutor(max_workers=4) as pool:
            for line in pool.map(lambda lm: _start_member(lm, user, creds, tls_files), checked):
                report(line)
        return topo

    def stop(self, topo: Topology, report: Report) -> None:
        user = self._user(topo)
        errors = []
        with ThreadPoolExecutor(max_workers=4) as pool:
            futures = {lm.name: pool.submit(local.stop, lm, user) for _, lm in local_members(self.directory, topo, user)}
        for name, fut in futures.items():
            try:
                report(f"{name}: stopped" if fut.result() else f"{name}: was not running")
            except NodeError as exc:
                errors.append(str(exc))
        if errors:
            raise NodeError("; ".join(errors))

    def add_worker(self, topo: Topology, name: str, creds: Credentials, report: Report) -> Group:
        user = self._user(topo)
        root = data_root(self.directory, user)
        group = Group(name, WORKER, new_members(name, 1, taken_ports(topo)))
        lm = local_member(root, group.members[0])
        try:
            local.initdb(lm, user, creds, material(topo, creds, user))
            local.start(lm, user)
        except BuildSmartError:
            self._delete(root, group, user)
            raise
        log.info("started plain worker %s on port %d", name, lm.member.port)
        report(f"{name}: started on port {lm.member.port}")
        return group

    def remove_worker(self, topo: Topology, name: str, report: Report) -> None:
        user = self._user(topo)
        self._delete(data_root(self.directory, user), topo.group(name), user)
        report(f"{name}: stopped and deleted")

    @staticmethod
    def _delete(root: Path, group: Group, user: ServiceUser) -> None:
        for m in group.members:
            lm = local_member(root, m)
            if local.stop(lm, user):
                log.info("stopped %s", lm.name)
            shutil.rmtree(lm.data_dir.parent, ignore_errors=True)
            log.info("deleted %s", lm.data_dir.parent)
