"""The MQTT loader's settings, checked once: broker URL, TLS, credentials, session, batching.

Why refuse a password in the URL: the URL is on the command line, where every local user sees it
(``ps``), and in shell history; the password comes from ``--password-file`` or the environment.
The client id is stable (derived from the cluster's name unless given) because the broker keeps
the persistent session, with every unacknowledged message, under that id.
"""

from __future__ import annotations

import logging
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from orchestrator.exceptions import ConfigError
from orchestrator.ingest.mqtt.flow import CutPolicy
from orchestrator.ingest.mqtt.payload import TopicRoute

log = logging.getLogger(__name__)

Protocol = Literal["5", "3.1.1"]
PROTOCOLS: tuple[Protocol, ...] = ("5", "3.1.1")
PASSWORD_ENV = "BUILDSMART_MQTT_PASSWORD"
DEFAULT_SESSION_EXPIRY_S = 7 * 86_400  # how long the broker keeps the session while the loader is away
DEFAULT_RECEIVE_MAXIMUM = 10_000  # unacknowledged messages the broker may send (MQTT 5 Receive Maximum)
DEFAULT_KEEPALIVE_S = 30


@dataclass(frozen=True)
class Broker:
    tls: bool
    host: str
    port: int
    username: str | None

    def __str__(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_url(url: str) -> Broker:
    """``mqtt://[user@]host[:port]`` (1883) or ``mqtts://...`` (TLS, 8883)."""
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise ConfigError(f"--mqtt {url!r}: {exc}") from exc
    if parts.scheme not in ("mqtt", "mqtts"):
        raise ConfigError(f"--mqtt {url!r}: use mqtt://host:port or mqtts://host:port (TLS)")
    if parts.password is not None:
        raise ConfigError("--mqtt: the URL holds a password; give it with --password-file or $" + PASSWORD_ENV)
    if not parts.hostname:
        raise ConfigError(f"--mqtt {url!r}: no host")
    if parts.path not in ("", "/") or parts.query or parts.fragment:
        raise ConfigError(f"--mqtt {url!r}: a broker URL has no path or query; give topics with --topic")
    tls = parts.scheme == "mqtts"
    return Broker(tls, parts.hostname, port or (8883 if tls else 1883), parts.username or None)


def read_password(path: Path | None) -> str | None:
    """The password from ``path`` (first line) or the environment; None for none."""
    if path is None:
        return os.environ.get(PASSWORD_ENV) or None
    try:
        mode = path.stat().st_mode
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--password-file {path}: cannot read: {exc.strerror}") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"--password-file {path}: not UTF-8 text") from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        log.warning("password file %s is readable by other users (mode %o); chmod 600 it", path, stat.S_IMODE(mode))
    password = text.splitlines()[0] if text else ""
    if not password:
        raise ConfigError(f"--password-file {path}: the first line is empty")
    return password


def _readable(path: Path | None, option: str) -> Path | None:
    if path is not None and not os.access(path, os.R_OK):
        raise ConfigError(f"{option} {path}: no such readable file")
    return path


@dataclass(frozen=True)
class MqttOptions:
    broker: Broker
    route: TopicRoute
    client_id: str
    password: str | None = field(default=None, repr=False)
    ca_file: Path | None = None
    cert_file: Path | None = None
    key_file: Path | None = None
    protocol: Protocol = "5"
    session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S
    receive_maximum: int = DEFAULT_RECEIVE_MAXIMUM
    keepalive_s: int = DEFAULT_KEEPALIVE_S
    rejects_path: Path | None = None
    rejects_topic: str | None = None
    policy: CutPolicy = field(default_factory=CutPolicy)
    stats_every_s: float = 10.0

    @staticmethod
    def make(
        url: str,
        topics: list[str],
        *,
        client_id: str,
        levels: str = "building,meter",
        username: str | None = None,
        password_file: Path | None = None,
        ca_file: Path | None = None,
        cert_file: Path | None = None,
        key_file: Path | None = None,
        protocol: str = "5",
        session_expiry_s: int = DEFAULT_SESSION_EXPIRY_S,
        receive_maximum: int = DEFAULT_RECEIVE_MAXIMUM,
        rejects_path: Path | None = None,
        rejects_topic: str | None = None,
        policy: CutPolicy | None = None,
    ) -> MqttOptions:
        policy = policy or CutPolicy()
        broker = parse_url(url)
        if username is not None and broker.username is not None and username != broker.username:
            raise ConfigError(f"--username {username!r} differs from the user {broker.username!r} in the URL")
        if username is not None:
            broker = Broker(broker.tls, broker.host, broker.port, username)
        if protocol not in PROTOCOLS:
            raise ConfigError(f"--mqtt-version {protocol!r}: use 5 or 3.1.1")
        if (ca_file or cert_file or key_file) and not broker.tls:
            raise ConfigError("--ca-file/--cert-file/--key-file need a TLS broker URL (mqtts://)")
        if bool(cert_file) != bool(key_file):
            raise ConfigError("a client certificate needs both --cert-file and --key-file")
        if not client_id or len(client_id.encode()) > 65_535 or "\x00" in client_id:
            raise ConfigError(f"--client-id {client_id!r}: give a non-empty name (it keys the broker's session)")
        if not 1 <= receive_maximum <= 65_535:
            raise ConfigError("--max-inflight must be between 1 and 65535 (MQTT's Receive Maximum)")
        if session_expiry_s < 0:
            raise ConfigError("--session-expiry must be 0 or more seconds")
        if rejects_topic is not None and ("+" in rejects_topic or "#" in rejects_topic or not rejects_topic):
            raise ConfigError(f"--rejects-topic {rejects_topic!r}: a topic name, without wildcards")
        if policy.max_readings < 1 or policy.linger_s <= 0 or policy.pipeline < 1:
            raise ConfigError("--batch-rows and --commit-interval must be positive")
        return MqttOptions(
            broker=broker,
            route=TopicRoute.make(topics, [s for s in levels.split(",") if s.strip()]),
            client_id=client_id,
            password=read_password(password_file),
            ca_file=_readable(ca_file, "--ca-file"),
            cert_file=_readable(cert_file, "--cert-file"),
            key_file=_readable(key_file, "--key-file"),
            protocol="5" if protocol == "5" else "3.1.1",
            session_expiry_s=session_expiry_s,
            receive_maximum=receive_maximum,
            rejects_path=rejects_path,
            rejects_topic=rejects_topic,
            policy=policy,
        )
