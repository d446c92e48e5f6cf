"""``buildsmart ingest --mqtt URL --topic FILTER``: the options, a live status line, the summary.

SIGTERM and the first Ctrl-C ask the loader to stop (commit and acknowledge what arrived); a
second Ctrl-C stops at once, leaving every message not yet acknowledged to the broker.
"""

from __future__ import annotations

import signal
import sys
import threading
from pathlib import Path
from types import FrameType
from typing import Annotated

import typer
from rich.live import Live
from rich.text import Text

from orchestrator import topology
from orchestrator.cli.app import console, out
from orchestrator.ingest.mqtt.flow import CutPolicy
from orchestrator.ingest.mqtt.loader import MqttLoader, MqttStats
from orchestrator.ingest.mqtt.options import DEFAULT_RECEIVE_MAXIMUM, DEFAULT_SESSION_EXPIRY_S, PASSWORD_ENV, MqttOptions

__all__ = ["DEFAULT_RECEIVE_MAXIMUM", "DEFAULT_SESSION_EXPIRY_S", "run"]

REJECTS_FILE = "mqtt-rejects.jsonl"
MQTT_BATCH_READINGS = 20_000

UrlOpt = Annotated[str | None, typer.Option("--mqtt", help="Subscribe to a broker: mqtt://[USER@]HOST[:1883] or mqtts://.")]
TopicOpt = Annotated[
    list[str] | None, typer.Option("--topic", help="MQTT topic filter (repeatable), e.g. 'buildings/+/meters/+'.")
]
LevelsOpt = Annotated[
    str, typer.Option(help="What the filter's + levels name, in order: building, meter or - (skip).", show_default=True)
]
ClientIdOpt = Annotated[
    str | None, typer.Option(help="MQTT client id; the broker keeps the session under it [default: buildsmart-ingest-CLUSTER].")
]
UserOpt = Annotated[str | None, typer.Option(help="MQTT user name.")]
PasswordOpt = Annotated[Path | None, typer.Option(help=f"File whose first line is the MQTT password [or ${PASSWORD_ENV}].")]
CaOpt = Annotated[Path | None, typer.Option(help="CA certificate(s) for mqtts:// [default: the system's].")]
CertOpt = Annotated[Path | None, typer.Option(help="Client certificate for mqtts:// (with --key-file).")]
KeyOpt = Annotated[Path | None, typer.Option(help="Client key for mqtts://.")]
VersionOpt = Annotated[str, typer.Option(help="MQTT protocol: 5 or 3.1.1.", show_default=True)]
ExpiryOpt = Annotated[int, typer.Option(help="Seconds the broker keeps the session while the loader is away (MQTT 5).")]
InflightOpt = Annotated[int, typer.Option(help="Unacknowledged messages the broker may send at once (MQTT 5 Receive Maximum).")]
RejectsTopicOpt = Annotated[str | None, typer.Option(help="Also publish each rejected message's record to this topic.")]


def run(
    directory: Path,
    url: str,
    topics: list[str],
    *,
    topic_levels: str,
    client_id: str | None,
    username: str | None,
    password_file: Path | None,
    ca_file: Path | None,
    cert_file: Path | None,
    key_file: Path | None,
    mqtt_version: str,
    session_expiry: int,
    max_inflight: int,
    rejects: Path | None,
    rejects_topic: str | None,
    batch_rows: int | None,
    commit_interval: float,
    streams: int,
    verbose: bool,
) -> None:
    directory = directory.resolve()
    if client_id is None:
        client_id = f"buildsmart-ingest-{topology.load(directory).cluster_name}"
    options = MqttOptions.make(
        url, topics, client_id=client_id, levels=topic_levels, username=username, password_file=password_file,
        ca_file=ca_file, cert_file=cert_file, key_file=key_file, protocol=mqtt_version, session_expiry_s=session_expiry,
        receive_maximum=max_inflight, rejects_path=rejects or directory / REJECTS_FILE, rejects_topic=rejects_topic,
        policy=CutPolicy(max_readings=batch_rows or MQTT_BATCH_READINGS, linger_s=commit_interval),
    )  # fmt: skip
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        if stop.is_set():
            raise KeyboardInterrupt  # the second one: stop now
        stop.set()

    live = Live(Text(""), console=console, transient=True, auto_refresh=False) if console.is_terminal and not verbose else None

    def progress(stats: MqttStats) -> None:
        if live is not None:
            live.update(Text(f"mqtt {stats.line()}"), refresh=True)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        loader = MqttLoader(directory, options, stop, progress=progress, streams=streams)
        if live is not None:
            live.start()
        try:
            stats = loader.run()
        finally:
            if live is not None:
                live.stop()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    out.print(summary(stats))
    sys.stdout.flush()


def summary(stats: MqttStats) -> str:
    line = (
        f"{stats.broker} {', '.join(stats.topics)}: {stats.received:,} messages in {stats.seconds:.1f} s — committed "
        f"{stats.committed:,}, acknowledged {stats.acknowledged:,}"
    )
    if stats.redelivery:
        line += f" (and {stats.redelivery:,} committed but left to the broker to deliver again after a reconnect)"
    line += (
        f"; loaded {stats.rows:,} readings (new {stats.inserted:,}, replaced {stats.replaced:,}, unchanged "
        f"{stats.unchanged:,}), rejected {stats.rejected_readings:,} readings in {stats.rejected_messages:,} messages"
    )
    if stats.rejected_messages and stats.rejects_path:
        line += f" (see {stats.rejects_path})"
    return line
