"""The MQTT loader: messages in, batches to :class:`~orchestrator.ingest.api.IngestSession`, PUBACKs
out once committed.

Each message gets a sequence number in arrival order; its readings are checked as they arrive (the
JSON-line rules of :func:`orchestrator.ingest.parse.check_object`) and gathered until
:func:`.flow.should_cut` says to submit them, labelled with the next sequence number. When the
session reports a batch committed (strictly in order), every message below its label is
acknowledged (:class:`.flow.AckBook`). A bad message or reading goes to the rejects file (fsync'd
before the batch holding its message is submitted, so it is on disk before the PUBACK) and,
optionally, to a rejects topic; it never stops the stream.

Stopping (SIGTERM, Ctrl-C: the ``stop`` event) commits and acknowledges what has arrived, then
disconnects; what the broker sends after that stays in the session for the next run.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import BinaryIO

from orchestrator.exceptions import NodeError
from orchestrator.ingest.api import BatchFailed, CommitOutcome, IngestSession
from orchestrator.ingest.mqtt.client import WAKE, Inbound, MqttLink
from orchestrator.ingest.mqtt.flow import AckBook, Delivery, should_cut
from orchestrator.ingest.mqtt.options import MqttOptions
from orchestrator.ingest.mqtt.payload import PayloadReject, decode
from orchestrator.ingest.parse import Reject, Row, batch_of, check_object
from orchestrator.ingest.validate import ts_micros
from orchestrator.ingest.writer import BatchCounts

log = logging.getLogger(__name__)

DRAIN_MAX = 2_000  # messages taken before looking at commits again
IDLE_WAIT_S = 0.2
REJECT_LOG_LIMIT = 5  # rejects logged one by one per stats interval; the rest are counted
PAYLOAD_KEEP = 64 << 10  # bytes of a rejected payload kept in its record
CACHE_LIMIT = 100_000  # topics and timestamps remembered (a gateway repeats both): cleared when full


@dataclass(frozen=True)
class MqttStats:
    """A snapshot of the loader's counters (progress, the periodic log line, the summary)."""

    broker: str
    topics: tuple[str, ...]
    seconds: float
    connected: bool
    reconnects: int
    received: int  # messages
    readings: int  # good readings taken from them
    rejected_messages: int  # messages with at least one bad reading, or unreadable
    rejected_readings: int
    committed: int  # messages whose batch committed
    acknowledged: int  # PUBACKs sent
    redelivery: int  # committed, but the connection changed first: the broker delivers them again
    rows: int  # readings committed
    inserted: int
    replaced: int
    unchanged: int
    pending: int  # messages waiting for a batch
    in_flight: int  # batches committing
    rejects_path: str | None

    @property
    def rate(self) -> float:
        return self.received / self.seconds if self.seconds > 0 else 0.0

    def line(self) -> str:
        state = "connected" if self.connected else "disconnected, reconnecting"
        return (
            f"{self.received:,} messages ({self.rate:,.0f}/s), {self.readings:,} readings; committed {self.committed:,} "
            f"messages ({self.rows:,} readings: new {self.inserted:,}, replaced {self.replaced:,}, unchanged "
            f"{self.unchanged:,}), acknowledged {self.acknowledged:,}; rejected {self.rejected_messages:,} messages "
            f"({self.rejected_readings:,} readings); waiting {self.pending:,}, batches committing {self.in_flight}; {state}"
        )


class RejectsSink:
    """Rejected messages as JSON lines: where (topic, message, reading, column), why, what (the
    payload), appended to a file and optionally published to a topic."""

    def __init__(self, path: Path | None, topic: str | None, link: MqttLink) -> None:
        self.path = path
        self.topic = topic
        self.link = link
        self._fh: BinaryIO | None = None
        self._dirty = False
        self._logged = 0
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(path, "ab")  # noqa: SIM115 - closed in close()

    def add(self, item: Inbound, seq: int, reject: PayloadReject) -> None:
        record: dict[str, object] = {
            "received": datetime.fromtimestamp(item.received, UTC).isoformat(timespec="milliseconds"),
            "topic": item.topic,
            "message": seq,
            "reading": reject.reading,
            "column": reject.column,
            "reason": reject.reason,
        }
        payload = item.payload[:PAYLOAD_KEEP]
        try:
            record["payload"] = payload.decode("utf-8")
        except UnicodeDecodeError:
            record["payload_base64"] = base64.b64encode(payload).decode()
        if len(item.payload) > PAYLOAD_KEEP:
            record["payload_truncated_from"] = len(item.payload)
        line = json.dumps(record, ensure_ascii=False).encode() + b"\n"
        if self._fh is not None:
            self._fh.write(line)
            self._dirty = True
        if self.topic is not None:
            self.link.publish(self.topic, line.rstrip(b"\n"))
        if self._logged < REJECT_LOG_LIMIT:
            self._logged += 1
            log.warning("rejected %s: %s", where(item.topic, seq, reject), reject.reason)

    def sync(self) -> None:
        """On disk before the messages are acknowledged."""
        if self._fh is not None and self._dirty:
            self._fh.flush()
            os.fsync(self._fh.fileno())
            self._dirty = False

    def new_interval(self) -> None:
        self._logged = 0

    def close(self) -> None:
        if self._fh is not None:
            self.sync()
            self._fh.close()


def where(topic: str, seq: int, reject: PayloadReject) -> str:
    """``TOPIC [message N, reading R, column C]``: the MQTT counterpart of ``file:line:column``."""
    parts = [f"message {seq}"]
    if reject.reading:
        parts.append(f"reading {reject.reading}")
    if reject.column:
        parts.append(f"column {reject.column}")
    return f"{topic} [{', '.join(parts)}]"


def drain(
    inbox: queue.SimpleQueue[Inbound | None],
    first: Inbound | None,
    take: Callable[[Inbound], None],
    full: Callable[[], bool],
    most: int,
) -> int:
    """Hand ``first``, then what is already waiting in ``inbox``, to ``take`` (skipping wake-ups)
    until the inbox is empty, ``full()`` or ``most`` items were handled; returns how many.

    An item is taken out of the inbox only when it will be handed over: one dropped here would
    never be acknowledged, and the broker sends a message again only after a reconnect.
    """
    item, handled = first, 0
    while True:
        handled += 1
        if item is not WAKE:
            take(item)
            if full():
                return handled
        if handled >= most:
            return handled
        try:
            item = inbox.get_nowait()
        except queue.Empty:
            return handled


@dataclass
class _Pending:
    messages: int = 0
    rows: list[Row] = field(default_factory=list)
    instants: list[int] = field(default_factory=list)
    oldest: float = 0.0  # time.monotonic() when the loader took the first message
    first_received: float = 0.0  # time.time() when paho handed the first message over


class BatchTimes:
    """Where a batch's time went, for the periodic log line: from paho handing over its oldest
    message to the cut (queue and gathering) and from the cut to the commit report."""

    def __init__(self) -> None:
        self._cut: dict[int, tuple[float, float]] = {}  # label -> (cut at, oldest received), wall clock
        self.waits: list[float] = []
        self.commits: list[float] = []

    def cut(self, label: int, first_received: float) -> None:
        self._cut[label] = (time.time(), first_received)

    def committed(self, label: int) -> None:
        at = self._cut.pop(label, None)
        if at is not None:
            self.waits.append(at[0] - at[1])
            self.commits.append(time.time() - at[0])

    def line(self) -> str:
        """``N batches: waited median/max ms, committed in median/max ms`` since the last call."""
        if not self.commits:
            return "0 batches"
        w, c = sorted(self.waits), sorted(self.commits)
        self.waits, self.commits = [], []
        return f"{len(c):,} batches: oldest message waited {_ms(w)} (median/max) before its batch, committed in {_ms(c)}"


def _ms(ordered: list[float]) -> str:
    return f"{ordered[len(ordered) // 2] * 1000:,.0f}/{ordered[-1] * 1000:,.0f} ms"


class MqttLoader:
    """Run once: :meth:`run` until ``stop`` is set. Used from one thread."""

    def __init__(
        self,
        directory: Path,
        options: MqttOptions,
        stop: threading.Event,
        progress: Callable[[MqttStats], None] | None = None,
        streams: int | None = None,
    ) -> None:
        self.options = options
        self.stop = stop
        self.progress = progress
        self.link = MqttLink(options)
        self.book = AckBook()
        self.pending = _Pending()
        self.seq = 0  # messages received
        self.reading_no = 0  # readings checked (their order within a batch: latest wins)
        self.readings = self.rejected_messages = self.rejected_readings = 0
        self.committed = self.acknowledged = self.redelivery = 0
        self.times = BatchTimes()
        self.started = time.monotonic()
        self._fields: dict[str, dict[str, str]] = {}  # topic -> its building and meter
        self._instants: dict[str, int] = {}  # ts text (already checked) -> microseconds
        extra = {} if streams is None else {"streams": streams}
        self.session = IngestSession.open(directory, on_commit=self._committed, **extra)
        self.rejects = RejectsSink(options.rejects_path, options.rejects_topic, self.link)

    # -- counters ----------------------------------------------------------------------------

    def stats(self) -> MqttStats:
        t = self.session.totals
        o = self.options
        return MqttStats(
            str(o.broker), o.route.filters, time.monotonic() - self.started, self.link.connected,
            max(self.link.connects - 1, 0), self.seq, self.readings, self.rejected_messages, self.rejected_readings,
            self.committed, self.acknowledged, self.redelivery, t.rows, t.inserted, t.replaced, t.unchanged,
            self.pending.messages, len(self.session.in_flight),
            str(o.rejects_path) if o.rejects_path else None,
        )  # fmt: skip

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> MqttStats:
        """Connect, subscribe, load until ``stop``; then commit and acknowledge what arrived."""
        try:
            self.link.connect()
        except BaseException:
            self._close()
            raise
        log.info(
            "mqtt ingest from %s %s as client %s into %d fragments started",
            self.options.broker, ", ".join(self.options.route.filters), self.options.client_id, self.session.fragments,
        )  # fmt: skip
        next_report = next_log = time.monotonic()
        try:
            while not self.stop.is_set():
                self._receive(self._wait_s())
                self.session.poll()
                self._maybe_cut()
                self.link.check()
                now = time.monotonic()
                if now >= next_report:
                    next_report = now + 0.5
                    if self.progress is not None:
                        self.progress(self.stats())
                if now >= next_log:
                    next_log = now + self.options.stats_every_s
                    log.info("mqtt ingest: %s; %s", self.stats().line(), self.times.line())
                    self.rejects.new_interval()
            self._finish()
        except BatchFailed as exc:
            self._close()
            done = f"messages 1-{self.committed:,} of this run are committed" if self.committed else "no message is committed"
            raise NodeError(
                f"a batch failed ({'; '.join(exc.reasons)}); {done}; the others are not acknowledged: the broker keeps them "
                f"in the session of client {self.options.client_id!r} and delivers them again when this ingest runs again"
            ) from exc
        except BaseException:
            self._close()
            raise
        stats = self.stats()
        self._close()
        log.info("mqtt ingest stopped: %s", stats.line())
        return stats

    def _wait_s(self) -> float:
        """How long to wait for a message: until the oldest waiting one is due, else a moment."""
        if self.pending.messages:
            due = self.pending.oldest + self.options.policy.linger_s - time.monotonic()
            return min(max(due, 0.001), IDLE_WAIT_S)
        return IDLE_WAIT_S

    def _receive(self, wait_s: float) -> None:
        try:
            first = self.link.inbox.get(timeout=wait_s)
        except queue.Empty:
            return
        limit = self.options.policy.max_readings
        drain(self.link.inbox, first, self._take, lambda: len(self.pending.rows) >= limit, DRAIN_MAX)

    def _take(self, item: Inbound) -> None:
        self.seq += 1
        seq = self.seq
        self.book.received(Delivery(seq, item.epoch, item.mid, item.qos))
        fields = self._fields.get(item.topic)
        if fields is None:
            if len(self._fields) >= CACHE_LIMIT:
                self._fields.clear()
            fields = self._fields[item.topic] = self.options.route.fields_of(item.topic)
        decoded = decode(fields, item.payload)
        bad = len(decoded.rejects)
        for reject in decoded.rejects:
            self.rejects.add(item, seq, reject)
        p = self.pending
        for number, obj in zip(decoded.reading, decoded.objects, strict=True):
            self.reading_no += 1
            row = check_object(obj, self.reading_no, b"")
            if isinstance(row, Reject):
                bad += 1
                self.rejects.add(item, seq, PayloadReject(number, 0, row.reason))
            else:
                p.rows.append(row)
                instant = self._instants.get(row[3])
                if instant is None:
                    if len(self._instants) >= CACHE_LIMIT:
                        self._instants.clear()
                    instant = self._instants[row[3]] = ts_micros(row[3], 2)
                p.instants.append(instant)
                self.readings += 1
        if bad:
            self.rejected_messages += 1
            self.rejected_readings += bad
        if not p.messages:
            p.oldest = time.monotonic()
            p.first_received = item.received
        p.messages += 1

    def _maybe_cut(self) -> None:
        p = self.pending
        age = time.monotonic() - p.oldest if p.messages else 0.0
        if should_cut(p.messages, len(p.rows), age, len(self.session.in_flight), self.options.policy):
            self._cut()

    def _cut(self) -> None:
        """Submit what is pending as one batch; it commits every message received so far."""
        p = self.pending
        self.pending = _Pending()
        self.rejects.sync()
        self.times.cut(self.seq + 1, p.first_received)
        commit = self.session.submit(batch_of(p.rows, p.instants), label=self.seq + 1)
        for _, _, fut in commit.parts:
            fut.add_done_callback(self._wake)

    def _wake(self, fut: Future[BatchCounts]) -> None:
        self.link.inbox.put(WAKE)

    def _committed(self, outcome: CommitOutcome) -> None:
        """The session reports a batch committed: acknowledge its messages (and all before)."""
        self.times.committed(outcome.label)
        deliveries = self.book.committed_below(outcome.label)
        sent, stale = self.link.ack(deliveries)
        self.committed += len(deliveries)
        self.acknowledged += sent
        self.redelivery += stale

    def _finish(self) -> None:
        """Stop requested: take what has arrived, commit it, acknowledge it."""
        log.info("mqtt ingest stopping: committing and acknowledging what arrived")
        while True:
            try:
                item = self.link.inbox.get_nowait()
            except queue.Empty:
                break
            if item is not WAKE:
                self._take(item)
        if self.pending.messages:
            self._cut()
        self.session.flush()

    def _close(self) -> None:
        try:
            self.link.close()
        finally:
            self.session.close()
            self.rejects.close()
