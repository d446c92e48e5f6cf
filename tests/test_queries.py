"""Query plans on the coordinator: pruning to one fragment, time pruning on the worker, remote
aggregation (Remote SQL carries GROUP BY) and async foreign scans."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from orchestrator.catalog import load_fragments
from orchestrator.ingest.loader import ingest
from tests.harness import ClusterHandle, write_csv


def explain(cluster: ClusterHandle, query: str, params: tuple[object, ...] = ()) -> str:
    with cluster.coordinator(admin=False) as conn:
        rows = conn.execute("EXPLAIN (VERBOSE, COSTS OFF) " + query, params).fetchall()
    return "\n".join(r[0] for r in rows)


@pytest.fixture
def loaded(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> str:
    rows = [
        (f"{p}{token}", "el", f"2023-{m:02d}-15 12:00:00+00", float(m)) for p in ("a", "b4", "c", "t", "z") for m in range(1, 13)
    ]
    ingest(main_cluster.directory, str(write_csv(tmp_path / "q.csv", rows)))
    return token


def test_one_building_scans_one_fragment(main_cluster: ClusterHandle, loaded: str) -> None:
    plan = explain(main_cluster, "SELECT * FROM readings WHERE building = %s", (f"c{loaded}",))
    assert len(re.findall(r"Foreign Scan on bsdata\.readings_f\d+", plan)) == 1, plan
    assert "readings_f3" in plan


def test_time_range_prunes_time_partitions_on_the_worker(main_cluster: ClusterHandle, loaded: str) -> None:
    b = f"c{loaded}"
    plan = explain(
        main_cluster, "SELECT sum(kwh) FROM readings WHERE building = %s AND ts >= '2023-03-01' AND ts < '2023-04-01'", (b,)
    )
    remote = re.search(r"Remote SQL: (.*)", plan)
    assert remote and "ts >=" in remote.group(1) and "ts <" in remote.group(1), plan
    with main_cluster.coordinator() as conn:
        frag = next(f for f in load_fragments(conn) if f.holds(b))
    with main_cluster.worker(frag.node) as conn:
        worker_plan = "\n".join(r[0] for r in conn.execute("EXPLAIN (COSTS OFF) " + remote.group(1)).fetchall())
        partitions = conn.execute(
            "SELECT count(*) FROM pg_partition_tree(%s::regclass) WHERE isleaf", (f"bsdata.{frag.shard_name}",)
        ).fetchone()
    assert partitions is not None and partitions[0] > 3
    scanned = re.findall(r"on (readings_f\d+_\w+)", worker_plan)
    assert scanned == [f"{frag.shard_name}_p20230301"], worker_plan


def test_group_by_building_runs_on_the_workers_in_parallel(main_cluster: ClusterHandle, loaded: str) -> None:
    plan = explain(main_cluster, "SELECT building, meter, sum(kwh), count(*) FROM readings GROUP BY building, meter")
    remote = re.findall(r"Remote SQL: (.*)", plan)
    assert len(remote) == 5 and all("GROUP BY" in r for r in remote), plan
    assert plan.count("Async Foreign Scan") == 5, plan


@pytest.mark.parametrize(
    "bucket",
    [
        "buildsmart.time_bucket('1 hour', ts)",
        "buildsmart.time_bucket('1 day', ts, 'Europe/London')",
        "buildsmart.month_bucket(ts)",
    ],
)
def test_time_buckets_per_building_are_pushed_down(main_cluster: ClusterHandle, loaded: str, bucket: str) -> None:
    plan = explain(main_cluster, f"SELECT building, {bucket} AS b, sum(kwh) FROM readings GROUP BY building, b")
    remote = re.findall(r"Remote SQL: (.*)", plan)
    assert len(remote) == 5 and all("GROUP BY 1, 2" in r for r in remote), plan
    assert "Async Foreign Scan" in plan
    with main_cluster.coordinator(admin=False) as conn:
        rows = conn.execute(
            f"SELECT building, {bucket} AS b, sum(kwh) FROM readings WHERE building = %s GROUP BY building, b ORDER BY b",
            (f"a{loaded}",),
        ).fetchall()
    assert [r[2] for r in rows] == [float(m) for m in range(1, 13)]
