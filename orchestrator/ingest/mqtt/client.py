"""The MQTT connection of the loader (paho-mqtt 2.x): QoS 1 subscription, persistent session,
manual acknowledgements, clear errors for a broker that is away or refuses.

paho's network thread only queues what arrives (:class:`Inbound`), tagged with the connection it
came on (``epoch``, counted up at every connect and disconnect); the loader's thread does the
rest. :meth:`MqttLink.ack` sends PUBACKs under the same lock that changes the epoch, so a PUBACK
never goes out on a connection other than the one its message came on (see :mod:`.flow`).
"""

from __future__ import annotations

import logging
import queue
import ssl
import threading
import time
from dataclasses import dataclass

import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

from orchestrator.exceptions import ConfigError, NodeError
from orchestrator.ingest.mqtt.flow import Delivery, to_acknowledge
from orchestrator.ingest.mqtt.options import MqttOptions

log = logging.getLogger(__name__)

CONNECT_TIMEOUT_S = 15.0
QOS = 1
# reasons a broker gives for refusing a client (MQTT 5 reason codes; paho maps 3.1.1 return codes to them)
_CREDENTIALS = {
    "Bad user name or password", "Not authorized", "Client identifier not valid", "Banned", "Bad authentication method",
}  # fmt: skip


@dataclass(frozen=True, slots=True)
class Inbound:
    epoch: int
    mid: int
    qos: int
    topic: str
    payload: bytes
    received: float  # time.time() when paho handed it over


WAKE = None  # put into the inbox to wake the loader (a batch committed)
READ_CHUNK = 64 << 10  # bytes taken from the socket at once
READ_BURST = 1_000  # packets handled per wake-up of paho's thread (then it looks at writes and keepalive)


class ReadingClient(paho.Client):
    """paho's client, reading the socket in chunks and many packets per wake-up.

    paho 2.x reads a packet with three or more ``recv`` calls and handles one packet per
    ``select`` when nothing is in flight the other way (a subscriber's case). Each system call
    lets go of the GIL, and getting it back waits for the loader's busy threads (up to the switch
    interval), so near its limit the loader read a few thousand messages a second and the rest
    queued in the socket and the broker: seconds of latency that no batching could remove. Here a
    ``recv`` takes up to ``READ_CHUNK`` bytes and ``loop_read`` goes on while packets are there.
    ``loop_read`` returns only with the chunk used up, so nothing waits in it unseen by ``select``.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._chunk = bytearray()
        self._chunk_of: object = None  # the socket the chunk came from: never parse it on another

    def _sock_recv(self, bufsize: int) -> bytes:
        if self._chunk_of is not self._sock:
            self._chunk.clear()
            self._chunk_of = self._sock
        if not self._chunk:
            data = super()._sock_recv(READ_CHUNK)  # raises BlockingIOError when nothing is there
            if not data:
                return data  # the connection closed
            self._chunk += data
        out = bytes(self._chunk[:bufsize])
        del self._chunk[:bufsize]
        return out

    def loop_read(self, max_packets: int = 1) -> paho.MQTTErrorCode:
        handled = 0
        while True:
            if self._sock is None:
                return paho.MQTTErrorCode.MQTT_ERR_NO_CONN
            rc = self._packet_read()
            if rc > 0:
                self._chunk.clear()
                return self._loop_rc_handle(rc)
            if rc == paho.MQTTErrorCode.MQTT_ERR_AGAIN:
                return paho.MQTTErrorCode.MQTT_ERR_SUCCESS
            handled += 1
            if handled >= READ_BURST and not self._chunk:
                return paho.MQTTErrorCode.MQTT_ERR_SUCCESS


class MqttLink:
    """One broker connection for one loader; paho reconnects by itself after the first connect."""

    def __init__(self, options: MqttOptions) -> None:
        self.options = options
        self.inbox: queue.SimpleQueue[Inbound | None] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self.epoch = 0
        self.connected = False
        self.connects = 0
        self.session_present = False
        self._first = threading.Event()
        self._subscribed = threading.Event()
        self._refusal: BaseException | None = None
        v5 = options.protocol == "5"
        self.client = ReadingClient(
            paho.CallbackAPIVersion.VERSION2,
            client_id=options.client_id,
            protocol=paho.MQTTv5 if v5 else paho.MQTTv311,
            clean_session=None if v5 else False,
            manual_ack=True,
            reconnect_on_failure=True,
        )
        self.client.reconnect_delay_set(1, 10)
        self.client.max_inflight_messages_set(100)  # our own publishes (rejects): not on the hot path
        if options.broker.username is not None:
            self.client.username_pw_set(options.broker.username, options.password)
        elif options.password is not None:
            raise ConfigError("a password was given but no user name: use --username or mqtt://USER@host")
        if options.broker.tls:
            try:
                self.client.tls_set(
                    ca_certs=str(options.ca_file) if options.ca_file else None,
                    certfile=str(options.cert_file) if options.cert_file else None,
                    keyfile=str(options.key_file) if options.key_file else None,
                    cert_reqs=ssl.CERT_REQUIRED,
                    tls_version=ssl.PROTOCOL_TLS_CLIENT,
                )
            except (ssl.SSLError, OSError) as exc:
                raise ConfigError(f"TLS settings: {exc}") from exc
        self.client.on_connect = self._on_connect
        self.client.on_disconnect = self._on_disconnect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message

    # -- paho's thread ---------------------------------------------------------------------

    def _on_connect(
        self, client: paho.Client, userdata: object, flags: paho.ConnectFlags, reason: ReasonCode, props: object
    ) -> None:
        if reason.is_failure:
            text = str(reason)
            hint = " (check --username and --password-file)" if text in _CREDENTIALS else ""
            error = f"the MQTT broker at {self.options.broker} refused the connection: {text}{hint}"
            if not self._first.is_set():
                self._refusal = ConfigError(error) if text in _CREDENTIALS else NodeError(error)
                self._first.set()
            else:
                log.error("%s; retrying", error)
            return
        with self._lock:
            self.epoch += 1
            self.connected = True
            self.connects += 1
            self.session_present = bool(flags.session_present)
        log.info(
            "connected to %s as %s (%s session)%s",
            self.options.broker, self.options.client_id, "resumed" if flags.session_present else "new",
            "" if self.connects == 1 else f", reconnect {self.connects - 1}",
        )  # fmt: skip
        if self.options.protocol == "5":
            client.subscribe([(f, SubscribeOptions(qos=QOS)) for f in self.options.route.filters])
        else:
            client.subscribe([(f, QOS) for f in self.options.route.filters])
        self._first.set()

    def _on_disconnect(self, client: paho.Client, userdata: object, flags: object, reason: ReasonCode, props: object) -> None:
        with self._lock:
            was = self.connected
            self.epoch += 1
            self.connected = False
        if was:
            log.warning("disconnected from %s (%s); reconnecting", self.options.broker, reason)

    def _on_subscribe(self, client: paho.Client, userdata: object, mid: int, reasons: list[ReasonCode], props: object) -> None:
        refused = [(f, r) for f, r in zip(self.options.route.filters, reasons, strict=False) if r.is_failure]
        if refused:
            what = "; ".join(f"{f!r}: {r}" for f, r in refused)
            self._refusal = ConfigError(f"the MQTT broker at {self.options.broker} refused the subscription to {what}")
        else:
            granted = ", ".join(f"{f} (QoS {r.value})" for f, r in zip(self.options.route.filters, reasons, strict=False))
            log.info("subscribed to %s", granted)
            if any(r.value < QOS for r in reasons):
                log.warning("the broker granted QoS 0 only: it does not keep messages for the loader, so a crash can lose some")
        self._subscribed.set()

    def _on_message(self, client: paho.Client, userdata: object, msg: paho.MQTTMessage) -> None:
        try:
            topic = msg.topic
        except UnicodeDecodeError:
            topic = repr(msg._topic)  # MQTT requires UTF-8 topics; a broker that passes others gets its message rejected
        self.inbox.put(Inbound(self.epoch, msg.mid, msg.qos, topic, bytes(msg.payload), time.time()))

    # -- the loader's thread ---------------------------------------------------------------

    def connect(self, timeout_s: float = CONNECT_TIMEOUT_S) -> None:
        """Connect and subscribe, or raise: NodeError when the broker cannot be reached,
        ConfigError when it refuses the credentials, the client id or the subscription."""
        broker = self.options.broker
        props = None
        if self.options.protocol == "5":
            props = Properties(PacketTypes.CONNECT)
            props.SessionExpiryInterval = self.options.session_expiry_s
            props.ReceiveMaximum = self.options.receive_maximum
        try:
            if props is not None:
                self.client.connect(broker.host, broker.port, self.options.keepalive_s, clean_start=False, properties=props)
            else:
                self.client.connect(broker.host, broker.port, self.options.keepalive_s)
        except ssl.SSLCertVerificationError as exc:
            raise NodeError(f"TLS with the MQTT broker at {broker} failed: {exc.verify_message} (check --ca-file)") from exc
        except ssl.SSLError as exc:
            raise NodeError(f"TLS with the MQTT broker at {broker} failed: {exc.reason or exc}") from exc
        except OSError as exc:
            reason = exc.strerror or str(exc) or type(exc).__name__
            raise NodeError(f"cannot reach the MQTT broker at {broker}: {reason}") from exc
        self.client.loop_start()
        deadline = time.monotonic() + timeout_s
        if not self._first.wait(timeout_s):
            self.close()
            raise NodeError(f"the MQTT broker at {broker} did not answer the connection within {timeout_s:.0f} s")
        if self._refusal is None and not self._subscribed.wait(max(deadline - time.monotonic(), 0.1)):
            self.close()
            raise NodeError(f"the MQTT broker at {broker} did not answer the subscription within {timeout_s:.0f} s")
        if self._refusal is not None:
            self.close()
            raise self._refusal

    def check(self) -> None:
        """Raise what the broker refused since (a subscription, after a reconnect)."""
        if self._refusal is not None:
            raise self._refusal

    def ack(self, deliveries: list[Delivery]) -> tuple[int, int]:
        """PUBACK the deliveries that came on the current connection; returns (acknowledged,
        left to the broker to deliver again)."""
        with self._lock:
            if not self.connected:
                return 0, sum(1 for d in deliveries if d.qos > 0)
            mine, stale = to_acknowledge(deliveries, self.epoch)
            for d in mine:
                self.client.ack(d.mid, d.qos)
        return len(mine), stale

    def publish(self, topic: str, payload: bytes) -> None:
        """Publish with QoS 1 (paho sends it again after a reconnect until the broker confirms)."""
        self.client.publish(topic, payload, qos=QOS)

    def close(self) -> None:
        """Disconnect and stop paho's thread. PUBACKs already queued go out first: paho writes its
        packets in order and closes the socket once the DISCONNECT is written."""
        self.client.disconnect()
        self.client.loop_stop()
