"""Reading and writing the coordinator catalog (buildsmart.*), and observing what exists on each
node. The one place that knows the catalog's tables: other modules call these functions."""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

import psycopg
from psycopg.types.json import Jsonb

from orchestrator import EXTENSION_NAME, EXTENSION_VERSION
from orchestrator.fragments import SHARD_SCHEMA, Fragment
from orchestrator.nodeconn import NodeConnections
from orchestrator.planner import NodeSpec, ObservedCluster

log = logging.getLogger(__name__)

FRAGMENTS_SQL = """
SELECT f.fragment_id, f.range_from, f.range_to, p.node_name, f.time_interval::text, f.ts_from, f.ts_to, f.time_group
  FROM buildsmart.fragments f
  JOIN buildsmart.placements p ON p.fragment_id = f.fragment_id AND p.state = 'active'
 WHERE f.logicalrelid = 'public.readings'::regclass
 ORDER BY f.fragment_id
"""


def has_catalog(conn: psycopg.Connection) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT 1 FROM pg_catalog.pg_extension WHERE extname = %s", (EXTENSION_NAME,))
        ext = cur.fetchone() is not None
        cur.execute("SELECT pg_catalog.to_regclass('public.readings') IS NOT NULL")
        row = cur.fetchone()
    return ext and bool(row and row[0])


def load_fragments(conn: psycopg.Connection) -> tuple[Fragment, ...]:
    with conn.cursor() as cur:
        # a cluster still on release 0.1 (before `buildsmart upgrade`) has no time ranges yet
        cur.execute(
            "SELECT 1 FROM pg_catalog.pg_attribute WHERE attrelid = 'buildsmart.fragments'::regclass "
            "AND attname = 'time_group' AND NOT attisdropped"
        )
        query = FRAGMENTS_SQL
        if cur.fetchone() is None:
            query = query.replace("f.ts_from, f.ts_to, f.time_group", "NULL::timestamptz, NULL::timestamptz, NULL::text")
        cur.execute(query)
        return tuple(Fragment(*row) for row in cur.fetchall())


def _extension_ok(conn: psycopg.Connection, coordinator: bool = False) -> bool:
    """The current extension version is installed (and, on the coordinator, its C module is
    preloaded into every session of the database)."""
    with conn.cursor() as cur:
        cur.execute("SELECT extversion FROM pg_catalog.pg_extension WHERE extname = %s", (EXTENSION_NAME,))
        row = cur.fetchone()
        if row is None or row[0] != EXTENSION_VERSION:
            return False
        if not coordinator:
            return True
        cur.execute(
            "SELECT 1 FROM pg_catalog.pg_db_role_setting s JOIN pg_catalog.pg_database d ON d.oid = s.setdatabase "
            "WHERE d.datname = current_database() AND s.setrole = 0 AND %s = ANY (s.setconfig)",
            (f"session_preload_libraries={EXTENSION_NAME}",),
        )
        return cur.fetchone() is not None


def _worker_tables(conn: psycopg.Connection) -> set[str]:
    with conn.cursor() as cur:
        cur.execute(
            "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'p' AND NOT c.relispartition",
            (SHARD_SCHEMA,),
        )
        return {r[0] for r in cur.fetchall()}


def _old_triggers(conn: psycopg.Connection) -> set[str]:
    """Fragment tables whose latest-wins trigger is still the 0.1 PL/pgSQL function."""
    with conn.cursor() as cur:
        cur.execute(
            "SELECT c.relname FROM pg_catalog.pg_trigger t "
            "JOIN pg_catalog.pg_class c ON c.oid = t.tgrelid JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "JOIN pg_catalog.pg_proc p ON p.oid = t.tgfoid JOIN pg_catalog.pg_namespace pn ON pn.oid = p.pronamespace "
            "WHERE n.nspname = %s AND c.relkind = 'p' AND NOT c.relispartition AND t.tgname = 'readings_replace' "
            "AND NOT t.tgisinternal AND (pn.nspname, p.proname) <> ('buildsmart', 'replace_existing')",
            (SHARD_SCHEMA,),
        )
        return {r[0] for r in cur.fetchall()}


def _has_energy_schema(conn: psycopg.Connection) -> bool:
    row = conn.execute(
        "SELECT pg_catalog.to_regclass('public.readings_daily') IS NOT NULL "
        "AND pg_catalog.to_regclass('public.meter_replacements') IS NOT NULL "
        "AND pg_catalog.to_regclass('public.readings_monthly') IS NOT NULL "
        # a downgrade to 0.1 drops these with the functions they call; setup makes them again
        "AND EXISTS (SELECT 1 FROM pg_catalog.pg_trigger WHERE tgrelid = 'public.meters'::regclass "
        "            AND tgname = 'reference_changed') "
        "AND EXISTS (SELECT 1 FROM pg_catalog.pg_constraint WHERE conrelid = 'public.buildings'::regclass "
        "            AND conname = 'buildings_time_zone_known')"
    ).fetchone()
    return bool(row and row[0])


def observe(nodes: NodeConnections) -> ObservedCluster:
    """Snapshot the catalog, foreign servers and fragment tables of every node."""
    coord = nodes.coordinator
    coordinator_name = nodes.topology.coordinator.name
    ext_ok = {
        name for name in (g.name for g in nodes.topology.groups) if _extension_ok(nodes.get(name), name == coordinator_name)
    }
    # an older extension still has a readable catalog (an upgrade); only a new coordinator has none
    if not has_catalog(coord):
        worker_tables = {
            (w.name, t) for w in nodes.topology.workers if w.name in ext_ok for t in _worker_tables(nodes.get(w.name))
        }
        return ObservedCluster(extension_ok=frozenset(ext_ok), worker_tables=frozenset(worker_tables))
    with coord.cursor() as cur:
        cur.execute("SELECT name, role, hosts, ports, dbname FROM buildsmart.nodes")
        catalog_nodes = {r[0]: NodeSpec(*r) for r in cur.fetchall()}
        cur.execute(
            "SELECT s.srvname, "
            " (SELECT split_part(o, '=', 2) FROM unnest(s.srvoptions) o WHERE o LIKE 'host=%%'), "
            " (SELECT split_part(o, '=', 2) FROM unnest(s.srvoptions) o WHERE o LIKE 'port=%%'), "
            " (SELECT split_part(o, '=', 2) FROM unnest(s.srvoptions) o WHERE o LIKE 'dbname=%%') "
            "FROM pg_catalog.pg_foreign_server s"
        )
        servers = {r[0]: (r[1], r[2], r[3]) for r in cur.fetchall()}
        # What each PUBLIC mapping does, in MappingSpec.describe() form (never its password).
        cur.execute(
            "SELECT s.srvname, "
            " (SELECT substr(o, 6) FROM unnest(um.umoptions) o WHERE o LIKE 'user=%%'), "
            " (SELECT substr(o, 10) FROM unnest(s.srvoptions) o WHERE o LIKE 'passfile=%%'), "
            " EXISTS (SELECT 1 FROM unnest(um.umoptions) o WHERE o LIKE 'password=%%') "
            "FROM pg_catalog.pg_user_mapping um "
            "JOIN pg_catalog.pg_foreign_server s ON s.oid = um.umserver WHERE um.umuser = 0"
        )
        mappings = {
            r[0]: f"user={r[1]} password" if r[3] or not r[2] else f"user={r[1]} passfile={r[2]}" for r in cur.fetchall()
        }
        cur.execute(
            "SELECT c.relname FROM pg_catalog.pg_class c JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace "
            "WHERE n.nspname = %s AND c.relkind = 'f' AND c.relispartition",
            (SHARD_SCHEMA,),
        )
        partitions = {r[0] for r in cur.fetchall()}
    worker_tables = set()
    old_triggers = set()
    for worker in nodes.topology.workers:
        # also on workers whose extension is older: the tables exist, only their trigger changes
        worker_tables |= {(worker.name, t) for t in _worker_tables(nodes.get(worker.name))}
        old_triggers |= {(worker.name, t) for t in _old_triggers(nodes.get(worker.name))}
    return ObservedCluster(
        extension_ok=frozenset(ext_ok),
        app_schema=True,
        energy_schema=_has_energy_schema(coord),
        nodes=catalog_nodes,
        servers=servers,
        user_mappings=mappings,
        fragments=load_fragments(coord),
        worker_tables=frozenset(worker_tables),
        old_triggers=frozenset(old_triggers),
        coordinator_partitions=frozenset(partitions),
    )


# ---------------------------------------------------------------- routing version and fragments


def catalog_version(conn: psycopg.Connection) -> int:
    row = conn.execute("SELECT version FROM buildsmart.catalog_version").fetchone()
    return int(row[0]) if row else 0


def bump_version(conn: psycopg.Connection) -> int:
    """Inside the caller's switching transaction: loaders re-route after it commits."""
    row = conn.execute("SELECT buildsmart.bump_catalog_version()").fetchone()
    return int(row[0]) if row else 0


FRAGMENT_ID_LOCK = 1112755528  # advisory lock (with jobs' 1112755525, the runner's ...526, layout ...527)


def next_fragment_id(conn: psycopg.Connection) -> int:
    """A fragment id nobody else holds: from buildsmart.fragment_id_seq, first moved past ids set
    without it (the initial layout, an older release's fragments, ids reserved by open split
    jobs). The catch-up runs under an advisory lock so two callers never both reset it."""
    with conn.transaction():
        conn.execute("SELECT pg_catalog.pg_advisory_xact_lock(%s, 0)", (FRAGMENT_ID_LOCK,))
        conn.execute(
            "SELECT pg_catalog.setval('buildsmart.fragment_id_seq', m) FROM ("
            " SELECT greatest("
            "  (SELECT pg_catalog.max(fragment_id) FROM buildsmart.fragments),"
            "  (SELECT pg_catalog.max((args ->> 'new_fragment_id')::integer) FROM buildsmart.jobs"
            "    WHERE kind = 'split' AND state IN ('scheduled', 'running'))) AS m) s "
            "WHERE m >= (SELECT last_value FROM buildsmart.fragment_id_seq)"
        )
        row = conn.execute("SELECT pg_catalog.nextval('buildsmart.fragment_id_seq')").fetchone()
    assert row is not None
    fid = int(row[0])
    log.info("reserved fragment id %d", fid)
    return fid


def claimed_fragment_ids(conn: psycopg.Connection, except_job: int | None = None) -> frozenset[int]:
    """Ids whose fragment tables someone else owns: live fragments, and the new fragments of open
    split jobs other than ``except_job``. A rollback never drops the table of one of them."""
    rows = conn.execute(
        "SELECT fragment_id FROM buildsmart.fragments UNION "
        "SELECT (args ->> 'new_fragment_id')::integer FROM buildsmart.jobs "
        "WHERE kind = 'split' AND state IN ('scheduled', 'running') AND job_id IS DISTINCT FROM %s",
        (except_job,),
    ).fetchall()
    return frozenset(int(r[0]) for r in rows if r[0] is not None)


def insert_fragment(conn: psycopg.Connection, frag: Fragment) -> None:
    """Catalog rows of a new fragment and its active placement (in the caller's transaction)."""
    conn.execute(
        "INSERT INTO buildsmart.fragments (fragment_id, logicalrelid, shard_name, range_from, range_to, time_interval, "
        "ts_from, ts_to, time_group) VALUES (%s, 'public.readings'::regclass, %s, %s, %s, %s::interval, %s, %s, %s)",
        (frag.fragment_id, frag.shard_name, frag.range_from, frag.range_to, frag.time_interval, frag.ts_from, frag.ts_to,
         frag.time_group),
    )  # fmt: skip
    conn.execute("INSERT INTO buildsmart.placements (fragment_id, node_name) VALUES (%s, %s)", (frag.fragment_id, frag.node))


def update_fragment_range(conn: psycopg.Connection, frag: Fragment) -> None:
    """Store a fragment's (narrowed) building and time range and its time group."""
    conn.execute(
        "UPDATE buildsmart.fragments SET range_from = %s, range_to = %s, ts_from = %s, ts_to = %s, time_group = %s "
        "WHERE fragment_id = %s",
        (frag.range_from, frag.range_to, frag.ts_from, frag.ts_to, frag.time_group, frag.fragment_id),
    )


def delete_fragment(conn: psycopg.Connection, fragment_id: int) -> None:
    conn.execute("DELETE FROM buildsmart.fragments WHERE fragment_id = %s", (fragment_id,))


def active_workers(conn: psycopg.Connection) -> tuple[str, ...]:
    rows = conn.execute("SELECT name FROM buildsmart.nodes WHERE role = 'worker' AND is_active ORDER BY name").fetchall()
    return tuple(str(r[0]) for r in rows)


def inactive_workers(conn: psycopg.Connection) -> frozenset[str]:
    rows = conn.execute("SELECT name FROM buildsmart.nodes WHERE role = 'worker' AND NOT is_active").fetchall()
    return frozenset(str(r[0]) for r in rows)


def store_fragment_stats(conn: psycopg.Connection, stats: Mapping[int, tuple[int, int | None]]) -> None:
    """Last observed (bytes, rows) per fragment, for citus_shards and status."""
    for fid, (nbytes, rows) in stats.items():
        conn.execute(
            "INSERT INTO buildsmart.fragment_stats (fragment_id, size_bytes, row_count) SELECT %s, %s, %s "
            "WHERE EXISTS (SELECT 1 FROM buildsmart.fragments WHERE fragment_id = %s) "
            "ON CONFLICT (fragment_id) DO UPDATE SET size_bytes = EXCLUDED.size_bytes, row_count = EXCLUDED.row_count, "
            "observed_at = now()",
            (fid, nbytes, rows, fid),
        )


# ---------------------------------------------------------------- balancer state and decisions

BalancerAction = Literal["presplit", "split", "time_split", "move", "wait", "none", "pause", "resume", "config"]
DecisionOutcome = Literal["decided", "done", "failed", "skipped"]


@dataclass(frozen=True)
class BalancerState:
    paused: bool
    paused_note: str | None
    auto_layout: bool
    settings: Mapping[str, Any]
    changed_at: datetime


@dataclass(frozen=True)
class DecisionEntry:
    entry_id: int
    at: datetime
    action: str
    outcome: str
    fragment_id: int | None
    reason: str
    job_id: int | None
    detail: Mapping[str, Any]


def balancer_state(conn: psycopg.Connection) -> BalancerState:
    row = conn.execute("SELECT paused, paused_note, auto_layout, settings, changed_at FROM buildsmart.balancer").fetchone()
    if row is None:  # the row is made with the extension; only a hand-edited catalog lacks it
        return BalancerState(False, None, True, {}, datetime.now().astimezone())
    return BalancerState(bool(row[0]), row[1], bool(row[2]), dict(row[3]), row[4])


def set_paused(conn: psycopg.Connection, paused: bool, note: str | None = None) -> None:
    conn.execute(
        "UPDATE buildsmart.balancer SET paused = %s, paused_note = %s, changed_at = now()", (paused, note if paused else None)
    )
    log_decision(conn, "pause" if paused else "resume", note or ("paused" if paused else "resumed"), outcome="done")
    log.info("balancer %s%s", "paused" if paused else "resumed", f" ({note})" if note else "")


def set_auto_layout(conn: psycopg.Connection, auto: bool) -> None:
    conn.execute("UPDATE buildsmart.balancer SET auto_layout = %s, changed_at = now()", (auto,))
    log.info("automatic first-load layout %s", "on" if auto else "off (split points given by the user)")


def set_balancer_settings(conn: psycopg.Connection, settings: Mapping[str, Any]) -> None:
    conn.execute("UPDATE buildsmart.balancer SET settings = %s, changed_at = now()", (Jsonb(dict(settings)),))
    log_decision(conn, "config", f"settings now {dict(settings)}", outcome="done")
    log.info("balancer settings now %s", dict(settings))


def log_decision(
    conn: psycopg.Connection,
    action: BalancerAction,
    reason: str,
    *,
    fragment_id: int | None = None,
    outcome: DecisionOutcome = "decided",
    job_id: int | None = None,
    detail: Mapping[str, Any] | None = None,
) -> int:
    row = conn.execute(
        "INSERT INTO buildsmart.balancer_log (action, outcome, fragment_id, reason, job_id, detail) "
        "VALUES (%s, %s, %s, %s, %s, %s) RETURNING entry_id",
        (action, outcome, fragment_id, reason, job_id, Jsonb(dict(detail or {}))),
    ).fetchone()
    assert row is not None
    return int(row[0])


def finish_decision(
    conn: psycopg.Connection, entry_id: int, outcome: DecisionOutcome, job_id: int | None = None, **detail: Any
) -> None:
    conn.execute(
        "UPDATE buildsmart.balancer_log SET outcome = %s, job_id = coalesce(%s, job_id), detail = detail || %s "
        "WHERE entry_id = %s",
        (outcome, job_id, Jsonb(detail), entry_id),
    )


_SETTLE_SQL = """
WITH m AS (
  SELECT l.entry_id,
         (SELECT j.job_id FROM buildsmart.jobs j
           WHERE j.created_at >= l.at
             AND j.kind = CASE l.action WHEN 'presplit' THEN 'relayout' WHEN 'move' THEN 'move' ELSE 'split' END
             AND (l.action = 'presplit' OR (j.args ->> 'fragment_id')::int = l.fragment_id)
           ORDER BY j.job_id LIMIT 1) AS job_id
    FROM buildsmart.balancer_log l
   WHERE l.outcome = 'decided' AND l.action IN ('presplit', 'split', 'time_split', 'move')
)
UPDATE buildsmart.balancer_log l
   SET outcome = CASE j.state WHEN 'done' THEN 'done' ELSE 'failed' END, job_id = j.job_id,
       detail = l.detail || jsonb_build_object('finished_by', 'a later run (the process that started it stopped)')
  FROM m JOIN buildsmart.jobs j ON j.job_id = m.job_id
 WHERE l.entry_id = m.entry_id AND j.state IN ('done', 'failed', 'cancelled')
"""


def settle_decisions(conn: psycopg.Connection) -> int:
    """Operations decided by a process that stopped before recording their outcome take the
    outcome of their job (which a later run finished or rolled back). Returns how many."""
    n = conn.execute(_SETTLE_SQL).rowcount
    if n:
        log.info("recorded the outcome of %d decision(s) whose process had stopped", n)
    return n


def recent_decisions(conn: psycopg.Connection, limit: int = 20, idle: bool = True) -> tuple[DecisionEntry, ...]:
    rows = conn.execute(
        "SELECT entry_id, at, action, outcome, fragment_id, reason, job_id, detail FROM buildsmart.balancer_log "
        "WHERE %s OR action NOT IN ('wait', 'none') ORDER BY entry_id DESC LIMIT %s",
        (idle, limit),
    ).fetchall()
    return tuple(DecisionEntry(int(r[0]), r[1], r[2], r[3], r[4], r[5], r[6], dict(r[7])) for r in rows)


def prune_decisions(conn: psycopg.Connection, keep: int = 5000) -> None:
    conn.execute(
        "DELETE FROM buildsmart.balancer_log WHERE entry_id <= (SELECT max(entry_id) FROM buildsmart.balancer_log) - %s",
        (keep,),
    )


# ---------------------------------------------------------------- periodic tasks


@dataclass(frozen=True)
class TaskRun:
    task: str
    runner: str
    started_at: datetime
    finished_at: datetime | None
    outcome: str
    summary: str | None
    runs: int
    failures: int


def runner_identity() -> str:
    """host:pid of this process, as recorded for task runs and shown by status."""
    return f"{socket.gethostname()}:{os.getpid()}"


def task_started(conn: psycopg.Connection, task: str) -> None:
    conn.execute(
        "INSERT INTO buildsmart.task_runs (task, runner, started_at, outcome) VALUES (%s, %s, now(), 'running') "
        "ON CONFLICT (task) DO UPDATE SET runner = EXCLUDED.runner, started_at = now(), finished_at = NULL, "
        "outcome = 'running'",
        (task, runner_identity()),
    )


def task_finished(conn: psycopg.Connection, task: str, ok: bool, summary: str) -> None:
    conn.execute(
        "UPDATE buildsmart.task_runs SET finished_at = now(), outcome = %s, summary = %s, runs = runs + 1, "
        "failures = failures + %s WHERE task = %s",
        ("ok" if ok else "failed", summary, 0 if ok else 1, task),
    )


def task_runs(conn: psycopg.Connection) -> tuple[TaskRun, ...]:
    rows = conn.execute(
        "SELECT task, runner, started_at, finished_at, outcome, summary, runs, failures FROM buildsmart.task_runs ORDER BY task"
    ).fetchall()
    return tuple(TaskRun(*r) for r in rows)


# ---------------------------------------------------------------- integrity checks


@dataclass(frozen=True)
class CheckRun:
    """The newest recorded `buildsmart check` run (status shows it)."""

    finished_at: datetime
    ok: bool
    summary: str


def cluster_created_at(conn: psycopg.Connection) -> datetime:
    """When the cluster's first node was registered."""
    row = conn.execute("SELECT min(added_at) FROM buildsmart.nodes").fetchone()
    return row[0] if row and row[0] is not None else datetime.now(UTC)


def record_check_run(conn: psycopg.Connection, started_at: datetime, ok: bool, summary: str, findings: list[Any]) -> None:
    conn.execute(
        "INSERT INTO buildsmart.check_runs (started_at, ok, summary, findings) VALUES (%s, %s, %s, %s)",
        (started_at, ok, summary, Jsonb(findings)),
    )


def last_check_run(conn: psycopg.Connection) -> CheckRun | None:
    if conn.execute("SELECT pg_catalog.to_regclass('buildsmart.check_runs') IS NULL").fetchone() == (True,):
        return None
    row = conn.execute("SELECT finished_at, ok, summary FROM buildsmart.check_runs ORDER BY run_id DESC LIMIT 1").fetchone()
    return None if row is None else CheckRun(row[0], bool(row[1]), str(row[2]))
