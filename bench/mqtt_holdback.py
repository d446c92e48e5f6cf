"""Does the broker alone hold back a QoS 1 message it acknowledged? (no database, no loader)

Written to chase the message missing after bench/mqtt.py's sustained phase. On Debian's mosquitto
2.0.11 it delivered every message in 4 runs of 86,000-149,000 (the cause was in the loader:
test_a_backlog_queued_while_the_loader_was_away_is_stored_whole); it also shows that 2.0.11 sends
far past the subscriber's Receive Maximum once a backlog builds (received >> acknowledged + 10,000).
Kept to check another broker or configuration the same way.

8 publishers (paho, MQTT 3.1.1, QoS 1, at most ``--window`` unacknowledged each) publish as fast as
the broker acknowledges, for ``--seconds``, into one subscriber shaped like the loader: MQTT 5,
persistent session, Receive Maximum ``--receive-maximum``, manual acknowledgements sent in order
in groups every ``--ack-delay-ms`` (a batch commit), at most ``--ack-rate`` a second (the loader's
commit rate), so a backlog builds in the broker as in ``bench/mqtt.py``. Then it waits up to ``--wait`` seconds for the
subscriber to have received every message a publisher's PUBACK confirmed; prints what is missing,
the broker's $SYS counters, and exits 1 when something is held back.

Usage (it starts a broker: under the shared lock):
  flock -s /tmp/bsdb-bench.lock /opt/venv-mqtt/bin/python bench/mqtt_holdback.py --runs 4
  ... --mosquitto /path/to/another/mosquitto --max-inflight 0
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import threading
import time
from pathlib import Path

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.harness import make_tmp_dir  # noqa: E402
from tests.mqtt_tools import Broker, Key, Publisher, stamp  # noqa: E402


class SlowAcker:
    """A loader-shaped subscriber: keeps (building, meter, ts) of every message; acks in order, late."""

    def __init__(self, port: int, receive_maximum: int, ack_delay_s: float, client_id: str, ack_rate: float) -> None:
        self.got: set[Key] = set()
        self.received = 0
        self.acked = 0
        self._pending: list[int] = []
        self._lock = threading.Lock()
        self.ack_delay_s = ack_delay_s
        self.per_tick = max(1, int(ack_rate * ack_delay_s)) if ack_rate > 0 else None
        self.stop = threading.Event()
        self.client = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv5, manual_ack=True)
        self.client.on_message = self._on_message
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        props.ReceiveMaximum = receive_maximum
        self.client.connect("127.0.0.1", port, 60, clean_start=False, properties=props)
        self.client.subscribe("buildings/+/meters/+", qos=1)
        self.client.loop_start()
        self.thread = threading.Thread(target=self._acks, daemon=True)
        self.thread.start()

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        _, building, _, meter = msg.topic.split("/")
        body = json.loads(msg.payload)
        with self._lock:
            self.got.add((building, meter, body["ts"]))
            self.received += 1
            self._pending.append(msg.mid)

    def _acks(self) -> None:
        while not self.stop.is_set():
            time.sleep(self.ack_delay_s)
            with self._lock:
                cut = len(self._pending) if self.per_tick is None else self.per_tick
                mids, self._pending = self._pending[:cut], self._pending[cut:]
            for mid in mids:
                self.client.ack(mid, 1)
            self.acked += len(mids)

    def close(self) -> None:
        self.stop.set()
        self.thread.join()
        self.client.disconnect()
        self.client.loop_stop()


def sys_counters(port: int) -> dict[str, str]:
    """The broker's $SYS counters (published every sys_interval)."""
    out: dict[str, str] = {}
    c = paho.Client(paho.CallbackAPIVersion.VERSION2, client_id="sys-reader", protocol=paho.MQTTv311)
    c.on_message = lambda _c, _u, m: out.__setitem__(m.topic, m.payload.decode(errors="replace"))
    c.connect("127.0.0.1", port, 60)
    c.subscribe("$SYS/broker/#", qos=0)
    c.loop_start()
    time.sleep(1.5)
    c.disconnect()
    c.loop_stop()
    keep = ("messages", "store", "publish", "clients/connected", "version")
    return {k: v for k, v in sorted(out.items()) if any(w in k for w in keep)}


def one_run(args: argparse.Namespace, n: int) -> int:
    work = make_tmp_dir("bs-mqtt-holdback-")
    broker = Broker(work / "broker", mosquitto=args.mosquitto, max_inflight=args.max_inflight, extra=args.conf)
    broker.start()
    sub = SlowAcker(broker.port, args.receive_maximum, args.ack_delay_ms / 1000, f"holdback-{n}", args.ack_rate)
    time.sleep(0.5)
    pubs = [Publisher(broker.port, f"p{i}", f"holdback-pub-{n}-{i}") for i in range(args.publishers)]
    sent = [0] * len(pubs)

    def publish(k: int, pub: Publisher) -> None:
        t0 = time.monotonic()
        i = 0
        while time.monotonic() - t0 < args.seconds:
            if len(pub._out) >= args.window and pub.collect() >= args.window:
                time.sleep(0.001)
                continue
            pub.publish([stamp(i)], meter=i % 2, value=float(i))
            i += 1
        sent[k] = i

    threads = [threading.Thread(target=publish, args=(k, p)) for k, p in enumerate(pubs)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want: set[Key] = set()
    for p in pubs:
        p.wait_acked(120)
        want |= set(p.acked)
    published_s = time.monotonic() - t0
    deadline = time.monotonic() + args.wait
    while time.monotonic() < deadline and not want <= sub.got:
        time.sleep(0.1)
    missing = sorted(want - sub.got)
    print(
        f"run {n}: {sum(sent):,} published in {published_s:.1f} s, {len(want):,} acknowledged by the broker, "
        f"subscriber received {sub.received:,} ({len(sub.got):,} distinct), acked {sub.acked:,}; "
        f"missing after {time.monotonic() - t0 - published_s:.0f} s: {len(missing)} {missing[:5]}",
        flush=True,
    )
    if missing:
        for k, v in sys_counters(broker.port).items():
            print(f"  {k} = {v}")
        if args.reconnect_when_stuck:
            # does the broker resend it when the persistent session is resumed?
            sub.close()
            again = SlowAcker(broker.port, args.receive_maximum, args.ack_delay_ms / 1000, f"holdback-{n}", args.ack_rate)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and not set(missing) <= again.got:
                time.sleep(0.1)
            print(f"  after a reconnect of the session: {len(set(missing) - again.got)} still missing", flush=True)
            sub = again
    for p in pubs:
        p.close()
    sub.close()
    broker.stop()
    if missing and args.keep:
        print(f"  kept {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    return len(missing)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--runs", type=int, default=1)
    ap.add_argument("--seconds", type=float, default=20.0)
    ap.add_argument("--publishers", type=int, default=8)
    ap.add_argument("--window", type=int, default=100)
    ap.add_argument("--receive-maximum", type=int, default=10_000)
    ap.add_argument("--ack-delay-ms", type=float, default=50.0)
    ap.add_argument("--ack-rate", type=float, default=3500.0, help="messages acknowledged per second at most (0: all)")
    ap.add_argument("--wait", type=float, default=60.0, help="seconds to wait for the last message")
    ap.add_argument("--mosquitto", help="broker binary (default: Debian's)")
    ap.add_argument("--max-inflight", type=int, default=0, help="the broker's max_inflight_messages")
    ap.add_argument("--conf", action="append", default=[], help="an extra mosquitto.conf line")
    ap.add_argument("--reconnect-when-stuck", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the broker's directory (log) of a run that lost one")
    args = ap.parse_args()
    lost = [one_run(args, n) for n in range(1, args.runs + 1)]
    print(f"{args.runs} runs, held back per run: {lost}")
    sys.exit(1 if any(lost) else 0)


if __name__ == "__main__":
    main()
