"""`node add` / `node remove` on the default, Patroni-shaped cluster, with real Patroni, etcd and
PostgreSQL: one HA cluster (coordinator + 1 worker, one synchronous replica each) for the module.

The new worker must come up as a Patroni group (leader + synchronous standby), take a fragment by an
online move, be failed over by the running supervisor after kill -9 of its primary, and leave no
process behind when it is removed with --drain."""

from __future__ import annotations

import json
import shutil
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import cluster, topology
from orchestrator.osuser import service_user
from orchestrator.runtime import etcd, groups, ha, hasettings, identity, patroni, supervisor
from tests import ha_tools
from tests.harness import ClusterHandle, make_tmp_dir

SPLIT_POINTS = ["m"]  # f1 [MIN, m), f2 [m, MAX): both on w1 at first
NEW = "w2"
RECOVERY_TARGET_S = 5.0


def _stop_leftover_group(directory: Path, name: str) -> None:
    """Teardown safety net: members of ``name`` that the topology no longer (or not yet) names are
    stopped by PID; members it names are stopped by `down`."""
    if not topology.exists(directory):
        return
    topo = topology.load(directory)
    user = service_user(topo.service_user)
    groups.discard_leftovers(directory, cluster.data_root(directory, user), topo, name, user)


@pytest.fixture(scope="module")
def hcluster() -> Iterator[ClusterHandle]:
    directory = make_tmp_dir("bs-ha-el-") / "cluster"
    handle = ClusterHandle(directory)
    try:
        cluster.up(directory, workers=1, split_points=SPLIT_POINTS, replicas=1, balancer_paused=True)
        with handle.coordinator() as conn:
            conn.execute(
                "INSERT INTO public.readings SELECT chr(97 + i % 20) || lpad((i % 7)::text, 2, '0'), 'seed', "
                "timestamptz '2025-06-01' + i * interval '1 minute', i % 13 FROM generate_series(1, 20000) i"
            )
        yield handle
    finally:
        try:
            _stop_leftover_group(directory, NEW)
        finally:
            if topology.exists(directory):
                cluster.down(directory, purge=True)
            shutil.rmtree(directory.parent, ignore_errors=True)


def _totals(handle: ClusterHandle) -> tuple[int, float]:
    with handle.coordinator() as conn:
        row = conn.execute("SELECT count(*), coalesce(sum(kwh), 0) FROM public.readings").fetchone()
    assert row is not None
    return int(row[0]), float(row[1])


def _pids(directory: Path, group: str) -> dict[str, int]:
    out = {}
    for name, pm in ha_tools.members(directory).items():
        if pm.group.name != group:
            continue
        for what, pid in (("patroni", pm.patroni_pid()), ("postgres", pm.postmaster_pid())):
            if pid is not None:
                out[f"{name}/{what}"] = pid
    return out


def test_node_add_move_failover_remove(hcluster: ClusterHandle) -> None:
    directory = hcluster.directory
    before = _totals(hcluster)

    # --- node add: a Patroni group of the same shape, supervised
    t0 = time.monotonic()
    hcluster.run_cli("node", "add", NEW)
    print(f"node add {NEW}: {time.monotonic() - t0:.1f} s")
    group = hcluster.topology.group(NEW)
    assert len(group.members) == 2
    settings = hasettings.load(directory)
    assert {m.name for m in group.members} <= set(settings.restapi_ports)
    status = ha.group_members_status(directory, NEW)
    assert sorted(str(m["role"]) for m in status) == ["leader", "sync_standby"], status
    assert all(m["state"] in ("running", "streaming") for m in status), status
    assert {m.name for m in group.members} <= (supervisor.supervising(directory) or set())
    with hcluster.coordinator() as conn:
        assert conn.execute("SELECT is_active FROM buildsmart.nodes WHERE name = %s", (NEW,)).fetchone() == (True,)
    with hcluster.worker(NEW) as w:
        assert w.execute("SELECT extversion FROM pg_extension WHERE extname = 'buildsmart'").fetchone() is not None

    # --- online move of a fragment onto the new group
    hcluster.run_cli("fragment", "move", "1", NEW)
    assert _totals(hcluster) == before
    assert ha_tools.worker_of(directory, "a") == NEW

    # --- kill -9 of the new group's primary (postgres + Patroni): the supervisor fails it over
    prefix = f"a{uuid.uuid4().hex[:8]}_"  # fragment 1, now on w2
    writer = ha_tools.Writer(directory, prefix, rows=200).start()
    try:
        writer.wait_acked(5)
        old = ha_tools.leader(directory, NEW)
        killed_at = ha_tools.kill9(ha_tools.members(directory)[old])
        new = ha_tools.wait_leader(directory, NEW, not_member=old, timeout_s=30)
        writer.wait_acked(writer.acked + 5, timeout_s=60)
    finally:
        writer.finish()
    recovery = writer.recovery_after(killed_at)
    print(f"{NEW}: {old} killed, {new} promoted; first write through the coordinator after {recovery} s")
    assert recovery is not None and recovery < RECOVERY_TARGET_S, f"writes resumed only after {recovery} s"
    ha_tools.wait_member_state(directory, old, "replica", timeout_s=60)  # restarted by the supervisor
    with hcluster.coordinator() as conn:
        assert ha_tools.count_rows(conn, prefix) == (writer.acked * writer.rows,) * 2
    reference = _totals(hcluster)
    assert reference[0] == before[0] + writer.acked * writer.rows

    # --- node remove --drain: fragments move back, every process of the group is gone
    pids = _pids(directory, NEW)
    assert len(pids) == 4, pids
    hcluster.run_cli("node", "remove", NEW, "--drain")
    still = {what: pid for what, pid in pids.items() if identity.alive(pid)}
    assert not still, f"processes of {NEW} still running: {still}"
    assert _totals(hcluster) == reference
    topo = hcluster.topology
    assert NEW not in {g.name for g in topo.groups}
    settings = hasettings.load(directory)
    assert not any(k.startswith(f"{NEW}-") for k in settings.restapi_ports), settings.restapi_ports
    assert not (supervisor.supervising(directory) or set()) & {m.name for m in group.members}
    assert etcd.get(settings.etcd_url, f"{patroni.namespace(topo)}{NEW}/initialize") is None
    root = cluster.data_root(directory, service_user(topo.service_user))
    assert not any(p.name.startswith(f"{NEW}-") for p in root.iterdir())
    with hcluster.coordinator() as conn:
        assert conn.execute("SELECT count(*) FROM buildsmart.nodes WHERE name = %s", (NEW,)).fetchone() == (0,)
    state = json.loads((directory / supervisor.STATE_FILE).read_text())
    assert sorted(state["members"]) == sorted(m.name for g in topo.groups for m in g.members)
    ha_tools.wait_healthy(directory)
