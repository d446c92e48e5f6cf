"""Input streams: a path (plain or gzip) or standard input, read as chunks of whole lines.

A chunk is a run of complete lines with the number of its first line, so every later stage can
name exact lines without splitting the bytes in Python. Decompression and reads happen on a
reader thread (zlib and file reads release the GIL), a bounded queue ahead of the parser.

In follow mode lines are handed over as soon as they are complete, and the reader sees a *tick*
(``None``) whenever nothing arrived for a short while, so the loader can commit on time even when
nothing new comes. A partial last line is only passed on at the end of the input.
"""

from __future__ import annotations

import gzip
import logging
import queue
import sys
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

import numpy as np

from orchestrator.exceptions import InputError, InputLocation, UnreadableInput

log = logging.getLogger(__name__)

FOLLOW_POLL_S = 0.05
TICK_AFTER_S = 0.1
READ_BYTES = 4 << 20
DEFAULT_CHUNK_BYTES = 4 << 20
_EOF = object()


@dataclass(frozen=True, slots=True)
class Chunk:
    """Whole lines ``first_line .. first_line + lines - 1`` (the last may lack its newline)."""

    first_line: int
    data: bytes
    lines: int


class Source:
    """One input with a readable name, its size (files) and the position read so far."""

    def __init__(self, path: str, follow: bool = False) -> None:
        self.name = "<stdin>" if path == "-" else path
        self.path = path
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
        self.gzip = magic == b"\x1f\x8b"
        if self.gzip and follow:
            raise InputError(InputLocation(self.name, 0), "--follow reads plain text; a gzip file cannot grow line by line")
        self.stream: BinaryIO = gzip.GzipFile(fileobj=self._raw) if self.gzip else self._raw  # type: ignore[assignment]
        self._position = 0

    @property
    def rereadable(self) -> bool:
        """A regular file read to its end, so a first pass (building counts) can read it again."""
        return self.path != "-" and not self.follow and Path(self.path).is_file()

    def position(self) -> int:
        """Bytes consumed of the underlying (possibly compressed) file, for progress."""
        try:
            return self._raw.tell()
        except (OSError, ValueError):
            return self._position

    # -- chunks ------------------------------------------------------------------------------

    def chunks(self, max_lines: int, max_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[Chunk | None]:
        """Chunks of at most ``max_lines`` lines (and about ``max_bytes``); ``None`` is a tick."""
        if self.follow:
            yield from self._followed_chunks(max_lines, max_bytes)
            return
        blocks: queue.Queue[object] = queue.Queue(maxsize=3)
        reader = threading.Thread(target=self._read_into, args=(blocks,), name="ingest-reader", daemon=True)
        reader.start()
        try:
            yield from _cut(_blocks_of(blocks, self.name), max_lines, max_bytes)
        finally:
            self._stop.set()
            while reader.is_alive():  # unblock a reader waiting on a full queue
                try:
                    blocks.get_nowait()
                except queue.Empty:
                    reader.join(0.05)

    def _read_into(self, blocks: queue.Queue[object]) -> None:
        try:
            while not self._stop.is_set():
                data = self.stream.read(READ_BYTES)
                if not data:
                    break
                self._position += len(data)
                blocks.put(data)
        except (OSError, EOFError, zlib.error) as exc:
            blocks.put(exc)
            return
        blocks.put(_EOF)

    def _followed_chunks(self, max_lines: int, max_bytes: int) -> Iterator[Chunk | None]:
        lines: queue.Queue[object] = queue.Queue(maxsize=10_000)
        reader = threading.Thread(target=self._follow_into, args=(lines,), name="follow-reader", daemon=True)
        reader.start()
        number = 1
        pending: list[bytes] = []
        size = 0

        def flush() -> Chunk:
            nonlocal number, pending, size
            chunk = Chunk(number, b"".join(pending), len(pending))
            number += len(pending)
            pending, size = [], 0
            return chunk

        while True:
            try:
                item = lines.get(timeout=TICK_AFTER_S if not pending else 0.0)
            except queue.Empty:
                if pending:
                    yield flush()
                    continue
                yield None
                continue
            if item is _EOF:
                if pending:
                    yield flush()
                return
            if isinstance(item, BaseException):
                raise UnreadableInput(InputLocation(self.name, number + len(pending)), f"cannot read: {item}") from item
            assert isinstance(item, bytes)
            pending.append(item)
            size += len(item)
            if len(pending) >= max_lines or size >= max_bytes:
                yield flush()

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


def _blocks_of(blocks: queue.Queue[object], name: str) -> Iterator[bytes]:
    while True:
        item = blocks.get()
        if item is _EOF:
            return
        if isinstance(item, BaseException):
            raise UnreadableInput(InputLocation(name, 0), f"cannot read: {item}") from item
        assert isinstance(item, bytes)
        yield item


def _cut(blocks: Iterator[bytes], max_lines: int, max_bytes: int) -> Iterator[Chunk]:
    """Re-cut raw blocks into chunks of whole lines: at most ``max_lines`` lines and, unless a
    single line is longer, about ``max_bytes``."""
    number = 1
    tail = b""
    pending: list[bytes] = []  # blocks without a newline yet (a very long line)
    for block in blocks:
        cut = block.rfind(b"\n") + 1
        if not cut:
            pending.append(block)
            continue
        data = b"".join([tail, *pending, block[:cut]]) if pending or tail else block[:cut]
        pending, tail = [], block[cut:]
        for chunk, lines in _split(data, max_lines, max_bytes):
            yield Chunk(number, chunk, lines)
            number += lines
    rest = b"".join([tail, *pending])
    if rest:
        for chunk, lines in _split(rest, max_lines, max_bytes):
            yield Chunk(number, chunk, lines)
            number += lines


def _split(data: bytes, max_lines: int, max_bytes: int) -> Iterator[tuple[bytes, int]]:
    """Whole lines of ``data`` (the last may lack its newline) in pieces of at most ``max_lines``
    lines and about ``max_bytes``."""
    ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10) + 1
    if not len(ends) or ends[-1] != len(data):
        ends = np.append(ends, len(data))
    start = 0
    first = 0  # index into ends of the first line of the piece
    while first < len(ends):
        last = min(first + max_lines, len(ends)) - 1
        if ends[last] - start > max_bytes + max_bytes // 8:  # fewer lines, but at least one
            last = max(first, int(np.searchsorted(ends, start + max_bytes, side="right")) - 1)
        end = int(ends[last])
        yield data[start:end], last - first + 1
        start, first = end, last + 1
