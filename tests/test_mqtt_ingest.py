"""MQTT ingest against a real broker (mosquitto, persistence on) and real QoS 1 publishers: every
reading whose PUBLISH the broker acknowledged is stored exactly once across a kill -9 of the
loader, a broker restart and a worker primary failover; bad payloads are set aside with the
reason; an unreachable broker and refused credentials are one clear line."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from tests import ha_tools
from tests.harness import ClusterHandle
from tests.mqtt_tools import Broker, Key, Loader, Publisher, stamp

PREFIXES = ("a", "b4", "c", "t", "z")  # one building per fragment of the session clusters


def stored(handle: ClusterHandle, like: str) -> dict[Key, float]:
    with handle.coordinator() as conn:
        got = conn.execute(
            "SELECT building, meter, to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), kwh "
            "FROM readings WHERE building LIKE %s",
            (like,),
        ).fetchall()
    table = {(b, m, t): v for b, m, t, v in got}
    assert len(table) == len(got), "a key is stored twice"
    return table


def publish_stream(pub: Publisher, messages: int, per_s: float, start: int = 0) -> threading.Thread:
    """Publish ``messages`` messages at about ``per_s``/s in a thread: every 5th one a batch of 3."""

    def run() -> None:
        i = start
        for n in range(messages):
            width = 3 if n % 5 == 4 else 1
            pub.publish([stamp(i + k) for k in range(width)], meter=n % 2, value=float(i))
            i += width
            time.sleep(1 / per_s)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def acked_of(pubs: list[Publisher]) -> dict[Key, float]:
    out: dict[Key, float] = {}
    for p in pubs:
        p.wait_acked()
        out.update(p.acked)
    return out


def wait_stored(handle: ClusterHandle, like: str, want: dict[Key, float], timeout_s: float = 60.0) -> dict[Key, float]:
    deadline = time.monotonic() + timeout_s
    got = stored(handle, like)
    while time.monotonic() < deadline and not want.keys() <= got.keys():
        time.sleep(0.2)
        got = stored(handle, like)
    return got


@pytest.fixture
def broker(tmp_path: Path) -> Broker:
    b = Broker(tmp_path / "broker")
    b.start()
    yield b  # type: ignore[misc]
    b.stop()


def test_acknowledged_readings_survive_loader_kill_and_broker_restart(
    main_cluster: ClusterHandle, token: str, broker: Broker, tmp_path: Path
) -> None:
    rejects = tmp_path / "rejects.jsonl"
    loader = Loader(main_cluster.directory, broker, tmp_path / "l1", "--rejects", str(rejects), client_id=f"t-{token}")
    loader.wait_for("subscribed to")
    pubs = [Publisher(broker.port, f"{p}{token}", f"pub-{token}-{i}") for i, p in enumerate(PREFIXES)]
    try:
        threads = [publish_stream(p, 150, 40.0) for p in pubs]
        # bad payloads in the middle of the stream: set aside with the reason, the stream goes on
        bad = pubs[0]
        topic = f"buildings/{bad.building}/meters/m0"
        bad.publish_raw(topic, b'{"ts": "2024-03-01T00:00:00Z", "kwh": ')
        bad.publish_raw(topic, b'{"ts": "yesterday", "kwh": 1}')
        bad.publish_raw(topic, json.dumps({"building": "other", "ts": stamp(0), "kwh": 1}).encode())
        time.sleep(1.0)
        loader.kill9()  # mid-stream: what it received but did not acknowledge comes again
        time.sleep(0.5)
        loader = Loader(main_cluster.directory, broker, tmp_path / "l2", "--rejects", str(rejects), client_id=f"t-{token}")
        loader.wait_for("resumed session")
        time.sleep(0.5)
        broker.restart()  # persistence on: the loader's session and its queued messages survive
        loader.wait_for("reconnect 1")
        for t in threads:
            t.join(60)
        want = acked_of(pubs)
        assert len(want) == 150 * len(pubs) // 5 * 7, len(want)  # 4 of 5 messages 1 reading, 1 of 5 three
        got = wait_stored(main_cluster, f"%{token}", want)
        assert loader.stop() == 0, loader.text()
    finally:
        for p in pubs:
            p.close()
    got = stored(main_cluster, f"%{token}")
    assert got == want, f"missing {len(want.keys() - got.keys())}, extra {len(got.keys() - want.keys())}"
    summary = loader.out_path.read_text()
    assert "acknowledged" in summary and "committed" in summary, summary
    records = [json.loads(line) for line in rejects.read_text().splitlines()]
    reasons = {r["reason"] for r in records}
    assert "invalid JSON: Expecting value" in reasons, records
    assert any(r.startswith("bad timestamp 'yesterday'") for r in reasons), records
    assert any("differs from" in r for r in reasons), records
    assert all(r["topic"] == topic and r["message"] > 0 for r in records), records


def test_a_backlog_queued_while_the_loader_was_away_is_stored_whole(
    main_cluster: ClusterHandle, token: str, broker: Broker, tmp_path: Path
) -> None:
    """Thousands of messages waiting in the session when the loader starts reach its queue faster
    than it takes them: every one of them is stored and acknowledged (a loader that dropped one
    message per full drain of its queue left it unacknowledged, and the broker never sent it again)."""
    loader = Loader(main_cluster.directory, broker, tmp_path / "l1", client_id=f"b-{token}")
    loader.wait_for("subscribed to")
    assert loader.stop() == 0, loader.text()  # the session stays: the broker queues for it
    pubs = [Publisher(broker.port, f"{p}{token}", f"pub-{token}-{i}") for i, p in enumerate(PREFIXES)]
    try:
        for n in range(3_000):
            for p in pubs:
                p.publish([stamp(n)], meter=n % 2, value=float(n))
            if n % 100 == 99:
                for p in pubs:
                    p.wait_acked()
        want = acked_of(pubs)
        assert len(want) == 3_000 * len(pubs)
        loader = Loader(main_cluster.directory, broker, tmp_path / "l2", client_id=f"b-{token}")
        loader.wait_for("resumed session")
        got = wait_stored(main_cluster, f"%{token}", want, timeout_s=120)
        assert loader.stop() == 0, loader.text()
    finally:
        for p in pubs:
            p.close()
    assert got == want, f"missing {len(want.keys() - got.keys())}, extra {len(got.keys() - want.keys())}"
    summary = " ".join(loader.out_path.read_text().split())  # the console may wrap the line
    assert f"{len(want):,} messages" in summary and f"acknowledged {len(want):,}" in summary, summary


def test_unreachable_broker_and_refused_credentials_are_one_line(main_cluster: ClusterHandle, tmp_path: Path) -> None:
    broker = Broker(tmp_path / "auth", users={"gateway": "right-password"})
    loader = Loader(main_cluster.directory, broker, tmp_path / "down")  # not started yet: nothing listens
    assert loader.proc.wait(60) == 3
    err = loader.err_path.read_text()
    assert f"cannot reach the MQTT broker at mqtt://127.0.0.1:{broker.port}" in err and "Traceback" not in err, err
    broker.start()
    try:
        wrong = tmp_path / "wrong"
        wrong.write_text("not-it\n")
        wrong.chmod(0o600)
        loader = Loader(
            main_cluster.directory, broker, tmp_path / "refused", "--username", "gateway", "--password-file", str(wrong)
        )
        assert loader.proc.wait(60) == 2
        err = loader.err_path.read_text()
        assert "refused the connection" in err and "--password-file" in err and "Traceback" not in err, err
        assert "not-it" not in err and "not-it" not in (main_cluster.directory / "buildsmart.log").read_text()
        right = tmp_path / "right"
        right.write_text("right-password\n")
        right.chmod(0o600)
        loader = Loader(main_cluster.directory, broker, tmp_path / "ok", "--username", "gateway", "--password-file", str(right))
        loader.wait_for("subscribed to")
        assert loader.stop() == 0, loader.text()
    finally:
        broker.stop()


def test_tls_broker_needs_its_ca(main_cluster: ClusterHandle, token: str, tmp_path: Path) -> None:
    broker = Broker(tmp_path / "tls", tls=True)
    broker.start()
    try:
        loader = Loader(main_cluster.directory, broker, tmp_path / "no-ca")  # the system's CAs do not know it
        assert loader.proc.wait(60) == 3
        err = loader.err_path.read_text()
        assert "TLS with the MQTT broker" in err and "--ca-file" in err and "Traceback" not in err, err
        loader = Loader(main_cluster.directory, broker, tmp_path / "ca", "--ca-file", str(broker.ca), client_id=f"tls-{token}")
        loader.wait_for("subscribed to")
        pub = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=f"tls-pub-{token}")
        pub.tls_set(ca_certs=str(broker.ca))
        pub.connect("localhost", broker.port)
        pub.loop_start()
        info = pub.publish(f"buildings/t{token}/meters/m0", json.dumps({"ts": stamp(1), "kwh": 2.5}), qos=1)
        info.wait_for_publish(10)
        pub.disconnect()
        pub.loop_stop()
        assert wait_stored(main_cluster, f"%{token}", {(f"t{token}", "m0", stamp(1)): 2.5}) == {
            (f"t{token}", "m0", stamp(1)): 2.5
        }
        assert loader.stop() == 0, loader.text()
    finally:
        broker.stop()


@pytest.mark.slow
def test_acknowledged_readings_survive_worker_primary_failover(ha_dir: Path, tmp_path: Path) -> None:
    ha_tools.wait_healthy(ha_dir)
    handle = ClusterHandle(ha_dir)
    token = f"mq{int(time.time() * 1000) % 10**8}"
    building = f"t{token}"
    group = ha_tools.worker_of(ha_dir, building)
    broker = Broker(tmp_path / "broker")
    broker.start()
    loader = Loader(ha_dir, broker, tmp_path / "l", client_id=f"ha-{token}")
    pubs = [Publisher(broker.port, f"{p}{token}", f"pub-{token}-{i}") for i, p in enumerate(("t", "u"))]
    try:
        loader.wait_for("subscribed to")
        threads = [publish_stream(p, 240, 40.0) for p in pubs]
        time.sleep(1.5)
        old = ha_tools.leader(ha_dir, group)
        ha_tools.kill9(ha_tools.members(ha_dir)[old])
        for t in threads:
            t.join(60)
        want = acked_of(pubs)
        wait_stored(handle, f"%{token}", want, timeout_s=90)
        assert loader.stop(90) == 0, loader.text()
        got = stored(handle, f"%{token}")
        assert got == want, f"missing {len(want.keys() - got.keys())}, extra {len(got.keys() - want.keys())}"
        ha_tools.wait_member_state(ha_dir, old, "replica", timeout_s=60)
    finally:
        for p in pubs:
            p.close()
        if loader.proc.poll() is None:
            loader.kill9()
        broker.stop()
        with handle.coordinator() as conn:
            conn.execute("DELETE FROM readings WHERE building LIKE %s", (f"%{token}",))
