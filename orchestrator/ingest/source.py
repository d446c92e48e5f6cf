"""Input streams: a path (plain or gzip) or standard input, read line by line.

In follow mode the stream is read by a thread that waits for more data at the end of a file (like
``tail -f``) or on a quiet standard input, and the reader sees a *tick* ``(0, b"")`` whenever no
line arrived for a short while, so the loader can commit on time even when nothing new comes.
"""

from __future__ import annotations

import gzip
import logging
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

from orchestrator.exceptions import InputError, InputLocation

log = logging.getLogger(__name__)

TICK: tuple[int, bytes] = (0, b"")
FOLLOW_POLL_S = 0.05
TICK_AFTER_S = 0.1
_EOF = object()


class Source:
    """One input with a readable name, its size (files) and the position read so far."""

    def __init__(self, path: str, follow: bool = False) -> None:
        self.name = "<stdin>" if path == "-" else path
        self.follow = follow
        self._stop = threading.Event()
        self._raw: BinaryIO
        self.size: int | None = None
        if path == "-":
            self._raw = sys.stdin.buffer
        else:
            try:
                self._raw = open(path, "rb")  # noqa: SIM115 - closed in close()
            except OSError as exc:
                raise InputError(InputLocation(path, 0), f"cannot open: {exc.strerror}") from exc
            self.size = None if follow else Path(path).stat().st_size
        magic = self._raw.peek(2)[:2] if hasattr(self._raw, "peek") else b""
        if magic == b"\x1f\x8b" and follow:
            raise InputError(InputLocation(self.name, 0), "--follow reads plain text; a gzip file cannot grow line by line")
        self.stream: BinaryIO = gzip.GzipFile(fileobj=self._raw) if magic == b"\x1f\x8b" else self._raw  # type: ignore[assignment]

    def position(self) -> int:
        """Bytes consumed of the underlying (possibly compressed) file, for progress."""
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return 0

    def lines(self) -> Iterator[tuple[int, bytes]]:
        if self.follow:
            yield from self._followed_lines()
            return
        try:
            yield from enumerate(self.stream, 1)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise InputError(InputLocation(self.name, 0), f"cannot read: {exc}") from exc

    def _followed_lines(self) -> Iterator[tuple[int, bytes]]:
        lines: queue.Queue[object] = queue.Queue(maxsize=10_000)
        reader = threading.Thread(target=self._follow_into, args=(lines,), name="follow-reader", daemon=True)
        reader.start()
        number = 0
        while True:
            try:
                item = lines.get(timeout=TICK_AFTER_S)
            except queue.Empty:
                yield TICK
                continue
            if item is _EOF:
                return
            if isinstance(item, BaseException):
                raise InputError(InputLocation(self.name, number + 1), f"cannot read: {item}") from item
            number += 1
            assert isinstance(item, bytes)
            yield number, item

    def _follow_into(self, lines: queue.Queue[object]) -> None:
        """Reader thread: complete lines only; at the end of a file wait for it to grow."""
        partial = b""
        is_file = self.stream is not sys.stdin.buffer
        try:
            while not self._stop.is_set():
                chunk = self.stream.readline()
                if not chunk:
                    if not is_file:
                        break  # standard input closed
                    time.sleep(FOLLOW_POLL_S)
                    continue
                partial += chunk
                if partial.endswith(b"\n"):
                    lines.put(partial)
                    partial = b""
        except (OSError, ValueError) as exc:
            lines.put(exc)
            return
        if partial:
            lines.put(partial)
        lines.put(_EOF)

    def close(self) -> None:
        self._stop.set()
        if self._raw is not sys.stdin.buffer:
            self._raw.close()
