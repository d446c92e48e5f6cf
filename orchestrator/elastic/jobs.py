"""Long operations as jobs in buildsmart.jobs on the coordinator. Each job persists its step after
every step (and the switching step in the same transaction as the switch), so a killed
orchestrator leaves a record that ``--resume`` / ``jobs run`` picks up."""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import psycopg
from psycopg.types.json import Jsonb

from orchestrator.exceptions import ClusterStateError

log = logging.getLogger(__name__)

OPEN_STATES = ("scheduled", "running")
# Advisory lock class "this session runs job N" (fragment write locks use 1112755524). The
# coordinator session of the process running a job holds it, so a job left 'running' by a killed
# orchestrator is told apart from one another process is running right now: its lock is free.
_RUN_LOCK = 1112755525


@dataclass(frozen=True)
class Job:
    job_id: int
    kind: str
    args: dict[str, Any]
    state: str
    step: str
    detail: dict[str, Any]


_COLS = "job_id, kind, args, state, step, detail"


def _job(row: tuple[Any, ...] | None) -> Job | None:
    return None if row is None else Job(int(row[0]), row[1], dict(row[2]), row[3], row[4], dict(row[5]))


def create(conn: psycopg.Connection, kind: str, args: dict[str, Any], parent_id: int | None = None) -> Job:
    """A job run by this process right away (state 'running')."""
    try:
        row = conn.execute(
            f"INSERT INTO buildsmart.jobs (kind, args, state, started_at, parent_id) VALUES (%s, %s, 'running', now(), %s) "
            f"RETURNING {_COLS}",
            (kind, Jsonb(args), parent_id),
        ).fetchone()
    except psycopg.errors.UniqueViolation as exc:
        raise ClusterStateError(
            f"fragment {args.get('fragment_id')} already has an open job; finish it with --resume or `buildsmart jobs run`"
        ) from exc
    job = _job(row)
    assert job is not None
    _hold(conn, job.job_id)
    log.info("job %d (%s %s) started", job.job_id, kind, args)
    return job


def _hold(conn: psycopg.Connection, job_id: int) -> bool:
    row = conn.execute("SELECT pg_catalog.pg_try_advisory_lock(%s, %s)", (_RUN_LOCK, job_id)).fetchone()
    return bool(row and row[0])


def _release(conn: psycopg.Connection, job_id: int) -> None:
    # Only if this session holds it (unlocking a lock not held draws a server WARNING).
    conn.execute(
        "SELECT pg_catalog.pg_advisory_unlock(%s, %s) FROM pg_catalog.pg_locks WHERE locktype = 'advisory' "
        "AND pid = pg_catalog.pg_backend_pid() AND classid = %s AND objid = %s AND objsubid = 2",
        (_RUN_LOCK, job_id, _RUN_LOCK, job_id),
    )


def get(conn: psycopg.Connection, job_id: int) -> Job:
    job = _job(conn.execute(f"SELECT {_COLS} FROM buildsmart.jobs WHERE job_id = %s", (job_id,)).fetchone())
    if job is None:
        raise ClusterStateError(f"no job {job_id}")
    return job


def open_jobs(conn: psycopg.Connection, kind: str | None = None) -> list[Job]:
    rows = conn.execute(
        f"SELECT {_COLS} FROM buildsmart.jobs WHERE state IN ('scheduled', 'running') AND (%s::text IS NULL OR kind = %s) "
        "ORDER BY job_id",
        (kind, kind),
    ).fetchall()
    return [j for j in (_job(r) for r in rows) if j is not None]


def open_for_fragment(conn: psycopg.Connection, fragment_id: int) -> Job | None:
    return _job(
        conn.execute(
            f"SELECT {_COLS} FROM buildsmart.jobs WHERE state IN ('scheduled', 'running') AND (args ->> 'fragment_id')::int = %s",
            (fragment_id,),
        ).fetchone()
    )


def claim(conn: psycopg.Connection, job_id: int) -> Job:
    """Mark a scheduled (or abandoned running) job as running by us; refused while another
    orchestrator runs it."""
    if not _hold(conn, job_id):
        raise ClusterStateError(f"job {job_id} is being run by another orchestrator process; wait for it to finish")
    job = _job(
        conn.execute(
            f"UPDATE buildsmart.jobs SET state = 'running', started_at = coalesce(started_at, now()), updated_at = now() "
            f"WHERE job_id = %s AND state IN ('scheduled', 'running') RETURNING {_COLS}",
            (job_id,),
        ).fetchone()
    )
    if job is None:
        _release(conn, job_id)
        raise ClusterStateError(f"job {job_id} is not open")
    return job


def try_claim(conn: psycopg.Connection, job_id: int) -> Job | None:
    """``claim``, or None when another live orchestrator runs the job (or it closed meanwhile)."""
    try:
        return claim(conn, job_id)
    except ClusterStateError:
        return None


def record_step(conn: psycopg.Connection, job_id: int, step: str, **detail: Any) -> None:
    """Persist progress; in autocommit mode this commits at once, inside a transaction it commits with it."""
    conn.execute(
        "UPDATE buildsmart.jobs SET step = %s, detail = detail || %s, updated_at = now() WHERE job_id = %s",
        (step, Jsonb(detail), job_id),
    )
    log.info("job %d: step %s %s", job_id, step, detail or "")


def finish(conn: psycopg.Connection, job_id: int, state: str = "done", error: str | None = None, **detail: Any) -> None:
    conn.execute(
        "UPDATE buildsmart.jobs SET state = %s, error = %s, detail = detail || %s, finished_at = now(), updated_at = now() "
        "WHERE job_id = %s",
        (state, error, Jsonb(detail), job_id),
    )
    _release(conn, job_id)
    log.info("job %d %s%s", job_id, state, f": {error}" if error else "")


def abandon(conn: psycopg.Connection, job_id: int, error: str, undo: Callable[[], None], committed: str = "switched") -> None:
    """After a run failed: a job that had not reached ``committed`` is undone and marked failed;
    one past it (or whose undo failed too) stays open with the error recorded, so rerunning the
    command (or ``jobs run``) finishes it. Never leaves artefacts behind a closed job."""
    try:
        step = get(conn, job_id).step
        if step != committed:
            try:
                undo()
            except Exception as exc:  # a node may be down: the rerun undoes it
                log.warning("job %d: undoing after the failure failed too (%s); left open for a rerun", job_id, exc)
                record_step(conn, job_id, step, error=error, undo_error=str(exc).splitlines()[0] if str(exc) else "")
                _release(conn, job_id)
                return
            finish(conn, job_id, "failed", error)
            return
        record_step(conn, job_id, step, error=error)
        _release(conn, job_id)
        log.warning("job %d failed after %s (%s); left open: rerun the command to finish it", job_id, committed, error)
    except psycopg.Error as exc:  # the coordinator itself is away: the job stays as it was
        log.warning("job %d: could not record the failure (%s)", job_id, exc)
