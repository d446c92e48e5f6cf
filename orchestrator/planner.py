"""Setup planning as a pure function: ``plan(desired, observed) -> steps``.

Steps are plain data; :mod:`orchestrator.executor` holds one registered implementation per step
type. Every step has a ``describe()`` sentence that is logged when it is applied.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from orchestrator.exceptions import ClusterStateError
from orchestrator.fragments import Fragment


@dataclass(frozen=True)
class NodeSpec:
    name: str
    role: str
    hosts: str
    ports: str
    dbname: str

    @property
    def server_name(self) -> str:
        return f"bs_{self.name}"


@dataclass(frozen=True)
class DesiredCluster:
    coordinator: NodeSpec
    workers: tuple[NodeSpec, ...]
    fragments: tuple[Fragment, ...]  # used only when the catalog holds none yet
    auto_layout: bool = True  # no split points given: the first load may lay the fragments out (orchestrator.elastic.autosplit)
    mapping: MappingSpec = field(default_factory=lambda: MappingSpec("buildsmart_fdw", None))


@dataclass(frozen=True)
class MappingSpec:
    """The coordinator's PUBLIC user mapping to each worker: the role it logs in as, and the
    passfile that holds its password (None: the password sits in the mapping, remote servers)."""

    user: str
    passfile: str | None

    def describe(self) -> str:
        return f"user={self.user} passfile={self.passfile}" if self.passfile else f"user={self.user} password"


@dataclass(frozen=True)
class ObservedCluster:
    """A frozen snapshot of what exists, read before planning."""

    extension_ok: frozenset[str] = frozenset()  # nodes with the current extension version
    app_schema: bool = False  # readings/buildings/devices on the coordinator
    energy_schema: bool = False  # meters, rollup tables and views on the coordinator (sql/app/energy.sql)
    nodes: Mapping[str, NodeSpec] = field(default_factory=dict)  # buildsmart.nodes
    servers: Mapping[str, tuple[str, str, str]] = field(default_factory=dict)  # fdw server -> (hosts, ports, dbname)
    user_mappings: Mapping[str, str] = field(default_factory=dict)  # server -> MappingSpec.describe() of its PUBLIC mapping
    fragments: tuple[Fragment, ...] = ()  # catalog fragments with their active placement
    worker_tables: frozenset[tuple[str, str]] = frozenset()  # (node, shard_name) existing on workers
    old_triggers: frozenset[tuple[str, str]] = frozenset()  # (node, shard_name) with a 0.1 replace trigger
    coordinator_partitions: frozenset[str] = frozenset()  # shard names attached on the coordinator


@dataclass(frozen=True)
class Step:
    def describe(self) -> str:  # pragma: no cover - every subclass overrides
        raise NotImplementedError


@dataclass(frozen=True)
class EnsureExtension(Step):
    node: str

    def describe(self) -> str:
        return f"install the buildsmart extension on {self.node}"


@dataclass(frozen=True)
class CreateAppSchema(Step):
    def describe(self) -> str:
        return "create readings, buildings and devices on the coordinator"


@dataclass(frozen=True)
class EnsureEnergySchema(Step):
    def describe(self) -> str:
        return "create meters, meter replacements and the rollup tables and views on the coordinator"


@dataclass(frozen=True)
class RegisterNode(Step):
    node: NodeSpec

    def describe(self) -> str:
        return f"register {self.node.role} {self.node.name} at {self.node.hosts}:{self.node.ports} in the catalog"


@dataclass(frozen=True)
class EnsureForeignServer(Step):
    node: NodeSpec
    create: bool

    def describe(self) -> str:
        verb = "create" if self.create else "repoint"
        return f"{verb} foreign server {self.node.server_name} -> {self.node.hosts}:{self.node.ports}"


@dataclass(frozen=True)
class EnsureUserMapping(Step):
    node: NodeSpec
    mapping: MappingSpec

    def describe(self) -> str:
        where = f"password file {self.mapping.passfile}" if self.mapping.passfile else "password in the mapping"
        return f"map coordinator roles to {self.mapping.user} on {self.node.name} ({where})"


@dataclass(frozen=True)
class CreateWorkerFragment(Step):
    fragment: Fragment

    def describe(self) -> str:
        return (
            f"create fragment table {self.fragment.shard_name} {self.fragment.describe_range()} "
            f"on {self.fragment.node}, partitioned by {self.fragment.time_interval}"
        )


@dataclass(frozen=True)
class UpgradeFragmentTrigger(Step):
    fragment: Fragment

    def describe(self) -> str:
        return f"swap the PL/pgSQL replace trigger of {self.fragment.shard_name} on {self.fragment.node} for the C one"


@dataclass(frozen=True)
class RegisterFragment(Step):
    fragment: Fragment

    def describe(self) -> str:
        return f"record fragment {self.fragment.fragment_id} on {self.fragment.node} in the catalog"


@dataclass(frozen=True)
class AttachCoordinatorPartition(Step):
    fragment: Fragment

    def describe(self) -> str:
        return f"attach foreign partition {self.fragment.shard_name} for {self.fragment.describe_range()}"


@dataclass(frozen=True)
class RecordLayoutSource(Step):
    auto: bool

    def describe(self) -> str:
        if self.auto:
            return "let the first load lay out the fragments from its own buildings"
        return "keep the given split points (no automatic first-load layout)"


def same_server(current: tuple[str, str, str], desired: tuple[str, str, str]) -> bool:
    """The same members and database: the order of the host list is fdwroute's (primary first)."""

    def members(hosts: str, ports: str) -> list[tuple[str, str]]:
        return sorted(zip(hosts.split(","), ports.split(","), strict=False))

    if not all(current):
        return False
    return current[2] == desired[2] and members(current[0], current[1]) == members(desired[0], desired[1])


def plan(desired: DesiredCluster, observed: ObservedCluster) -> list[Step]:
    """Steps that take the observed cluster to the desired one; empty when nothing is to do."""
    steps: list[Step] = []
    all_nodes = (desired.coordinator, *desired.workers)
    steps += [EnsureExtension(n.name) for n in all_nodes if n.name not in observed.extension_ok]
    if not observed.app_schema:
        steps.append(CreateAppSchema())
    if not observed.energy_schema:
        steps.append(EnsureEnergySchema())
    steps += [RegisterNode(n) for n in all_nodes if observed.nodes.get(n.name) != n]
    for worker in desired.workers:
        current = observed.servers.get(worker.server_name)
        if current is None or not same_server(current, (worker.hosts, worker.ports, worker.dbname)):
            steps.append(EnsureForeignServer(worker, create=current is None))
        if observed.user_mappings.get(worker.server_name) != desired.mapping.describe():
            steps.append(EnsureUserMapping(worker, desired.mapping))
    fragments = _fragments_to_keep(desired, observed)
    known = {f.fragment_id for f in observed.fragments}
    for frag in fragments:
        if (frag.node, frag.shard_name) not in observed.worker_tables:
            steps.append(CreateWorkerFragment(frag))
        elif (frag.node, frag.shard_name) in observed.old_triggers:
            steps.append(UpgradeFragmentTrigger(frag))
        if frag.fragment_id not in known:
            steps.append(RegisterFragment(frag))
        if frag.shard_name not in observed.coordinator_partitions:
            steps.append(AttachCoordinatorPartition(frag))
    if not observed.fragments:  # a new catalog: remember where its layout comes from
        steps.append(RecordLayoutSource(desired.auto_layout))
    return steps


def _fragments_to_keep(desired: DesiredCluster, observed: ObservedCluster) -> tuple[Fragment, ...]:
    """The catalog wins once it has fragments: a different layout is a split/move, not a setup."""
    if not observed.fragments:
        return desired.fragments
    worker_names = {w.name for w in desired.workers}
    for frag in observed.fragments:
        if frag.node not in worker_names:
            raise ClusterStateError(
                f"fragment {frag.fragment_id} is placed on {frag.node}, which is not a worker of this cluster"
            )
    return observed.fragments
