"""A real MQTT broker (Debian's mosquitto, persistence on) and real QoS 1 publishers for the MQTT
ingest tests and ``bench/mqtt.py``.

The broker is started from a config file in its own directory and stopped by its PID; a restart
keeps the port and the persistence file, so sessions and queued messages survive it. Publishers
record which readings the broker acknowledged (PUBACK): that set is what must end up stored.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as paho

from orchestrator.ingest.mqtt.client import ReadingClient
from orchestrator.runtime.ports import free_port

MOSQUITTO = next((p for p in ("/usr/sbin/mosquitto", "/usr/bin/mosquitto") if Path(p).exists()), "mosquitto")
REPO = Path(__file__).resolve().parent.parent
Key = tuple[str, str, str]


class Broker:
    """One mosquitto with persistence on, listening on 127.0.0.1:``port``."""

    def __init__(
        self,
        workdir: Path,
        users: dict[str, str] | None = None,
        tls: bool = False,
        *,
        mosquitto: str | None = None,
        max_inflight: int = 0,
        extra: list[str] | None = None,
    ) -> None:
        self.dir = workdir
        self.binary = mosquitto or MOSQUITTO
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.tls = tls
        self.proc: subprocess.Popen[bytes] | None = None
        lines = [f"listener {self.port} 127.0.0.1"]
        if tls:
            self.ca = make_certs(self.dir)
            lines += [f"cafile {self.ca}", f"certfile {self.dir}/server.crt", f"keyfile {self.dir}/server.key"]
        lines += [
            "persistence true",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            # a persistent session must keep every message while the loader is away (the default, 1000, drops)
            "max_queued_messages 0",
            f"max_inflight_messages {max_inflight}",
            "max_keepalive 65535",
            f"user {pwd.getpwuid(os.getuid()).pw_name}",
            f"log_dest file {self.dir}/mosquitto.log",
            "log_type error",
            "log_type warning",
            "log_type notice",
        ]
        lines += extra or []
        if users:
            passwd = self.dir / "passwd"
            passwd.write_text("")
            for user, password in users.items():
                subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True, capture_output=True)
            lines += [f"password_file {passwd}", "allow_anonymous false"]
        else:
            lines.append("allow_anonymous true")
        self.conf = self.dir / "mosquitto.conf"
        self.conf.write_text("\n".join(lines) + "\n")

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{'localhost' if self.tls else '127.0.0.1'}:{self.port}"

    def start(self, timeout_s: float = 10.0) -> None:
        self.proc = subprocess.Popen([self.binary, "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited: {self.proc.stderr.read().decode() if self.proc.stderr else ''}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return
            except OSError:
                time.sleep(0.05)
        raise AssertionError(f"mosquitto is not listening on {self.port} after {timeout_s} s")

    def stop(self) -> None:
        """SIGTERM by PID (mosquitto writes its persistence file on the way out)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def restart(self, down_s: float = 1.0) -> None:
        self.stop()
        time.sleep(down_s)
        self.start()


def make_certs(workdir: Path) -> Path:
    """A throw-away CA and a server certificate for ``localhost`` (openssl); returns the CA file."""

    def ssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=workdir, check=True, capture_output=True)

    key = ("-newkey", "rsa:2048", "-nodes")
    ssl("req", "-x509", *key, "-days", "2", "-subj", "/CN=bsdb-test-ca", "-keyout", "ca.key", "-out", "ca.crt")
    ssl("req", *key, "-subj", "/CN=localhost", "-keyout", "server.key", "-out", "server.csr")
    (workdir / "san.ext").write_text("subjectAltName=DNS:localhost,IP:127.0.0.1\n")
    ssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial", "-days", "2",
        "-extfile", "san.ext", "-out", "server.crt")  # fmt: skip
    return workdir / "ca.crt"


@dataclass
class Publisher:
    """One gateway: publishes readings of one building (meters ``m0..``) with QoS 1; ``acked``
    holds the readings whose PUBLISH the broker acknowledged, with the time it was sent."""

    url_port: int
    building: str
    name: str
    meters: int = 2
    batch: int = 1  # readings per message (1: an object, more: an array)
    acked: dict[Key, float] = field(default_factory=dict)
    sent_at: dict[Key, float] = field(default_factory=dict)
    sent: int = 0
    _out: list[tuple[paho.MQTTMessageInfo, list[tuple[Key, float]]]] = field(default_factory=list)
    _sent_mid: list[tuple[int, float]] = field(default_factory=list)
    _acked_at: dict[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        # the loader's chunked reader: here all gateways share one Python process, where paho's
        # three recv calls per PUBACK made the acknowledgements queue near bench/mqtt.py's 80% rate
        self.client = ReadingClient(paho.CallbackAPIVersion.VERSION2, client_id=self.name, protocol=paho.MQTTv311)
        self.client.max_inflight_messages_set(200)
        self.client.max_queued_messages_set(0)
        self.client.reconnect_delay_set(0.2, 2)
        self.client.on_publish = self._on_publish
        self.client.connect("127.0.0.1", self.url_port, 60)
        self.client.loop_start()

    def publish(self, ts: list[str], meter: int, value: float) -> None:
        """One message with ``len(ts)`` readings of meter ``m{meter}``; value ``value + i/1000``.
        Used from one thread."""
        m = f"m{meter}"
        readings = [(t, round(value + i / 1000, 3)) for i, t in enumerate(ts)]
        body: object = [{"ts": t, "kwh": k} for t, k in readings]
        payload = json.dumps(body[0] if len(readings) == 1 else body)  # type: ignore[index]
        now = time.time()
        info = self.client.publish(f"buildings/{self.building}/meters/{m}", payload, qos=1)
        self._sent_mid.append((info.mid, now))
        self._out.append((info, [((self.building, m, t), k) for t, k in readings]))
        for t, _ in readings:
            self.sent_at[(self.building, m, t)] = now
        self.sent += 1

    def _on_publish(self, client: paho.Client, userdata: object, mid: int, reason: object, props: object) -> None:
        self._acked_at[mid] = time.time()  # paho's thread

    def puback_s(self) -> list[float]:
        """Seconds from each PUBLISH call to the broker's PUBACK (packet ids are unique below 65,536 messages)."""
        return [self._acked_at[mid] - sent for mid, sent in self._sent_mid if mid in self._acked_at]

    def collect(self) -> int:
        """Move what the broker acknowledged into ``acked``; returns how many messages wait for it.
        (MQTTMessageInfo, not the packet id: paho reuses ids.)"""
        waiting = []
        for info, readings in self._out:
            # not is_published(): it raises for a message published while the broker was away,
            # which paho still sends after the reconnect and marks published on its PUBACK
            if info._published:
                self.acked.update(readings)
            else:
                waiting.append((info, readings))
        self._out = waiting
        return len(waiting)

    def publish_raw(self, topic: str, payload: bytes) -> None:
        self.client.publish(topic, payload, qos=1)

    def wait_acked(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while self.collect() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not self.collect(), f"{self.name}: {self.collect()} messages not acknowledged by the broker"

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


STAMP_BASE = 1709251200  # 2024-03-01T00:00:00Z


def stamp(i: int) -> str:
    """The i-th quarter hour from 2024-03-01 as an ISO timestamp."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(STAMP_BASE + 900 * i))


class Loader:
    """``buildsmart ingest --mqtt`` as a user runs it, in its own process (to kill -9 or SIGTERM);
    its standard output and error go to files in ``workdir``."""

    def __init__(
        self,
        directory: Path,
        broker: Broker,
        workdir: Path,
        *extra: str,
        client_id: str = "bsdb-test",
        python: tuple[str, ...] = (),
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.out_path, self.err_path = workdir / "stdout", workdir / "stderr"
        cmd = [
            sys.executable, *python, "-m", "orchestrator", "ingest", "--mqtt", broker.url, "--topic", "buildings/+/meters/+",
            "--client-id", client_id, "--commit-interval", "0.2", "--dir", str(directory), "-v", *extra,
        ]  # fmt: skip
        with self.out_path.open("w") as out, self.err_path.open("w") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, cwd=REPO)

    def text(self) -> str:
        return self.out_path.read_text() + self.err_path.read_text()

    def wait_for(self, needle: str, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if needle in self.err_path.read_text():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"the loader exited ({self.proc.returncode}) before {needle!r}:\n{self.text()}")
            time.sleep(0.05)
        raise AssertionError(f"the loader did not log {needle!r} in {timeout_s} s:\n{self.text()}")

    def kill9(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM (commit and acknowledge what arrived) and wait; returns the exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
            raise AssertionError(f"the loader did not stop within {timeout_s} s after SIGTERM:\n{self.text()}") from None
