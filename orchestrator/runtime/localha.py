"""The ``patroni`` runtime (the default of ``buildsmart up``): on this host, every node is a Patroni
group (primary + synchronous replicas) with a local etcd, and the failover supervisor
(runtime/supervisor.py) fails over within a second instead of Patroni's 20 s lease."""

from __future__ import annotations

import logging
from dataclasses import replace
from pathlib import Path

from orchestrator import extension
from orchestrator.osuser import ServiceUser, service_user
from orchestrator.runtime import etcd, groups, ha, hasettings, supervisor, tls
from orchestrator.runtime.base import Report, Runtime, register
from orchestrator.runtime.hasettings import HaSettings
from orchestrator.runtime.layout import data_root, local_members
from orchestrator.runtime.patroni import PatroniMember
from orchestrator.topology import Credentials, Group, Topology

log = logging.getLogger(__name__)


@register
class LocalPatroniRuntime(Runtime):
    kind = "patroni"
    owns_processes = True

    def _user(self, topo: Topology) -> ServiceUser:
        return service_user(topo.service_user)

    def ha(self) -> HaSettings:
        return hasettings.load(self.directory)

    def _members(self, topo: Topology, user: ServiceUser) -> list[PatroniMember]:
        return [PatroniMember(g, lm) for g, lm in local_members(self.directory, topo, user)]

    def start(self, topo: Topology, creds: Credentials, report: Report) -> Topology:
        """etcd, members (leaders first), then the supervisor."""
        user = self._user(topo)
        extension.copy_files()
        if creds.ca_file:
            tls.ensure_local(Path(creds.ca_file).parent, topo.cluster_name, user)
        ha.start_groups(data_root(self.directory, user), topo, creds, self.ha(), self._members(topo, user), user, report)
        supervisor.start_daemon(self.directory)
        report("failover supervisor running")
        return topo

    def stop(self, topo: Topology, report: Report) -> None:
        if supervisor.stop_daemon(self.directory):
            report("failover supervisor: stopped")
        user = self._user(topo)
        settings = self.ha()
        root = data_root(self.directory, user)
        running = etcd.is_running(ha.local_etcd(root, settings))
        leaders = ha.current_leaders(topo, settings) if running else {}
        if leaders:
            settings = replace(settings, last_leaders={**settings.last_leaders, **leaders})
            hasettings.save(self.directory, settings)
        ha.stop_groups(root, topo, settings, self._members(topo, user), user, report)

    def add_worker(self, topo: Topology, name: str, creds: Credentials, report: Report) -> Group:
        user = self._user(topo)
        return groups.start_worker(self.directory, data_root(self.directory, user), topo, name, creds, user, report)

    def confirm_worker(self, group: Group) -> bool:
        return groups.confirm_supervised(self.directory, group)

    def remove_worker(self, topo: Topology, name: str, report: Report) -> None:
        user = self._user(topo)
        groups.delete_worker(self.directory, data_root(self.directory, user), topo, name, user, report)
