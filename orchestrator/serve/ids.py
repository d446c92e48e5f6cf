"""Haystack ids of what the cluster itself knows: a site per building, a point per (building, meter).

Ref ids may only hold ``A-Z a-z 0-9 _ : - . ~``, while building and meter codes may hold anything
(spaces, unicode). Each code is escaped reversibly (any other byte of its UTF-8 as ``~XX``) and the
parts are joined with ``:`` (escaped inside codes), so every code has exactly one id and back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SITE_PREFIX = "site"
POINT_PREFIX = "pt"
_PLAIN = re.compile(r"[A-Za-z0-9_\-.]")
_ESCAPE = re.compile(r"~([0-9A-F]{2})")


def escape(code: str) -> str:
    out = []
    for ch in code:
        if _PLAIN.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"~{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def unescape(text: str) -> str | None:
    """The code of an escaped id part; None when ``text`` is not a valid escaping."""
    if not re.fullmatch(r"(?:[A-Za-z0-9_\-.]|~[0-9A-F]{2})*", text):
        return None
    try:
        raw = _ESCAPE.sub(lambda m: f"\x00{m.group(1)}", text)
        data = bytearray()
        i = 0
        while i < len(raw):
            if raw[i] == "\x00":
                data.append(int(raw[i + 1 : i + 3], 16))
                i += 3
            else:
                data.extend(raw[i].encode())
                i += 1
        code = data.decode("utf-8")
    except UnicodeDecodeError:
        return None
    return code if escape(code) == text else None  # one id per code


@dataclass(frozen=True)
class PointKey:
    building: str
    meter: str


def site_id(building: str) -> str:
    return f"{SITE_PREFIX}:{escape(building)}"


def point_id(building: str, meter: str) -> str:
    return f"{POINT_PREFIX}:{escape(building)}:{escape(meter)}"


def parse_site(ref: str) -> str | None:
    prefix, _, rest = ref.partition(":")
    if prefix != SITE_PREFIX or ":" in rest or not rest:
        return None
    return unescape(rest)


def parse_point(ref: str) -> PointKey | None:
    parts = ref.split(":")
    if len(parts) != 3 or parts[0] != POINT_PREFIX or not parts[1] or not parts[2]:
        return None
    building, meter = unescape(parts[1]), unescape(parts[2])
    if building is None or meter is None:
        return None
    return PointKey(building, meter)
