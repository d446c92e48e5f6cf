"""Online fragment move between workers with logical replication.

Steps (persisted in buildsmart.jobs so a killed orchestrator can resume):

  new -> target_created -> subscribed -> [catch-up, pre-check] -> switched -> done

Before ``switched`` nothing the application sees has changed: a resume rolls the pre-switch
artefacts back (subscription, publication, change watch, target table) and starts again.
``switched`` is recorded in the same coordinator transaction that swaps the foreign partition and
the placement, so it is exactly as durable as the switch; after it a resume only finishes the
cleanup.

The write pause: the switch transaction takes the fragment's advisory lock exclusively (loaders
hold it shared per batch, see buildsmart.fragment_write_lock) and locks public.readings in
EXCLUSIVE mode (writes through the coordinator wait, reads go on); then the target must reach the
frozen source's row count and checksum before the partition swap commits. Most of that is
checked before the pause, time partition by time partition (orchestrator.elastic.verify); the
pause re-checks only the partitions written since (orchestrator.elastic.watch), or the whole
fragment when its time partitions changed meanwhile.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace

import psycopg
from psycopg import sql

from orchestrator.elastic import jobs, shardops, verify, watch
from orchestrator.elastic.context import Elastic
from orchestrator.exceptions import ClusterStateError, NodeError
from orchestrator.executor import drop_fragment_sql
from orchestrator.fragments import Fragment

log = logging.getLogger(__name__)

PRE_SWITCH = ("new", "target_created", "subscribed")
SYNC_TIMEOUT_S = 600.0
PAUSE_LOCK_TIMEOUT = "2s"
CATCHUP_IN_PAUSE_S = 5.0
SWITCH_ATTEMPTS = 5


@dataclass(frozen=True)
class MoveResult:
    fragment_id: int
    source: str
    target: str
    rows: int
    copy_seconds: float
    pause_seconds: float
    job_id: int

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.copy_seconds if self.copy_seconds > 0 else 0.0


def _pubsub_name(frag_id: int) -> str:
    return f"bs_move_f{frag_id}"


def move_fragment(
    el: Elastic, fragment_id: int, target: str, *, resume: bool = True, parent_job: int | None = None
) -> MoveResult:
    """Move a fragment to ``target`` while writes go on. An open job for the fragment is resumed."""
    el.topo.group(target)  # unknown node -> ConfigError
    coord = el.coord
    job = jobs.open_for_fragment(coord, fragment_id)
    if job is not None and job.kind != "move":
        raise ClusterStateError(f"fragment {fragment_id} has an open {job.kind} job {job.job_id}; resume that first")
    if job is not None:
        if not resume:
            raise ClusterStateError(f"fragment {fragment_id} has an open move job {job.job_id}; rerun with --resume")
        job = jobs.claim(coord, job.job_id)
        return run_move_job(el, job)
    frag = el.fragment(fragment_id)
    if frag.node == target:
        log.info("fragment %d is already on %s", fragment_id, target)
        return MoveResult(fragment_id, target, target, 0, 0.0, 0.0, 0)
    row = coord.execute("SELECT role, is_active FROM buildsmart.nodes WHERE name = %s", (target,)).fetchone()
    if row is None or row[0] != "worker" or not row[1]:
        raise ClusterStateError(f"{target} is not an active worker")
    job = jobs.create(coord, "move", {"fragment_id": fragment_id, "source": frag.node, "target": target}, parent_job)
    return run_move_job(el, job)


def run_move_job(el: Elastic, job: jobs.Job) -> MoveResult:
    fid, source, target = int(job.args["fragment_id"]), str(job.args["source"]), str(job.args["target"])
    try:
        if job.step in PRE_SWITCH and job.step != "new":
            log.info("job %d stopped at %s before the switch: rolling back and starting again", job.job_id, job.step)
            rollback(el, fid, source, target)
            jobs.record_step(el.coord, job.job_id, "new")
        if job.step != "switched":
            frag = el.fragment(fid)
            if frag.node != source:
                raise ClusterStateError(f"fragment {fid} is on {frag.node}, not {source}; job {job.job_id} is stale")
            started = time.monotonic()
            _create_target(el, frag, target)
            jobs.record_step(el.coord, job.job_id, "target_created")
            _subscribe(el, frag, target)
            jobs.record_step(el.coord, job.job_id, "subscribed")
            _wait_initial_sync(el, frag, target)
            copy_s = time.monotonic() - started
            changes, pre = _precheck(el, frag, target)
            rows, pause = _switch(el, frag, target, job.job_id, changes, pre)
        else:
            copy_s, rows, pause = float(job.detail.get("copy_seconds", 0)), int(job.detail.get("rows", 0)), 0.0
        _cleanup(el, fid, source, target)
        jobs.finish(el.coord, job.job_id, copy_seconds=copy_s, pause_seconds=pause, rows=rows)
    except (psycopg.Error, ClusterStateError, NodeError) as exc:
        jobs.abandon(el.coord, job.job_id, str(exc).splitlines()[0], lambda: rollback(el, fid, source, target))
        if isinstance(exc, psycopg.Error):
            raise NodeError(f"move of fragment {fid} to {target} failed (job {job.job_id}): {exc}") from exc
        raise
    log.info("moved fragment %d from %s to %s: %d rows, pause %.3f s", fid, source, target, rows, pause)
    return MoveResult(fid, source, target, rows, copy_s, pause, job.job_id)


def _create_target(el: Elastic, frag: Fragment, target: str) -> None:
    dst, src = el.nodes.get(target), el.nodes.get(frag.node)
    if shardops.table_exists(dst, frag.shard_name):
        raise ClusterStateError(f"{frag.shard_name} already exists on {target}; drop it or resume the job that made it")
    moved = replace(frag, node=target)
    shardops.create_fragment_table(el.nodes, moved, dst)
    shardops.mirror_time_partitions(src, frag.shard_name, dst, frag.shard_name, frag.time_interval)
    shardops.copy_indexes(src, frag.shard_name, dst, frag.shard_name)


def _subscribe(el: Elastic, frag: Fragment, target: str) -> None:
    name = sql.Identifier(_pubsub_name(frag.fragment_id))
    src, dst = el.nodes.get(frag.node), el.nodes.get(target)
    src.execute(
        sql.SQL("CREATE PUBLICATION {} FOR TABLE {} WITH (publish_via_partition_root = true)").format(
            name, shardops.table(frag.shard_name)
        )
    )
    log.info("created publication %s on %s", name.as_string(src), frag.node)
    dst.execute(
        sql.SQL("CREATE SUBSCRIPTION {} CONNECTION {} PUBLICATION {} WITH (copy_data = true)").format(
            name, sql.Literal(el.conninfo(frag.node)), name
        )
    )
    log.info("created subscription %s on %s (initial copy of %s started)", name.as_string(dst), target, frag.shard_name)


def _wait_initial_sync(el: Elastic, frag: Fragment, target: str) -> None:
    """Until the initial copy is done and streaming has caught up to near the source's WAL position."""
    dst, src = el.nodes.get(target), el.nodes.get(frag.node)
    name = _pubsub_name(frag.fragment_id)
    deadline = time.monotonic() + SYNC_TIMEOUT_S
    while True:
        row = dst.execute(
            "SELECT count(*) FILTER (WHERE r.srsubstate NOT IN ('r', 's')), count(*) FROM pg_catalog.pg_subscription_rel r "
            "JOIN pg_catalog.pg_subscription s ON s.oid = r.srsubid WHERE s.subname = %s",
            (name,),
        ).fetchone()
        if row is not None and row[1] > 0 and row[0] == 0:
            break
        if time.monotonic() > deadline:
            raise ClusterStateError(f"initial copy of {frag.shard_name} to {target} did not finish in {SYNC_TIMEOUT_S:.0f} s")
        time.sleep(0.1)
    # Streaming lag: wait (briefly) until the slot has confirmed up to where the source was now.
    lsn = src.execute("SELECT pg_catalog.pg_current_wal_lsn()::text").fetchone()
    if lsn is not None:
        _wait_flushed(src, name, str(lsn[0]))


def _wait_flushed(src: psycopg.Connection, slot: str, lsn: str, seconds: float = 10.0) -> bool:
    """Until the subscriber confirmed everything up to ``lsn`` (False when it did not in time)."""
    until = time.monotonic() + seconds
    while time.monotonic() < until:
        got = src.execute(
            "SELECT confirmed_flush_lsn >= %s::pg_lsn FROM pg_catalog.pg_replication_slots WHERE slot_name = %s", (lsn, slot)
        ).fetchone()
        if got and got[0]:
            return True
        time.sleep(0.05)
    return False


def _precheck(el: Elastic, frag: Fragment, target: str) -> tuple[watch.ChangeWatch, verify.PreCheck]:
    """Before the pause, while writes go on: start watching the source's changes, let the target
    catch up to that point and checksum every time partition on both sides."""
    src, dst = el.nodes.get(frag.node), el.nodes.get(target)
    changes = watch.ChangeWatch(src, watch.watch_name(frag.fragment_id), frag.shard_name)
    since = changes.start()
    # Partitions the source grew since the target was made (same layouts: unit by unit).
    shardops.mirror_time_partitions(src, frag.shard_name, dst, frag.shard_name, frag.time_interval)
    if not _wait_flushed(src, _pubsub_name(frag.fragment_id), since):
        log.info(
            "target of fragment %d has not confirmed %s yet; unmatched partitions are checked in the pause",
            frag.fragment_id,
            since,
        )
    with ThreadPoolExecutor(max_workers=2) as pool:
        s_fut = pool.submit(verify.unit_sums, src, frag.shard_name)
        d_fut = pool.submit(verify.unit_sums, dst, frag.shard_name)
        pre = verify.PreCheck(s_fut.result(), d_fut.result())
    changes.drain()
    log.info(
        "pre-verified %d of %d time partitions of fragment %d before the pause",
        len(pre.verified),
        len(pre.source),
        frag.fragment_id,
    )
    return changes, pre


def _switch(
    el: Elastic, frag: Fragment, target: str, job_id: int, changes: watch.ChangeWatch, pre: verify.PreCheck
) -> tuple[int, float]:
    last: Exception | None = None
    for attempt in range(1, SWITCH_ATTEMPTS + 1):
        try:
            changes.drain()  # what was written during the pre-check: decoded before the pause, not in it
            return _switch_once(el, frag, target, job_id, changes, pre)
        except (psycopg.errors.LockNotAvailable, _NotCaughtUp) as exc:
            last = exc
            log.info("switch of fragment %d: attempt %d gave way (%s); retrying", frag.fragment_id, attempt, exc)
            time.sleep(0.2 * attempt)
    raise ClusterStateError(f"could not switch fragment {frag.fragment_id} to {target}: {last}")


class _NotCaughtUp(Exception):
    pass


def _verify_in_pause(
    src: psycopg.Connection, dst: psycopg.Connection, shard: str, changes: watch.ChangeWatch, pre: verify.PreCheck
) -> tuple[int, int]:
    """With the source frozen: the time partitions written since the pre-check (or not matched by
    it) must become equal on the target; the whole fragment when the layouts changed meanwhile."""
    deadline = time.monotonic() + CATCHUP_IN_PAUSE_S
    changes.drain(flush=True)
    recheck = verify.recheck_units(pre, verify.layout(src, shard), verify.layout(dst, shard), changes.changed, changes.truncated)
    if recheck is None:
        log.info("time partitions of %s changed during the move: verifying all of it in the pause", shard)
        src_sum, dst_sum = verify.parallel_fragment_sums([(src, shard, None), (dst, shard, None)])
        while dst_sum != src_sum:
            if time.monotonic() > deadline:
                raise _NotCaughtUp(f"target has {dst_sum[0]} rows, source {src_sum[0]} (checksums differ)")
            time.sleep(0.02)
            dst_sum = verify.fragment_sums(dst, shard)
        return src_sum
    src_units = verify.unit_sums(src, shard, recheck)
    dst_units = verify.unit_sums(dst, shard, recheck)
    while dst_units != src_units:
        if time.monotonic() > deadline:
            raise _NotCaughtUp(f"{len(recheck)} time partition(s) of {shard} differ on the target")
        time.sleep(0.02)
        dst_units = verify.unit_sums(dst, shard, recheck)
    log.info(
        "verified %d time partition(s) of %s in the pause, %d before it", len(recheck), shard, len(pre.source) - len(recheck)
    )
    return verify.combine({**{b: s for b, s in pre.source.items() if b not in recheck}, **src_units})


def _switch_once(
    el: Elastic, frag: Fragment, target: str, job_id: int, changes: watch.ChangeWatch, pre: verify.PreCheck
) -> tuple[int, float]:
    coord, src, dst = el.coord, el.nodes.get(frag.node), el.nodes.get(target)
    moved = replace(frag, node=target)
    with coord.transaction():
        coord.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(PAUSE_LOCK_TIMEOUT)))
        coord.execute("SELECT buildsmart.fragment_switch_lock(%s)", (frag.fragment_id,))
        coord.execute("LOCK TABLE public.readings IN EXCLUSIVE MODE")
        paused = time.monotonic()
        log.info("write pause for fragment %d started", frag.fragment_id)
        src_sum = _verify_in_pause(src, dst, frag.shard_name, changes, pre)
        shardops.replace_coordinator_partitions(el.nodes, [frag.shard_name], [moved])
        coord.execute(
            "UPDATE buildsmart.placements SET node_name = %s, state = 'active' WHERE fragment_id = %s AND node_name = %s",
            (target, frag.fragment_id, frag.node),
        )
        coord.execute("SELECT buildsmart.bump_catalog_version()")
        jobs.record_step(coord, job_id, "switched", rows=src_sum[0], verified_checksum=str(src_sum[1]))
    pause = time.monotonic() - paused
    log.info(
        "switched fragment %d to %s after verifying %d rows; write pause %.3f s", frag.fragment_id, target, src_sum[0], pause
    )
    return src_sum[0], pause


def _drop_subscription(el: Elastic, node: str, name: str) -> None:
    conn = el.nodes.get(node)
    if conn.execute("SELECT 1 FROM pg_catalog.pg_subscription WHERE subname = %s", (name,)).fetchone() is None:
        return
    try:
        conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sql.Identifier(name)))
    except psycopg.errors.ObjectInUse:
        time.sleep(0.5)
        conn.execute(sql.SQL("DROP SUBSCRIPTION {}").format(sql.Identifier(name)))
    log.info("dropped subscription %s on %s", name, node)


def _cleanup(el: Elastic, fid: int, source: str, target: str) -> None:
    """After the switch (idempotent): stop replication, drop the publication and the source table."""
    name = _pubsub_name(fid)
    shard = el.fragment(fid).shard_name
    _drop_subscription(el, target, name)
    src = el.nodes.get(source)
    src.execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))
    watch.drop(src, watch.watch_name(fid))
    # The source may have grown time partitions during the move; the target's DEFAULT has those rows.
    if shardops.table_exists(src, shard):
        frag = el.fragment(fid)
        shardops.mirror_time_partitions(src, shard, el.nodes.get(target), shard, frag.time_interval)
        for stmt in drop_fragment_sql(shard):
            src.execute(stmt)
        log.info("dropped source %s on %s", shard, source)
    # The initial copy extends each time partition by many pages at once (bulk COPY); VACUUM gives
    # the unused tail back, so the target's bytes are its rows' bytes (what the balancer evens).
    shardops.vacuum_if_not_empty(el.nodes.get(target), shard)


def rollback(el: Elastic, fid: int, source: str, target: str) -> None:
    """Undo a move that did not switch: the source is untouched and still serves everything."""
    name = _pubsub_name(fid)
    shard = f"readings_f{fid}"
    _drop_subscription(el, target, name)
    el.nodes.get(source).execute(sql.SQL("DROP PUBLICATION IF EXISTS {}").format(sql.Identifier(name)))
    watch.drop(el.nodes.get(source), watch.watch_name(fid))
    # Only drop the target table if the catalog does not place the fragment there.
    frag = el.fragment(fid)
    if frag.node != target:
        for stmt in drop_fragment_sql(shard, if_exists=True):
            el.nodes.get(target).execute(stmt)
    # A slot left behind when the subscription was dropped without reaching the source.
    el.nodes.get(source).execute(
        "SELECT pg_catalog.pg_drop_replication_slot(slot_name) FROM pg_catalog.pg_replication_slots "
        "WHERE slot_name = %s AND NOT active",
        (name,),
    )
    log.info("rolled back the unswitched move of fragment %d to %s", fid, target)
