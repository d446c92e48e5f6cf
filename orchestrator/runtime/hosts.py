"""Runtimes whose servers the orchestrator does not start: ``external`` (servers someone else
runs: ``init --spec`` of plain servers, docker compose); ``hosts`` (each host runs its own
members under its own agent) is planned here (docs/hosts.md).

From the orchestrator's side both only *reach* servers, through PostgreSQL, Patroni's REST API and
etcd: no /proc, no pid files, no data directories of other hosts."""

from __future__ import annotations

import logging

from orchestrator.exceptions import ConfigError
from orchestrator.runtime.base import Report, Runtime, register
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
