"""The ingest pipeline: read and validate (main thread), route each row to its fragment, and let
one writer thread per fragment load batches on its worker. The coordinator is not on the path.

Commit rule: batches are cut at the same line for every fragment and each fragment applies its
batches in order, so after a stop (bad row without --rejects, a failed worker, Ctrl-C) the
committed rows are exactly the lines before a known line. Loading the same rows again is a no-op,
so a stopped load can simply be run again.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import BinaryIO

from orchestrator import catalog, topology
from orchestrator.connections import connect, superuser_target
from orchestrator.exceptions import BuildSmartError, ClusterStateError, InputError, InputLocation, NodeError
from orchestrator.fragments import Fragment, Router
from orchestrator.ingest.reader import Reject, Row, open_rows
from orchestrator.ingest.writer import BatchCounts, FragmentWriter

log = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 200_000
MAX_BATCHES_IN_FLIGHT = 2


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
    per_fragment: dict[str, int] = field(default_factory=dict)

    @property
    def loaded(self) -> int:
        return self.inserted + self.replaced + self.unchanged

    @property
    def rows_per_second(self) -> float:
        return self.rows / self.seconds if self.seconds > 0 else 0.0

    def add(self, fragment: str, counts: BatchCounts) -> None:
        self.inserted += counts.inserted
        self.replaced += counts.updated + counts.superseded
        self.unchanged += counts.unchanged
        self.per_fragment[fragment] = self.per_fragment.get(fragment, 0) + counts.staged


@dataclass
class _Pending:
    """Rows of one fragment waiting for the next batch cut."""

    lines: list[str] = field(default_factory=list)
    lo: datetime | None = None
    hi: datetime | None = None

    def add(self, row: Row) -> None:
        self.lines.append(row.csv_text)
        ts = row.ts
        if self.lo is None or ts < self.lo:
            self.lo = ts
        if self.hi is None or ts > self.hi:
            self.hi = ts


class RejectsFile:
    """Bad lines, verbatim, with line number and reason: ``line<TAB>column<TAB>reason<TAB>raw``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write(b"# line\tcolumn\treason\traw line\n")

    def write(self, source: str, reject: Reject) -> None:
        raw = reject.raw.rstrip(b"\r\n")
        self._fh.write(f"{reject.line}\t{reject.column}\t{reject.reason}\t".encode() + raw + b"\n")

    def close(self) -> None:
        self._fh.close()


class Loader:
    """Routes rows to fragment writers and commits them in line-ordered batches."""

    def __init__(self, fragments: Iterable[Fragment], targets: dict[str, object], batch_rows: int = DEFAULT_BATCH_ROWS) -> None:
        self.router = Router(list(fragments))
        self.batch_rows = batch_rows
        self.writers = {f.fragment_id: FragmentWriter(f, targets[f.node]) for f in self.router.fragments}  # type: ignore[arg-type]
        self.pools = {fid: ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"frag{fid}") for fid in self.writers}
        self.pending: dict[int, _Pending] = {}
        self.in_flight: list[tuple[int, list[tuple[str, Future[tuple[BatchCounts, int]]]]]] = []
        self.first_uncommitted_line = 2  # lines before this one are committed everywhere

    def _write(self, fid: int, pending: _Pending) -> tuple[BatchCounts, int]:
        writer = self.writers[fid]
        assert pending.lo is not None and pending.hi is not None
        created = writer.ensure_partitions(pending.lo, pending.hi)
        return writer.write(pending.lines), created

    def add(self, row: Row) -> None:
        frag = self.router.route(row.building)
        pending = self.pending.get(frag.fragment_id)
        if pending is None:
            pending = self.pending[frag.fragment_id] = _Pending()
        pending.add(row)

    def cut(self, next_line: int, result: IngestResult) -> None:
        """Send everything before ``next_line`` as one batch; keep at most a few batches in flight."""
        futures = []
        for fid, pending in self.pending.items():
            if pending.lines:
                futures.append((self.writers[fid].fragment.shard_name, self.pools[fid].submit(self._write, fid, pending)))
        self.pending = {}
        self.in_flight.append((next_line, futures))
        while len(self.in_flight) > MAX_BATCHES_IN_FLIGHT - 1:
            self._settle_oldest(result)

    def _settle_oldest(self, result: IngestResult) -> None:
        next_line, futures = self.in_flight.pop(0)
        errors = []
        for shard, fut in futures:
            try:
                counts, created = fut.result()
            except BuildSmartError as exc:
                errors.append(f"{shard}: {exc}")
                continue
            except Exception as exc:  # psycopg errors from the writer thread
                errors.append(f"{shard}: {type(exc).__name__}: {exc}".strip())
                continue
            result.add(shard, counts)
            result.partitions_created += created
        if errors:
            self._drain_after_error(result)
            raise NodeError(
                f"a batch before line {next_line} failed ({'; '.join(errors)}); lines before "
                f"{self.first_uncommitted_line} are committed. Run the same ingest again to finish: "
                "rows already loaded are not duplicated"
            )
        self.first_uncommitted_line = next_line
        result.committed_through_line = next_line - 1

    def _drain_after_error(self, result: IngestResult) -> None:
        for _, futures in self.in_flight:
            for _, fut in futures:
                fut.exception()
        self.in_flight.clear()

    def finish(self, next_line: int, result: IngestResult) -> None:
        self.cut(next_line, result)
        while self.in_flight:
            self._settle_oldest(result)

    def close(self) -> None:
        for pool in self.pools.values():
            pool.shutdown(wait=True, cancel_futures=True)
        for writer in self.writers.values():
            writer.close()


def ingest(
    directory: Path,
    path: str,
    rejects: Path | None = None,
    fmt: str | None = None,
    batch_rows: int = DEFAULT_BATCH_ROWS,
    progress: Callable[[int, int, int | None], None] | None = None,
) -> IngestResult:
    """Load a file (or ``-``) into the cluster in DIR. Raises InputError at the first bad row
    unless ``rejects`` is given; the error says exactly which lines were committed."""
    directory = directory.resolve()
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    with connect(superuser_target(topo.coordinator, creds), "ingest:plan", autocommit=True) as conn:
        fragments = catalog.load_fragments(conn)
    targets: dict[str, object] = {g.name: superuser_target(g, creds) for g in topo.workers}
    source, rows = open_rows(path, fmt)
    result = IngestResult(source.name)
    loader = Loader(fragments, targets, batch_rows)
    rejects_file = RejectsFile(rejects) if rejects else None
    started = time.monotonic()
    since_cut = 0
    line = 1
    log.info("ingest of %s into %d fragments started", source.name, len(fragments))
    try:
        for item in rows:
            line = item.line
            result.rows += 1
            if isinstance(item, Reject):
                if rejects_file is None:
                    loader.finish(item.line, result)
                    raise InputError(
                        InputLocation(source.name, item.line, item.column),
                        f"{item.reason}; stopped here: lines 2-{item.line - 1} ({result.loaded} rows) are committed, "
                        "nothing from this line on",
                    )
                rejects_file.write(source.name, item)
                result.rejected += 1
                continue
            loader.add(item)
            since_cut += 1
            if since_cut >= batch_rows:
                loader.cut(line + 1, result)
                since_cut = 0
                if progress:
                    progress(result.rows, source.position(), source.size)
        loader.finish(line + 1, result)
    except KeyboardInterrupt as exc:
        # Let in-flight batches settle so the report of what is committed is exact.
        while loader.in_flight:
            try:
                loader._settle_oldest(result)
            except NodeError:
                break
        raise ClusterStateError(
            f"interrupted at line {line}: lines 2-{result.committed_through_line} ({result.loaded} rows) are committed; "
            "run the same ingest again to finish (nothing is duplicated)"
        ) from exc
    finally:
        result.seconds = time.monotonic() - started
        loader.close()
        source.close()
        if rejects_file:
            rejects_file.close()
    if progress:
        progress(result.rows, source.size or 0, source.size)
    log.info(
        "ingest of %s done: %d rows, %d new, %d replaced, %d unchanged, %d rejected in %.1f s",
        source.name,
        result.rows,
        result.inserted,
        result.replaced,
        result.unchanged,
        result.rejected,
        result.seconds,
    )
    return result
