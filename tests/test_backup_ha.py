"""Backups of Patroni groups (the session's Patroni-shaped cluster: coordinator + 2 workers, one
synchronous replica each): a switchover between the base backup and the restore point does not
break the WAL chain, and the restored cluster is a Patroni cluster of its own (new namespace,
replicas recreated)."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from orchestrator import cluster
from orchestrator.backup import archive, check, ops, points, repo
from orchestrator.osuser import service_user
from orchestrator.runtime import ha, hasettings
from tests import ha_tools
from tests.harness import ClusterHandle, make_tmp_dir, stop_cluster

pytestmark = pytest.mark.slow
BUILDSMART = str(Path(sys.executable).parent / "buildsmart")


@pytest.fixture
def ha_cluster(ha_dir: Path) -> Iterator[ClusterHandle]:
    """The shared Patroni cluster, healthy; afterwards its members archive nowhere again, it has no
    repository and the test's rows are gone."""
    ha_tools.wait_healthy(ha_dir)
    handle = ClusterHandle(ha_dir)
    try:
        yield handle
    finally:
        topo = handle.topology
        for _group, lm in cluster.local_members(ha_dir, topo, service_user(topo.service_user)):
            archive.remove_conf(lm.data_dir.parent)
        (ha_dir / repo.SETTINGS_FILE).unlink(missing_ok=True)
        ha_tools.wait_healthy(ha_dir)
        with handle.coordinator() as conn:
            conn.execute("DELETE FROM readings WHERE building IN ('a1', 'c1')")


def _count(handle: ClusterHandle) -> int:
    with handle.coordinator() as conn:
        row = conn.execute("SELECT count(*) FROM readings WHERE building IN ('a1', 'c1')").fetchone()
    return int(row[0]) if row else -1


def _insert(handle: ClusterHandle, meter: str) -> None:
    with handle.coordinator() as conn:
        conn.execute(
            "INSERT INTO readings SELECT b, %s, t, 1.5 FROM unnest(ARRAY['a1', 'c1']) b, "
            "generate_series('2030-01-01'::timestamptz, '2030-01-10', '1 hour') t",
            (meter,),
        )


def test_switchover_between_base_backup_and_point_restores_with_replicas(ha_cluster: ClusterHandle) -> None:
    location = make_tmp_dir("bs-harepo-") / "repo"
    new = make_tmp_dir("bs-harestored-") / "cluster"
    try:
        ha_cluster.run_cli("backup", "init", "--repo", str(location), "--points-every", "0", "--base-every", "0")
        _insert(ha_cluster, "electricity")
        ha_cluster.run_cli("backup", "create")
        r = repo.Repository(location)
        topo = ha_cluster.topology
        settings = hasettings.load(ha_cluster.directory)
        before = {g: ha.leader_of(topo, topo.group(g), settings) for g in ("coordinator", "w1")}
        for group in ("coordinator", "w1"):
            ha_cluster.run_cli("switchover", group)
        after = {g: ha.leader_of(topo, topo.group(g), settings) for g in ("coordinator", "w1")}
        assert all(before[g] != after[g] for g in before)
        _insert(ha_cluster, "gas")  # written on the new timelines
        ha_cluster.run_cli("backup", "point", "after-switchover")
        at_point = _count(ha_cluster)
        _insert(ha_cluster, "water")  # after the point: must not come back
        point = points.load_point(r, "after-switchover")
        backups = {b.group: b for b in ops.all_backups(r)}
        assert point.timelines["w1"] > backups["w1"].timeline  # the WAL chain crosses a timeline switch

        proc = subprocess.run(
            [BUILDSMART, "backup", "restore", "--to", "after-switchover", "--from", str(ha_cluster.directory), "--dir", str(new)],
            capture_output=True, text=True, timeout=900, check=False,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stdout + proc.stderr
        restored = ClusterHandle(new)
        assert check.compare(point, new) == []
        assert _count(restored) == at_point and _count(ha_cluster) == at_point + 2 * 217
        # a Patroni cluster of its own: every group has a leader and a streaming synchronous replica
        new_topo, new_ha = restored.topology, hasettings.load(new)
        assert new_topo.cluster_name != topo.cluster_name
        for group in new_topo.groups:
            roles = sorted(str(m["role"]) for m in ha.members_status(new_ha, group))
            assert roles == ["leader", "sync_standby"], (group.name, roles)
        member = new / "nodes" / f"{new_topo.workers[0].name}-0"
        assert f'namespace: "/{new_topo.cluster_name}/"' in (member / "patroni.yml").read_text()
        assert not (member / archive.CONF).exists()  # archives into no repository, least of all the original's
        # verify restores the same point as plain servers (no replicas) into a scratch directory
        verified = ha_cluster.run_cli("backup", "verify", "after-switchover")
        assert "verified after-switchover" in verified.stdout + verified.stderr
    finally:
        if (new / "topology.json").exists():
            stop_cluster(ClusterHandle(new))
        subprocess.run(["rm", "-rf", str(location.parent)], check=False)
