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
import time

from orchestrator.exceptions import ConfigError
from orchestrator.runtime import hasettings, hostfiles, hostplan, hostready, hostspec
from orchestrator.runtime.base import Report, Runtime, register
from orchestrator.runtime.hasettings import HaSettings
from orchestrator.topology import WORKER, Credentials, Group, Topology

log = logging.getLogger(__name__)

ADD_TIMEOUT_S = 180.0  # a new group's first member bootstraps, its replica copies it


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
        """A worker group planned by ``host plan`` (a ``[groups.NAME]`` table added to the hosts
        spec) whose hosts' agents run it: wait for its primary and synchronous standby, give its
        members their etcd users, and hand the group to ``node add``."""
        spec_file = self.directory / hostfiles.SPEC_FILE
        steps = (
            f"add a [groups.{name}] table with its hosts to the hosts spec, run `buildsmart host plan --spec FILE "
            f"--dir {self.directory}`, copy each of its hosts' files there and restart their agents "
            f"(`buildsmart host down` and `host up --host NAME`), then rerun `buildsmart node add {name}`"
        )
        if not spec_file.exists():
            raise ConfigError(f"{self.directory} was not planned by `buildsmart host plan` ({spec_file} is missing): {steps}")
        p = hostplan.plan(hostspec.load(spec_file))
        planned = next((g for g in p.topology().groups if g.name == name), None)
        if planned is None:
            raise ConfigError(f"{name} is not a group of {spec_file}: {steps}")
        if planned.role != WORKER:
            raise ConfigError(f"{name} is the coordinator group of {spec_file}, not a worker")
        settings = hasettings.load(self.directory)
        if not all(m.name in settings.restapi_ports for m in planned.members):
            raise ConfigError(f"{hasettings.HA_FILE} does not know the members of {name}: {steps}")
        hostready.ensure_auth(p, settings, hostfiles.load_secrets(self.directory), report)
        rerun = f"rerun `buildsmart node add {name}` once its hosts' agents run it"
        hostready.wait_groups(p, (planned,), settings, time.monotonic() + ADD_TIMEOUT_S, report, rerun)
        log.info("worker group %s of the host plan runs on %s", name, planned.hosts)
        return planned

    def remove_worker(self, topo: Topology, name: str, report: Report) -> None:
        report(f"{name}: its members run on their hosts; stop them there")
