"""Observe fragment sizes, plan with :func:`rebalance.plan_rebalance`, apply one step at a time.

After every step the cluster is observed again and re-planned: ingest keeps changing sizes, and a
split's real halves are only known once it is done.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from orchestrator import catalog
from orchestrator.elastic import jobs, move, observe, rebalance, split
from orchestrator.elastic.context import Elastic
from orchestrator.elastic.rebalance import FragmentLoad, MoveFragment, ObservedLoad, RebalanceStep, SplitFragment

log = logging.getLogger(__name__)

MAX_ROUNDS = 32
PARENT_KINDS = ("rebalance_run", "drain_run")


def observe_load(el: Elastic, draining: frozenset[str] = frozenset(), split_points: bool = True) -> ObservedLoad:
    """Bytes per fragment from the catalogs (orchestrator.elastic.observe), and, with
    ``split_points``, split points from statistics for the fragments of the heaviest worker (the
    only ones a plan splits)."""
    active = catalog.active_workers(el.coord)
    draining = draining | catalog.inactive_workers(el.coord)
    sample = observe.sample(el)
    observe.store(el, sample)
    totals: dict[str, int] = {}
    for x in sample.fragments:
        totals[x.fragment.node] = totals.get(x.fragment.node, 0) + x.bytes
    heaviest = max(totals, key=lambda n: (totals[n], n)) if totals and split_points else None
    loads = []
    for x in sample.fragments:
        f = x.fragment
        at = observe.split_points(el, f).at if f.node == heaviest and f.time_group is None else None
        loads.append(FragmentLoad(f.fragment_id, f.node, x.bytes, at, f.range_from, f.range_to))
    nodes = tuple(sorted(set(active) | {f.node for f in loads}))
    return ObservedLoad(tuple(loads), nodes, frozenset(draining))


def plan(el: Elastic, tolerance: float, draining: frozenset[str] = frozenset()) -> list[RebalanceStep]:
    """Moves first (no statistics needed); split points are gathered only when moves alone do not
    bring bytes per node within tolerance."""
    observed = observe_load(el, draining, split_points=False)
    steps = rebalance.plan_rebalance(observed, tolerance)
    if rebalance.is_balanced(rebalance.simulate(observed, steps), tolerance):
        return steps
    return rebalance.plan_rebalance(observe_load(el, draining), tolerance)


def resume_abandoned(el: Elastic, report: Callable[[str], None] = lambda _: None) -> int:
    """Finish what a killed rebalance, drain or fragment command left: its moves and splits are
    resumed (rolled back and redone before their switch, cleaned up after it) and the abandoned
    parent jobs are closed. Jobs another live orchestrator runs are refused by ``jobs.claim``.
    Returns the number of moves and splits finished."""
    finished = 0
    for job in jobs.open_jobs(el.coord):
        if job.state != "running":
            continue  # queued by SQL: `jobs run` runs those
        if job.kind not in ("move", "split", *PARENT_KINDS):
            continue
        claimed = jobs.try_claim(el.coord, job.job_id)
        if claimed is None:
            report(f"job {job.job_id} ({job.kind}) is being run by another orchestrator; left alone")
            continue
        if job.kind in ("move", "split"):
            report(f"resuming interrupted {job.kind} job {job.job_id} ({job.args}) at step {job.step}")
            log.info("resuming abandoned %s job %d at step %s", job.kind, job.job_id, job.step)
            if job.kind == "move":
                move.run_move_job(el, claimed)
            else:
                split.run_split_job(el, claimed)
            finished += 1
        else:
            jobs.finish(el.coord, job.job_id, "cancelled", "orchestrator stopped; its moves and splits were resumed")
    return finished


def run(
    el: Elastic,
    tolerance: float = rebalance.DEFAULT_TOLERANCE,
    draining: frozenset[str] = frozenset(),
    report: Callable[[str], None] = lambda _: None,
    job_kind: str = "rebalance_run",
) -> int:
    """Apply the plan step by step, re-planning after each; returns the number of steps applied.
    Interrupted moves and splits are finished first (a rerun after a kill resumes)."""
    done = resume_abandoned(el, report)
    parent = jobs.create(el.coord, job_kind, {"tolerance": tolerance, "draining": sorted(draining)})
    try:
        for _ in range(MAX_ROUNDS):
            steps = plan(el, tolerance, draining)
            if not steps:
                break
            step = steps[0]
            report(step.describe())
            log.info("rebalance job %d: %s", parent.job_id, step.describe())
            if isinstance(step, MoveFragment):
                move.move_fragment(el, step.fragment_id, step.target, parent_job=parent.job_id)
            elif isinstance(step, SplitFragment):
                split.split_fragment(el, step.fragment_id, step.at, parent_job=parent.job_id)
            done += 1
            jobs.record_step(el.coord, parent.job_id, f"step {done}", last=step.describe())
    except Exception as exc:
        jobs.finish(el.coord, parent.job_id, "failed", str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
        raise
    jobs.finish(el.coord, parent.job_id, steps=done)
    return done
