"""The file loader: ``buildsmart ingest FILE|-`` as one client of :class:`.api.IngestSession`.

It reads chunks of whole lines (:mod:`.source`), parses and validates them (:mod:`.parse`), and
submits one batch per ``batch_rows`` lines (or, with ``--follow``, whenever the input pauses and
at least every ``commit_interval`` seconds). The session reports batches committed in order, so
after a stop (bad row without --rejects, a worker that stays away, Ctrl-C) the committed rows are
exactly the lines before a known line. Applying a batch again is a no-op, so a stopped load can
simply be run again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from orchestrator.exceptions import (
    BuildSmartError,
    ClusterStateError,
    InputError,
    InputLocation,
    NodeError,
    RejectsUnwritable,
    UnreadableInput,
)
from orchestrator.ingest.api import (
    DEFAULT_STREAMS,
    BatchFailed,
    CommitOutcome,
    IngestSession,
    SessionTotals,
)
from orchestrator.ingest.parse import EMPTY, CsvParser, Parsed, ReadingBatch, Reject, format_of, parser_for
from orchestrator.ingest.source import Source

log = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 100_000
Progress = Callable[[int, int, int | None], None]
__all__ = ["DEFAULT_BATCH_ROWS", "DEFAULT_STREAMS", "IngestResult", "RejectsFile", "ingest"]


@dataclass
class IngestResult:
    source: str
    rows: int = 0  # data lines read
    inserted: int = 0
    replaced: int = 0
    unchanged: int = 0
    rejected: int = 0
    committed_through_line: int = 1  # every data line up to here is committed (1 = header only)
    seconds: float = 0.0
    partitions_created: int = 0
    retries: int = 0
    reroutes: int = 0
    copied: int = 0  # rows written by the plain COPY (new keys)
    fallbacks: int = 0  # parts whose COPY met a stored key and were upserted instead
    per_fragment: dict[str, int] = field(default_factory=dict)

    @property
    def loaded(self) -> int:
        return self.inserted + self.replaced + self.unchanged

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def take(self, totals: SessionTotals) -> None:
        self.inserted, self.replaced, self.unchanged = totals.inserted, totals.replaced, totals.unchanged
        self.partitions_created, self.retries, self.reroutes = totals.partitions_created, totals.retries, totals.reroutes
        self.copied, self.fallbacks, self.per_fragment = totals.copied, totals.fallbacks, dict(totals.per_fragment)


class RejectsFile:
    """Bad lines, verbatim, with line number and reason: ``line<TAB>column<TAB>reason<TAB>raw``.
    A record whose quoted field spans lines is one entry; its inner line breaks are written as
    ``\\n`` so every entry stays one line of this file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._fh: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
            self._fh.write(b"# line\tcolumn\treason\traw line\n")
        except OSError as exc:
            raise RejectsUnwritable(f"cannot write the rejects file {path}: {exc.strerror or exc}; nothing was loaded") from exc

    def write(self, reject: Reject) -> None:
        raw = reject.raw.rstrip(b"\r\n").replace(b"\n", b"\\n")
        try:
            self._fh.write(f"{reject.line}\t{reject.column}\t{reject.reason}\t".encode() + raw + b"\n")
            self._fh.flush()
        except OSError as exc:
            raise RejectsUnwritable(f"cannot write the rejects file {self.path}: {exc.strerror or exc}") from exc

    def close(self) -> None:
        self._fh.close()


class _Batcher:
    """Collects parsed rows until a batch is due, then submits it labelled with the next line."""

    def __init__(self, session: IngestSession, result: IngestResult) -> None:
        self.session = session
        self.result = result
        self.pending: list[ReadingBatch] = []
        self.rows = 0
        self.last_cut = time.monotonic()

    def add(self, batch: ReadingBatch) -> None:
        if batch.rows:
            self.pending.append(batch)
            self.rows += batch.rows

    def cut(self, next_line: int) -> None:
        """Submit what is pending as one batch; it commits every line before ``next_line``."""
        self.session.submit(ReadingBatch.concat(self.pending), label=next_line)
        self.pending, self.rows = [], 0
        self.last_cut = time.monotonic()

    def finish(self, next_line: int) -> None:
        self.cut(next_line)
        self.session.flush()


def ingest(
    directory: Path,
    path: str,
    rejects: Path | None = None,
    fmt: str | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: Progress | None = None,
    follow: bool = False,
    commit_interval: float = 1.0,
    streams: int = DEFAULT_STREAMS,
) -> IngestResult:
    """Load a file (or ``-``) into the cluster in DIR. Stops at the first bad row unless ``rejects``
    is given; the error says exactly which lines are committed. ``follow`` keeps reading a growing
    file or standard input and commits at least every ``commit_interval`` seconds, until Ctrl-C."""
    fmt_ = format_of(path, fmt)
    result = IngestResult("<stdin>" if path == "-" else path)

    def committed(outcome: CommitOutcome) -> None:
        result.committed_through_line = outcome.label - 1

    rejects_file = RejectsFile(rejects) if rejects else None  # an unwritable path fails before any load
    try:
        session = IngestSession.open(directory, streams=streams, on_commit=committed, bulk=not follow)
    except BaseException:
        if rejects_file:
            rejects_file.close()
        raise
    try:
        source = Source(path, follow=follow)
    except BaseException:
        session.close()
        if rejects_file:
            rejects_file.close()
        raise
    parser = parser_for(fmt_, source.name, units=session.unit_table())
    batcher = _Batcher(session, result)
    first_chunk = True
    started = time.monotonic()
    line = 1  # the last line read
    log.info("ingest of %s into %d fragments started%s", source.name, session.fragments, " (follow)" if follow else "")
    try:
        if source.rereadable:
            session.prepare_for_file(path, fmt_)
            first_chunk = False
        for chunk in source.chunks(batch_rows):
            if chunk is None:  # follow mode: the input has been quiet for a moment, so commit what came
                if batcher.rows:
                    batcher.cut(line + 1)
                session.poll()
                if progress:
                    progress(result.rows, source.position(), source.size)
                continue
            parsed = parser.parse(chunk.data, chunk.first_line, chunk.lines)
            if first_chunk:  # a stream: its first chunk stands for the load
                session.prepare_for_load(parsed.batch.building_counts())
                first_chunk = False
            if parsed.rejects:
                _rejects(parsed, rejects_file, batcher, result)
            result.rows += parsed.lines
            line = parsed.next_line - 1
            batcher.add(parsed.batch)
            if batcher.rows >= batch_rows or (follow and time.monotonic() - batcher.last_cut >= commit_interval):
                batcher.cut(parsed.next_line)
                if progress:
                    progress(result.rows, source.position(), source.size)
        if not follow and isinstance(parser, CsvParser) and parser.order is None:
            raise InputError(InputLocation(source.name, 1), "empty input: missing header building,meter,ts,kwh")
        if isinstance(parser, CsvParser) and (unclosed := parser.finish()):
            _rejects(Parsed(EMPTY, unclosed, unclosed[0].line, line + 1, True), rejects_file, batcher, result)
        batcher.finish(line + 1)
    except UnreadableInput as exc:
        # Every line read before the damage is good: commit it, then say where the input broke.
        batcher.finish(line + 1)
        result.take(session.totals)
        raise InputError(
            InputLocation(result.source, line + 1),
            f"{exc.reason}; stopped here: lines 2-{result.committed_through_line} ({result.loaded} rows) are committed, "
            f"nothing from line {line + 1} on. Repair or replace the file and run the same ingest again (nothing is duplicated)",
        ) from exc
    except RejectsUnwritable as exc:
        _settle_quietly(session)
        result.take(session.totals)
        raise RejectsUnwritable(
            f"{exc}; lines 2-{result.committed_through_line} ({result.loaded} rows) are committed. "
            "Run the same ingest again with a writable --rejects path (nothing is duplicated)"
        ) from exc
    except BatchFailed as exc:
        result.take(session.totals)
        after = (
            f"; of the lines after it, {exc.committed_after} rows of batches already running were committed too"
            if exc.committed_after
            else ""
        )
        raise NodeError(
            f"a batch before line {exc.label} failed ({'; '.join(exc.reasons)}); lines 2-{result.committed_through_line} "
            f"({result.loaded} rows) are committed{after}; {exc.cancelled} later batch part(s) were cancelled before they "
            "started. Run the same ingest again to finish: rows already loaded are not duplicated"
        ) from exc
    except KeyboardInterrupt as exc:
        if follow:
            batcher.finish(line + 1)  # a follower stops by Ctrl-C: commit what arrived
        else:
            _settle_quietly(session)
            result.take(session.totals)
            raise ClusterStateError(
                f"interrupted at line {line}: lines 2-{result.committed_through_line} ({result.loaded} rows) are committed; "
                "run the same ingest again to finish (nothing is duplicated)"
            ) from exc
    finally:
        result.seconds = time.monotonic() - started
        result.take(session.totals)
        session.close()
        source.close()
        if rejects_file:
            rejects_file.close()
    if progress:
        progress(result.rows, source.size or 0, source.size)
    log.info(
        "ingest of %s done: %d rows, %d new (%d by plain COPY), %d replaced, %d unchanged, %d rejected in %.1f s",
        source.name, result.rows, result.inserted, result.copied, result.replaced, result.unchanged, result.rejected,
        result.seconds,
    )  # fmt: skip
    return result


def _rejects(parsed: Parsed, rejects_file: RejectsFile | None, batcher: _Batcher, result: IngestResult) -> None:
    """Bad lines of a chunk: recorded (with --rejects), or the load stops before the first one."""
    if rejects_file is None:
        bad = parsed.rejects[0]
        result.rows += max(0, bad.line - parsed.first_line + 1)  # a spanning record starts in an earlier chunk
        batcher.add(parsed.batch.before_line(bad.line))
        batcher.finish(bad.line)
        result.take(batcher.session.totals)
        raise InputError(
            InputLocation(result.source, bad.line, bad.column),
            f"{bad.reason}; stopped here: lines 2-{bad.line - 1} ({result.loaded} rows) are committed, nothing from this line on",
        )
    for reject in parsed.rejects:
        rejects_file.write(reject)
    result.rejected += len(parsed.rejects)


def _settle_quietly(session: IngestSession) -> None:
    """After Ctrl-C: let in-flight batches finish so the report of what is committed is exact."""
    while session.in_flight:
        try:
            session.flush()
        except BuildSmartError:
            break
