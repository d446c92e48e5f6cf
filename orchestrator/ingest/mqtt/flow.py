"""When the MQTT loader cuts a batch and which messages it may acknowledge: pure decisions.

Cutting is group commit: while fewer than ``pipeline`` batches are committing, what has arrived
is cut at once (one message at a low rate, so latency is one commit); otherwise messages gather
until a batch commits, ``max_readings`` are waiting, or the oldest has waited ``linger_s``. So the
batch size follows the rate by itself, and at a high rate each commit carries many messages.

Acknowledging: MQTT wants PUBACKs in the order the PUBLISHes came, and a message may be
acknowledged only once its batch has committed. Batches are reported committed in submission
order, so the deliveries below the committed label leave the book in order. A delivery is
acknowledged only on the connection it came on (its ``epoch``): after a reconnect the broker sends
unacknowledged messages again (persistent session) and a packet id of the old connection may
already name another message, so acknowledging it could confirm a message that is not committed.
The re-delivered copy is committed again (no change: same key, same value) and acknowledged then.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass


@dataclass(frozen=True)
class CutPolicy:
    max_readings: int = 20_000
    linger_s: float = 1.0
    pipeline: int = 2


def should_cut(messages: int, readings: int, oldest_age_s: float, in_flight: int, policy: CutPolicy) -> bool:
    """Submit the pending messages as one batch now?"""
    if messages == 0:
        return False
    if readings >= policy.max_readings or in_flight < policy.pipeline:
        return True
    return oldest_age_s >= policy.linger_s


@dataclass(frozen=True, slots=True)
class Delivery:
    """One received PUBLISH: the loader's sequence number, the connection it came on, its packet id."""

    seq: int
    epoch: int
    mid: int
    qos: int


class AckBook:
    """Deliveries waiting for their batch to commit, in sequence order."""

    def __init__(self) -> None:
        self._waiting: deque[Delivery] = deque()

    def __len__(self) -> int:
        return len(self._waiting)

    def received(self, delivery: Delivery) -> None:
        if self._waiting and delivery.seq <= self._waiting[-1].seq:
            raise ValueError(f"delivery {delivery.seq} after {self._waiting[-1].seq}: sequence numbers must increase")
        self._waiting.append(delivery)

    def committed_below(self, label: int) -> list[Delivery]:
        """Every delivery with ``seq < label`` (their batches committed), in order."""
        out = []
        while self._waiting and self._waiting[0].seq < label:
            out.append(self._waiting.popleft())
        return out


def to_acknowledge(deliveries: list[Delivery], epoch: int) -> tuple[list[Delivery], int]:
    """The deliveries to PUBACK on the connection ``epoch`` (QoS 1 ones that came on it) and the
    number left to the broker to deliver again (they came on an earlier connection)."""
    mine = [d for d in deliveries if d.qos > 0 and d.epoch == epoch]
    stale = sum(1 for d in deliveries if d.qos > 0 and d.epoch != epoch)
    return mine, stale
