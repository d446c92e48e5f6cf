"""What an MQTT message means: building and meter from its topic, readings from its payload.

Pure functions, so every rule is unit-tested without a broker. The payload is UTF-8 JSON: one
reading ``{"ts": "2024-05-01T12:00:00Z", "kwh": 1.25}`` or a small batch ``[{...}, ...]``. The
topic filter's ``+`` levels name the building and the meter (``buildings/+/meters/+``: the first
is the building, the second the meter, unless ``levels`` says otherwise); a reading may also carry
``building`` and ``meter`` itself, and where both say something they must agree. Each reading is
then checked by :func:`orchestrator.ingest.parse.check_object`, the rule of a JSON line, so the
reasons are the file loader's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from orchestrator.exceptions import ConfigError

Level = Literal["building", "meter"]
LEVEL_NAMES: tuple[Level, ...] = ("building", "meter")
SKIP = "-"  # a `+` level that names neither
MAX_READINGS = 10_000  # per message: a gateway's small batch, not a file


@dataclass(frozen=True, slots=True)
class PayloadReject:
    """A bad message (``reading`` 0) or a bad reading in a batch (1-based), with the 1-based
    column of a JSON syntax error in the payload (0: none)."""

    reading: int
    column: int
    reason: str


@dataclass(frozen=True)
class Decoded:
    """The readings of one message as objects for ``check_object`` (``reading`` numbers them as
    :class:`PayloadReject` does), and what was rejected before that check."""

    objects: tuple[dict[str, object], ...]
    reading: tuple[int, ...]
    rejects: tuple[PayloadReject, ...]


def share_stripped(topic_filter: str) -> str:
    """The filter of a shared subscription (``$share/GROUP/filter``) without its prefix."""
    if topic_filter.startswith("$share/"):
        parts = topic_filter.split("/", 2)
        return parts[2] if len(parts) == 3 else ""
    return topic_filter


def matches(topic_filter: str, topic: str) -> bool:
    """MQTT topic matching: ``+`` is one level, a trailing ``#`` the rest (and the parent level);
    wildcards at the first level do not match topics starting with ``$``."""
    f_levels = share_stripped(topic_filter).split("/")
    t_levels = topic.split("/")
    if topic.startswith("$") and f_levels[0] in ("+", "#"):
        return False
    for i, level in enumerate(f_levels):
        if level == "#":
            return True
        if i >= len(t_levels):
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(t_levels) == len(f_levels)


@dataclass(frozen=True)
class TopicRoute:
    """Subscribed filters and what their ``+`` levels name, in order (``building``, ``meter`` or
    ``-``); with fewer names than ``+`` levels the rest name nothing."""

    filters: tuple[str, ...]
    levels: tuple[str, ...] = LEVEL_NAMES

    @staticmethod
    def make(filters: Sequence[str], levels: Sequence[str] = LEVEL_NAMES) -> TopicRoute:
        """Checked: every filter a valid MQTT filter, every level name known and used once."""
        if not filters:
            raise ConfigError("give at least one --topic filter, e.g. 'buildings/+/meters/+'")
        for f in filters:
            check_filter(f)
        names = tuple(n.strip() for n in levels)
        for n in names:
            if n not in (*LEVEL_NAMES, SKIP):
                raise ConfigError(f"--topic-levels: unknown name {n!r}: use building, meter or - (a level to skip)")
        for n in LEVEL_NAMES:
            if names.count(n) > 1:
                raise ConfigError(f"--topic-levels: {n} is named twice")
        return TopicRoute(tuple(filters), names)

    def fields_of(self, topic: str) -> dict[str, str]:
        """Building and meter named by the topic (through the first filter that matches it)."""
        for topic_filter in self.filters:
            if not matches(topic_filter, topic):
                continue
            out: dict[str, str] = {}
            t_levels = topic.split("/")
            plus = 0
            for i, level in enumerate(share_stripped(topic_filter).split("/")):
                if level == "+":
                    name = self.levels[plus] if plus < len(self.levels) else SKIP
                    plus += 1
                    if name != SKIP:
                        out[name] = t_levels[i]
            return out
        return {}


def check_filter(topic_filter: str) -> None:
    """A valid MQTT topic filter, or ConfigError saying what is wrong with it."""
    pattern = share_stripped(topic_filter)
    if topic_filter.startswith("$share/") and (len(topic_filter.split("/", 2)) < 3 or not topic_filter.split("/")[1]):
        raise ConfigError(f"topic filter {topic_filter!r}: a shared subscription is $share/GROUP/FILTER")
    if not pattern:
        raise ConfigError(f"topic filter {topic_filter!r} is empty")
    if "\x00" in pattern:
        raise ConfigError(f"topic filter {topic_filter!r} contains a NUL character")
    levels = pattern.split("/")
    for i, level in enumerate(levels):
        if "#" in level and (level != "#" or i != len(levels) - 1):
            raise ConfigError(f"topic filter {topic_filter!r}: '#' must be a whole level and the last one")
        if "+" in level and level != "+":
            raise ConfigError(f"topic filter {topic_filter!r}: '+' must be a whole level")


def decode(fields: Mapping[str, str], payload: bytes, max_readings: int = MAX_READINGS) -> Decoded:
    """The readings of one payload, each with the topic's building and meter where it has none."""
    try:
        text = payload.decode("utf-8")
    except UnicodeDecodeError as exc:
        column = len(payload[: exc.start].decode("utf-8", errors="replace")) + 1
        return Decoded((), (), (PayloadReject(0, column, f"invalid UTF-8 byte 0x{payload[exc.start]:02x}"),))
    if not text.strip():
        return Decoded((), (), (PayloadReject(0, 0, "empty payload: expected a JSON object or array"),))
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        where = f" (line {exc.lineno})" if exc.lineno > 1 else ""
        return Decoded((), (), (PayloadReject(0, exc.colno, f"invalid JSON: {exc.msg}{where}"),))
    except RecursionError:
        return Decoded((), (), (PayloadReject(0, 0, "invalid JSON: nested too deeply"),))
    if isinstance(value, list):
        if not value:
            return Decoded((), (), (PayloadReject(0, 1, "empty array: expected at least one reading"),))
        if len(value) > max_readings:
            return Decoded((), (), (PayloadReject(0, 0, f"{len(value):,} readings in one message: at most {max_readings:,}"),))
        items: list[tuple[int, object]] = list(enumerate(value, 1))
    else:
        items = [(0, value)]
    objects: list[dict[str, object]] = []
    numbers: list[int] = []
    rejects: list[PayloadReject] = []
    for number, item in items:
        if not isinstance(item, dict):
            rejects.append(PayloadReject(number, 0, "expected a JSON object with ts and kwh"))
            continue
        clash = _merge(item, fields)
        if clash:
            rejects.append(PayloadReject(number, 0, clash))
            continue
        objects.append(item)
        numbers.append(number)
    return Decoded(tuple(objects), tuple(numbers), tuple(rejects))


def _merge(item: dict[str, object], fields: Mapping[str, str]) -> str | None:
    """Put the topic's building and meter into ``item``; the reason when the payload disagrees."""
    for name, value in fields.items():
        given = item.get(name)
        if given is None and name not in item:
            item[name] = value
        elif given != value:
            return f"{name} {given!r} in the payload differs from {value!r} in the topic"
    return None
