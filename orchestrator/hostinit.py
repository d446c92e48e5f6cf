"""``buildsmart host init``: turn the running hosts of a plan into a BuildSmartDB cluster.

After ``buildsmart host plan`` (runtime/hostfiles.py) wrote DIR and each host runs its agent
(``buildsmart host up``), this waits for etcd, turns etcd's authentication on with the planned
users, waits for every group's primary and synchronous standby (runtime/hostready.py), and sets
BuildSmartDB up on them with ``cluster.init_remote`` (runtime ``hosts``: the orchestrator starts
nothing, it reaches PostgreSQL, Patroni's REST API and etcd as DIR/ha.json says).

Why above runtime/: it drives ``orchestrator/cluster.py``, which the runtimes must not import.
Every step can be run again: etcd users that exist are kept, a group that runs is not waited for,
and ``init_remote`` applies only what is missing. Once the cluster exists, a group added to the
plan later is started and waited for here but joins the cluster through ``node add`` (the
``hosts`` runtime), which gives it its place in the catalog. A failure says what is done and
what to rerun.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from orchestrator import cluster, topology
from orchestrator.exceptions import ConfigError, NodeError
from orchestrator.runtime import hasettings, hostfiles, hostplan, hostready, hostspec
from orchestrator.spec import ClusterSpec

log = logging.getLogger(__name__)

Report = Callable[[str], None]


def init(directory: Path, report: Report, timeout_s: float = 300.0) -> hostplan.ClusterPlan:
    """Wait for etcd, enable its authentication, wait for every group, set the cluster up."""
    directory = directory.resolve()
    spec_file = directory / hostfiles.SPEC_FILE
    if not spec_file.exists():
        raise ConfigError(f"{spec_file}: missing: write the plan first (`buildsmart host plan --spec FILE --dir {directory}`)")
    p = hostplan.plan(hostspec.load(spec_file))
    secrets = hostfiles.load_secrets(directory)
    settings = hasettings.load(directory)
    deadline = time.monotonic() + timeout_s
    rerun = f"rerun `buildsmart host init --dir {directory}`"

    hostready.wait_etcd(p, settings, deadline, report, rerun)
    hostready.ensure_auth(p, settings, secrets, report)
    topo = p.topology()
    hostready.wait_groups(p, topo.groups, settings, deadline, report, rerun)
    if not p.is_cluster:
        report("no coordinator and worker groups in the spec: the groups run; there is no BuildSmartDB database to set up")
        return p
    if topology.exists(directory):
        known = {g.name for g in topology.load(directory).groups}
        for g in topo.groups:
            if g.name not in known:
                report(f"{g.name}: planned and running, not in the cluster yet: `buildsmart node add {g.name} --dir {directory}`")
        topo = replace(topo, groups=tuple(g for g in topo.groups if g.name in known))
    try:
        cluster.init_remote(directory, ClusterSpec(topo, topology.load_credentials(directory)), report)
    except NodeError as exc:
        raise NodeError(f"{exc}\netcd and every group are up; the database setup stopped there: {rerun}") from exc
    report(
        f"cluster {p.spec.cluster} is set up on {len(p.hosts)} hosts: `buildsmart status --dir {directory}`; "
        f"connect with `buildsmart dsn --dir {directory}`"
    )
    log.info("host init of %s done (%d groups)", p.spec.cluster, len(topo.groups))
    return p
