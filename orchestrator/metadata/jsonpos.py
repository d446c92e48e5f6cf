"""Locate a JSON path in source text, so shape errors name a line and column.

Only used on the error path: the file is parsed with :func:`json.loads` first, and when a value
is found wrong this walks the text once more to the offending member.
"""

from __future__ import annotations

import json
import re

from orchestrator.exceptions import InputLocation

_WS = re.compile(r"[ \t\n\r]*")
_DECODER = json.JSONDecoder()

PathStep = str | int


def _skip(text: str, i: int) -> int:
    match = _WS.match(text, i)
    return match.end() if match else i


def _skip_value(text: str, i: int) -> int:
    _, end = _DECODER.raw_decode(text, i)
    return _skip(text, end)


def _after_comma(text: str, i: int) -> int:
    if i < len(text) and text[i] == ",":
        return _skip(text, i + 1)
    return i


def _find_member(text: str, i: int, step: PathStep) -> int | None:
    """Offset of the value of ``step`` in the container starting at ``i``, or None."""
    if isinstance(step, str):
        if text[i] != "{":
            return None
        i = _skip(text, i + 1)
        while i < len(text) and text[i] != "}":
            key, i = _DECODER.raw_decode(text, i)
            i = _skip(text, _skip(text, i) + 1)  # past ':'
            if key == step:
                return i
            i = _after_comma(text, _skip_value(text, i))
        return None
    if text[i] != "[":
        return None
    i = _skip(text, i + 1)
    index = 0
    while i < len(text) and text[i] != "]":
        if index == step:
            return i
        i = _after_comma(text, _skip_value(text, i))
        index += 1
    return None


def offset_of(text: str, path: tuple[PathStep, ...]) -> int:
    """Offset of the deepest member of ``path`` that exists (the container when a key is missing)."""
    i = _skip(text, 0)
    try:
        for step in path:
            found = _find_member(text, i, step)
            if found is None:
                return i
            i = found
    except (json.JSONDecodeError, IndexError):
        pass
    return i


def location(path: str, text: str, offset: int) -> InputLocation:
    line = text.count("\n", 0, offset) + 1
    column = offset - (text.rfind("\n", 0, offset) + 1) + 1
    return InputLocation(path, line, column)


def locate(path: str, text: str, json_path: tuple[PathStep, ...]) -> InputLocation:
    return location(path, text, offset_of(text, json_path))
