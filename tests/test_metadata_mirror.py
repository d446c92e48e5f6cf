"""The PostgreSQL -> MongoDB mirror against a real SecantusDB server (no mocks).

The server is started for this module through the runtime (free port, data in the test cluster's
temporary DIR) and stopped by PID at the end.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from psycopg.types.json import Jsonb
from pymongo import MongoClient
from pymongo.collection import Collection

from orchestrator.metadata import haystack, importer, verify
from orchestrator.metadata.mirror import mirror_lag, pg_connect, run_once
from orchestrator.metadata.model import mongo_document
from orchestrator.runtime import mongo
from tests.harness import SHARED_DATA, ClusterHandle

BUILDSMART = str(Path(sys.executable).parent / "buildsmart")
GHAUSI = SHARED_DATA / "haystack" / "ghausi.json"


@pytest.fixture(scope="module")
def mongo_devices(main_cluster: ClusterHandle) -> Iterator[Collection[dict[str, Any]]]:
    directory = main_cluster.directory
    uri = mongo.ensure_started(directory)
    client: MongoClient[dict[str, Any]] = MongoClient(uri, w="majority")
    try:
        run_once(directory)  # drain events other test modules left in the outbox
        yield client[mongo.DEFAULT_DATABASE]["devices"]
    finally:
        client.close()
        mongo.stop(directory)
        assert not mongo.is_running(directory)


@pytest.fixture
def ids(main_cluster: ClusterHandle) -> Iterator[set[str]]:
    """Device ids a test created: deleted afterwards, and the deletes mirrored."""
    created: set[str] = set()
    yield created
    with main_cluster.coordinator() as conn:
        conn.execute("DELETE FROM public.devices WHERE id = ANY(%s)", (sorted(created),))
    if mongo.is_running(main_cluster.directory):
        run_once(main_cluster.directory)


def _pg_documents(cluster: ClusterHandle, id_list: list[str]) -> dict[str, dict[str, Any]]:
    with cluster.coordinator() as conn:
        rows = conn.execute(
            "SELECT id, bsmirror.device_doc(building, kind, metadata) FROM public.devices WHERE id = ANY(%s)", (id_list,)
        ).fetchall()
    return {r[0]: mongo_document(r[0], r[1]) for r in rows}


def _mongo_documents(col: Collection[dict[str, Any]], id_list: list[str]) -> dict[str, dict[str, Any]]:
    return {d["_id"]: d for d in col.find({"_id": {"$in": id_list}})}


def _assert_equal_both_sides(cluster: ClusterHandle, col: Collection[dict[str, Any]], id_list: list[str]) -> None:
    pg, mg = _pg_documents(cluster, id_list), _mongo_documents(col, id_list)
    assert pg.keys() == mg.keys()
    differing = [i for i in pg if pg[i] != mg[i]]
    assert differing == []


def _insert(cluster: ClusterHandle, ids: set[str], prefix: str, n: int) -> list[str]:
    new = [f"{prefix}-{i}" for i in range(n)]
    with cluster.coordinator() as conn:
        conn.cursor().executemany(
            "INSERT INTO public.devices (id, building, kind, metadata) VALUES (%s, 'tbench', 'point', %s)",
            [(i, Jsonb({"n": 0, "nested": {"unit": "kW", "tags": ["a"]}})) for i in new],
        )
    ids.update(new)
    return new


def _wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def _start_mirror(cluster: ClusterHandle, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [BUILDSMART, "mirror", "--dir", str(cluster.directory), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


def _stop_mirror(proc: subprocess.Popen[str]) -> str:
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err  # Ctrl-C is a clean stop
    return err


def _mirror_sessions(cluster: ClusterHandle) -> int:
    with cluster.coordinator() as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_locks l JOIN pg_stat_activity a USING (pid)"
            " WHERE l.locktype = 'advisory' AND a.application_name = 'buildsmart:mirror-lock'"
        ).fetchone()
    return int(row[0]) if row else 0


def _outbox_empty(cluster: ClusterHandle) -> bool:
    lag = mirror_lag(cluster.directory)
    return lag is not None and lag["events"] == 0


def test_ghausi_mirrored_then_nested_updates_deletes_and_reimport(
    main_cluster: ClusterHandle, mongo_devices: Collection[dict[str, Any]], ids: set[str]
) -> None:
    entity_ids = sorted(e.id for e in haystack.parse_file(GHAUSI))
    ids.update(entity_ids)
    with pg_connect(main_cluster.directory, "test") as conn:
        assert importer.import_file(conn, GHAUSI).inserted == 2183
    lag = mirror_lag(main_cluster.directory)
    assert lag is not None and lag["events"] >= 2183 and lag["seconds"] > 0
    assert run_once(main_cluster.directory) >= 2183
    assert mirror_lag(main_cluster.directory) == {**(mirror_lag(main_cluster.directory) or {}), "events": 0, "seconds": 0.0}
    _assert_equal_both_sides(main_cluster, mongo_devices, entity_ids)
    assert mongo_devices.count_documents({"_id": {"$in": entity_ids}}) == 2183

    first, second, *_ = entity_ids
    removed = entity_ids[100:110]
    with main_cluster.coordinator() as conn:
        conn.execute(
            "UPDATE public.devices SET metadata = jsonb_set(metadata, '{design}', %s) WHERE id = %s",
            (Jsonb({"flow": {"val": 42, "unit": "cfm"}, "limits": [1, 2.5]}), first),
        )
        conn.execute(
            "UPDATE public.devices SET metadata = jsonb_set(metadata, '{design,flow,val}', '43') WHERE id = %s", (first,)
        )
        conn.execute("UPDATE public.devices SET metadata = metadata - 'air' || '{\"water\": true}' WHERE id = %s", (second,))
        conn.execute("DELETE FROM public.devices WHERE id = ANY(%s)", (removed,))
    assert run_once(main_cluster.directory) == 13  # two updates of first, one of second, ten deletes
    doc = mongo_devices.find_one({"_id": first})
    assert doc is not None and doc["metadata"]["design"] == {"flow": {"val": 43, "unit": "cfm"}, "limits": [1, 2.5]}
    doc = mongo_devices.find_one({"_id": second})
    assert doc is not None and "air" not in doc["metadata"] and doc["metadata"]["water"] is True
    assert mongo_devices.count_documents({"_id": {"$in": removed}}) == 0
    _assert_equal_both_sides(main_cluster, mongo_devices, entity_ids)

    with pg_connect(main_cluster.directory, "test") as conn:
        again = importer.import_file(conn, GHAUSI)
    assert (again.inserted, again.updated, again.unchanged) == (10, 2, 2171)
    assert run_once(main_cluster.directory) == 12
    _assert_equal_both_sides(main_cluster, mongo_devices, entity_ids)
    assert mongo_devices.count_documents({"_id": {"$in": entity_ids}}) == 2183


def test_mirror_killed_mid_stream_resumes_without_lost_or_repeated_effects(
    main_cluster: ClusterHandle, mongo_devices: Collection[dict[str, Any]], ids: set[str]
) -> None:
    prefix = f"tkill{uuid.uuid4().hex[:6]}"
    entity_ids = _insert(main_cluster, ids, prefix, 10)
    assert run_once(main_cluster.directory) == 10
    updates = 400
    # Every update sets a distinct n; the change stream shows each applied MongoDB write, so a
    # replayed batch would show a value twice (or going back) and a lost one would leave a gap.
    stream = mongo_devices.watch([{"$match": {"documentKey._id": {"$regex": f"^{prefix}-"}}}])
    done = threading.Event()

    def updater() -> None:
        with main_cluster.coordinator() as conn:
            for k in range(1, updates + 1):
                conn.execute("UPDATE public.devices SET metadata = jsonb_set(metadata, '{n}', %s) WHERE id = %s",
                             (Jsonb(k), entity_ids[k % 10]))  # fmt: skip
                time.sleep(0.004)
        done.set()

    mirror = _start_mirror(main_cluster, "--batch-size", "7")
    thread = threading.Thread(target=updater)
    thread.start()
    try:
        _wait_until(lambda: mongo_devices.count_documents({"_id": {"$in": entity_ids}, "metadata.n": {"$gte": 40}}) > 0,
                    30, "the mirror to apply some updates")  # fmt: skip
        mirror.kill()  # SIGKILL, mid-stream
        mirror.wait(10)
        assert not done.is_set(), "the updates finished before the kill: not mid-stream"
        killed_at = mirror_lag(main_cluster.directory)
        thread.join(60)
        assert killed_at is not None
        mirror = _start_mirror(main_cluster)
        _wait_until(lambda: _outbox_empty(main_cluster), 60, "the restarted mirror to catch up")
    finally:
        thread.join(60)
        err = _stop_mirror(mirror)
    assert "mirror stopped" in err

    seen: dict[str, list[int]] = {i: [] for i in entity_ids}
    while (change := stream.try_next()) is not None:
        seen[change["documentKey"]["_id"]].append(change["fullDocument"]["metadata"]["n"])
    stream.close()
    for index, entity_id in enumerate(entity_ids):
        expected = [k for k in range(1, updates + 1) if k % 10 == index]
        assert seen[entity_id] == expected, entity_id
    _assert_equal_both_sides(main_cluster, mongo_devices, entity_ids)


def test_mongodb_stopped_mid_stream_then_restarted_converges(
    main_cluster: ClusterHandle, mongo_devices: Collection[dict[str, Any]], ids: set[str]
) -> None:
    directory = main_cluster.directory
    prefix = f"tmdown{uuid.uuid4().hex[:6]}"
    entity_ids = _insert(main_cluster, ids, prefix, 20)
    mirror = _start_mirror(main_cluster)
    try:
        _wait_until(lambda: mongo_devices.count_documents({"_id": {"$in": entity_ids}}) == 20, 30, "the inserts")
        uri_before = mongo.mongo_uri(directory)
        with main_cluster.coordinator() as conn:
            conn.execute("UPDATE public.devices SET metadata = jsonb_set(metadata, '{n}', '1') WHERE id = ANY(%s)", (entity_ids,))
            assert mongo.stop(directory)
            # While MongoDB is down: updates, deletes and inserts pile up in the outbox.
            for k in range(2, 30):
                conn.execute("UPDATE public.devices SET metadata = jsonb_set(metadata, '{nested,n}', %s) WHERE id = %s",
                             (Jsonb(k), entity_ids[k % 20]))  # fmt: skip
            conn.execute("DELETE FROM public.devices WHERE id = ANY(%s)", (entity_ids[:5],))
        entity_ids += _insert(main_cluster, ids, f"{prefix}b", 5)
        lag = mirror_lag(directory)
        assert lag is not None and lag["events"] > 0
        assert mirror.poll() is None, "the mirror must survive MongoDB going away"
        assert mongo.ensure_started(directory) == uri_before  # same port: clients reconnect
        _wait_until(lambda: _outbox_empty(main_cluster), 60, "the mirror to catch up after MongoDB restarted")
    finally:
        _stop_mirror(mirror)
    _assert_equal_both_sides(main_cluster, mongo_devices, entity_ids)
    assert mongo_devices.count_documents({"_id": {"$in": entity_ids[:5]}}) == 0


def test_verify_finds_tampering_and_repair_fixes_it(
    main_cluster: ClusterHandle, mongo_devices: Collection[dict[str, Any]], ids: set[str]
) -> None:
    directory = main_cluster.directory
    prefix = f"tver{uuid.uuid4().hex[:6]}"
    entity_ids = _insert(main_cluster, ids, prefix, 6)
    run_once(directory)
    assert verify.run_verify(directory).before.ok

    changed, lost, extra = entity_ids[0], entity_ids[1], f"{prefix}-extra"
    ids.add(extra)
    mongo_devices.update_one({"_id": changed}, {"$set": {"metadata.nested.unit": "MW"}})  # behind the mirror's back
    mongo_devices.delete_one({"_id": lost})
    mongo_devices.insert_one({"_id": extra, "building": None, "kind": "point", "metadata": {}})

    proc = subprocess.run([BUILDSMART, "mirror", "verify", "--dir", str(directory)], capture_output=True, text=True)
    assert proc.returncode == 1
    assert "differences found" in proc.stderr

    found = verify.run_verify(directory).before
    assert (found.different, found.missing, found.extra) == ([changed], [lost], [extra])

    repaired = verify.run_verify(directory, repair=True)
    assert repaired.queued == 3
    assert repaired.after is not None and repaired.after.ok
    _assert_equal_both_sides(main_cluster, mongo_devices, entity_ids)
    assert mongo_devices.count_documents({"_id": extra}) == 0
    proc = subprocess.run([BUILDSMART, "mirror", "verify", "--dir", str(directory)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_second_mirror_is_refused_while_one_runs(main_cluster: ClusterHandle, mongo_devices: Collection[dict[str, Any]]) -> None:
    mirror = _start_mirror(main_cluster)
    try:
        _wait_until(lambda: _mirror_sessions(main_cluster) == 1, 30, "the mirror to take its lock")
        proc = subprocess.run(
            [BUILDSMART, "mirror", "--once", "--dir", str(main_cluster.directory)], capture_output=True, text=True
        )
        assert proc.returncode == 4
        assert "another mirror is already running" in " ".join(proc.stderr.split())
    finally:
        _stop_mirror(mirror)


def test_devices_written_before_the_outbox_existed_are_mirrored(
    main_cluster: ClusterHandle, mongo_devices: Collection[dict[str, Any]], ids: set[str]
) -> None:
    run_once(main_cluster.directory)
    with main_cluster.coordinator() as conn:
        conn.execute("DROP SCHEMA bsmirror CASCADE")  # as on a cluster that had devices before the mirror
    prefix = f"tseed{uuid.uuid4().hex[:6]}"
    entity_ids = _insert(main_cluster, ids, prefix, 3)
    assert mirror_lag(main_cluster.directory) is None
    assert run_once(main_cluster.directory) >= 3  # installs the outbox, seeded with every device
    _assert_equal_both_sides(main_cluster, mongo_devices, entity_ids)
    assert verify.run_verify(main_cluster.directory).before.ok
