"""Cluster lifecycle: ``up`` and ``down`` for the local runtime, ``init`` for servers we did not start,
and ``setup`` (plan + apply) shared by both.

The local runtime has two shapes: ``replicas >= 1`` (the default) makes every node a Patroni group
(primary + replicas, etcd, the failover supervisor: see runtime/ha.py and runtime/supervisor.py);
``replicas == 0`` starts one plain server per node with pg_ctl. A cluster remembers its shape:
DIR/ha.json exists for Patroni clusters only."""

from __future__ import annotations

import hashlib
import logging
import shutil
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import psycopg
from psycopg import sql

from orchestrator import catalog, executor, extension, metadata_store, roles, topology
from orchestrator.connections import connect, superuser_target
from orchestrator.exceptions import ClusterStateError, ConfigError, NodeError
from orchestrator.fragments import initial_fragments, validate_split_points
from orchestrator.nodeconn import NodeConnections
from orchestrator.osuser import ServiceUser, service_user
from orchestrator.planner import DesiredCluster, MappingSpec, NodeSpec, Step, plan
from orchestrator.runtime import etcd, ha, hasettings, local, supervisor
from orchestrator.runtime.patroni import PatroniMember
from orchestrator.runtime.ports import free_port, is_listening
from orchestrator.spec import ClusterSpec
from orchestrator.tasks import runner as tasks_runner
from orchestrator.topology import COORDINATOR, WORKER, Credentials, Group, Layout, Member, Topology

log = logging.getLogger(__name__)

DEFAULT_WORKERS = 3
DEFAULT_REPLICAS = 1
FALLBACK_DATA_ROOT = Path("/var/lib/buildsmart")
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


def data_root(directory: Path, user: ServiceUser) -> Path:
    """Where member directories live: DIR/nodes, or (when the service user cannot reach DIR, e.g.
    under /root) a directory under /var/lib/buildsmart that DIR/nodes links to."""
    nodes = directory / "nodes"
    if nodes.is_symlink():
        return nodes.resolve()
    if user.can_traverse(directory):
        nodes.mkdir(parents=True, exist_ok=True)
        return nodes
    digest = hashlib.sha1(str(directory).encode()).hexdigest()[:12]
    target = FALLBACK_DATA_ROOT / digest
    target.mkdir(parents=True, exist_ok=True)
    FALLBACK_DATA_ROOT.chmod(0o755)
    if nodes.exists():
        raise ConfigError(f"{nodes} exists but the service user {user.name} cannot reach it; move DIR elsewhere")
    nodes.symlink_to(target)
    log.info("service user %s cannot reach %s; member data lives in %s (linked from %s)", user.name, directory, target, nodes)
    return target


def local_members(directory: Path, topo: Topology, user: ServiceUser) -> list[tuple[Group, local.LocalMember]]:
    root = data_root(directory, user)
    out = []
    for group in topo.groups:
        if not group.managed:
            continue
        for m in group.members:
            base = root / (m.data_dir or m.name)
            out.append((group, local.LocalMember(m, base / "data", base / "postgres.log")))
    return out


def _ensure_port_free(
    topo: Topology, group: Group, lm: local.LocalMember, user: ServiceUser
) -> tuple[Topology, local.LocalMember]:
    """If our recorded port is now used by someone else, move the member to a free port."""
    if local.pid_of(lm.data_dir) is not None or not is_listening(lm.member.host, lm.member.port):
        return topo, lm
    taken = frozenset(m.port for g in topo.groups for m in g.members)
    new_member = replace(lm.member, port=free_port(exclude=taken))
    log.info("port %d of %s is taken by another process; moving it to %d", lm.member.port, lm.name, new_member.port)
    members = tuple(new_member if m.name == lm.member.name else m for m in group.members)
    new_lm = replace(lm, member=new_member)
    if local.is_initialized(new_lm):
        local.set_port(new_lm, user)
    return topo.with_group(replace(group, members=members)), new_lm


def _start_member(lm: local.LocalMember, user: ServiceUser, creds: Credentials) -> str:
    if not local.is_initialized(lm):
        local.initdb(lm, user, creds)
        started = local.start(lm, user)
        return f"{lm.name}: initialised and started on port {lm.member.port}" if started else f"{lm.name}: running"
    started = local.start(lm, user)
    return f"{lm.name}: started on port {lm.member.port}" if started else f"{lm.name}: already running on port {lm.member.port}"


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
        topo = new_local_topology(n, layout, user, replicas=r)
        creds = Credentials.generate()
        topology.save_credentials(directory, creds)
        if r > 0:
            hasettings.save(directory, ha.new_settings(topo, r, synchronous))
        shape = f"{len(points) + 1} fragments" if points else "fragments laid out by the first load"
        report(f"new cluster in {directory}: coordinator + {n} workers, {shape}, {r} replica(s) per node")
    if hasettings.exists(directory):
        topo = _up_patroni(directory, topo, creds, user, report)
    else:
        topo = _up_plain(directory, topo, creds, user, report)
    if new and balancer_paused:
        _pause_balancer(topo, creds, "started paused (`buildsmart balancer resume` starts it)")
    report(f"task runner running (pid {tasks_runner.start_daemon(directory)})")
    return topo


def _pause_balancer(topo: Topology, creds: Credentials, note: str) -> None:
    with connect(superuser_target(topo.coordinator, creds), "up", autocommit=True) as conn:
        catalog.set_paused(conn, True, note)


def _up_plain(directory: Path, topo: Topology, creds: Credentials, user: ServiceUser, report: Report) -> Topology:
    members = local_members(directory, topo, user)
    checked = []
    for group, lm in members:
        topo, lm = _ensure_port_free(topo, topo.group(group.name), lm, user)
        checked.append(lm)
    topology.save(directory, topo)
    extension.copy_files()
    with ThreadPoolExecutor(max_workers=4) as pool:
        for line in pool.map(lambda lm: _start_member(lm, user, creds), checked):
            report(line)
    for group in topo.groups:
        if group.managed:
            _bootstrap_group(group, creds)
    write_passfile(directory, creds, user)
    applied = setup(topo, creds, directory)
    report(f"setup: {len(applied)} change(s) applied" if applied else "setup: catalog and fragments up to date")
    return topo


def _up_patroni(directory: Path, topo: Topology, creds: Credentials, user: ServiceUser, report: Report) -> Topology:
    """Patroni groups: etcd, members (leaders first), database and roles, setup, then the supervisor."""
    settings = hasettings.load(directory)
    topology.save(directory, topo)
    extension.copy_files()
    members = [PatroniMember(g, lm) for g, lm in local_members(directory, topo, user)]
    ha.start_groups(data_root(directory, user), topo, creds, settings, members, user, report)
    for group in topo.groups:
        if group.managed:
            _bootstrap_group(group, creds)
    write_passfile(directory, creds, user)
    applied = setup(topo, creds, directory)
    report(f"setup: {len(applied)} change(s) applied" if applied else "setup: catalog and fragments up to date")
    supervisor.start_daemon(directory)
    report("failover supervisor running")
    return topo


def _down_patroni(directory: Path, topo: Topology, user: ServiceUser, report: Report) -> None:
    if supervisor.stop_daemon(directory):
        report("failover supervisor: stopped")
    members = [PatroniMember(g, lm) for g, lm in local_members(directory, topo, user)]
    settings = hasettings.load(directory)
    leaders = ha.current_leaders(topo, settings) if etcd_running(directory, settings, user) else {}
    if leaders:
        settings = replace(settings, last_leaders={**settings.last_leaders, **leaders})
        hasettings.save(directory, settings)
    ha.stop_groups(data_root(directory, user), topo, settings, members, user, report)


def etcd_running(directory: Path, settings: hasettings.HaSettings, user: ServiceUser) -> bool:
    return etcd.is_running(ha.local_etcd(data_root(directory, user), settings))


def down(directory: Path, purge: bool = False, report: Report = _quiet) -> None:
    directory = directory.resolve()
    if not topology.exists(directory):
        if purge and directory.exists():
            shutil.rmtree(directory)
        report(f"no cluster in {directory}")
        return
    topo = topology.load(directory)
    user = service_user(topo.service_user)
    stopped = tasks_runner.stop_daemon(directory)  # first: it works on the servers stopped below
    if stopped is not None:
        report(f"task runner: stopped (pid {stopped})")
    metadata_store.stop(directory, report)  # the MongoDB-protocol server `up` may have started
    if hasettings.exists(directory):
        _down_patroni(directory, topo, user, report)
        _purge(directory, purge, report)
        return
    members = local_members(directory, topo, user)
    errors = []
    with ThreadPoolExecutor(max_workers=4) as pool:
        futures = {lm.name: pool.submit(local.stop, lm, user) for _, lm in members}
    for name, fut in futures.items():
        try:
            report(f"{name}: stopped" if fut.result() else f"{name}: was not running")
        except NodeError as exc:
            errors.append(str(exc))
    if errors:
        raise NodeError("; ".join(errors))
    _purge(directory, purge, report)


def _purge(directory: Path, purge: bool, report: Report) -> None:
    if purge:
        nodes = directory / "nodes"
        if nodes.is_symlink():
            shutil.rmtree(nodes.resolve(), ignore_errors=True)
        shutil.rmtree(directory)
        report(f"purged {directory}")


# ---------------------------------------------------------------- remote nodes


def init_remote(directory: Path, spec: ClusterSpec, report: Report = _quiet) -> Topology:
    """Set up servers we did not start (from a spec) and remember them in DIR."""
    directory = directory.resolve()
    topo = spec.topology
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
