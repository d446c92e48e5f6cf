"""Cluster-consistent restore points (``buildsmart backup point NAME``).

Why a pause: every fragment commits on its own worker, so restore points made one node after the
other could split an ingest batch or a switch in two. For the shortest moment the coordinator
holds distributed writes back the way a fragment switch does (orchestrator/elastic/gate.py):

1. every fragment's write lock EXCLUSIVELY (loaders take it SHARED per batch; a move's or split's
   switch takes it too, so a switch is never half done), and
2. ``LOCK public.readings IN EXCLUSIVE MODE``: writes through the coordinator wait, reads go on.
   Waiting on a lock a loader holds queues every new batch behind it: a pause as long as the batch
   in flight (100,000 rows, about a second). So every free lock is taken at once
   (``buildsmart.fragment_try_switch_lock``), the batches in flight get WAIT_BUDGET_MS to finish,
   and otherwise everything is released and tried again a moment later; a writer never waits
   longer than that budget plus the pause itself. Only when SPIN_S passed without success does
   it wait as long as it takes (``fragment_switch_lock`` in fragment order, as loaders take theirs);
3. the catalog version must not have changed since the fragments were read, and no node may hold
   a prepared transaction (a migration between its coordinator and worker COMMIT PREPARED):
   otherwise the pause is released and tried again;
4. ``pg_create_restore_point(NAME)`` on every group's primary, and on every worker a REPEATABLE
   READ transaction whose snapshot is exported (``pg_export_snapshot``);
5. commit: writes resume.

After the pause the per-time-partition checksums of every fragment are computed in those
snapshots (the same function moves use, orchestrator/elastic/verify.py), i.e. of exactly the data
at the point, and the point is recorded in the repository (points/NAME.json) and in
``buildsmart.restore_points`` on the coordinator. ``make_restore_point`` is a plain function, so a
periodic task (or a migration, move or split) can call it.
"""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import psycopg
from psycopg import sql
from psycopg.types.json import Jsonb

from orchestrator import catalog
from orchestrator.backup import decide, repo
from orchestrator.backup.decide import FragmentAt, RestorePoint
from orchestrator.connections import connect, superuser_target
from orchestrator.elastic import verify
from orchestrator.elastic.context import Elastic
from orchestrator.exceptions import ClusterStateError, ConfigError
from orchestrator.fragments import Fragment

log = logging.getLogger(__name__)

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,53}$")  # + "@" + 8 hex = 63, the WAL record's limit
PAUSE_LOCK_TIMEOUT = "2s"
# First take every free lock at once and give the batches in flight WAIT_BUDGET_MS to finish (else
# release all and try again after SPIN_SLEEP_S, for SPIN_S): no writer waits longer than that
# budget plus the few round trips inside the pause. Only after SPIN_S, wait as long as it takes.
WAIT_BUDGET_MS = 40
SPIN_S = 30.0
SPIN_SLEEP_S = 0.1
ATTEMPTS = 10


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise ConfigError(f"restore point name {name!r}: use 1-54 letters, digits, '_', '.', '-' (first a letter or digit)")
    return name


def auto_name(reason: str, now: datetime | None = None) -> str:
    """A point name for automatic points: <reason>-<UTC time>."""
    return f"{reason}-{(now or datetime.now(UTC)):%Y%m%dT%H%M%S}"


def load_points(r: repo.Repository) -> list[RestorePoint]:
    if not r.points_dir.is_dir():
        return []
    out = []
    for path in sorted(r.points_dir.glob("*.json")):
        try:
            out.append(RestorePoint.from_json(json.loads(path.read_text())))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring unreadable restore point %s: %s", path, exc)
    return sorted(out, key=lambda p: p.created_at)


def load_point(r: repo.Repository, name: str) -> RestorePoint:
    path = r.points_dir / f"{validate_name(name)}.json"
    try:
        return RestorePoint.from_json(json.loads(path.read_text()))
    except FileNotFoundError as exc:
        known = ", ".join(p.name for p in load_points(r)) or "none"
        raise ConfigError(f"no restore point {name!r} in {r.root} (known: {known})") from exc


def _save_point(r: repo.Repository, point: RestorePoint) -> None:
    r.points_dir.mkdir(parents=True, exist_ok=True)
    path = r.points_dir / f"{point.name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(point.to_json(), indent=1) + "\n")
    tmp.replace(path)


def _record_in_catalog(coord: psycopg.Connection, point: RestorePoint) -> None:
    data = point.to_json()
    coord.execute(
        "INSERT INTO buildsmart.restore_points (name, reason, created_at, catalog_version, pause_ms, lsns, topology, checksums) "
        "VALUES (%s, %s, %s, %s, %s, %s, %s, %s)",
        (
            point.name,
            point.reason,
            point.created_at,
            point.catalog_version,
            point.pause_ms,
            Jsonb(data["lsns"]),
            Jsonb({k: data[k] for k in ("cluster_name", "groups", "fragments", "time_interval", "timelines")}),
            Jsonb(data["checksums"]),
        ),
    )


def _read_catalog(coord: psycopg.Connection) -> tuple[int, tuple[FragmentAt, ...]]:
    with coord.transaction():
        coord.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        row = coord.execute("SELECT version FROM buildsmart.catalog_version").fetchone()
        frags = catalog.load_fragments(coord)
    return (int(row[0]) if row else 0), tuple(fragment_at(f) for f in frags)


def fragment_at(f: Fragment) -> FragmentAt:
    """The JSON-friendly record of a catalog fragment (times as ISO 8601)."""
    return FragmentAt(
        f.fragment_id, f.range_from, f.range_to, f.node, f.time_interval,
        f.ts_from.isoformat() if f.ts_from else None, f.ts_to.isoformat() if f.ts_to else None, f.time_group,
    )  # fmt: skip


class _Retry(Exception):
    pass


def _end_snapshots(snaps: dict[str, psycopg.Connection]) -> None:
    for conn in snaps.values():
        if conn.info.transaction_status != psycopg.pq.TransactionStatus.IDLE:
            conn.execute("ROLLBACK")


def _pause(
    el: Elastic,
    wal_name: str,
    version: int,
    fragment_ids: list[int],
    snaps: dict[str, psycopg.Connection],
    pool: ThreadPoolExecutor,
) -> tuple[dict[str, str], float, datetime]:
    """Steps 1-5 above. Returns the LSN of the point per group, the pause in ms and when. Per-node
    statements run on all nodes at once (one thread per node) to keep the pause short."""
    coord = el.coord
    conns = {g.name: coord if g.role == "coordinator" else el.nodes.get(g.name) for g in el.topo.groups}

    def prepared(group: str) -> tuple[int, str | None]:
        """Prepared transactions on the node; on a worker, in the same round trip, the REPEATABLE
        READ snapshot of the point is taken and exported (its connection is in autocommit mode:
        the BEGIN is part of the one statement string)."""
        if group not in snaps:
            row = conns[group].execute("SELECT count(*) FROM pg_catalog.pg_prepared_xacts").fetchone()
            return (int(row[0]) if row else 0), None
        cur = snaps[group].execute(
            "BEGIN ISOLATION LEVEL REPEATABLE READ; "
            "SELECT count(*), pg_catalog.pg_export_snapshot() FROM pg_catalog.pg_prepared_xacts"
        )
        while cur.nextset():
            pass
        got = cur.fetchone()
        assert got is not None
        return int(got[0]), str(got[1])

    def mark(group: str) -> str:
        query = sql.SQL("SELECT pg_catalog.pg_create_restore_point({})::text").format(sql.Literal(wal_name))
        got = conns[group].execute(query).fetchone()
        assert got is not None
        return str(got[0])

    spin_until = time.monotonic() + SPIN_S
    attempts = 0
    while True:
        blocking = time.monotonic() >= spin_until
        try:
            with coord.transaction():
                started = time.monotonic()
                if blocking:
                    # the fallback: wait for the batches in flight (new ones queue behind us)
                    cur = coord.execute(
                        sql.SQL(
                            "SET LOCAL lock_timeout = {}; "
                            "SELECT count(buildsmart.fragment_switch_lock(f)) FROM (SELECT unnest({}::int[]) AS f ORDER BY 1) s; "
                            "LOCK TABLE public.readings IN EXCLUSIVE MODE; "
                            "SELECT version FROM buildsmart.catalog_version"
                        ).format(sql.Literal(PAUSE_LOCK_TIMEOUT), sql.Literal(sorted(fragment_ids)))
                    )
                else:
                    # every free lock at once; the busy ones (batches in flight) get WAIT_BUDGET
                    # to finish, else everything is released: a writer never waits longer
                    got = coord.execute(
                        "SELECT buildsmart.fragment_try_switch_lock(%s::int[])", (sorted(fragment_ids),)
                    ).fetchone()
                    busy_ids = list(got[0]) if got and got[0] else []
                    cur = coord.execute(
                        sql.SQL(
                            "SET LOCAL lock_timeout = {}; "
                            "SELECT count(buildsmart.fragment_switch_lock(f)) FROM (SELECT unnest({}::int[]) AS f ORDER BY 1) s; "
                            "LOCK TABLE public.readings IN EXCLUSIVE MODE; "
                            "SELECT version FROM buildsmart.catalog_version"
                        ).format(sql.Literal(f"{WAIT_BUDGET_MS}ms"), sql.Literal(busy_ids))
                    )
                while cur.nextset():
                    pass
                row = cur.fetchone()
                if row is None or int(row[0]) != version:
                    raise _Retry(f"catalog version changed ({version} -> {row[0] if row else None})")
                pending = dict(zip(conns, pool.map(prepared, list(conns)), strict=True))
                busy = {g: n for g, (n, _) in pending.items() if n}
                if busy:
                    raise _Retry(f"prepared transactions on {busy} (a distributed commit in progress)")
                lsns = dict(zip(conns, pool.map(mark, list(conns)), strict=True))
            break
        except psycopg.errors.LockNotAvailable:
            _end_snapshots(snaps)
            if blocking:
                raise
            attempts += 1
            time.sleep(SPIN_SLEEP_S)
        except _Retry:
            _end_snapshots(snaps)
            raise
    pause_ms = (time.monotonic() - started) * 1000.0
    created = datetime.now(UTC)
    log.info(
        "restore point %s: pause taken at attempt %d%s; snapshots %s exported in it",
        wal_name,
        attempts + 1,
        " (waiting for batches in flight)" if blocking else "",
        {g: s for g, (_, s) in pending.items() if s},
    )
    return lsns, pause_ms, created


def _attempts(
    el: Elastic, name: str, wal_name: str, pool: ThreadPoolExecutor
) -> tuple[dict[str, str], float, datetime, int, tuple[FragmentAt, ...], dict[str, dict[str, verify.Sums]]]:
    """The pause, tried again when it gave way; then the checksums in the exported snapshots."""
    last: Exception | None = None
    for attempt in range(1, ATTEMPTS + 1):
        version, frags = _read_catalog(el.coord)
        # snapshot connections are opened before the pause: connecting is not part of it
        snaps = {w.name: connect(superuser_target(w, el.creds), "backup:snapshot", autocommit=True) for w in el.topo.workers}
        try:
            try:
                lsns, pause_ms, created = _pause(el, wal_name, version, [f.fragment_id for f in frags], snaps, pool)
            except (_Retry, psycopg.errors.LockNotAvailable) as exc:
                last = exc
                log.info("restore point %s: attempt %d gave way (%s); retrying", name, attempt, exc)
                time.sleep(0.1 * attempt)
                continue
            log.info("restore point %s created on %d groups; write pause %.1f ms", name, len(lsns), pause_ms)
            checksums = {f.shard_name: verify.unit_sums(snaps[f.node], f.shard_name) for f in frags}
            return lsns, pause_ms, created, version, frags, checksums
        finally:
            for conn in snaps.values():
                conn.close()
    raise ClusterStateError(f"restore point {name!r} not made: writes could not be paused ({last}); nothing was recorded")


def make_restore_point(el: Elastic, name: str, reason: decide.PointReason | str = "manual") -> RestorePoint:
    """Create a cluster-consistent restore point NAME on every group and record it (repository +
    catalog). Raises ClusterStateError when the pause could not be taken (a long-running batch
    or switch held it off ATTEMPTS times) or the name is taken; nothing is recorded then."""
    validate_name(name)
    settings = repo.load(el.directory)
    r = settings.repo
    if (r.points_dir / f"{name}.json").exists():
        raise ClusterStateError(f"restore point {name!r} exists already in {r.root}")
    if el.coord.execute("SELECT 1 FROM buildsmart.restore_points WHERE name = %s", (name,)).fetchone():
        raise ClusterStateError(f"restore point {name!r} exists already in buildsmart.restore_points")
    for group in el.topo.groups:
        el.nodes.get(group.name)  # connect now: a connection made inside the pause lengthens it
    # the name written into the WAL is unique even if a failed attempt left NAME on some node:
    # recovery stops at the first record with the target name
    wal_name = f"{name}@{uuid.uuid4().hex[:8]}"
    with ThreadPoolExecutor(max_workers=len(el.topo.groups)) as pool:
        lsns, pause_ms, created, version, frags, checksums = _attempts(el, name, wal_name, pool)
    timelines = {}
    for group in el.topo.groups:
        # the segment holding the point goes to the archive now, not when it fills up
        row = (
            el.nodes.get(group.name)
            .execute("SELECT pg_catalog.pg_walfile_name(%s::pg_lsn), pg_catalog.pg_switch_wal()", (lsns[group.name],))
            .fetchone()
        )
        timelines[group.name] = int(str(row[0])[:8], 16) if row else 0
    point = RestorePoint(
        name=name,
        wal_name=wal_name,
        reason=str(reason),
        created_at=created,
        catalog_version=version,
        pause_ms=pause_ms,
        lsns=lsns,
        timelines=timelines,
        groups={g.name: {"role": g.role, "members": len(g.members), "dbname": g.dbname} for g in el.topo.groups},
        fragments=frags,
        cluster_name=el.topo.cluster_name,
        time_interval=el.topo.layout.time_interval,
        checksums=checksums,
        roles={"superuser": el.creds.superuser, "app_user": el.creds.app_user},
    )
    _save_point(r, point)
    _record_in_catalog(el.coord, point)
    # Barman files the archived WAL later (list, create, restore, a periodic task): its archive-wal
    # processes would compete with writers for the CPU right after the pause.
    log.info(
        "restore point %s recorded (reason %s, catalog version %d, %d fragments, LSNs %s)",
        name,
        reason,
        version,
        len(frags),
        lsns,
    )
    return point
