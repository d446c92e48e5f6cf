"""The runtime seam: one small interface for *where the servers of a cluster run*, the way Patroni
puts every DCS behind one abstract class.

Everything above this seam (setup, status, switchover/failover, node add/remove, moves, ingest)
talks to servers through PostgreSQL, Patroni's REST API and etcd only, so it works the same
whoever started the servers. Below it, each runtime knows how members come to exist:

* ``plain``    (runtime/plain.py): one pg_ctl server per node on this host (``up --replicas 0``);
* ``patroni``  (runtime/localha.py): local Patroni groups, a local etcd and the failover supervisor
  (``up``, the default);
* ``hosts``    (runtime/hosts.py): every host runs its own members under its own agent; the
  orchestrator, from any host, starts and stops nothing there and reaches Patroni and etcd as
  DIR/ha.json says;
* ``external`` (runtime/hosts.py): servers someone else runs (``init --spec`` of plain servers,
  docker compose).

The kind is recorded in topology.json (``runtime``); :func:`kind_of` reads it, and for a topology
written before the field existed infers it once from what that old version left in DIR.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

from orchestrator.exceptions import ConfigError
from orchestrator.runtime.hasettings import HaSettings
from orchestrator.topology import Credentials, Group, RuntimeKind, Topology

Report = Callable[[str], None]


class Runtime(ABC):
    """Where the servers of one cluster (directory DIR) run."""

    kind: ClassVar[RuntimeKind]
    # True when the orchestrator starts and stops the servers itself (on this host)
    owns_processes: ClassVar[bool] = False
    # True when a lost member's host can hold a connection attempt for seconds (members on other
    # hosts): the task runner keeps each worker's foreign server led by its primary (fdwroute.py)
    routes_fdw_by_dcs: ClassVar[bool] = False

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    @abstractmethod
    def start(self, topo: Topology, creds: Credentials, report: Report) -> Topology:
        """Bring every member up (or wait until the hosts have), idempotently; the topology to save."""

    @abstractmethod
    def stop(self, topo: Topology, report: Report) -> None:
        """Stop what this runtime started (nothing for runtimes that own no process)."""

    def ha(self) -> HaSettings | None:
        """How to reach Patroni's REST API and etcd (None: no Patroni, plain servers)."""
        return None

    @abstractmethod
    def add_worker(self, topo: Topology, name: str, creds: Credentials, report: Report) -> Group:
        """Start (or find running) worker group ``name``, not yet in ``topo``; the caller bootstraps
        the database, saves the topology and runs setup, then calls :meth:`confirm_worker`."""

    def confirm_worker(self, group: Group) -> bool:
        """After the topology naming ``group`` was saved: True once failover watches it."""
        return False

    @abstractmethod
    def remove_worker(self, topo: Topology, name: str, report: Report) -> None:
        """Stop and delete worker group ``name`` (the caller has emptied it and drops it from the topology)."""


_RUNTIMES: dict[str, type[Runtime]] = {}


def register(cls: type[Runtime]) -> type[Runtime]:
    _RUNTIMES[cls.kind] = cls
    return cls


def kind_of(directory: Path, topo: Topology) -> RuntimeKind:
    """The runtime of a cluster: the recorded kind; for a topology older than that field, a
    Patroni cluster kept its REST ports in ha.json and a cluster of servers we did not start had
    no managed group."""
    if topo.runtime is not None:
        return topo.runtime
    if not any(g.managed for g in topo.groups):
        return "external"
    return "patroni" if (directory / "ha.json").exists() else "plain"


def for_kind(kind: RuntimeKind, directory: Path) -> Runtime:
    # late imports: each runtime pulls in its own process machinery only when used
    from orchestrator.runtime import hosts, localha, plain  # noqa: F401

    try:
        return _RUNTIMES[kind](directory)
    except KeyError as exc:
        raise ConfigError(f"no runtime {kind!r}") from exc


def for_cluster(directory: Path, topo: Topology) -> Runtime:
    return for_kind(kind_of(directory, topo), directory)
