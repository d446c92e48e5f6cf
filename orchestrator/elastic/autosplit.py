"""Split points from the data: the first load lays out the fragments from what it is about to write.

A new cluster (or one whose fragments are all empty) has a placeholder layout. Before its first
batch, a load calls :func:`presplit_for_load` with the rows per building it will write (a fast
pass over the input, :func:`count_buildings`). The buildings are cut, in byte order, into ranges
of about equal rows (``fragments_per_worker`` per worker, so the balancer has room later) and the
ranges are placed round-robin, so consecutive ranges of a building-sorted file land on different
workers and every worker receives its share of the load.

Replacing EMPTY fragments copies no data: it is a catalog and DDL operation. The new worker
tables are made first (invisible to anyone); then ONE coordinator transaction takes every old
fragment's switch lock (in-flight loader batches finish, new ones wait) and ``readings`` in
EXCLUSIVE mode (writes through the coordinator wait), checks that every old fragment is still
empty, swaps the coordinator partitions and the catalog rows and bumps the catalog version (any
loader re-routes). The old worker tables are dropped afterwards. Each step is recorded in a
``relayout`` job, so a killed process is finished or rolled back by the next run (or
``buildsmart jobs run``). The user's own split points (``--split-at``, a spec's split_points)
switch this off.
"""

from __future__ import annotations

import bisect
import gzip
import json
import logging
import re
import time
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql

from orchestrator import catalog
from orchestrator.elastic import jobs, shardops
from orchestrator.elastic.context import Elastic, open_cluster
from orchestrator.elastic.move import PAUSE_LOCK_TIMEOUT, SWITCH_ATTEMPTS
from orchestrator.elastic.policy import BalancerPolicy, policy_from
from orchestrator.exceptions import BuildSmartError, ClusterStateError, InputError, InputLocation, NodeError
from orchestrator.executor import drop_fragment_sql
from orchestrator.fragments import Fragment, c_order, weighted_split_points

log = logging.getLogger(__name__)

JOB_KIND = "relayout"
# Advisory lock class "laying out the first load" (fragment locks 1112755524, job runs ...525,
# the task runner's election ...526): two loads starting at once lay out the cluster once.
_LAYOUT_LOCK = 1112755527


@dataclass(frozen=True)
class PresplitResult:
    changed: bool
    split_points: tuple[str, ...]
    placement: tuple[tuple[int, str], ...]  # (fragment id, worker) in building order
    reason: str


@dataclass(frozen=True)
class LayoutState:
    """What the pre-split decision looks at (a frozen snapshot)."""

    fragments: tuple[Fragment, ...]
    workers: tuple[str, ...]
    auto_layout: bool
    empty: bool  # every fragment holds no row
    next_id: int
    time_interval: str = "1 month"


def plan_presplit(
    state: LayoutState, counts: Mapping[str, int], policy: BalancerPolicy
) -> tuple[tuple[Fragment, ...] | None, str]:
    """The new fragments (or None) and why. Pure."""
    if not state.auto_layout:
        return None, "split points were given by the user (--split-at or the spec); the layout is kept"
    if not state.empty:
        return None, "fragments already hold rows; the balancer splits and moves them from here"
    if any(f.time_group is not None for f in state.fragments):
        return None, "a building range is split by time; the layout is kept"
    if not state.workers:
        return None, "no active worker"
    rows = sum(n for n in counts.values() if n > 0)
    if rows == 0:
        return None, "the load holds no rows"
    wanted = len(state.workers) * policy.fragments_per_worker
    points = weighted_split_points(counts, wanted)
    bounds: list[str | None] = [None, *points, None]
    ranges = [(bounds[i], bounds[i + 1]) for i in range(len(bounds) - 1)]
    nodes = place(range_weights(ranges, counts), state.workers)
    layout = [(lo, hi, node) for (lo, hi), node in zip(ranges, nodes, strict=True)]
    current = sorted(((f.range_from, f.range_to, f.node) for f in state.fragments), key=_range_key)
    if current == layout:
        return None, f"the layout already fits the load ({len(layout)} fragments)"
    new = tuple(Fragment(state.next_id + i, lo, hi, node, state.time_interval) for i, (lo, hi, node) in enumerate(layout))
    buildings = sum(1 for n in counts.values() if n > 0)
    return new, (
        f"first load of about {rows:,} rows ({buildings:,} buildings counted): {len(new)} fragments of about "
        f"{rows / len(new):,.0f} rows ({policy.fragments_per_worker} per worker wanted) on {', '.join(state.workers)}, "
        "neighbours on different workers"
    )


def range_weights(ranges: list[tuple[str | None, str | None]], counts: Mapping[str, int]) -> list[int]:
    """Rows of each building range (ranges in byte order, tiling everything)."""
    lowers = [c_order(lo) for lo, _ in ranges[1:] if lo is not None]
    weights = [0] * len(ranges)
    for building, n in counts.items():
        weights[bisect.bisect_right(lowers, c_order(building))] += max(0, n)
    return weights


def place(weights: list[int], workers: tuple[str, ...]) -> list[str]:
    """Workers for ranges in building order: each range to the least loaded worker that did not
    take the previous range (a building-sorted load then moves from worker to worker), ties in
    round-robin order. Equal weights give plain round-robin."""
    load = dict.fromkeys(workers, 0)
    out: list[str] = []
    for i, w in enumerate(weights):
        choices = [x for x in workers if not out or x != out[-1]] or list(workers)
        rr = {x: (workers.index(x) - i) % len(workers) for x in choices}
        best = min(choices, key=lambda x: (load[x], rr[x]))
        load[best] += w
        out.append(best)
    return out


def _range_key(item: tuple[str | None, str | None, str]) -> bytes:
    return b"" if item[0] is None else item[0].encode()


# ---------------------------------------------------------------- counting the input


_FIRST_FIELD = re.compile(rb"^([^,\n\"]*),", re.MULTILINE)
CHUNK_BYTES = 256 << 10
# Up to this much text every line is counted; beyond it, every k-th 256 kB chunk is, so that about
# this much is read by the pattern (the file is still read whole: gzip cannot seek). The layout
# needs rows per building only to within a few percent.
SAMPLE_BYTES = 48 << 20


def count_buildings(
    path: str | Path, fmt: str | None = None, sample_bytes: int = SAMPLE_BYTES, chunk_bytes: int = CHUNK_BYTES
) -> dict[str, int]:
    """Rows per building of a CSV (plain or .gz, any column order) or JSON-lines file: a simple,
    fast pass, no validation (the load validates). Large inputs are sampled in whole chunks and the
    counts scaled; memory is one chunk and one counter entry per building."""
    path = Path(path)
    name = path.name.lower().removesuffix(".gz")
    fmt = fmt or ("jsonl" if name.endswith((".jsonl", ".ndjson", ".json")) else "csv")
    counts: Counter[bytes] = Counter()
    try:
        with _open(path) as (fh, size):
            if fmt == "jsonl":
                for line in fh:
                    if line.strip():
                        building = json.loads(line).get("building")
                        if isinstance(building, str):
                            counts[building.encode()] += 1
                scale = 1.0
            else:
                chunks = -(-size // chunk_bytes)
                scale = _count_csv(fh, counts, chunk_bytes, max(1, chunks // max(1, -(-sample_bytes // chunk_bytes))))
    except (OSError, EOFError, ValueError) as exc:
        raise InputError(InputLocation(str(path), 0), f"cannot count buildings: {exc}") from exc
    return {b.decode("utf-8", errors="replace"): max(1, round(n * scale)) for b, n in counts.items()}


@contextmanager
def _open(path: Path) -> Iterator[tuple[Any, int]]:
    """The decompressed stream and an estimate of its size (gzip's trailer holds it mod 2^32)."""
    with path.open("rb") as raw:
        size = path.stat().st_size
        if raw.peek(2)[:2] == b"\x1f\x8b":
            raw.seek(-4, 2)
            isize = int.from_bytes(raw.read(4), "little")
            raw.seek(0)
            while isize < size:  # more than 4 GiB of text wrapped around
                isize += 1 << 32
            with gzip.GzipFile(fileobj=raw) as gz:
                yield gz, isize
        else:
            yield raw, size


def _count_csv(fh: Any, counts: Counter[bytes], chunk_bytes: int, every: int) -> float:
    """Count the building field of every ``every``-th chunk; returns the factor to scale by."""
    import csv

    header = fh.readline().decode("utf-8", errors="replace").lstrip("\ufeff")
    names = [n.strip().lower() for n in next(csv.reader([header]), [])]
    column = names.index("building") if "building" in names else 0
    pattern = _FIRST_FIELD if column == 0 else re.compile(rb"^(?:[^,\n\"]*,){%d}([^,\n\"]*)," % column, re.MULTILINE)
    tail = b""
    seen = counted = 0
    index = -1
    while chunk := fh.read(chunk_bytes):
        index += 1
        seen += len(chunk)
        if every > 1 and index % every:
            tail = b""  # the next counted chunk starts after its first line break
            continue
        if every > 1 and index > 0 and not tail:
            chunk = chunk[chunk.find(b"\n") + 1 :]
        data = tail + chunk
        cut = data.rfind(b"\n") + 1
        data, tail = data[:cut], data[cut:]
        counted += len(data)
        if b'"' in data:  # quoted fields somewhere: the careful way for this chunk
            for row in csv.reader(data.decode("utf-8", errors="replace").splitlines()):
                if len(row) > column:
                    counts[row[column].encode()] += 1
        else:
            counts.update(pattern.findall(data))
    if tail.strip():
        row = next(csv.reader([tail.decode("utf-8", errors="replace")]), [])
        if len(row) > column:
            counts[row[column].encode()] += 1
    return seen / counted if counted else 1.0


# ---------------------------------------------------------------- the pre-split


def layout_state(el: Elastic) -> LayoutState:
    frags = el.fragments()
    return LayoutState(
        fragments=frags,
        workers=catalog.active_workers(el.coord),
        auto_layout=catalog.balancer_state(el.coord).auto_layout,
        empty=all_empty(el, frags),
        next_id=catalog.next_fragment_id(el.coord),
        time_interval=frags[0].time_interval if frags else el.topo.layout.time_interval,
    )


def is_empty(conn: psycopg.Connection, shard: str) -> bool:
    row = conn.execute(sql.SQL("SELECT NOT EXISTS (SELECT 1 FROM {})").format(shardops.table(shard))).fetchone()
    return bool(row and row[0])


def all_empty(el: Elastic, frags: tuple[Fragment, ...]) -> bool:
    """Every fragment holds no row (one index probe each, never a count)."""
    return all(is_empty(el.nodes.get(f.node), f.shard_name) for f in frags)


def presplit_for_load(target: Elastic | Path, building_counts: Mapping[str, int]) -> PresplitResult:
    """Before a load's first batch: lay out empty fragments from the rows per building it will
    write. Returns what was decided; idempotent (the same counts a second time change nothing)."""
    if isinstance(target, Path):
        with open_cluster(target, "presplit") as el:
            return presplit_for_load(el, building_counts)
    el = target
    with _layout_lock(el):
        resume_relayouts(el)
        catalog.settle_decisions(el.coord)
        state = layout_state(el)
        policy = policy_from(catalog.balancer_state(el.coord).settings)
        new, reason = plan_presplit(state, building_counts, policy)
        if new is None:
            log.info("first-load layout unchanged: %s", reason)
            return PresplitResult(False, _points(state.fragments), _placement(state.fragments), reason)
        entry = catalog.log_decision(el.coord, "presplit", reason, detail={"fragments": len(new)})
        try:
            job = relayout(el, state.fragments, new)
        except ClusterStateError as exc:
            catalog.finish_decision(el.coord, entry, "skipped", error=str(exc))
            log.info("first-load layout skipped: %s", exc)
            return PresplitResult(False, _points(state.fragments), _placement(state.fragments), str(exc))
        catalog.finish_decision(el.coord, entry, "done", job_id=job)
        log.info("laid out %d fragments for the first load: %s", len(new), reason)
        return PresplitResult(True, _points(new), _placement(new), reason)


def presplit_for_file(directory: Path, path: str, fmt: str | None = None) -> PresplitResult | None:
    """The loader's call before its first batch: counts the input's buildings only when a
    pre-split can happen at all (automatic layout on, every fragment empty). Standard input and
    followed files are not read twice: None."""
    if path == "-":
        return None
    try:
        with open_cluster(directory, "presplit") as el:
            state = layout_state(el)
            if not state.auto_layout or not state.empty:
                return None
            started = time.monotonic()
            counts = count_buildings(path, fmt)
            log.info(
                "counted %d buildings of %s in %.1f s for the first-load layout", len(counts), path, time.monotonic() - started
            )
            return presplit_for_load(el, counts)
    except (BuildSmartError, psycopg.Error) as exc:
        # The load does not depend on it: it goes on with the fragments as they are (a half-done
        # re-layout was rolled back or is finished by the next run), and the balancer evens them out.
        log.warning("first-load layout skipped (%s); loading into the current fragments", str(exc).splitlines()[0])
        return None


def _points(frags: tuple[Fragment, ...]) -> tuple[str, ...]:
    return tuple(sorted((f.range_from for f in frags if f.range_from is not None), key=str.encode))


def _placement(frags: tuple[Fragment, ...]) -> tuple[tuple[int, str], ...]:
    ordered = sorted(frags, key=lambda f: b"" if f.range_from is None else f.range_from.encode())
    return tuple((f.fragment_id, f.node) for f in ordered)


@contextmanager
def _layout_lock(el: Elastic) -> Iterator[None]:
    el.coord.execute("SELECT pg_catalog.pg_advisory_lock(%s, 0)", (_LAYOUT_LOCK,))
    try:
        yield
    finally:
        if not el.coord.closed:
            el.coord.execute("SELECT pg_catalog.pg_advisory_unlock(%s, 0)", (_LAYOUT_LOCK,))


# ---------------------------------------------------------------- the crash-safe re-layout


def _frag_arg(f: Fragment) -> list[Any]:
    return [f.fragment_id, f.range_from, f.range_to, f.node, f.time_interval]


def relayout(el: Elastic, old: tuple[Fragment, ...], new: tuple[Fragment, ...]) -> int:
    """Replace the empty fragments ``old`` by ``new`` (a job); returns the job id."""
    job = jobs.create(el.coord, JOB_KIND, {"old": [_frag_arg(f) for f in old], "new": [_frag_arg(f) for f in new]})
    run_relayout_job(el, job)
    return job.job_id


def resume_relayouts(el: Elastic) -> int:
    """Finish (or roll back and redo) relayout jobs a killed process left; returns how many."""
    done = 0
    for job in jobs.open_jobs(el.coord, JOB_KIND):
        claimed = jobs.try_claim(el.coord, job.job_id)
        if claimed is None:
            continue
        log.info("resuming interrupted relayout job %d at step %s", job.job_id, job.step)
        try:
            run_relayout_job(el, claimed)
        except ClusterStateError as exc:  # rows arrived meanwhile: the job was rolled back and failed
            log.info("interrupted relayout job %d not redone: %s", job.job_id, exc)
        done += 1
    return done


def run_relayout_job(el: Elastic, job: jobs.Job) -> None:
    old = tuple(Fragment(*a) for a in job.args["old"])
    new = tuple(Fragment(*a) for a in job.args["new"])
    try:
        if job.step != "switched":
            if job.step != "new":
                _drop_new(el, new)
                jobs.record_step(el.coord, job.job_id, "new")
            for f in new:
                shardops.create_fragment_table(el.nodes, f, el.nodes.get(f.node))
            jobs.record_step(el.coord, job.job_id, "tables_created")
            _switch(el, old, new, job.job_id)
        _cleanup(el, old)
        jobs.finish(el.coord, job.job_id, fragments=len(new))
    except (psycopg.Error, ClusterStateError, NodeError) as exc:
        jobs.abandon(el.coord, job.job_id, str(exc).splitlines()[0], lambda: _drop_new(el, new))
        if isinstance(exc, psycopg.Error):
            raise NodeError(f"re-layout of the empty fragments failed (job {job.job_id}): {exc}") from exc
        raise


def _switch(el: Elastic, old: tuple[Fragment, ...], new: tuple[Fragment, ...], job_id: int) -> None:
    last: Exception | None = None
    for attempt in range(1, SWITCH_ATTEMPTS + 1):
        try:
            _switch_once(el, old, new, job_id)
            return
        except psycopg.errors.LockNotAvailable as exc:
            last = exc
            log.info("re-layout switch: attempt %d gave way to a writer (%s); retrying", attempt, str(exc).strip())
            time.sleep(0.2 * attempt)
    raise ClusterStateError(f"could not take the write locks of the empty fragments: {last}")


def _switch_once(el: Elastic, old: tuple[Fragment, ...], new: tuple[Fragment, ...], job_id: int) -> None:
    coord = el.coord
    with coord.transaction():
        coord.execute(sql.SQL("SET LOCAL lock_timeout = {}").format(sql.Literal(PAUSE_LOCK_TIMEOUT)))
        for f in sorted(old, key=lambda f: f.fragment_id):
            coord.execute("SELECT buildsmart.fragment_switch_lock(%s)", (f.fragment_id,))
        coord.execute("LOCK TABLE public.readings IN EXCLUSIVE MODE")
        now = {f.fragment_id for f in catalog.load_fragments(coord)}
        if now != {f.fragment_id for f in old}:
            raise ClusterStateError("the fragments changed since the layout was planned; nothing was changed")
        full = [f.fragment_id for f in old if not is_empty(el.nodes.get(f.node), f.shard_name)]
        if full:
            raise ClusterStateError(f"fragment(s) {full} received rows meanwhile; the layout is kept (the balancer takes over)")
        shardops.replace_coordinator_partitions(el.nodes, [f.shard_name for f in old], list(new))
        for f in old:
            catalog.delete_fragment(coord, f.fragment_id)
        for f in new:
            catalog.insert_fragment(coord, f)
        version = catalog.bump_version(coord)
        jobs.record_step(coord, job_id, "switched")
    log.info("replaced %d empty fragments by %d (catalog version %d)", len(old), len(new), version)


def _drop_new(el: Elastic, new: tuple[Fragment, ...]) -> None:
    """Roll back: the new worker tables, unless the catalog already places them (it wins)."""
    placed = {f.fragment_id for f in catalog.load_fragments(el.coord)}
    for f in new:
        if f.fragment_id not in placed:
            for stmt in drop_fragment_sql(f.shard_name, if_exists=True):
                el.nodes.get(f.node).execute(stmt)
    log.info("dropped the worker tables of an unfinished re-layout")


def _cleanup(el: Elastic, old: tuple[Fragment, ...]) -> None:
    placed = {f.fragment_id for f in catalog.load_fragments(el.coord)}
    for f in old:
        if f.fragment_id in placed:
            continue
        for stmt in drop_fragment_sql(f.shard_name, if_exists=True):
            el.nodes.get(f.node).execute(stmt)
        log.info("dropped the replaced empty fragment table %s on %s", f.shard_name, f.node)
