"""Runtimes whose servers the orchestrator does not start: ``external`` (servers someone else
runs: ``init --spec`` of plain servers, docker compose) and ``hosts`` (each host runs its own
members under its own agent, runtime/agent.py, started by ``buildsmart host up``).

From the orchestrator's side both only *reach* servers, through PostgreSQL, Patroni's REST API and
etcd: no /proc, no pid files, no data directories of other hosts. A ``hosts`` cluster keeps how to
reach Patroni and etcd (member REST addresses, etcd endpoints and user, the cluster CA and the
orchestrator's client certificate) in DIR/ha.json, so ``status``, ``switchover`` and ``failover``
work from any host that holds DIR."""

from __future__ import annotations

import logging

from orchestrator.exceptions import ConfigError
from orchestrator.runtime import hasettings
from orchestrator.runtime.base import Report, Runtime, register
from orchestrator.runtime.hasettings import HaSettings
from orchestrator.topology import Credentials, Group, Topology

log = logging.getLogger(__name__)


@register
class ExternalRuntime(Runtime):
    kind = "external"

    def start(self, topo: Topology, creds: Credentials, report: Report) -> Topology:
        return topo

    def stop(self, topo: Topology, report: Report) -> None:
        report("the servers of this cluster are run by someone else: nothing to stop here")

    def add_worker(self, topo: Topology, name: str, creds: Credentials, report: Report) -> Group:
        raise ConfigError(f"this cluster's servers are run elsewhere: register {name} with `node add {name} --host H --port P`")

    def remove_worker(self, topo: Topology, name: str, report: Report) -> None:
        report(f"{name}: its servers are run elsewhere; stop them there")


@register
class HostsRuntime(Runtime):
    """Patroni groups over several hosts, each host's members run by its own agent."""

    kind = "hosts"
    routes_fdw_by_dcs = True

    def ha(self) -> HaSettings:
        return hasettings.load(self.directory)

    def start(self, topo: Topology, creds: Credentials, report: Report) -> Topology:
        return topo

    def stop(self, topo: Topology, report: Report) -> None:
        report("each host's agent runs its members: stop them on each host (`buildsmart host down --host NAME`)")

    def add_worker(self, topo: Topology, name: str, creds: Credentials, report: Report) -> Group:
        raise ConfigError(
            f"the members of {name} run on their hosts: start them there (`buildsmart host up --host NAME`), "
            f"then register the group with `node add {name} --host H --port P`"
        )

    def remove_worker(self, topo: Topology, name: str, report: Report) -> None:
        report(f"{name}: its members run on their hosts; stop them there")
