"""Online split of a fragment's building range on its own node.

  new -> target_created -> mirroring -> copied -> switched -> done

The upper half [at, hi) gets a new fragment table next to the old one. An ENABLE ALWAYS trigger
(buildsmart.split_mirror_trigger) mirrors concurrent writes of the upper half while the existing
rows are copied one time partition at a time; count and checksum of the upper half are verified
per time partition before the write pause and, under it, for the partitions written since (all of
it, repairing the rare copy/delete race first, when they differ or the layout changed); then the
switch swaps the coordinator partitions and the catalog in one transaction. Cleanup deletes the moved rows from
the old table and narrows its CHECK. Before ``switched`` a resume drops the new table and the
trigger and starts again; after it, it finishes the cleanup. To place the new half elsewhere,
move it afterwards (rebalance does).
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass

import psycopg
from psycopg import sql

from orchestrator.elastic import jobs, shardops, verify, watch
from orchestrator.elastic.context import Elastic
from orchestrator.elastic.move import PAUSE_LOCK_TIMEOUT, SWITCH_ATTEMPTS
from orchestrator.elastic.rebalance import split_point
from orchestrator.exceptions import ClusterStateError, NodeError
from orchestrator.executor import drop_fragment_sql
from orchestrator.fragments import Fragment, c_order, shard_name

log = logging.getLogger(__name__)

TRIGGER = "bs_split_mirror"
COPY_ATTEMPTS = 5


def _lower_view(shard: str) -> str:
    # Until the moved rows are deleted from the old table, the coordinator's lower partition reads
    # through this view: a foreign partition's bound is not sent to the remote side, so without it
    # a query would see the upper half twice between the switch and the cleanup.
    return f"{shard}_lower"


@dataclass(frozen=True)
class SplitResult:
    fragment_id: int
    new_fragment_id: int
    at: str
    rows_moved: int
    pause_seconds: float
    job_id: int


def choose_split_point(el: Elastic, frag: Fragment) -> str | None:
    """The building that halves the fragment's rows (observed on its worker)."""
    rows = (
        el.nodes.get(frag.node)
        .execute(
            sql.SQL('SELECT building, count(*) FROM {} GROUP BY building ORDER BY building COLLATE "C"').format(
                shardops.table(frag.shard_name)
            )
        )
        .fetchall()
    )
    return split_point([(str(b), int(n)) for b, n in rows])


def split_fragment(el: Elastic, fragment_id: int, at: str | None = None, *, parent_job: int | None = None) -> SplitResult:
    coord = el.coord
    job = jobs.open_for_fragment(coord, fragment_id)
    if job is not None:
        if job.kind != "split":
            raise ClusterStateError(f"fragment {fragment_id} has an open {job.kind} job {job.job_id}; resume that first")
        return run_split_job(el, jobs.claim(coord, job.job_id))
    frag = el.fragment(fragment_id)
    if at is None:
        at = choose_split_point(el, frag)
        if at is None:
            raise ClusterStateError(f"fragment {fragment_id} holds fewer than two buildings; give --at")
    lo_ok = frag.range_from is None or c_order(at) > c_order(frag.range_from)
    hi_ok = frag.range_to is None or c_order(at) < c_order(frag.range_to)
    if not (lo_ok and hi_ok):
        raise ClusterStateError(f"split point {at!r} is not inside fragment {fragment_id} {frag.describe_range()}")
    row = coord.execute("SELECT coalesce(max(fragment_id), 0) + 1 FROM buildsmart.fragments").fetchone()
    assert row is not None
    new_id = int(row[0])
    job = jobs.create(
        coord, "split", {"fragment_id": fragment_id, "at": at, "new_fragment_id": new_id, "node": frag.node}, parent_job
    )
    return run_split_job(el, job)


def run_split_job(el: Elastic, job: jobs.Job) -> SplitResult:
    fid, at, new_id, node = (
        int(job.args["fragment_id"]),
        str(job.args["at"]),
        int(job.args["new_fragment_id"]),
        str(job.args["node"]),
    )
    try:
        if job.step not in ("new", "switched"):
            log.info("job %d stopped at %s before the switch: rolling back and starting again", job.job_id, job.step)
            _rollback(el, fid, new_id, node)
            jobs.record_step(el.coord, job.job_id, "new")
        rows, pause = int(job.detail.get("rows", 0)), 0.0
        if job.step != "switched":
            frag = el.fragment(fid)
            upper = Fragment(new_id, at, frag.range_to, node, frag.time_interval)
            _create_upper(el, frag, upper)
            jobs.record_step(el.coord, job.job_id, "target_created")
            _install_mirror(el, frag, upper)
            jobs.record_step(el.coord, job.job_id, "mirroring")
            _copy(el, frag, upper)
            jobs.record_step(el.coord, job.job_id, "copied")
            changes, pre = _precheck(el, frag, upper)
            rows, pause = _switch(el, frag, upper, job.job_id, changes, pre)
        _cleanup(el, fid, at, new_id, node)
        jobs.finish(el.coord, job.job_id, pause_seconds=pause, rows=rows)
    except (psycopg.Error, ClusterStateError, NodeError) as exc:
        jobs.abandon(el.coord, job.job_id, str(exc).splitlines()[0], lambda: _rollback(el, fid, new_id, node))
        if isinstance(exc, psycopg.Error):
            raise NodeError(f"split of fragment {fid} at {at!r} failed (job {job.job_id}): {exc}") from exc
        raise
    log.info("split fragment %d at %r: new fragment %d with %d rows, pause %.3f s", fid, at, new_id, rows, pause)
    return SplitResult(fid, new_id, at, rows, pause, job.job_id)


def _create_upper(el: Elastic, frag: Fragment, upper: Fragment) -> None:
    conn = el.nodes.get(frag.node)
    if shardops.table_exists(conn, upper.shard_name):
        raise ClusterStateError(f"{upper.shard_name} already exists on {frag.node}")
    shardops.create_fragment_table(el.nodes, upper, conn)
    shardops.mirror_time_partitions(conn, frag.shard_name, conn, upper.shard_name, frag.time_interval)
    shardops.copy_indexes(conn, frag.shard_name, conn, upper.shard_name)
    conn.execute(
        sql.SQL("CREATE OR REPLACE VIEW {} AS SELECT * FROM {} WHERE building < {}").format(
            shardops.table(_lower_view(frag.shard_name)), shardops.table(frag.shard_name), sql.Literal(upper.range_from)
        )
    )
    conn.execute(
        sql.SQL("GRANT SELECT, INSERT, UPDATE, DELETE ON {} TO {}").format(
            shardops.table(_lower_view(frag.shard_name)), sql.Identifier(el.creds.app_user)
        )
    )


def _install_mirror(el: Elastic, frag: Fragment, upper: Fragment) -> None:
    conn = el.nodes.get(frag.node)
    row = conn.execute(
        "SELECT string_agg(format('%%I = EXCLUDED.%%I', attname, attname), ', ' ORDER BY attnum) FROM pg_catalog.pg_attribute "
        "WHERE attrelid = %s::regclass AND attnum > 0 AND NOT attisdropped AND attname NOT IN ('building', 'meter', 'ts')",
        (shardops.regclass(upper.shard_name),),
    ).fetchone()
    assert row is not None and row[0]
    with conn.transaction():
        _lock_root(conn, shardops.table(frag.shard_name))  # root first, as writers do (see _cleanup)
        conn.execute(
            sql.SQL(
                "CREATE TRIGGER {} AFTER INSERT OR UPDATE OR DELETE ON {} FOR EACH ROW "
                "EXECUTE FUNCTION buildsmart.split_mirror_trigger({}, {}, {})"
            ).format(
                sql.Identifier(TRIGGER),
                shardops.table(frag.shard_name),
                sql.Literal(shardops.regclass(upper.shard_name)),
                sql.Literal(upper.range_from),
                sql.Literal(row[0]),
            )
        )
        conn.execute(
            sql.SQL("ALTER TABLE {} ENABLE ALWAYS TRIGGER {}").format(shardops.table(frag.shard_name), sql.Identifier(TRIGGER))
        )
    log.info("mirroring writes of %s at or above %r into %s", frag.shard_name, upper.range_from, upper.shard_name)


def _copy(el: Elastic, frag: Fragment, upper: Fragment) -> None:
    """Copy existing rows one time partition per transaction (short row locks).

    Rows go in key order: the bulk loader's upsert (mirrored by the trigger) inserts its keys in
    the same order, so the two never wait for each other in a cycle. Writers through the
    coordinator insert in any order; a deadlock with one of them costs that partition a retry."""
    conn = el.nodes.get(frag.node)
    leaves = conn.execute(
        "SELECT relid::regclass::text FROM pg_catalog.pg_partition_tree(%s::regclass) WHERE isleaf",
        (shardops.regclass(frag.shard_name),),
    ).fetchall()
    copied = 0
    for (leaf,) in leaves:
        query = sql.SQL(
            "INSERT INTO {} SELECT * FROM {} WHERE building >= {} ORDER BY building, meter, ts "
            "ON CONFLICT (building, meter, ts) DO NOTHING"
        ).format(shardops.table(upper.shard_name), sql.SQL(leaf), sql.Literal(upper.range_from))
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


def _upper_filter(at: str) -> sql.Composable:
    return sql.SQL("building >= {}").format(sql.Literal(at))


def _repair(conn: psycopg.Connection, frag: Fragment, upper: Fragment) -> None:
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
                dst, src, _upper_filter(str(upper.range_from))
            )
        )
    log.info("repaired %s from %s under the write pause", upper.shard_name, frag.shard_name)


def _precheck(el: Elastic, frag: Fragment, upper: Fragment) -> tuple[watch.ChangeWatch, verify.PreCheck]:
    """Before the pause: watch the source's changes from now on and checksum both sides per time
    partition in one snapshot (both tables are on this node)."""
    conn = el.nodes.get(frag.node)
    changes = watch.ChangeWatch(conn, watch.watch_name(frag.fragment_id), frag.shard_name)
    changes.start()
    shardops.mirror_time_partitions(conn, frag.shard_name, conn, upper.shard_name, frag.time_interval)
    with conn.transaction():
        conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        pre = verify.PreCheck(
            verify.unit_sums(conn, frag.shard_name, where=_upper_filter(str(upper.range_from))),
            verify.unit_sums(conn, upper.shard_name),
        )
    changes.drain()
    log.info(
        "pre-verified %d of %d time partitions of the upper half of fragment %d before the pause",
        len(pre.verified),
        len(pre.source),
        frag.fragment_id,
    )
    return changes, pre


def _switch(
    el: Elastic, frag: Fragment, upper: Fragment, job_id: int, changes: watch.ChangeWatch, pre: verify.PreCheck
) -> tuple[int, float]:
    last: Exception | None = None
    for attempt in range(1, SWITCH_ATTEMPTS + 1):
        try:
            changes.drain()  # what was written meanwhile: decoded before the pause, not in it
            return _switch_once(el, frag, upper, job_id, changes, pre)
        except psycopg.errors.LockNotAvailable as exc:
            last = exc
            log.info("split switch of fragment %d: attempt %d gave way (%s); retrying", frag.fragment_id, attempt, exc)
            time.sleep(0.2 * attempt)
    raise ClusterStateError(f"could not switch the split of fragment {frag.fragment_id}: {last}")


def _verify_in_pause(
    conn: psycopg.Connection, frag: Fragment, upper: Fragment, changes: watch.ChangeWatch, pre: verify.PreCheck
) -> int:
    """With the source frozen: the time partitions written since the pre-check (or not matched by
    it) must be equal in the upper table; all of it when the layouts changed or they are not
    (then the upper table is repaired from the source first). Returns the upper half's rows."""
    at = str(upper.range_from)
    changes.drain(flush=True)
    recheck = verify.recheck_units(
        pre, verify.layout(conn, frag.shard_name), verify.layout(conn, upper.shard_name), changes.changed, changes.truncated
    )
    if recheck is not None:
        want_units = verify.unit_sums(conn, frag.shard_name, recheck, _upper_filter(at))
        if verify.unit_sums(conn, upper.shard_name, recheck) == want_units:
            log.info(
                "verified %d time partition(s) of %s in the pause, %d before it",
                len(recheck),
                upper.shard_name,
                len(pre.source) - len(recheck),
            )
            return verify.combine({**{b: s for b, s in pre.source.items() if b not in recheck}, **want_units})[0]
    # One connection (both tables are on this node), so one after the other.
    want, got = shardops.checksum(conn, frag.shard_name, _upper_filter(at)), shardops.checksum(conn, upper.shard_name)
    if want != got:
        _repair(conn, frag, upper)
        got = shardops.checksum(conn, upper.shard_name)
        if want != got:
            raise ClusterStateError(f"split of fragment {frag.fragment_id}: upper half differs after repair ({want} vs {got})")
    return want[0]


def _switch_once(
    el: Elastic, frag: Fragment, upper: Fragment, job_id: int, changes: watch.ChangeWatch, pre: verify.PreCheck
) -> tuple[int, float]:
    coord, conn = el.coord, el.nodes.get(frag.node)
    at = str(upper.range_from)
    lower = Fragment(frag.fragment_id, frag.range_from, at, frag.node, frag.time_interval)
    with coord.transaction():
        coord.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(PAUSE_LOCK_TIMEOUT)))
        coord.execute("SELECT buildsmart.fragment_switch_lock(%s)", (frag.fragment_id,))
        coord.execute("LOCK TABLE public.readings IN EXCLUSIVE MODE")
        paused = time.monotonic()
        rows = _verify_in_pause(conn, frag, upper, changes, pre)
        shardops.replace_coordinator_partitions(
            el.nodes, [frag.shard_name], [lower, upper], {lower.shard_name: _lower_view(frag.shard_name)}
        )
        coord.execute("UPDATE buildsmart.fragments SET range_to = %s WHERE fragment_id = %s", (at, frag.fragment_id))
        coord.execute(
            "INSERT INTO buildsmart.fragments (fragment_id, logicalrelid, shard_name, range_from, range_to, time_interval) "
            "SELECT %s, logicalrelid, %s, %s, %s, time_interval FROM buildsmart.fragments WHERE fragment_id = %s",
            (upper.fragment_id, upper.shard_name, at, frag.range_to, frag.fragment_id),
        )
        coord.execute(
            "INSERT INTO buildsmart.placements (fragment_id, node_name) VALUES (%s, %s)", (upper.fragment_id, frag.node)
        )
        coord.execute("SELECT buildsmart.bump_catalog_version()")
        jobs.record_step(coord, job_id, "switched", rows=rows)
    pause = time.monotonic() - paused
    log.info(
        "switched split of fragment %d at %r (%d rows to fragment %d); write pause %.3f s",
        frag.fragment_id,
        at,
        rows,
        upper.fragment_id,
        pause,
    )
    return rows, pause


def _cleanup(el: Elastic, fid: int, at: str, new_id: int, node: str) -> None:
    """After the switch (idempotent): stop mirroring, delete the moved rows, narrow the CHECK."""
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
    with conn.transaction():
        conn.execute("SET LOCAL session_replication_role = replica")
        cur = conn.execute(sql.SQL("DELETE FROM {} WHERE {}").format(tbl, _upper_filter(at)))
        log.info("deleted %d rows now in fragment %d from %s", cur.rowcount, new_id, frag.shard_name)
    checks = [sql.SQL("building < {}").format(sql.Literal(at))]
    if frag.range_from is not None:
        checks.insert(0, sql.SQL("building >= {}").format(sql.Literal(frag.range_from)))
    constraint = sql.Identifier(f"{frag.shard_name}_range")
    with conn.transaction():
        _lock_root(conn, tbl)
        conn.execute(sql.SQL("ALTER TABLE {} DROP CONSTRAINT IF EXISTS {}").format(tbl, constraint))
        conn.execute(
            sql.SQL("ALTER TABLE {} ADD CONSTRAINT {} CHECK ({})").format(tbl, constraint, sql.SQL(" AND ").join(checks))
        )
    # The old table now holds only the lower half: read it directly again, then drop the view.
    if shardops.remote_name(el.coord, frag.shard_name) != frag.shard_name:
        with el.coord.transaction():
            shardops.set_remote_name(el.coord, frag.shard_name, frag.shard_name)
    conn.execute(sql.SQL("DROP VIEW IF EXISTS {}").format(shardops.table(_lower_view(frag.shard_name))))


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
