"""Runs jobs queued in buildsmart.jobs (by the citus_* SQL functions) and resumes abandoned ones."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from orchestrator.elastic import autosplit, balancer, jobs, maintenance, move, nodes, split
from orchestrator.elastic.context import Elastic
from orchestrator.exceptions import BuildSmartError, ClusterStateError

log = logging.getLogger(__name__)
Report = Callable[[str], None]


def _node_by_address(el: Elastic, host: str, port: int) -> str:
    for g in el.topo.groups:
        if any(m.host == host and m.port == port for m in g.members) or g.name == host:
            return g.name
    raise ClusterStateError(f"no node at {host}:{port}")


def run_job(el: Elastic, job: jobs.Job, report: Report) -> None:
    a: dict[str, Any] = job.args
    kind = job.kind
    if kind == "move":
        move.run_move_job(el, job)
        return
    if kind == "split":
        split.run_split_job(el, job)
        return
    if kind == autosplit.JOB_KIND:
        autosplit.run_relayout_job(el, job)
        return
    # Queued jobs of the other kinds are one-shot: the job row records the outcome.
    try:
        if kind == "citus_move":
            node = _node_by_address(el, a["target_host"], int(a["target_port"]))
            result = move.move_fragment(el, int(a["shard_id"]), node, parent_job=job.job_id)
            detail: dict[str, Any] = {"rows": result.rows, "pause_seconds": result.pause_seconds}
        elif kind == "add_node":
            group = nodes.add_node(el, a.get("name"), a["host"], int(a["port"]), a.get("dbname"), report)
            detail = {"node": group.name}
        elif kind == "remove_node":
            nodes.remove_node(el, _node_by_address(el, a["host"], int(a["port"])), bool(a.get("drain", False)), report)
            detail = {}
        elif kind == "drain_node":
            detail = {"moves": nodes.drain_node(el, _node_by_address(el, a["host"], int(a["port"])), report)}
        elif kind == "rebalance":
            detail = {"steps": balancer.run(el, float(a.get("tolerance", 0.1)), report=report)}
        elif kind == "create_time_partitions":
            detail = {"created": maintenance.ensure_future_partitions(el, int(a.get("ahead", maintenance.DEFAULT_AHEAD)))}
        elif kind == "drop_old_time_partitions":
            expired = maintenance.plan_retention(el, str(a["older_than"]))
            detail = {"dropped": maintenance.apply_retention(el, expired)}
        else:
            raise ClusterStateError(f"unknown job kind {kind!r}")
    except BuildSmartError as exc:
        jobs.finish(el.coord, job.job_id, "failed", str(exc))
        raise
    jobs.finish(el.coord, job.job_id, **detail)


def run_pending(el: Elastic, job_id: int | None = None, report: Report = lambda _: None) -> list[int]:
    """Run one job, or every open job in order (resuming 'running' ones a killed process left)."""
    todo = [jobs.get(el.coord, job_id)] if job_id is not None else jobs.open_jobs(el.coord)
    ran = []
    for job in todo:
        if job.state not in jobs.OPEN_STATES:
            continue
        claimed = jobs.claim(el.coord, job.job_id) if job_id is not None else jobs.try_claim(el.coord, job.job_id)
        if claimed is None:
            report(f"job {job.job_id} ({job.kind}) is being run by another orchestrator; left alone")
            continue
        if job.kind in balancer.PARENT_KINDS and job.state == "running" and job_id is None:
            # A parent whose process died: its children are resumed on their own; close it.
            jobs.finish(el.coord, job.job_id, "cancelled", "orchestrator stopped; rerun the command")
            continue
        report(f"job {job.job_id}: {job.kind} {job.args}")
        run_job(el, claimed, report)
        ran.append(job.job_id)
    return ran
