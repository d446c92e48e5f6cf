"""The ingest pipeline: read and validate (main thread), route each row to its fragment, and let
one writer thread per fragment load batches on its worker. The coordinator is not on the data
path; it only hands out the fragment write locks of the online-move protocol.

Commit rule: batches are cut at the same line for every fragment and each fragment applies its
batches in order, so after a stop (bad row without --rejects, a worker that stays away, Ctrl-C)
the committed rows are exactly the lines before a known line. Applying a batch again is a no-op,
so a stopped load can simply be run again, and a batch whose outcome is unknown is retried.
In follow mode a batch is also cut every ``commit_interval`` seconds.

Each fragment is written by ``streams`` connections in parallel; a meter's rows always go to the
same stream (hash of building and meter), so the order of every key's rows is kept.
"""

from __future__ import annotations

import csv
import logging
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from orchestrator import topology
from orchestrator.connections import Target, superuser_target
from orchestrator.elastic.autosplit import presplit_for_file
from orchestrator.elastic.gate import RoutingChanged, WriteGate
from orchestrator.exceptions import BuildSmartError, ClusterStateError, InputError, InputLocation, NodeError
from orchestrator.fragments import Router
from orchestrator.ingest.reader import ParsedRow, Reject, open_rows
from orchestrator.ingest.writer import BatchCounts, FragmentWriter

log = logging.getLogger(__name__)

DEFAULT_BATCH_ROWS = 100_000
DEFAULT_STREAMS = 2
MAX_BATCHES_IN_FLIGHT = 2
Progress = Callable[[int, int, int | None], None]


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
        self.partitions_created += counts.partitions
        self.retries += counts.retries
        self.per_fragment[fragment] = self.per_fragment.get(fragment, 0) + counts.staged


class RejectsFile:
    """Bad lines, verbatim, with line number and reason: ``line<TAB>column<TAB>reason<TAB>raw``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fh: BinaryIO = open(path, "wb")  # noqa: SIM115 - closed in close()
        self._fh.write(b"# line\tcolumn\treason\traw line\n")

    def write(self, reject: Reject) -> None:
        raw = reject.raw.rstrip(b"\r\n")
        self._fh.write(f"{reject.line}\t{reject.column}\t{reject.reason}\t".encode() + raw + b"\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def _building_meter_of(csv_line: bytes) -> tuple[bytes, bytes]:
    if b'"' in csv_line:
        fields = next(csv.reader([csv_line.decode()]))
        return fields[0].encode(), fields[1].encode()
    building, meter, _ = csv_line.split(b",", 2)
    return building, meter


Stream = tuple[int, int]  # fragment id, stream number
_Sent = tuple[Stream, list[bytes], "Future[BatchCounts]"]  # where, its lines, the write


class Loader:
    """Routes rows to fragment writers and commits them in line-ordered batches."""

    def __init__(
        self,
        coordinator: Target,
        workers: dict[str, Target],
        batch_rows: int = DEFAULT_BATCH_ROWS,
        streams: int = DEFAULT_STREAMS,
    ) -> None:
        self.coordinator = coordinator
        self.workers = workers
        self.batch_rows = batch_rows
        self.streams = max(1, streams)
        self.gate = WriteGate(coordinator, "ingest:plan")
        self.writers: dict[Stream, FragmentWriter] = {}
        self.pools: dict[Stream, ThreadPoolExecutor] = {}
        self.pending: dict[Stream, list[bytes]] = {}
        self.pending_rows = 0
        self.in_flight: list[tuple[int, list[_Sent]]] = []
        self._load_routing()

    def _load_routing(self) -> None:
        """(Re)read placements with the catalog version; writers of moved fragments are replaced."""
        fragments = self.gate.fragments()
        self.router = Router(fragments)
        for frag in fragments:
            target = self.workers.get(frag.node)
            if target is None:
                raise ClusterStateError(f"fragment {frag.fragment_id} is on {frag.node}, which this cluster does not know")
            for n in range(self.streams):
                where = (frag.fragment_id, n)
                writer = self.writers.get(where)
                if writer is None or writer.fragment != frag:
                    if writer is not None:
                        self.pools[where].submit(writer.close).result()
                    self.writers[where] = writer = FragmentWriter(frag, target, self.coordinator)
                    if where not in self.pools:
                        self.pools[where] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"frag{frag.fragment_id}.{n}")
                elif (gate := writer.gate()) is not None:
                    # A kept writer's open gate still holds the old version and would refuse every
                    # batch from now on (re-routing forever); it is idle here, so update it.
                    gate.version = self.gate.version
                writer.gate_version = self.gate.version
        log.info("routing %d fragments (catalog version %d)", len(fragments), self.gate.version)

    def add(self, building: bytes, meter: bytes, csv_line: bytes) -> None:
        where = (self.router.route_row(building, csv_line).fragment_id, hash((building, meter)) % self.streams)
        lines = self.pending.get(where)
        if lines is None:
            lines = self.pending[where] = []
        lines.append(csv_line)
        self.pending_rows += 1

    def cut(self, next_line: int, result: IngestResult) -> None:
        """Send everything before ``next_line`` as one batch; keep at most a few batches in flight."""
        sent = [
            (fid, lines, self.pools[fid].submit(self.writers[fid].write, lines)) for fid, lines in self.pending.items() if lines
        ]
        self.pending = {}
        self.pending_rows = 0
        self.in_flight.append((next_line, sent))
        while len(self.in_flight) >= MAX_BATCHES_IN_FLIGHT:
            self.settle_oldest(result)

    def settle_oldest(self, result: IngestResult) -> None:
        next_line, sent = self.in_flight.pop(0)
        errors: list[str] = []
        reroute: list[bytes] = []
        for where, lines, fut in sent:
            try:
                result.add(self.writers[where].fragment.shard_name, fut.result())
            except RoutingChanged:
                reroute.extend(lines)
            except BuildSmartError as exc:
                errors.append(str(exc))
            except Exception as exc:  # a database error the writer does not retry (e.g. a bad value)
                errors.append(f"{type(exc).__name__}: {str(exc).strip()}")
        if errors:
            self._drain_after_error()
            raise NodeError(
                f"a batch before line {next_line} failed ({'; '.join(errors)}); lines 2-{result.committed_through_line} are "
                "committed. Run the same ingest again to finish: rows already loaded are not duplicated"
            )
        if reroute:
            self._reroute(reroute, next_line, result)
        result.committed_through_line = next_line - 1

    def _reroute(self, lines: list[bytes], next_line: int, result: IngestResult) -> None:
        """Placements changed under this batch (an online move or split switched): later batches in
        flight are settled first so each fragment keeps its order, then the rows go where they now belong."""
        later = self.in_flight
        self.in_flight = []
        for where, later_lines, fut in (s for _, batch in later for s in batch):
            try:
                result.add(self.writers[where].fragment.shard_name, fut.result())
            except RoutingChanged:
                lines.extend(later_lines)
        result.reroutes += 1
        self._load_routing()
        held = self.pending
        self.pending = {}
        for line in lines:
            self.add(*_building_meter_of(line), line)
        self.cut(next_line, result)
        while self.in_flight:
            self.settle_oldest(result)
        for pending in held.values():
            for line in pending:
                self.add(*_building_meter_of(line), line)

    def _drain_after_error(self) -> None:
        for _, sent in self.in_flight:
            for _, _, fut in sent:
                fut.exception()
        self.in_flight.clear()

    def finish(self, next_line: int, result: IngestResult) -> None:
        if self.pending_rows:
            self.cut(next_line, result)
        while self.in_flight:
            self.settle_oldest(result)
        result.committed_through_line = next_line - 1

    def close(self) -> None:
        for where, pool in self.pools.items():
            writer = self.writers.get(where)
            if writer is not None:
                pool.submit(writer.close)
            pool.shutdown(wait=True, cancel_futures=True)
        self.gate.close()


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
    directory = directory.resolve()
    if not follow:  # a first load into empty fragments lays them out from its own buildings
        presplit_for_file(directory, path, fmt)
    topo, creds = topology.load(directory), topology.load_credentials(directory)
    workers = {g.name: superuser_target(g, creds) for g in topo.workers}
    loader = Loader(superuser_target(topo.coordinator, creds), workers, batch_rows, streams)
    try:
        source, rows = open_rows(path, fmt, follow=follow)
    except BaseException:
        loader.close()
        raise
    result = IngestResult(source.name)
    rejects_file = RejectsFile(rejects) if rejects else None
    started = last_cut = time.monotonic()
    line = 1
    log.info("ingest of %s into %d fragments started%s", source.name, len(loader.router.fragments), " (follow)" if follow else "")
    try:
        for number, building_or_none, meter, csv_or_none in _items(rows):
            if number == 0:  # follow mode: the input has been quiet for a moment, so commit what came
                if loader.pending_rows:
                    loader.cut(line + 1, result)
                    last_cut = time.monotonic()
                if progress:
                    progress(result.rows, source.position(), source.size)
                continue
            line = number
            result.rows += 1
            if building_or_none is None:
                reject = csv_or_none
                assert isinstance(reject, Reject)
                if rejects_file is None:
                    loader.finish(number, result)
                    raise InputError(
                        InputLocation(source.name, number, reject.column),
                        f"{reject.reason}; stopped here: lines 2-{number - 1} ({result.loaded} rows) are committed, "
                        "nothing from this line on",
                    )
                rejects_file.write(reject)
                result.rejected += 1
                continue
            assert isinstance(csv_or_none, bytes)
            loader.add(building_or_none, meter, csv_or_none)
            if loader.pending_rows >= batch_rows or (follow and time.monotonic() - last_cut >= commit_interval):
                loader.cut(number + 1, result)
                last_cut = time.monotonic()
                if progress:
                    progress(result.rows, source.position(), source.size)
        loader.finish(line + 1, result)
    except KeyboardInterrupt as exc:
        if follow:
            loader.finish(line + 1, result)  # a follower stops by Ctrl-C: commit what arrived
        else:
            _settle_quietly(loader, result)
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
        source.name, result.rows, result.inserted, result.replaced, result.unchanged, result.rejected, result.seconds,
    )  # fmt: skip
    return result


def _items(rows: Iterable[ParsedRow | Reject]) -> Iterator[tuple[int, bytes | None, bytes, bytes | Reject]]:
    """Rows as (line, building | None, meter, csv | Reject): one shape for the loop above."""
    for item in rows:
        if isinstance(item, Reject):
            yield item.line, None, b"", item
        else:
            yield item


def _settle_quietly(loader: Loader, result: IngestResult) -> None:
    """After Ctrl-C: let in-flight batches finish so the report of what is committed is exact."""
    while loader.in_flight:
        try:
            loader.settle_oldest(result)
        except BuildSmartError:
            break
