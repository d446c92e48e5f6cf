"""Cluster lifecycle: ``up`` and ``down`` of a cluster in DIR, ``init`` for servers we did not start,
and ``setup`` (plan + apply) shared by all.

Where the servers run is the runtime's business (orchestrator/runtime/base.py): ``up`` makes a
``patroni`` cluster (every node a Patroni group with etcd and the failover supervisor; the
default) or, with ``--replicas 0``, a ``plain`` one; ``init --spec`` records ``external`` servers or
``hosts`` that run their own members. The kind is recorded in topology.json."""

from __future__ import annotations

import logging
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

import psutil
import psycopg
from psycopg import sql

from orchestrator import catalog, executor, extension, metadata_store, pgbin, roles, runtime, topology
from orchestrator.connections import connect, superuser_target
from orchestrator.exceptions import ClusterStateError, ConfigError, NodeError
from orchestrator.fragments import initial_fragments, validate_split_points
from orchestrator.nodeconn import NodeConnections
from orchestrator.osuser import ServiceUser, service_user
from orchestrator.planner import DesiredCluster, MappingSpec, NodeSpec, Step, plan
from orchestrator.runtime import ha, hasettings

# re-exported: callers find member files through the cluster module
from orchestrator.runtime.layout import data_root as data_root
from orchestrator.runtime.layout import local_members as local_members
from orchestrator.runtime.ports import free_port
from orchestrator.serve import daemon as serve_daemon
from orchestrator.spec import ClusterSpec
from orchestrator.tasks import runner as tasks_runner
from orchestrator.topology import COORDINATOR, WORKER, Credentials, Group, Layout, Member, Topology

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 3
DEFAULT_REPLICAS = 1
Report = Callable[[str], None]


def _quiet(_: str) -> None:
    return None


# ---------------------------------------------------------------- local runtime


def new_local_topology(
    workers: int, layout: Layout, service: ServiceUser, name: str = "buildsmart", replicas: int = 0
) -> Topology:
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    if replicas < 0:
        raise ConfigError("--replicas must be 0 or more")
    used: set[int] = set()

    def member(gname: str, i: int) -> Member:
        port = free_port(exclude=frozenset(used))
        used.add(port)
        return Member(f"{gname}-{i}", "127.0.0.1", port, data_dir=f"{gname}-{i}")

    def group(gname: str, role: str) -> Group:
        return Group(gname, role, tuple(member(gname, i) for i in range(replicas + 1)), managed=True)

    groups = (group("coordinator", COORDINATOR), *(group(f"w{i}", WORKER) for i in range(1, workers + 1)))
    return Topology(name, groups, layout, service.name)


def _bootstrap_group(group: Group, creds: Credentials) -> None:
    """Database and roles on a group we started (idempotent)."""
    with connect(superuser_target(group, creds, dbname="postgres"), "bootstrap", autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_catalog.pg_database WHERE datname = %s", (group.dbname,)).fetchone()
        if not exists:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(group.dbname)))
            log.info("created database %s on %s", group.dbname, group.name)
    with connect(superuser_target(group, creds), "bootstrap", autocommit=True) as conn:
        roles.ensure_roles(conn, roles.kind_of(group.role), creds, group.dbname)


def up(
    directory: Path,
    workers: int | None = None,
    split_points: Sequence[str] | None = None,
    time_interval: str | None = None,
    report: Report = _quiet,
    replicas: int | None = None,
    synchronous: str = "on",
    balancer_paused: bool = False,
) -> Topology:
    """Create or restart the local cluster in DIR; idempotent.

    ``replicas`` (new clusters only, default 1): streaming replicas per node under Patroni; 0 runs
    plain servers. ``synchronous``: "on" (default), "strict" or "off" (Patroni synchronous mode).
    ``balancer_paused`` (new clusters only): the background balancer starts paused. Either shape
    ends with the task runner running (orchestrator.tasks)."""
    directory = directory.resolve()
    directory.mkdir(parents=True, exist_ok=True)
    user = service_user()
    new = not topology.exists(directory)
    if not new:
        topo = topology.load(directory)
        creds = topology.load_credentials(directory)
        if workers is not None and workers != len(topo.workers):
            report(f"cluster in {directory} has {len(topo.workers)} workers; ignoring --workers {workers} (use `node add`)")
        if replicas is not None and replicas != len(topo.coordinator.members) - 1:
            report(f"cluster in {directory} has {len(topo.coordinator.members) - 1} replicas per node; ignoring --replicas")
        if split_points and tuple(split_points) != topo.layout.split_points:
            raise ClusterStateError(
                f"cluster in {directory} already has split points {list(topo.layout.split_points)}; "
                "change fragments with `fragment split`/`move`, or `down --purge` first"
            )
    else:
        n = DEFAULT_WORKERS if workers is None else workers
        # Without split points the cluster starts with one placeholder fragment; the first load lays
        # the fragments out from its own buildings (orchestrator.elastic.autosplit).
        points = validate_split_points(split_points) if split_points else ()
        layout = Layout(points, time_interval or "1 month")
        r = DEFAULT_REPLICAS if replicas is None else replicas
        if synchronous not in hasettings.SYNC_MODES:
            raise ConfigError(f"--synchronous must be one of {', '.join(hasettings.SYNC_MODES)}")
        topo = replace(new_local_topology(n, layout, user, replicas=r), runtime="patroni" if r > 0 else "plain")
        # TLS by default when the server build has it (runtime/tls.py; pgbin says which build runs)
        tls_dir = data_root(directory, user) / "tls" if pgbin.has_ssl() else None
        creds = replace(Credentials.generate(), ca_file=str(tls_dir / "ca.crt") if tls_dir else None)
        topology.save_credentials(directory, creds)
        if r > 0:
            hasettings.save(directory, replace(ha.new_settings(topo, r, synchronous), tls_dir=str(tls_dir) if tls_dir else None))
        shape = f"{len(points) + 1} fragments" if points else "fragments laid out by the first load"
        report(f"new cluster in {directory}: coordinator + {n} workers, {shape}, {r} replica(s) per node")
    rt = runtime.for_cluster(directory, topo)
    topology.save(directory, topo)  # first: the supervisor and task runner read it
    topo = rt.start(topo, creds, report)
    topology.save(directory, topo)
    for group in topo.groups:
        if group.managed:
            _bootstrap_group(group, creds)
    write_passfile(directory, creds, user)
    applied = setup(topo, creds, directory)
    report(f"setup: {len(applied)} change(s) applied" if applied else "setup: catalog and fragments up to date")
    if new and balancer_paused:
        _pause_balancer(topo, creds, "started paused (`buildsmart balancer resume` starts it)")
    report(f"task runner running (pid {tasks_runner.start_daemon(directory)})")
    return topo


def _pause_balancer(topo: Topology, creds: Credentials, note: str) -> None:
    with connect(superuser_target(topo.coordinator, creds), "up", autocommit=True) as conn:
        catalog.set_paused(conn, True, note)


def down(directory: Path, purge: bool = False, report: Report = _quiet) -> None:
    directory = directory.resolve()
    if not topology.exists(directory):
        if purge and directory.exists():
            shutil.rmtree(directory)
        report(f"no cluster in {directory}")
        return
    topo = topology.load(directory)
    served = serve_daemon.stop_daemon(directory)  # a client of the servers stopped below
    if served is not None:
        report(f"buildsmart serve: stopped (pid {served})")
    stopped = tasks_runner.stop_daemon(directory)  # first: it works on the servers stopped below
    if stopped is not None:
        report(f"task runner: stopped (pid {stopped})")
    metadata_store.stop(directory, report)  # the MongoDB-protocol server `up` may have started
    runtime.for_cluster(directory, topo).stop(topo, report)
    _purge(directory, purge, report)


PURGE_WAIT_S = 30.0


def _purge(directory: Path, purge: bool, report: Report) -> None:
    if purge:
        nodes = directory / "nodes"
        root = nodes.resolve() if nodes.exists() else nodes
        deadline = time.monotonic() + PURGE_WAIT_S
        while (still := _live_postmasters(root)) and time.monotonic() < deadline:
            time.sleep(0.2)  # a server that was told to stop may still be writing its shutdown checkpoint
        if still:
            # never delete data under a running server (e.g. one started by another installation,
            # whose binaries our identity check does not accept, so the stop above left it)
            listing = ", ".join(f"pid {pid} ({path})" for pid, path in still)
            raise ClusterStateError(
                f"not purging {directory}: PostgreSQL still runs on its data ({listing}); stop it "
                "(`buildsmart down` from the installation that started it, or pg_ctl stop -D ...) and run down --purge again"
            )
        if nodes.is_symlink():
            shutil.rmtree(nodes.resolve(), onerror=_gone_is_fine)
        shutil.rmtree(directory, onerror=_gone_is_fine)
        report(f"purged {directory}")


def _gone_is_fine(func: Callable[..., object], path: str, exc_info: tuple[type[BaseException], BaseException, object]) -> None:
    """rmtree: a file that disappeared meanwhile (a server removing its pid file on exit) is fine."""
    if not isinstance(exc_info[1], FileNotFoundError):
        raise exc_info[1]


def _live_postmasters(nodes: Path) -> list[tuple[int, Path]]:
    """Servers whose postmaster.pid under ``nodes`` names a live process working in that data
    directory (its cwd), whoever's binaries they are."""
    found = []
    for pidfile in sorted(nodes.glob("**/postmaster.pid")) if nodes.is_dir() else []:
        try:
            pid = int(pidfile.read_text().split()[0])
            if psutil.Process(pid).cwd() == str(pidfile.parent.resolve()):
                found.append((pid, pidfile.parent))
        except (OSError, ValueError, IndexError, psutil.Error):
            continue
    return found


# ---------------------------------------------------------------- remote nodes


def init_remote(directory: Path, spec: ClusterSpec, report: Report = _quiet) -> Topology:
    """Set up servers we did not start (from a spec) and remember them in DIR."""
    directory = directory.resolve()
    topo = replace(spec.topology, runtime=spec.topology.runtime or "external")
    if topology.exists(directory):
        # Keep the passwords made the first time: the user mappings on the coordinator hold the
        # fdw role's, and clients hold the generated application password.
        stored = topology.load_credentials(directory)
        kept = replace(spec.credentials, ingest_password=stored.ingest_password, fdw_password=stored.fdw_password)
        if spec.app_password_generated:
            kept = replace(kept, app_password=stored.app_password)
        spec = replace(spec, credentials=kept)
    for group in topo.groups:
        _prepare_remote_group(group, spec.credentials)
        report(f"{group.name}: reachable at {group.address}")
    topology.save_credentials(directory, spec.credentials)
    topology.save(directory, topo)
    _copy_extension_files_if_possible()
    applied = setup(topo, spec.credentials, directory)
    report(f"setup: {len(applied)} change(s) applied" if applied else "setup: catalog and fragments up to date")
    return topo


def _copy_extension_files_if_possible() -> None:
    """Servers on this host that use the embedded binaries find the extension there; remote hosts
    need the files installed by their own means (docker-compose mounts sql/)."""
    try:
        extension.copy_files()
    except (OSError, ConfigError) as exc:
        log.info("extension files not copied into the local PostgreSQL share dir: %s", exc)


def _prepare_remote_group(group: Group, creds: Credentials) -> None:
    try:
        with connect(superuser_target(group, creds), "init", autocommit=True) as conn:
            roles.ensure_roles(conn, roles.kind_of(group.role), creds, group.dbname)
            return
    except NodeError as exc:
        if "does not exist" not in str(exc):
            raise
    _bootstrap_group(group, creds)


# ---------------------------------------------------------------- shared setup


def desired_state(topo: Topology, mapping: MappingSpec | None = None) -> DesiredCluster:
    def spec(g: Group) -> NodeSpec:
        return NodeSpec(g.name, g.role, g.hosts, g.ports, g.dbname)

    workers = tuple(spec(w) for w in topo.workers)
    fragments = initial_fragments(topo.layout.split_points, [w.name for w in workers], topo.layout.time_interval)
    desired = DesiredCluster(spec(topo.coordinator), workers, fragments, auto_layout=not topo.layout.split_points)
    return desired if mapping is None else replace(desired, mapping=mapping)


def setup(topo: Topology, creds: Credentials, directory: Path | None = None) -> list[Step]:
    """Plan from a fresh snapshot and apply: extension, catalog, servers, fragments; then the
    roles' privileges on every node (idempotent, so an older cluster gets them on its next up).
    ``directory``: a local cluster, whose servers read the fdw password from its passfile."""
    passfile = roles.passfile_of(directory) if directory is not None and topo.coordinator.managed else None
    mapping = MappingSpec(creds.fdw_user, str(passfile.path) if passfile else None)
    with NodeConnections(topo, creds, "setup") as nodes:
        try:
            observed = catalog.observe(nodes)
        except psycopg.Error as exc:
            raise NodeError(f"cannot read the cluster state: {exc}") from exc
        steps = plan(desired_state(topo, mapping), observed)
        executor.apply(nodes, steps)
        for group in topo.groups:
            try:
                roles.grant_schema_objects(nodes.get(group.name), roles.kind_of(group.role), creds, creds.superuser)
            except psycopg.Error as exc:
                raise NodeError(f"could not grant the roles' privileges on {group.name}: {exc}") from exc
    return steps


def write_passfile(directory: Path, creds: Credentials, user: ServiceUser) -> None:
    """The servers' password file of a local cluster (before setup points mappings at it)."""
    passfile = roles.passfile_of(directory)
    if passfile is not None:
        passfile.write(creds, user.uid, user.gid)
