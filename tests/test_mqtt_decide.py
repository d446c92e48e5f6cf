"""The MQTT loader's pure decisions, without a broker: topics, payloads, options, batching, acks."""

from __future__ import annotations

import itertools
import queue
import re
import select
import socket
import time
from pathlib import Path

import paho.mqtt.client as paho
import pytest

from orchestrator.exceptions import ConfigError
from orchestrator.ingest.mqtt.client import WAKE, Inbound, ReadingClient
from orchestrator.ingest.mqtt.flow import AckBook, CutPolicy, Delivery, should_cut, to_acknowledge
from orchestrator.ingest.mqtt.loader import BatchTimes, drain
from orchestrator.ingest.mqtt.options import PASSWORD_ENV, MqttOptions, parse_url, read_password
from orchestrator.ingest.mqtt.payload import PayloadReject, TopicRoute, check_filter, decode, matches
from orchestrator.ingest.parse import Reject, check_object

# -- topics -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic_filter", "topic", "expected"),
    [
        ("buildings/+/meters/+", "buildings/b1/meters/el", True),
        ("buildings/+/meters/+", "buildings/b1/meters", False),
        ("buildings/+/meters/+", "buildings/b1/meters/el/x", False),
        ("buildings/#", "buildings", True),
        ("buildings/#", "buildings/b1/meters/el", True),
        ("#", "$SYS/broker/uptime", False),
        ("+/x", "$SYS/x", False),
        ("$share/grp/buildings/+", "buildings/b1", True),
        ("a/b", "a/b", True),
        ("a/b", "a/c", False),
    ],
)
def test_topic_matching_follows_mqtt_rules(topic_filter: str, topic: str, expected: bool) -> None:
    assert matches(topic_filter, topic) is expected


def test_plus_levels_name_building_and_meter_in_order() -> None:
    route = TopicRoute.make(["buildings/+/meters/+"])
    assert route.fields_of("buildings/b 1/meters/el") == {"building": "b 1", "meter": "el"}
    assert route.fields_of("other/b1") == {}
    skip = TopicRoute.make(["tenants/+/+/+"], ["-", "building", "meter"])
    assert skip.fields_of("tenants/acme/b7/gas") == {"building": "b7", "meter": "gas"}
    only_building = TopicRoute.make(["$share/g/site/+/#"], ["building"])
    assert only_building.fields_of("site/b9/anything/else") == {"building": "b9"}


@pytest.mark.parametrize(
    ("topic_filter", "reason"),
    [("a/b#", "'#' must be a whole level"), ("a/#/b", "the last one"), ("a/x+/b", "'+' must be a whole level"),
     ("", "empty"), ("$share//a", "shared subscription"), ("$share/g", "shared subscription")],
)  # fmt: skip
def test_bad_filters_are_refused_with_the_reason(topic_filter: str, reason: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(reason)):
        check_filter(topic_filter)


def test_level_names_are_checked() -> None:
    with pytest.raises(ConfigError, match="unknown name 'site'"):
        TopicRoute.make(["a/+"], ["site"])
    with pytest.raises(ConfigError, match="building is named twice"):
        TopicRoute.make(["a/+/+"], ["building", "building"])
    with pytest.raises(ConfigError, match="at least one --topic"):
        TopicRoute.make([])


# -- payloads -----------------------------------------------------------------------------------

TOPIC = {"building": "b1", "meter": "el"}


def test_one_reading_takes_building_and_meter_from_the_topic() -> None:
    d = decode(TOPIC, b'{"ts": "2024-05-01T12:00:00Z", "kwh": 1.25}')
    assert d.rejects == () and d.reading == (0,)
    assert d.objects == ({"ts": "2024-05-01T12:00:00Z", "kwh": 1.25, "building": "b1", "meter": "el"},)
    row = check_object(d.objects[0], 1, b"")
    assert row == (1, "b1", "el", "2024-05-01T12:00:00Z", "1.25")


def test_a_batch_numbers_its_readings_and_rejects_only_the_bad_ones() -> None:
    payload = b'[{"ts": "2024-05-01T12:00:00Z", "kwh": 1}, 7, {"ts": "2024-05-01T13:00:00Z", "kwh": 2, "meter": "gas"}]'
    d = decode(TOPIC, payload)
    assert d.reading == (1,)
    assert d.rejects == (
        PayloadReject(2, 0, "expected a JSON object with ts and kwh"),
        PayloadReject(3, 0, "meter 'gas' in the payload differs from 'el' in the topic"),
    )


def test_payload_may_name_building_and_meter_when_the_topic_does_not() -> None:
    d = decode({}, b'{"building": "b2", "meter": "m", "ts": "2024-05-01T12:00:00+02:00", "kwh": "3.5"}')
    assert check_object(d.objects[0], 9, b"") == (9, "b2", "m", "2024-05-01T12:00:00+02:00", "3.5")
    missing = decode({}, b'{"ts": "2024-05-01T12:00:00Z", "kwh": 1}')
    assert check_object(missing.objects[0], 1, b"") == Reject(1, 0, "missing fields: building, meter", b"")


@pytest.mark.parametrize(
    ("payload", "reject"),
    [
        (b'{"ts": "2024-05-01T12:00:00Z", "kwh": 1', PayloadReject(0, 40, "invalid JSON: Expecting ',' delimiter")),
        (b'{\n"ts": x}', PayloadReject(0, 7, "invalid JSON: Expecting value (line 2)")),
        (b"\xff{}", PayloadReject(0, 1, "invalid UTF-8 byte 0xff")),
        (b"  ", PayloadReject(0, 0, "empty payload: expected a JSON object or array")),
        (b"[]", PayloadReject(0, 1, "empty array: expected at least one reading")),
        (b'"x"', PayloadReject(0, 0, "expected a JSON object with ts and kwh")),
    ],
)
def test_unreadable_payloads_say_where_and_why(payload: bytes, reject: PayloadReject) -> None:
    d = decode(TOPIC, payload)
    assert d.objects == () and d.rejects == (reject,)


def test_the_file_rules_apply_to_each_reading() -> None:
    """Same reasons as a JSON line: the checker is parse.check_object."""
    cases = {
        b'{"ts": "2024-05-01 12:00:00", "kwh": 1}': "bad timestamp '2024-05-01 12:00:00'",
        b'{"ts": "2024-05-01T12:00:00Z", "kwh": "abc"}': "kwh 'abc' is not a number",
        b'{"ts": "2024-05-01T12:00:00Z", "kwh": 1, "unit": "kWh"}': "extra fields: unit",
        b'{"ts": "2024-05-01T12:00:00Z"}': "missing fields: kwh",
        b'{"ts": "2024-05-01T12:00:00Z", "kwh": 1e400}': "kwh 'inf' is not a number",
    }
    for payload, reason in cases.items():
        d = decode(TOPIC, payload)
        row = check_object(d.objects[0], 1, payload)
        assert isinstance(row, Reject) and reason in row.reason, (payload, row)


def test_too_many_readings_in_one_message() -> None:
    d = decode(TOPIC, b"[" + b",".join([b'{"ts":"2024-05-01T12:00:00Z","kwh":1}'] * 4) + b"]", max_readings=3)
    assert d.rejects == (PayloadReject(0, 0, "4 readings in one message: at most 3"),)


def test_empty_topic_level_is_an_empty_building() -> None:
    route = TopicRoute.make(["buildings/+/meters/+"])
    d = decode(route.fields_of("buildings//meters/el"), b'{"ts": "2024-05-01T12:00:00Z", "kwh": 1}')
    row = check_object(d.objects[0], 1, b"")
    assert isinstance(row, Reject) and row.reason == "empty building"


# -- options ------------------------------------------------------------------------------------


def test_broker_urls() -> None:
    assert str(parse_url("mqtt://broker")) == "mqtt://broker:1883"
    b = parse_url("mqtts://gw@broker.example:8884")
    assert (b.tls, b.host, b.port, b.username) == (True, "broker.example", 8884, "gw")
    assert parse_url("mqtts://h").port == 8883
    for url, reason in [
        ("mqtt://u:secret@h", "holds a password"),
        ("http://h", "use mqtt://"),
        ("mqtt://h/buildings", "no path"),
        ("mqtt://h:99999", "Port out of range"),
        ("mqtt://", "no host"),
    ]:
        with pytest.raises(ConfigError, match=reason) as info:
            parse_url(url)
        assert "secret" not in str(info.value)


def test_password_comes_from_a_file_or_the_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    f = tmp_path / "pw"
    f.write_text("s3cret\nignored\n")
    f.chmod(0o600)
    assert read_password(f) == "s3cret"
    monkeypatch.setenv(PASSWORD_ENV, "fromenv")
    assert read_password(None) == "fromenv"
    with pytest.raises(ConfigError, match="cannot read"):
        read_password(tmp_path / "missing")
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(ConfigError, match="first line is empty"):
        read_password(tmp_path / "empty")


def test_option_combinations_are_checked(tmp_path: Path) -> None:
    ok = MqttOptions.make("mqtt://h", ["buildings/+/meters/+"], client_id="c")
    assert ok.broker.port == 1883 and ok.route.levels == ("building", "meter")
    assert "password" not in repr(MqttOptions.make("mqtt://u@h", ["a/+"], client_id="c"))
    with pytest.raises(ConfigError, match="need a TLS broker URL"):
        MqttOptions.make("mqtt://h", ["a"], client_id="c", ca_file=tmp_path)
    with pytest.raises(ConfigError, match="both --cert-file and --key-file"):
        MqttOptions.make("mqtts://h", ["a"], client_id="c", cert_file=tmp_path)
    with pytest.raises(ConfigError, match=r"use 5 or 3\.1\.1"):
        MqttOptions.make("mqtt://h", ["a"], client_id="c", protocol="4")
    with pytest.raises(ConfigError, match="differs from the user"):
        MqttOptions.make("mqtt://a@h", ["a"], client_id="c", username="b")
    with pytest.raises(ConfigError, match="without wildcards"):
        MqttOptions.make("mqtt://h", ["a"], client_id="c", rejects_topic="rejects/#")
    with pytest.raises(ConfigError, match="no such readable file"):
        MqttOptions.make("mqtts://h", ["a"], client_id="c", ca_file=tmp_path / "nope.pem")


# -- batching and acknowledgements --------------------------------------------------------------


def test_cut_is_group_commit() -> None:
    p = CutPolicy(max_readings=100, linger_s=0.5, pipeline=2)
    assert not should_cut(0, 0, 9.0, 0, p)  # nothing waiting
    assert should_cut(1, 1, 0.0, 0, p)  # idle: one message goes at once
    assert should_cut(1, 1, 0.0, 1, p)  # a free slot in the pipeline
    assert not should_cut(5, 5, 0.1, 2, p)  # pipeline full: gather
    assert should_cut(5, 5, 0.5, 2, p)  # ... until the oldest has waited linger_s
    assert should_cut(5, 100, 0.0, 2, p)  # ... or the batch is full
    assert should_cut(3, 0, 0.0, 0, p)  # rejected messages only: still cut, so they are acknowledged


def test_acknowledged_in_order_only_below_the_committed_label() -> None:
    book = AckBook()
    for seq in range(1, 6):
        book.received(Delivery(seq, 1, 100 + seq, 1))
    assert [d.seq for d in book.committed_below(3)] == [1, 2]
    assert book.committed_below(3) == []
    assert [d.seq for d in book.committed_below(10)] == [3, 4, 5]
    with pytest.raises(ValueError, match="must increase"):
        book.received(Delivery(5, 1, 1, 1))
        book.received(Delivery(4, 1, 1, 1))


def test_only_deliveries_of_the_current_connection_are_acknowledged() -> None:
    deliveries = [Delivery(1, 1, 10, 1), Delivery(2, 1, 11, 0), Delivery(3, 3, 10, 1), Delivery(4, 3, 12, 1)]
    mine, stale = to_acknowledge(deliveries, epoch=3)
    assert [d.seq for d in mine] == [3, 4]  # packet id 10 of connection 1 is not the 10 of connection 3
    assert stale == 1  # QoS 0 needs no acknowledgement


# -- draining the inbox ------------------------------------------------------------------------


def _inbound(n: int) -> Inbound:
    return Inbound(1, n % 65_535 + 1, 1, "buildings/b/meters/m", b"{}", 0.0)


def test_draining_hands_over_every_message_it_takes_from_the_inbox() -> None:
    """The regression behind a message the broker acknowledged but the loader never stored: the
    drain stopped after ``most`` items with one more already taken out of the inbox."""
    inbox: queue.SimpleQueue[Inbound | None] = queue.SimpleQueue()
    for n in range(1, 5_001):
        inbox.put(_inbound(n))
        if n % 700 == 0:
            inbox.put(WAKE)
    taken: list[int] = []
    rounds = 0
    while not inbox.empty():
        first = inbox.get_nowait()
        drain(inbox, first, lambda item: taken.append(item.mid), lambda: False, 2_000)
        rounds += 1
    assert taken == [n % 65_535 + 1 for n in range(1, 5_001)]
    assert rounds == 3  # 5,007 items, 2,000 a round


def test_draining_stops_when_the_batch_is_full_or_the_inbox_empty() -> None:
    inbox: queue.SimpleQueue[Inbound | None] = queue.SimpleQueue()
    for n in range(2, 11):
        inbox.put(_inbound(n))
    taken: list[Inbound] = []
    assert drain(inbox, _inbound(1), taken.append, lambda: len(taken) >= 4, 100) == 4
    assert [t.mid for t in taken] == [2, 3, 4, 5] and inbox.qsize() == 6
    assert drain(inbox, inbox.get_nowait(), taken.append, lambda: False, 100) == 6
    assert inbox.empty() and len(taken) == 10


# -- reading the socket in chunks ---------------------------------------------------------------


def _publish_packet(mid: int, topic: str, payload: bytes) -> bytes:
    """An MQTT 3.1.1 PUBLISH, QoS 1."""
    body = len(topic).to_bytes(2, "big") + topic.encode() + mid.to_bytes(2, "big") + payload
    n, length = len(body), b""
    while True:
        n, digit = n // 128, n % 128
        length += bytes([digit | (128 if n else 0)])
        if not n:
            break
    return b"\x32" + length + body


def test_the_chunked_reader_hands_over_every_packet_in_order_across_chunk_edges() -> None:
    """Thousands of PUBLISH packets through a socket pair (no broker): each comes out once, in
    order, whether a packet ends in a chunk, straddles two, or arrives byte by byte."""
    client = ReadingClient(paho.CallbackAPIVersion.VERSION2, client_id="t", protocol=paho.MQTTv311, manual_ack=True)
    got: list[tuple[int, str, bytes]] = []
    client.on_message = lambda _c, _u, msg: got.append((msg.mid, msg.topic, msg.payload))
    ours, theirs = socket.socketpair()
    ours.setblocking(False)
    client._sock = ours  # type: ignore[assignment]
    client._state = paho._ConnectionState.MQTT_CS_CONNECTED
    want = [(n % 65_535 + 1, f"buildings/b{n % 7}/meters/m{n % 3}", b'{"ts": "%d", "kwh": 1}' % n) for n in range(6_000)]
    stream = b"".join(_publish_packet(*w) for w in want)
    try:
        pos = 0
        for size in itertools.cycle((1, 3, 70_000, 17, 150_000, 2, 40_000)):
            if pos >= len(stream):
                break
            theirs.sendall(stream[pos : pos + size])
            pos += size
            while client.loop_read() == paho.MQTTErrorCode.MQTT_ERR_SUCCESS and _readable(ours):
                pass
        assert got == want
        assert not client._chunk
        # a new connection never sees the old one's bytes
        theirs.sendall(_publish_packet(1, "a/b", b"x")[:5])
        client.loop_read()
        other, far = socket.socketpair()
        other.setblocking(False)
        client._sock = other  # type: ignore[assignment]
        client._in_packet = {  # what paho's reconnect() sets
            "command": 0, "have_remaining": 0, "remaining_count": [], "remaining_mult": 1, "remaining_length": 0,
            "packet": bytearray(b""), "to_process": 0, "pos": 0,
        }  # fmt: skip
        far.sendall(_publish_packet(9, "c/d", b"y"))
        client.loop_read()
        assert got[-1] == (9, "c/d", b"y")
        other.close()
        far.close()
    finally:
        ours.close()
        theirs.close()


def _readable(sock: socket.socket) -> bool:
    return bool(select.select([sock], [], [], 0)[0])


def test_batch_times_report_the_wait_and_the_commit_then_start_over() -> None:
    times = BatchTimes()
    assert times.line() == "0 batches"
    now = time.time()
    times.cut(11, now - 0.5)  # its oldest message came half a second ago
    times.cut(20, now - 0.1)
    times.committed(11)
    times.committed(20)
    times.committed(99)  # a label never cut: ignored
    line = times.line()
    assert line.startswith("2 batches: oldest message waited "), line
    waited = re.search(r"waited ([\d,]+)/([\d,]+) ms", line)
    assert waited and 400 <= int(waited.group(2).replace(",", "")) <= 1_500, line
    assert times.line() == "0 batches"
