"""Integrity of a running cluster, checked on demand (``buildsmart check``) and on a schedule.

What the product promises, verified against the servers themselves (PostgreSQL only: no files,
no process table, so it works the same on remote hosts):

- catalog: the catalog's fragments, the coordinator's foreign partitions (bounds, server, remote
  table) and the workers' fragment tables agree, and no worker holds a fragment table the
  catalog does not place there;
- placement: every row of a fragment lies inside its building range (and time range, for a
  building split by time) and inside the bounds of the time partition that holds it;
- replicas: each replica holds what its primary holds. Per fragment, the primary's table is
  locked against writes for a moment while a snapshot is taken there and, once each replica has
  replayed up to that point, on the replica too; the lock is then released and per-partition
  counts and checksums (the one checksum function of moves and backups,
  :func:`orchestrator.elastic.verify.unit_sums`) are compared at leisure in those snapshots;
- corruption: heap pages and btree indexes of every time partition, with PostgreSQL's amcheck,
  on primaries and replicas (data checksums are on, so a damaged page fails here).

Every finding names the node, the object and what is wrong. The outcome of each run is recorded
in ``buildsmart.check_runs`` on the coordinator, where ``status`` reads the last one.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Literal

import psycopg
from psycopg import sql

from orchestrator import catalog, topology
from orchestrator.connections import Target, connect, superuser_target
from orchestrator.elastic import verify
from orchestrator.energy.rollups import follows_layout, rollup_tables
from orchestrator.exceptions import BuildSmartError, NodeError
from orchestrator.fragments import SHARD_SCHEMA, Fragment
from orchestrator.topology import Credentials, Group, Topology

log = logging.getLogger(__name__)

FindingKind = Literal["catalog", "placement", "replica", "corruption", "unreachable"]
Progress = Callable[[str], None]
SCHEDULED_EVERY = timedelta(hours=24)  # the task runner's integrity check (orchestrator/tasks)
REPLAY_TIMEOUT_S = 5.0  # writes to the table wait meanwhile: a lagging replica is reported, not waited for
LOCK_TIMEOUT_MS = 5_000
COORDINATOR_TABLES = ("buildsmart.nodes", "buildsmart.fragments", "buildsmart.placements", "public.buildings", "public.devices")


@dataclass(frozen=True)
class Finding:
    kind: FindingKind
    node: str
    obj: str
    detail: str

    def __str__(self) -> str:
        return f"{self.kind}: {self.node}: {self.obj}: {self.detail}"


@dataclass(frozen=True)
class CheckReport:
    started_at: datetime
    seconds: float
    fragments: int
    partitions: int
    replicas_compared: int
    findings: tuple[Finding, ...] = field(default_factory=tuple)

    @property
    def ok(self) -> bool:
        return not self.findings

    def summary(self) -> str:
        verdict = "clean" if self.ok else f"{len(self.findings)} finding(s)"
        return (
            f"{verdict}: {self.fragments} fragment(s), {self.partitions} time partition(s), "
            f"{self.replicas_compared} replica comparison(s) in {self.seconds:.1f} s"
        )


@dataclass
class _Run:
    topo: Topology
    creds: Credentials
    progress: Progress
    findings: list[Finding] = field(default_factory=list)
    partitions: int = 0
    replicas_compared: int = 0

    def add(self, kind: FindingKind, node: str, obj: str, detail: str) -> None:
        finding = Finding(kind, node, obj, detail)
        log.warning("check: %s", finding)
        self.findings.append(finding)


def _member_target(group: Group, host: str, port: int, creds: Credentials) -> Target:
    return Target(f"{group.name}/{host}:{port}", host, str(port), group.dbname, creds.superuser, creds.superuser_password)


def _members(group: Group, creds: Credentials) -> tuple[Target | None, list[Target], list[str]]:
    """The primary and replicas of a group, asked of each member (no Patroni, no files)."""
    primary: Target | None = None
    replicas: list[Target] = []
    down: list[str] = []
    for m in group.members:
        target = _member_target(group, m.host, m.port, creds)
        try:
            with connect(target, "check", autocommit=True, primary=False) as conn:
                row = conn.execute("SELECT pg_catalog.pg_is_in_recovery()").fetchone()
        except BuildSmartError:
            down.append(f"{m.host}:{m.port}")
            continue
        if row and row[0]:
            replicas.append(target)
        else:
            primary = target
    return primary, replicas, down


# ---------------------------------------------------------------- catalog


def _check_catalog(run: _Run, coord: psycopg.Connection, fragments: tuple[Fragment, ...]) -> None:
    rows = coord.execute(
        "SELECT c.relname, ft.ftoptions, s.srvname, pg_catalog.pg_get_expr(c.relpartbound, c.oid) "
        "FROM pg_catalog.pg_partition_tree('public.readings') t JOIN pg_catalog.pg_class c ON c.oid = t.relid "
        "JOIN pg_catalog.pg_foreign_table ft ON ft.ftrelid = c.oid JOIN pg_catalog.pg_foreign_server s ON s.oid = ft.ftserver "
        "WHERE t.isleaf"
    ).fetchall()
    coordinator = {str(r[0]): (list(r[1] or []), str(r[2]), str(r[3])) for r in rows}
    servers: dict[str, str] = {
        str(r[0]): str(r[1])
        for r in coord.execute("SELECT name, server_name FROM buildsmart.nodes WHERE role = 'worker'").fetchall()
    }
    moving = {
        int(r[0])
        for r in coord.execute(
            "SELECT (args ->> 'fragment_id')::int FROM buildsmart.jobs WHERE state IN ('scheduled', 'running') "
            "AND args ? 'fragment_id'"
        ).fetchall()
    }
    for f in fragments:
        got = coordinator.pop(f.shard_name, None)
        if got is None:
            run.add("catalog", "coordinator", f.shard_name, "in the catalog but no foreign partition of readings")
            continue
        options, server, _bound = got
        if server != servers.get(f.node):
            run.add("catalog", "coordinator", f.shard_name, f"foreign table on server {server}, catalog places it on {f.node}")
        if f"table_name={f.shard_name}" not in options or f"schema_name={SHARD_SCHEMA}" not in options:
            run.add("catalog", "coordinator", f.shard_name, f"foreign table reads {options}, not {SHARD_SCHEMA}.{f.shard_name}")
    for name in coordinator:
        run.add("catalog", "coordinator", name, "foreign partition of readings that the catalog does not know")
    for worker in run.topo.workers:
        placed = {f.shard_name for f in fragments if f.node == worker.name}
        in_flight = {f"readings_f{fid}" for fid in moving}
        try:
            with connect(superuser_target(worker, run.creds), "check", autocommit=True) as conn:
                tables = {
                    str(r[0])
                    for r in conn.execute(
                        "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
                        "WHERE n.nspname = %s AND c.relkind = 'p' AND NOT c.relispartition",
                        (SHARD_SCHEMA,),
                    ).fetchall()
                }
        except BuildSmartError as exc:
            run.add("unreachable", worker.name, "node", str(exc).splitlines()[0])
            continue
        for missing in sorted(placed - tables):
            run.add("catalog", worker.name, missing, "placed here by the catalog but the table does not exist")
        for extra in sorted(tables - placed - in_flight):
            run.add("catalog", worker.name, extra, "fragment table the catalog does not place on this node")


# ---------------------------------------------------------------- placement


def _partition_constraints(conn: psycopg.Connection, shard: str) -> dict[str, str]:
    """Leaf partitions of a fragment table and their partition constraints."""
    rows = conn.execute(
        "SELECT c.relname, pg_catalog.pg_get_partition_constraintdef(c.oid) "
        "FROM pg_catalog.pg_partition_tree(%s::regclass) t JOIN pg_catalog.pg_class c ON c.oid = t.relid WHERE t.isleaf",
        (f"{SHARD_SCHEMA}.{shard}",),
    ).fetchall()
    return {str(r[0]): str(r[1]) for r in rows if r[1] is not None}


def _check_placement(run: _Run, coord: psycopg.Connection, fragments: tuple[Fragment, ...]) -> None:
    fragment_rules = {
        str(r[0]): str(r[1])
        for r in coord.execute(
            "SELECT c.relname, pg_catalog.pg_get_partition_constraintdef(c.oid) "
            "FROM pg_catalog.pg_partition_tree('public.readings') t JOIN pg_catalog.pg_class c ON c.oid = t.relid "
            "WHERE t.isleaf AND c.relkind = 'f'"
        ).fetchall()
        if r[1] is not None
    }
    by_node: dict[str, list[Fragment]] = {}
    for f in fragments:
        by_node.setdefault(f.node, []).append(f)
    for node, frags in by_node.items():
        try:
            conn_cm = connect(superuser_target(run.topo.group(node), run.creds), "check", autocommit=True)
        except BuildSmartError as exc:
            run.add("unreachable", node, "node", str(exc).splitlines()[0])
            continue
        with conn_cm as conn:
            # the constraints are what is being checked: the planner must not assume them
            conn.execute("SET constraint_exclusion = off")
            for f in frags:
                run.progress(f"placement of {f.shard_name} on {node}")
                rule = fragment_rules.get(f.shard_name)
                if rule:
                    row = conn.execute(
                        sql.SQL("SELECT count(*) FROM {} WHERE NOT ({})").format(
                            sql.Identifier(SHARD_SCHEMA, f.shard_name), sql.SQL(rule)
                        )
                    ).fetchone()
                    if row and row[0]:
                        run.add("placement", node, f.shard_name, f"{row[0]} row(s) outside the fragment's range ({rule})")
                    # its rollups must follow its range too, once the rollups task caught up with a split
                    for name in rollup_tables(conn, f.shard_name) if follows_layout(conn, f) else []:
                        outside = sql.SQL("SELECT count(*) FROM {} WHERE NOT ({})")
                        row = conn.execute(outside.format(sql.Identifier(SHARD_SCHEMA, name), sql.SQL(rule))).fetchone()
                        if row and row[0]:
                            run.add("placement", node, name, f"{row[0]} rollup row(s) outside the fragment's range ({rule})")
                for leaf, constraint in _partition_constraints(conn, f.shard_name).items():
                    run.partitions += 1
                    row = conn.execute(
                        sql.SQL("SELECT count(*) FROM {} WHERE NOT ({})").format(
                            sql.Identifier(SHARD_SCHEMA, leaf), sql.SQL(constraint)
                        )
                    ).fetchone()
                    if row and row[0]:
                        run.add("placement", node, leaf, f"{row[0]} row(s) outside the time partition's bounds")


# ---------------------------------------------------------------- replicas


@contextmanager
def _snapshot(target: Target) -> Iterator[psycopg.Connection]:
    """A connection holding a REPEATABLE READ snapshot for as long as the block runs."""
    conn = connect(target, "check:snapshot", primary=False)
    try:
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
        conn.execute("SELECT 1")  # the snapshot is taken here
        yield conn
    finally:
        with suppress(Exception):
            conn.rollback()
        conn.close()


def _wait_replay(target: Target, lsn: str) -> bool:
    deadline = time.monotonic() + REPLAY_TIMEOUT_S
    with connect(target, "check:replay", autocommit=True, primary=False) as conn:
        while time.monotonic() < deadline:
            row = conn.execute("SELECT pg_catalog.pg_last_wal_replay_lsn() >= %s::pg_lsn", (lsn,)).fetchone()
            if row and row[0]:
                return True
            time.sleep(0.05)
    return False


def _same_state(
    run: _Run,
    primary: Target,
    replicas: list[Target],
    locks: Sequence[sql.Composable],
    measure: Callable[[psycopg.Connection], dict[str, verify.Sums]],
    what: str,
) -> None:
    """Snapshots of one state on the primary and every replica, then compare what ``measure`` returns."""
    lock = connect(primary, "check:lock", primary=False)
    opened: list[tuple[Target, psycopg.Connection]] = []
    try:
        lock.execute(f"SET LOCAL lock_timeout = {LOCK_TIMEOUT_MS}")
        for stmt in locks:
            lock.execute(sql.SQL("LOCK TABLE {} IN SHARE MODE").format(stmt))  # writers wait; readers do not
        prim_cm = _snapshot(primary)
        prim = prim_cm.__enter__()
        row = prim.execute("SELECT pg_catalog.pg_current_wal_lsn()::text").fetchone()
        lsn = str(row[0]) if row else "0/0"
        replica_cms = []
        for rt in replicas:
            if not _wait_replay(rt, lsn):
                run.add("replica", rt.group, what, f"did not replay up to {lsn} within {REPLAY_TIMEOUT_S:.0f} s")
                continue
            cm = _snapshot(rt)
            opened.append((rt, cm.__enter__()))
            replica_cms.append(cm)
        lock.rollback()  # writes go on; the snapshots keep the state they saw
        try:
            want = measure(prim)
            for rt, conn in opened:
                got = measure(conn)
                run.replicas_compared += 1
                log.info("check: %s on %s: %d unit(s) compared at %s", what, rt.group, len(want), lsn)
                for unit in sorted(set(want) | set(got)):
                    if want.get(unit) != got.get(unit):
                        run.add(
                            "replica",
                            rt.group,
                            f"{what} {unit}",
                            f"primary has {want.get(unit, 'nothing')} (rows, checksum), replica {got.get(unit, 'nothing')}",
                        )
        finally:
            for cm in replica_cms:
                cm.__exit__(None, None, None)
            prim_cm.__exit__(None, None, None)
    except psycopg.Error as exc:
        run.add("replica", primary.group, what, f"could not compare: {str(exc).strip().splitlines()[0]}")
    finally:
        with suppress(Exception):
            lock.rollback()
        lock.close()


def _table_sums(tables: tuple[str, ...]) -> Callable[[psycopg.Connection], dict[str, verify.Sums]]:
    def measure(conn: psycopg.Connection) -> dict[str, verify.Sums]:
        return {t: verify.table_sums(conn, sql.Identifier(*t.split("."))) for t in tables}

    return measure


def _check_replicas(run: _Run, fragments: tuple[Fragment, ...]) -> None:
    for group in run.topo.groups:
        if len(group.members) < 2:
            continue
        primary, replicas, down = _members(group, run.creds)
        for d in down:
            run.add("unreachable", group.name, d, "member not reachable; its replica state was not checked")
        if primary is None or not replicas:
            continue
        if group.role == topology.COORDINATOR:
            run.progress(f"replicas of {group.name}: catalog and metadata tables")
            with connect(primary, "check", autocommit=True, primary=False) as conn:
                present = tuple(
                    t
                    for t in COORDINATOR_TABLES
                    if conn.execute("SELECT pg_catalog.to_regclass(%s) IS NOT NULL", (t,)).fetchone() == (True,)
                )
            locks = [sql.Identifier(*t.split(".")) for t in present]
            _same_state(run, primary, replicas, locks, _table_sums(present), "coordinator tables")
            continue
        for f in (f for f in fragments if f.node == group.name):
            run.progress(f"replicas of {f.shard_name} on {group.name}")
            shard = f.shard_name
            _same_state(
                run,
                primary,
                replicas,
                [sql.Identifier(SHARD_SCHEMA, shard)],
                lambda conn, shard=shard: verify.unit_sums(conn, shard),  # type: ignore[misc]
                shard,
            )


# ---------------------------------------------------------------- corruption


def _check_pages(run: _Run, fragments: tuple[Fragment, ...]) -> None:
    for group in run.topo.groups:
        if group.role != topology.WORKER:
            continue
        shards = [f.shard_name for f in fragments if f.node == group.name]
        primary, replicas, _down = _members(group, run.creds)
        targets = ([primary] if primary else []) + replicas
        for target in targets:
            run.progress(f"pages and indexes on {target.group}")
            with connect(target, "check:amcheck", autocommit=True, primary=False) as conn:
                if target is primary:
                    conn.execute("CREATE EXTENSION IF NOT EXISTS amcheck SCHEMA buildsmart")
                row = conn.execute(
                    "SELECT n.nspname FROM pg_catalog.pg_extension e JOIN pg_catalog.pg_namespace n ON n.oid = e.extnamespace "
                    "WHERE e.extname = 'amcheck'"
                ).fetchone()
                if row is None:
                    continue  # created on the primary; the replica has not replayed it yet
                schema = str(row[0])
                for shard in shards:
                    leaves = conn.execute(
                        "SELECT c.oid::regclass::text, c.oid FROM pg_catalog.pg_partition_tree(%s::regclass) t "
                        "JOIN pg_catalog.pg_class c ON c.oid = t.relid WHERE t.isleaf",
                        (f"{SHARD_SCHEMA}.{shard}",),
                    ).fetchall()
                    for leaf, oid in leaves:
                        _amcheck_leaf(run, conn, target.group, schema, str(leaf), int(oid))


def _amcheck_leaf(run: _Run, conn: psycopg.Connection, where: str, schema: str, leaf: str, oid: int) -> None:
    amcheck = sql.Identifier(schema)
    try:
        for blk, offnum, msg in conn.execute(
            sql.SQL("SELECT blkno, offnum, msg FROM {}.verify_heapam(%s::regclass, on_error_stop => false)").format(amcheck),
            (oid,),
        ).fetchall():
            run.add("corruption", where, leaf, f"heap block {blk} item {offnum}: {msg}")
    except psycopg.Error as exc:
        run.add("corruption", where, leaf, f"heap: {str(exc).strip().splitlines()[0]}")
    for (index,) in conn.execute(
        "SELECT indexrelid::regclass::text FROM pg_catalog.pg_index i JOIN pg_catalog.pg_class c ON c.oid = i.indexrelid "
        "JOIN pg_catalog.pg_am am ON am.oid = c.relam WHERE i.indrelid = %s AND am.amname = 'btree'",
        (oid,),
    ).fetchall():
        try:
            conn.execute(sql.SQL("SELECT {}.bt_index_check(%s::regclass, true)").format(amcheck), (index,))
        except psycopg.Error as exc:
            run.add("corruption", where, str(index), f"index: {str(exc).strip().splitlines()[0]}")


# ---------------------------------------------------------------- the run


def run_check(directory: Path, *, replicas: bool = True, pages: bool = True, progress: Progress = lambda _: None) -> CheckReport:
    """Run every check on the cluster in DIR; records the outcome on the coordinator."""
    directory = directory.resolve()
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    run = _Run(topo, creds, progress)
    started_at = datetime.now(UTC)
    t0 = time.monotonic()
    log.info("integrity check of %s started", directory)
    with connect(superuser_target(topo.coordinator, creds), "check", autocommit=True) as coord:
        fragments = catalog.load_fragments(coord)
        progress("catalog, foreign partitions and fragment tables")
        _check_catalog(run, coord, fragments)
        _check_placement(run, coord, fragments)
        if replicas:
            _check_replicas(run, fragments)
        if pages:
            _check_pages(run, fragments)
        report = CheckReport(
            started_at, time.monotonic() - t0, len(fragments), run.partitions, run.replicas_compared, tuple(run.findings)
        )
        record(coord, report)
    log.info("integrity check of %s: %s", directory, report.summary())
    return report


def record(coord: psycopg.Connection, report: CheckReport) -> None:
    try:
        catalog.record_check_run(coord, report.started_at, report.ok, report.summary(), [asdict(f) for f in report.findings])
    except psycopg.Error as exc:
        raise NodeError(f"the check ran ({report.summary()}) but could not be recorded on the coordinator: {exc}") from exc


def last_check(coord: psycopg.Connection) -> catalog.CheckRun | None:
    """The newest recorded run, for status."""
    return catalog.last_check_run(coord)


def check_due(last: catalog.CheckRun | None, created_at: datetime, now: datetime, every: timedelta = SCHEDULED_EVERY) -> bool:
    """Whether the task runner's scheduled check is due: ``every`` after the last run, or after the
    cluster was created when none ran (not during the first load of a new cluster). Pure."""
    since = last.finished_at if last is not None else created_at
    return now - since >= every
