"""Online split of a fragment on its own node: by building, or (one building too big for a
fragment) by time.

  new -> target_created -> mirroring -> copied -> switched -> done

A building split gives the upper half [at, hi) a new fragment; a time split gives the rows from
``at_ts`` on a new fragment with the same building range (the two form a time group: on the
coordinator the building range becomes a table partitioned by time, whose partitions are the two
foreign tables; orchestrator.executor.time_group_sql). Either way the new half gets a new
fragment table next to the old one. An ENABLE ALWAYS trigger (buildsmart.split_mirror_trigger or
time_split_mirror_trigger) mirrors concurrent writes of the new half while the existing rows are
copied one time partition at a time; count and checksum of the new half are verified per time
partition before the write pause and, under it, for the partitions written since (all of it,
repairing the rare copy/delete race first, when they differ or the layout changed); then the
switch swaps the coordinator partitions and the catalog in one transaction. Cleanup removes the
moved rows from the old table (a time split drops its whole time partitions after the split
instant) and narrows its CHECK. Before ``switched`` a resume drops the new table and the trigger
and starts again; after it, it finishes the cleanup. To place the new half elsewhere, move it
afterwards (the balancer and rebalance do).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import psycopg
from psycopg import sql

from orchestrator import catalog
from orchestrator.elastic import jobs, observe, shardops, verify, watch
from orchestrator.elastic.context import Elastic
from orchestrator.elastic.move import PAUSE_LOCK_TIMEOUT, SWITCH_ATTEMPTS
from orchestrator.exceptions import ClusterStateError, NodeError
from orchestrator.executor import attach_partition_sql, drop_fragment_sql, range_check, time_group_sql
from orchestrator.fragments import SHARD_SCHEMA, Fragment, c_order, shard_name

log = logging.getLogger(__name__)

TRIGGER = "bs_split_mirror"
COPY_ATTEMPTS = 5


def _lower_view(shard: str) -> str:
    # Until the moved rows are deleted from the old table, the coordinator's lower partition reads
    # through this view: a foreign partition's bound is not sent to the remote side, so without it
    # a query would see the upper half twice between the switch and the cleanup.
    return f"{shard}_lower"


@dataclass(frozen=True)
class SplitKey:
    """Where a fragment is cut: at a building (the new fragment takes [at, hi)) or at an instant
    (the new fragment takes the rows with ts >= at_ts)."""

    at: str | None = None
    at_ts: datetime | None = None

    def __post_init__(self) -> None:
        if (self.at is None) == (self.at_ts is None):
            raise ClusterStateError("a split needs exactly one of a building and an instant")

    @property
    def by_time(self) -> bool:
        return self.at_ts is not None

    def upper(self) -> sql.Composable:
        if self.at_ts is not None:
            return sql.SQL("ts >= {}::timestamptz").format(sql.Literal(self.at_ts.isoformat()))
        return sql.SQL("building >= {}").format(sql.Literal(self.at))

    def lower(self) -> sql.Composable:
        if self.at_ts is not None:
            return sql.SQL("ts < {}::timestamptz").format(sql.Literal(self.at_ts.isoformat()))
        return sql.SQL("building < {}").format(sql.Literal(self.at))

    def describe(self) -> str:
        return f"at {self.at_ts.isoformat()}" if self.at_ts is not None else f"at {self.at!r}"

    def args(self) -> dict[str, Any]:
        return {"at_ts": self.at_ts.isoformat()} if self.at_ts is not None else {"at": self.at}

    @staticmethod
    def from_args(args: dict[str, Any]) -> SplitKey:
        if args.get("at_ts") is not None:
            return SplitKey(at_ts=datetime.fromisoformat(str(args["at_ts"])))
        return SplitKey(at=str(args["at"]))

    def halves(self, frag: Fragment, new_id: int) -> tuple[Fragment, Fragment]:
        """The old fragment narrowed, and the new one, as the catalog will hold them."""
        if self.at_ts is None:
            assert self.at is not None
            return replace(frag, range_to=self.at), Fragment(new_id, self.at, frag.range_to, frag.node, frag.time_interval)
        group = frag.time_group or time_group_name(frag.fragment_id)
        lower = replace(frag, ts_to=self.at_ts, time_group=group)
        return lower, replace(frag, fragment_id=new_id, ts_from=self.at_ts, time_group=group)


def time_group_name(fragment_id: int) -> str:
    """The coordinator table of a building range split by time (named after its first fragment)."""
    return f"readings_g{fragment_id}"


@dataclass(frozen=True)
class SplitResult:
    fragment_id: int
    new_fragment_id: int
    at: str | None
    rows_moved: int
    pause_seconds: float
    job_id: int
    at_ts: datetime | None = None


def choose_split_point(el: Elastic, frag: Fragment) -> str | None:
    """The building that halves the fragment's rows, estimated from its statistics (a sample)."""
    return observe.split_points(el, frag).at


def split_fragment(
    el: Elastic,
    fragment_id: int,
    at: str | None = None,
    *,
    at_ts: datetime | None = None,
    parent_job: int | None = None,
) -> SplitResult:
    """Split a fragment at building ``at`` or instant ``at_ts`` (neither: the building that halves
    its rows by its statistics). An open split job of the fragment is resumed instead."""
    coord = el.coord
    job = jobs.open_for_fragment(coord, fragment_id)
    if job is not None:
        if job.kind != "split":
            raise ClusterStateError(f"fragment {fragment_id} has an open {job.kind} job {job.job_id}; resume that first")
        return run_split_job(el, jobs.claim(coord, job.job_id))
    frag = el.fragment(fragment_id)
    if at is None and at_ts is None:
        if frag.time_group is not None:
            raise ClusterStateError(f"fragment {fragment_id} is a time range of {frag.describe_range()}; give an instant")
        at = choose_split_point(el, frag)
        if at is None:
            raise ClusterStateError(f"fragment {fragment_id} holds fewer than two buildings; give --at or --at-time")
    key = SplitKey(at, at_ts)
    if key.at is not None:
        if frag.time_group is not None:
            raise ClusterStateError(f"fragment {fragment_id} is split by time; it can only be split by time again")
        lo_ok = frag.range_from is None or c_order(key.at) > c_order(frag.range_from)
        hi_ok = frag.range_to is None or c_order(key.at) < c_order(frag.range_to)
        if not (lo_ok and hi_ok):
            raise ClusterStateError(f"split point {key.at!r} is not inside fragment {fragment_id} {frag.describe_range()}")
    else:
        assert key.at_ts is not None
        if key.at_ts.tzinfo is None:
            raise ClusterStateError("a time split point needs a UTC offset")
        if not ((frag.ts_from is None or key.at_ts > frag.ts_from) and (frag.ts_to is None or key.at_ts < frag.ts_to)):
            raise ClusterStateError(f"split instant {key.at_ts} is not inside fragment {fragment_id} {frag.describe_range()}")
    new_id = catalog.next_fragment_id(coord)
    job = jobs.create(
        coord, "split", {"fragment_id": fragment_id, **key.args(), "new_fragment_id": new_id, "node": frag.node}, parent_job
    )
    return run_split_job(el, job)


def run_split_job(el: Elastic, job: jobs.Job) -> SplitResult:
    fid, new_id, node = int(job.args["fragment_id"]), int(job.args["new_fragment_id"]), str(job.args["node"])
    key = SplitKey.from_args(job.args)
    try:
        if job.step not in ("new", "switched"):
            log.info("job %d stopped at %s before the switch: rolling back and starting again", job.job_id, job.step)
            _rollback(el, fid, new_id, node)
            jobs.record_step(el.coord, job.job_id, "new")
        rows, pause = int(job.detail.get("rows", 0)), 0.0
        if job.step != "switched":
            frag = el.fragment(fid)
            lower, upper = key.halves(frag, new_id)
            _create_upper(el, frag, upper, key)
            jobs.record_step(el.coord, job.job_id, "target_created")
            _install_mirror(el, frag, upper, key)
            jobs.record_step(el.coord, job.job_id, "mirroring")
            _copy(el, frag, upper, key)
            jobs.record_step(el.coord, job.job_id, "copied")
            changes, pre = _precheck(el, frag, upper, key)
            rows, pause = _switch(el, frag, lower, upper, key, job.job_id, changes, pre)
        _cleanup(el, fid, key, new_id, node)
        jobs.finish(el.coord, job.job_id, pause_seconds=pause, rows=rows)
    except (psycopg.Error, ClusterStateError, NodeError) as exc:
        jobs.abandon(el.coord, job.job_id, str(exc).splitlines()[0], lambda: _rollback(el, fid, new_id, node))
        if isinstance(exc, psycopg.Error):
            raise NodeError(f"split of fragment {fid} {key.describe()} failed (job {job.job_id}): {exc}") from exc
        raise
    log.info("split fragment %d %s: new fragment %d with %d rows, pause %.3f s", fid, key.describe(), new_id, rows, pause)
    return SplitResult(fid, new_id, key.at, rows, pause, job.job_id, key.at_ts)


def _create_upper(el: Elastic, frag: Fragment, upper: Fragment, key: SplitKey) -> None:
    conn = el.nodes.get(frag.node)
    if shardops.table_exists(conn, upper.shard_name):
        raise ClusterStateError(f"{upper.shard_name} already exists on {frag.node}")
    shardops.create_fragment_table(el.nodes, upper, conn)
    shardops.mirror_time_partitions(conn, frag.shard_name, conn, upper.shard_name, frag.time_interval)
    shardops.copy_indexes(conn, frag.shard_name, conn, upper.shard_name)
    conn.execute(
        sql.SQL("CREATE OR REPLACE VIEW {} AS SELECT * FROM {} WHERE {}").format(
            shardops.table(_lower_view(frag.shard_name)), shardops.table(frag.shard_name), key.lower()
        )
    )
    conn.execute(
        sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(
            shardops.table(_lower_view(frag.shard_name)), sql.Identifier(el.creds.app_user)
        )
    )


def _install_mirror(el: Elastic, frag: Fragment, upper: Fragment, key: SplitKey) -> None:
    conn = el.nodes.get(frag.node)
    row = conn.execute(
        "SELECT string_agg(format('%%I = EXCLUDED.%%I', attname, attname), ', ' ORDER BY attnum) FROM pg_catalog.pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped AND attname NOT IN ('building', 'meter', 'ts')",
        (shardops.regclass(upper.shard_name),),
    ).fetchone()
    assert row is not None and row[0]
    with conn.transaction():
        _lock_root(conn, shardops.table(frag.shard_name))  # root first, as writers do (see _cleanup)
        function = "time_split_mirror_trigger" if key.by_time else "split_mirror_trigger"
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW EXECUTE FUNCTION {}({}, {}, {})"
            ).format(
                sql.Identifier(TRIGGER),
                shardops.table(frag.shard_name),
                sql.Identifier("buildsmart", function),
                sql.Literal(shardops.regclass(upper.shard_name)),
                sql.Literal(key.at_ts.isoformat() if key.at_ts is not None else key.at),
                sql.Literal(row[0]),
            )
        )
        conn.execute(
            sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(shardops.table(frag.shard_name), sql.Identifier(TRIGGER))
        )
    log.info("mirroring writes of %s %s and above into %s", frag.shard_name, key.describe(), upper.shard_name)


def _copy(el: Elastic, frag: Fragment, upper: Fragment, key: SplitKey) -> None:
    """Copy existing rows one time partition per transaction (short row locks).

    Rows go in key order: the bulk loader's upsert (mirrored by the trigger) inserts its keys in
    the same order, so the two never wait for each other in a cycle. Writers through the
    coordinator insert in any order; a deadlock with one of them costs that partition a retry."""
    conn = el.nodes.get(frag.node)
    leaves = _leaves_with_bounds(conn, frag.shard_name)
    copied = 0
    for leaf, _lo, hi in leaves:
        if key.at_ts is not None and hi is not None and hi <= key.at_ts:
            continue  # a time partition wholly before the split instant stays where it is
        query = sql.SQL(
            "INSERT INTO {} SELECT * FROM {} WHERE {} ORDER BY building, meter, ts ON CONFLICT (building, meter, ts) DO NOTHING"
        ).format(shardops.table(upper.shard_name), sql.Identifier(SHARD_SCHEMA, leaf), key.upper())
        for attempt in range(1, COPY_ATTEMPTS + 1):
            try:
                with conn.transaction():
                    conn.execute("SET LOCAL session_replication_role = replica")  # skip the upper table's replace trigger
                    copied += conn.execute(query).rowcount
                break
            except (psycopg.errors.DeadlockDetected, psycopg.errors.SerializationFailure) as exc:
                if attempt == COPY_ATTEMPTS:
                    raise
                log.info("copy of %s gave way to a writer (%s); retrying", leaf, str(exc).splitlines()[0])
                time.sleep(0.1 * attempt)
    log.info("copied %d rows of %s into %s", copied, frag.shard_name, upper.shard_name)


def _leaves_with_bounds(conn: psycopg.Connection, shard: str) -> list[tuple[str, datetime | None, datetime | None]]:
    """Time partitions of a fragment table: name, lower and upper bound (None for DEFAULT)."""
    rows = conn.execute(
        "SELECT c.relname, substring(pg_catalog.pg_get_expr(c.relpartbound, c.oid) FROM 'FROM \\(''([^'']+)''\\)')::timestamptz, "
        "substring(pg_catalog.pg_get_expr(c.relpartbound, c.oid) FROM 'TO \\(''([^'']+)''\\)')::timestamptz "
        "FROM pg_catalog.pg_partition_tree(%s::regclass) t JOIN pg_catalog.pg_class c ON c.oid = t.relid WHERE t.isleaf",
        (shardops.regclass(shard),),
    ).fetchall()
    return [(str(r[0]), r[1], r[2]) for r in rows]


def _repair(conn: psycopg.Connection, frag: Fragment, upper: Fragment, key: SplitKey) -> None:
    """Under the pause (source frozen): make the upper table equal to the source's upper half."""
    src, dst = shardops.table(frag.shard_name), shardops.table(upper.shard_name)
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        conn.execute(
            sql.SQL(
                "DELETE FROM {dst} n WHERE NOT EXISTS (SELECT 1 FROM {src} f WHERE f.building = n.building "
                "AND f.meter = n.meter AND f.ts = n.ts AND f::text = n::text)"
            ).format(src=src, dst=dst)
        )
        conn.execute(
            sql.SQL("INSERT INTO {} SELECT * FROM {} WHERE {} ON CONFLICT (building, meter, ts) DO NOTHING").format(
                dst, src, key.upper()
            )
        )
    log.info("repaired %s from %s under the write pause", upper.shard_name, frag.shard_name)


def _precheck(el: Elastic, frag: Fragment, upper: Fragment, key: SplitKey) -> tuple[watch.ChangeWatch, verify.PreCheck]:
    """Before the pause: watch the source's changes from now on and checksum both sides per time
    partition in one snapshot (both tables are on this node)."""
    conn = el.nodes.get(frag.node)
    changes = watch.ChangeWatch(conn, watch.watch_name(frag.fragment_id), frag.shard_name)
    changes.start()
    shardops.mirror_time_partitions(conn, frag.shard_name, conn, upper.shard_name, frag.time_interval)
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        pre = verify.PreCheck(
            verify.unit_sums(conn, frag.shard_name, where=key.upper()),
            verify.unit_sums(conn, upper.shard_name),
        )
    changes.drain()
    log.info(
        "pre-verified %d of %d time partitions of the new half of fragment %d before the pause",
        len(pre.verified),
        len(pre.source),
        frag.fragment_id,
    )
    return changes, pre


def _switch(
    el: Elastic,
    frag: Fragment,
    lower: Fragment,
    upper: Fragment,
    key: SplitKey,
    job_id: int,
    changes: watch.ChangeWatch,
    pre: verify.PreCheck,
) -> tuple[int, float]:
    last: Exception | None = None
    for attempt in range(1, SWITCH_ATTEMPTS + 1):
        try:
            changes.drain()  # what was written meanwhile: decoded before the pause, not in it
            return _switch_once(el, frag, lower, upper, key, job_id, changes, pre)
        except psycopg.errors.LockNotAvailable as exc:
            last = exc
            log.info("split switch of fragment %d: attempt %d gave way (%s); retrying", frag.fragment_id, attempt, exc)
            time.sleep(0.2 * attempt)
    raise ClusterStateError(f"could not switch the split of fragment {frag.fragment_id}: {last}")


def _verify_in_pause(
    conn: psycopg.Connection, frag: Fragment, upper: Fragment, key: SplitKey, changes: watch.ChangeWatch, pre: verify.PreCheck
) -> int:
    """With the source frozen: the time partitions written since the pre-check (or not matched by
    it) must be equal in the upper table; all of it when the layouts changed or they are not
    (then the upper table is repaired from the source first). Returns the upper half's rows."""
    changes.drain(flush=True)
    recheck = verify.recheck_units(
        pre, verify.layout(conn, frag.shard_name), verify.layout(conn, upper.shard_name), changes.changed, changes.truncated
    )
    if recheck is not None:
        want_units = verify.unit_sums(conn, frag.shard_name, recheck, key.upper())
        if verify.unit_sums(conn, upper.shard_name, recheck) == want_units:
            log.info(
                "verified %d time partition(s) of %s in the pause, %d before it",
                len(recheck),
                upper.shard_name,
                len(pre.source) - len(recheck),
            )
            return verify.combine({**{b: s for b, s in pre.source.items() if b not in recheck}, **want_units})[0]
    # One connection (both tables are on this node), so one after the other.
    want, got = verify.fragment_sums(conn, frag.shard_name, key.upper()), verify.fragment_sums(conn, upper.shard_name)
    if want != got:
        _repair(conn, frag, upper, key)
        got = verify.fragment_sums(conn, upper.shard_name)
        if want != got:
            raise ClusterStateError(f"split of fragment {frag.fragment_id}: upper half differs after repair ({want} vs {got})")
    return want[0]


def _switch_once(
    el: Elastic,
    frag: Fragment,
    lower: Fragment,
    upper: Fragment,
    key: SplitKey,
    job_id: int,
    changes: watch.ChangeWatch,
    pre: verify.PreCheck,
) -> tuple[int, float]:
    coord, conn = el.coord, el.nodes.get(frag.node)
    views = {lower.shard_name: _lower_view(frag.shard_name)}
    with coord.transaction():
        coord.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(PAUSE_LOCK_TIMEOUT)))
        coord.execute("SELECT buildsmart.fragment_switch_lock(%s)", (frag.fragment_id,))
        coord.execute("LOCK TABLE public.readings IN EXCLUSIVE MODE")
        paused = time.monotonic()
        rows = _verify_in_pause(conn, frag, upper, key, changes, pre)
        if key.by_time and frag.time_group is None:
            _make_time_group(el, frag, lower, upper, views)
        else:
            shardops.replace_coordinator_partitions(el.nodes, [frag.shard_name], [lower, upper], views)
        catalog.update_fragment_range(coord, lower)
        catalog.insert_fragment(coord, upper)
        catalog.bump_version(coord)
        jobs.record_step(coord, job_id, "switched", rows=rows)
    pause = time.monotonic() - paused
    log.info(
        "switched split of fragment %d %s (%d rows to fragment %d); write pause %.3f s",
        frag.fragment_id,
        key.describe(),
        rows,
        upper.fragment_id,
        pause,
    )
    return rows, pause


def _make_time_group(el: Elastic, frag: Fragment, lower: Fragment, upper: Fragment, views: dict[str, str]) -> None:
    """Inside the switch: the building range's foreign partition becomes a time group holding the
    two halves (readers see the old partition or the group, never both)."""
    coord = el.coord
    assert lower.time_group is not None
    coord.execute(sql.SQL("ALTER TABLE public.readings DETACH PARTITION {}").format(shardops.table(frag.shard_name)))
    coord.execute(sql.SQL("DROP FOREIGN TABLE {}").format(shardops.table(frag.shard_name)))
    for stmt in time_group_sql(lower.time_group, frag.range_from, frag.range_to):
        coord.execute(stmt)
    app = sql.Identifier(el.creds.app_user)
    coord.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(shardops.table(lower.time_group), app))
    for half in (lower, upper):
        coord.execute(attach_partition_sql(half, shardops.server_of(coord, half.node)))
        if half.shard_name in views:
            shardops.set_remote_name(coord, half.shard_name, views[half.shard_name])
        coord.execute(sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(shardops.table(half.shard_name), app))
    log.info("building range %s of fragment %d is now time group %s", frag.describe_range(), frag.fragment_id, lower.time_group)


def _cleanup(el: Elastic, fid: int, key: SplitKey, new_id: int, node: str) -> None:
    """After the switch (idempotent): stop mirroring, remove the moved rows (a time split drops
    whole time partitions after the split instant), narrow the CHECK to the catalog's range."""
    conn = el.nodes.get(node)
    watch.drop(conn, watch.watch_name(fid))
    frag = el.fragment(fid)
    if frag.node != node:  # moved away since; its table there is clean already
        return
    tbl = shardops.table(frag.shard_name)
    with conn.transaction():
        # Lock the root first: DDL recursing into the time partitions would otherwise take their
        # locks one by one and deadlock with a writer holding one of them.
        _lock_root(conn, tbl)
        conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(TRIGGER), tbl))
    if key.at_ts is not None:
        for leaf, lo, _hi in _leaves_with_bounds(conn, frag.shard_name):
            if lo is not None and lo >= key.at_ts:
                with conn.transaction():
                    _lock_root(conn, tbl)
                    conn.execute(sql.SQL("ALTER TABLE {} DETACH PARTITION {}").format(tbl, sql.Identifier(SHARD_SCHEMA, leaf)))
                    conn.execute(sql.SQL("DROP TABLE {}").format(sql.Identifier(SHARD_SCHEMA, leaf)))
                log.info("dropped time partition %s of %s (now in fragment %d)", leaf, frag.shard_name, new_id)
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        cur = conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(tbl, key.upper()))
        log.info("deleted %d rows now in fragment %d from %s", cur.rowcount, new_id, frag.shard_name)
    check = range_check(frag)
    constraint = sql.Identifier(f"{frag.shard_name}_range")
    with conn.transaction():
        _lock_root(conn, tbl)
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(tbl, constraint))
        if check is not None:
            conn.execute(sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({})").format(tbl, constraint, check))
    # The old table now holds only its own half: read it directly again, then drop the view.
    if shardops.remote_name(el.coord, frag.shard_name) != frag.shard_name:
        with el.coord.transaction():
            shardops.set_remote_name(el.coord, frag.shard_name, frag.shard_name)
    conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(shardops.table(_lower_view(frag.shard_name))))
    # Give the deleted rows' space back where it is at the end of the files, so bytes per worker
    # (what the balancer evens out) reflect the rows that are left.
    shardops.vacuum_if_not_empty(conn, frag.shard_name)


def _lock_root(conn: psycopg.Connection, tbl: sql.Identifier) -> None:
    conn.execute("SET LOCAL lock_timeout = '10s'")
    conn.execute(sql.SQL("LOCK TABLE {} IN ACCESS EXCLUSIVE MODE").format(tbl))


def _rollback(el: Elastic, fid: int, new_id: int, node: str) -> None:
    """One short transaction under the source's root lock: writers go through the root and the
    mirror trigger into the new table, so dropping either without it can deadlock with them."""
    conn = el.nodes.get(node)
    source = shardops.table(shard_name(fid))
    watch.drop(conn, watch.watch_name(fid))
    with conn.transaction():
        if shardops.table_exists(conn, shard_name(fid)):
            _lock_root(conn, source)
            conn.execute(sql.SQL("DROP TRIGGER IF EXISTS {} ON {}").format(sql.Identifier(TRIGGER), source))
        conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(shardops.table(_lower_view(shard_name(fid)))))
        for stmt in drop_fragment_sql(shard_name(new_id), if_exists=True):
            conn.execute(stmt)
    log.info("rolled back the unswitched split of fragment %d", fid)
