"""The one way into the cluster for readings: an :class:`IngestSession`.

Every source (files, standard input, ``--follow``; later MQTT, HTTP POST, Haystack hisWrite)
parses and validates its input into :class:`~orchestrator.ingest.parse.ReadingBatch` es and
submits them here. The session routes each row to its fragment and to one of ``streams``
connections of that fragment (a meter always to the same one, so every key keeps its order),
decides per row between the plain COPY and the upsert (:mod:`.fastpath`), and hands the parts to
one writer thread per stream (:mod:`.writer`).

Commit rule: a batch is *committed* when every part of it has committed on its worker; batches
are reported committed strictly in submission order (``on_commit`` callbacks and the handles
returned by :meth:`IngestSession.submit`), so a source may acknowledge its input (a file line, an
MQTT PUBACK) exactly when its batch is reported. Committing happens when the caller calls
:meth:`submit` (when the in-flight window is full), :meth:`poll`, :meth:`flush` or :meth:`close`;
there is no thread of its own, so callbacks run on the caller's thread.

Online moves and splits: each part holds its fragment's shared write lock; when the catalog
version changed under it, the session settles everything in flight, re-reads placements and
writes the affected rows where they now belong (:mod:`orchestrator.elastic.gate`).

Placement: before the first batch of a load, a source may call :meth:`prepare_for_load` with the
building row counts of its input; it calls the placement hook of issue 9 when it exists.

A network source (MQTT, HTTP POST, hisWrite) checks its readings with
:func:`orchestrator.ingest.parse.rows_to_batch` (the same rules and reasons as a JSON line; each
message gets an increasing sequence number, so rejects name it), submits the batch with
``label`` = the next sequence number, and acknowledges every message below an outcome's
``label`` in ``on_commit``. It calls :meth:`poll` on its commit interval, so acknowledgements
follow commits without waiting for the next batch.
"""

from __future__ import annotations

import ctypes
import io
import itertools
import logging
import struct
from collections import deque
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import numpy as np
import psycopg
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from orchestrator import topology
from orchestrator.connections import Target, connect, ingest_target
from orchestrator.elastic import autosplit
from orchestrator.elastic.gate import RoutingChanged, WriteGate
from orchestrator.energy import imports
from orchestrator.energy.units import UnitTable
from orchestrator.exceptions import BuildSmartError, ClusterStateError, NodeError
from orchestrator.fragments import Fragment, Router, TimeGroup
from orchestrator.ingest.fastpath import NO_ROWS, split_new_rows
from orchestrator.ingest.parse import COLUMNS, ReadingBatch, ValueChecks, batch_of, plain_texts
from orchestrator.ingest.validate import EPOCH
from orchestrator.ingest.writer import HOUR_US, NO_LEAVES, BatchCounts, FragmentWriter, LeafMap, Pair, Part, Segment

log = logging.getLogger(__name__)

DEFAULT_STREAMS = 2
DEFAULT_WINDOW_BYTES = 48 << 20  # bytes in flight: more than one fragment busy on sorted input, RSS < 300 MB
MAX_COMMITS_IN_FLIGHT = 64
PG_EPOCH_US = 946_684_800_000_000  # 2000-01-01, PostgreSQL's timestamp origin
MIN_LEAF_ROWS = 5_000  # new rows of one time partition worth a COPY straight into it
MARKS_LIMIT = 2_000_000  # meters whose high-water mark is remembered
Stream = tuple[int, int]  # fragment id, stream number
# pyarrow quotes every string when quoting is "needed"; most batches need none, and PostgreSQL
# parses unquoted CSV faster.
_CSV_PLAIN = pacsv.WriteOptions(include_header=False, quoting_style="none")
_CSV_QUOTED = pacsv.WriteOptions(include_header=False, quoting_style="needed")


class BatchFailed(NodeError):
    """A part of a batch failed for good (after retries); what was committed before it stays.
    ``committed_after``: rows of this batch's other parts and of later batches that were already
    running and committed anyway; ``cancelled``: parts of later batches that never started."""

    def __init__(self, token: int, label: int, reasons: list[str], committed_after: int = 0, cancelled: int = 0) -> None:
        super().__init__("; ".join(reasons))
        self.token = token
        self.label = label
        self.reasons = reasons
        self.committed_after = committed_after
        self.cancelled = cancelled


@dataclass(frozen=True)
class CommitOutcome:
    """What one submitted batch did, once every part of it is committed."""

    token: int  # 1, 2, ... in submission order
    rows: int
    inserted: int
    replaced: int  # stored value changed, or superseded by a later line of the same batch
    unchanged: int
    copied: int  # rows written by the plain COPY
    label: int  # what the source passed to submit (e.g. the line after the batch)


@dataclass
class SessionTotals:
    """Running totals of committed batches."""

    rows: int = 0
    inserted: int = 0
    replaced: int = 0
    unchanged: int = 0
    copied: int = 0
    fallbacks: int = 0
    partitions_created: int = 0
    retries: int = 0
    reroutes: int = 0
    per_fragment: dict[str, int] = field(default_factory=dict)


class Commit:
    """Handle of one submitted batch: done once every part is committed (or the batch failed)."""

    def __init__(self, token: int, label: int) -> None:
        self.token = token
        self.label = label
        self.parts: list[tuple[Stream, Part, Future[BatchCounts]]] = []
        self.bytes = 0
        self.outcome: CommitOutcome | None = None
        self._counts: list[BatchCounts] = []

    def done(self) -> bool:
        return self.outcome is not None

    def ready(self) -> bool:
        return all(f.done() for _, _, f in self.parts)

    def add(self, counts: BatchCounts) -> None:
        self._counts.append(counts)

    def finish(self) -> CommitOutcome:
        c = self._counts
        self.outcome = CommitOutcome(
            self.token,
            sum(x.staged for x in c),
            sum(x.inserted for x in c),
            sum(x.updated + x.superseded for x in c),
            sum(x.unchanged for x in c),
            sum(x.copied for x in c),
            self.label,
        )
        self.parts = []
        return self.outcome


def _return_big_buffers_to_the_os() -> None:
    """Serve buffers of 256 kB and more with their own mappings (glibc), freed back to the OS at
    once. glibc's default raises that threshold up to 32 MB after the first big free, and then
    chunks and parts (a few MB each, freed on other threads) fragmented the heap: the resident size
    grew by about 60 MB over the 6.7M-row file (measured). No-op elsewhere."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, 256 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        log.debug("mallopt not available; default allocator settings")


class IngestSession:
    """Open once per cluster (and load); submit batches; close. Used from one thread."""

    def __init__(
        self,
        coordinator: Target,
        workers: Mapping[str, Target],
        *,
        streams: int = DEFAULT_STREAMS,
        window_bytes: int = DEFAULT_WINDOW_BYTES,
        on_commit: Callable[[CommitOutcome], None] | None = None,
        directory: Path | None = None,
        bulk: bool = False,
    ) -> None:
        _return_big_buffers_to_the_os()
        self.coordinator = coordinator
        self.workers = dict(workers)
        self.streams = max(1, streams)
        self.window_bytes = window_bytes
        self.on_commit = on_commit
        self.directory = directory
        self.bulk = bulk  # a file load, not a stream: rollup refresh waits for it (energy/task.py)
        self.totals = SessionTotals()
        self.gate = WriteGate(coordinator, "ingest:plan")
        self.writers: dict[Stream, FragmentWriter] = {}
        self.pools: dict[Stream, ThreadPoolExecutor] = {}
        self.in_flight: deque[Commit] = deque()
        self._bytes_in_flight = 0
        self._tokens = 0
        self._marks: dict[Pair, int] = {}
        self.leaf_maps: dict[int, LeafMap] = {}  # fragment id -> its time partitions (filled by the writers)
        self._checks = ValueChecks()
        self._load_routing()

    @classmethod
    def open(cls, directory: Path, **options: object) -> IngestSession:
        """A session on the cluster whose topology and credentials live in ``directory``."""
        directory = directory.resolve()
        topo, creds = topology.load(directory), topology.load_credentials(directory)
        # The data path runs as the ingest role, not as the superuser (orchestrator/roles.py).
        workers = {g.name: ingest_target(g, creds) for g in topo.workers}
        return cls(ingest_target(topo.coordinator, creds), workers, directory=directory, **options)  # type: ignore[arg-type]

    def unit_table(self) -> UnitTable:
        """Meters' canonical units (public.meters), for sources that give each reading's unit."""
        with connect(self.coordinator, "ingest:units", autocommit=True) as conn:
            return imports.unit_table(conn)

    @property
    def fragments(self) -> int:
        return len(self.router.fragments)

    # -- placement ---------------------------------------------------------------------------

    def prepare_for_load(self, building_counts: Mapping[str, int]) -> None:
        """Before the first batch of a load from a stream: lay out an empty cluster's fragments
        from the building row counts of its first chunk (issue 9's first-load layout; it changes
        nothing when fragments hold rows or the user gave split points). Placements are read
        again after it. The load does not depend on it: a failure is a warning."""
        if self.directory is None or self.in_flight:
            return
        try:
            autosplit.presplit_for_load(self.directory, building_counts)
        except (BuildSmartError, psycopg.Error) as exc:
            log.warning("first-load layout skipped (%s); loading into the current fragments", str(exc).splitlines()[0])
        self._load_routing()

    def prepare_for_file(self, path: str, fmt: str) -> None:
        """The same for a regular file: its buildings are counted (sampled when large) only when
        a first-load layout can happen at all."""
        if self.directory is None or self.in_flight:
            return
        if autosplit.presplit_for_file(self.directory, path, fmt) is not None:
            self._load_routing()

    # -- routing -----------------------------------------------------------------------------

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
                    self.leaf_maps.pop(frag.fragment_id, None)
                    if writer is not None:
                        self.pools[where].submit(writer.close).result()
                    self.writers[where] = writer = self.new_writer(frag, target)
                    if where not in self.pools:
                        self.pools[where] = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"frag{frag.fragment_id}.{n}")
                elif (gate := writer.gate()) is not None:
                    # A kept writer's open gate still holds the old version and would refuse every
                    # batch from now on (re-routing forever); it is idle here, so update it.
                    gate.version = self.gate.version
                writer.gate_version = self.gate.version
        log.info("routing %d fragments (catalog version %d)", len(fragments), self.gate.version)

    def new_writer(self, fragment: object, target: Target) -> FragmentWriter:
        """Factory (a seam for tests that need a writer with a fault injected)."""
        return FragmentWriter(fragment, target, self.coordinator, self.leaf_maps, bulk=self.bulk)  # type: ignore[arg-type]

    def _parts(self, batch: ReadingBatch) -> dict[Stream, Part]:
        """Route the rows and split each stream's share into new rows and rows to upsert."""
        b_enc = pc.dictionary_encode(batch.building)
        m_enc = pc.dictionary_encode(batch.meter)
        b_names: list[str] = b_enc.dictionary.to_pylist()
        m_names: list[str] = m_enc.dictionary.to_pylist()
        b_idx = b_enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
        codes = b_idx * len(m_names) + m_enc.indices.to_numpy(zero_copy_only=False)
        pair, unique_codes = dense_ids(codes, len(b_names) * len(m_names))
        pairs: list[Pair] = [(b_names[c // len(m_names)], m_names[c % len(m_names)]) for c in unique_codes.tolist()]
        marks = self._marks
        split = split_new_rows(pair, batch.instant, np.array([marks.get(p, NO_ROWS) for p in pairs], dtype=np.int64))
        if len(marks) + len(pairs) > MARKS_LIMIT:
            marks.clear()  # forgetting only costs a failed COPY per meter
        # each meter's first instant in the batch (its last is split.pair_max): the rollups' change log
        pair_min = np.full(len(pairs), np.iinfo(np.int64).max, dtype=np.int64)
        np.minimum.at(pair_min, pair, batch.instant)
        pair_max = split.pair_max.tolist()
        for p, latest in zip(pairs, split.pair_max.tolist(), strict=True):
            if latest > marks.get(p, NO_ROWS):
                marks[p] = latest  # what this batch will have stored once committed
        entries = [self.router.entry(p[0]) for p in pairs]
        # a building split by time has no one fragment: its pairs get -1 and their rows go by instant
        dest_of_pair = np.array(
            [e.fragment_id * self.streams + hash(p) % self.streams if isinstance(e, Fragment) else -1
             for e, p in zip(entries, pairs, strict=True)],
            dtype=np.int64,
        )  # fmt: skip
        dest = dest_of_pair[pair]
        for i, e in enumerate(entries):
            if isinstance(e, TimeGroup):
                rows_i = np.flatnonzero(pair == i)
                piece = np.searchsorted(np.array(e.starts_us(), dtype=np.int64), batch.instant[rows_i], side="right")
                ids = np.array([f.fragment_id for f in e.fragments], dtype=np.int64)[piece]
                dest[rows_i] = ids * self.streams + hash(pairs[i]) % self.streams
                dest_of_pair[i] = -2  # spread over pieces: found by row below
        order = np.argsort(dest, kind="stable")  # rows by destination, in line order within each
        cuts = [0, *(np.flatnonzero(dest[order][1:] != dest[order][:-1]) + 1).tolist(), len(order)]
        parts: dict[Stream, Part] = {}
        for start, end in itertools.pairwise(cuts):
            rows = order[start:end]
            d = int(dest[rows[0]])
            fid = d // self.streams
            leaves = self.leaf_maps.get(fid, NO_LEAVES)
            leaf = leaves.leaf_of(batch.instant[rows])
            # the writer makes the partitions rows need; only hours outside known ones are sent
            hours = np.unique(batch.instant[rows[leaf < 0]] // HOUR_US)
            new = split.fast[rows]
            fast, slow = rows[new], rows[~new]
            data, segments = _by_leaf(batch, fast, leaf[new], leaves)
            in_part = np.unique(pair[rows]).tolist()
            part_pairs = tuple(pairs[i] for i in in_part)
            changes = tuple((pairs[i][0], pairs[i][1], int(pair_min[i]), int(pair_max[i])) for i in in_part)
            parts[(fid, d % self.streams)] = Part(
                data, len(fast), segments, _csv(batch, slow), len(slow), hours, part_pairs, changes
            )
        return parts

    # -- submit and settle -------------------------------------------------------------------

    def submit(self, batch: ReadingBatch, label: int = 0) -> Commit:
        """Send a batch to its writers; returns its handle. Blocks while the window is full
        (settling the oldest batches, which may raise :class:`BatchFailed`)."""
        self._tokens += 1
        commit = Commit(self._tokens, label)
        if batch.rows:
            self._send(commit, self._parts(batch))
        self.in_flight.append(commit)
        self._bytes_in_flight += commit.bytes
        self.poll()
        while self.in_flight and (self._bytes_in_flight > self.window_bytes or len(self.in_flight) > MAX_COMMITS_IN_FLIGHT):
            self._settle_oldest()
        return commit

    def _send(self, commit: Commit, parts: Mapping[Stream, Part]) -> None:
        for where, part in parts.items():
            commit.parts.append((where, part, self.pools[where].submit(self.writers[where].write, part)))
            commit.bytes += len(part.fast) + len(part.slow)

    def poll(self) -> None:
        """Report every batch at the head of the queue that has committed (does not wait)."""
        while self.in_flight and self.in_flight[0].ready():
            self._settle_oldest()

    def flush(self) -> None:
        """Wait until every submitted batch is committed."""
        while self.in_flight:
            self._settle_oldest()

    def _settle_oldest(self) -> None:
        commit = self.in_flight.popleft()
        self._bytes_in_flight -= commit.bytes
        reroute = self._collect(commit, commit)
        if not reroute:
            self._report(commit)
            return
        # Placements changed under this batch (an online move or split switched): later batches
        # in flight are settled first so each fragment keeps its order, then the refused rows go
        # where they now belong (counted with this batch), and every batch is reported in order.
        later = list(self.in_flight)
        self.in_flight.clear()
        self._bytes_in_flight = 0
        for c in later:
            reroute.extend(self._collect(c, c))
        while reroute:
            self.totals.reroutes += 1
            self._load_routing()
            again = Commit(commit.token, commit.label)
            self._send(again, self._parts(ReadingBatch.concat([self._rows_of(p) for p in reroute])))
            reroute = self._collect(again, commit)
        self._report(commit)
        for c in later:
            self._report(c)

    def _collect(self, commit: Commit, owner: Commit) -> list[Part]:
        """Wait for a batch's parts; account what committed to ``owner``; return the parts to
        re-route."""
        errors: list[str] = []
        reroute: list[Part] = []
        ok_rows = 0
        for where, part, fut in commit.parts:
            try:
                counts = fut.result()
            except RoutingChanged:
                reroute.append(part)
                continue
            except BuildSmartError as exc:
                errors.append(str(exc))
                continue
            except Exception as exc:  # a database error the writer does not retry (e.g. a bad value)
                errors.append(f"{type(exc).__name__}: {str(exc).strip()}")
                continue
            self._account(owner, where, counts)
            ok_rows += counts.staged
        if errors:
            later_rows, cancelled = self._drain()
            log.info("batch %d failed: %d part(s) of later batches cancelled before they started", commit.token, cancelled)
            raise BatchFailed(commit.token, commit.label, errors, ok_rows + later_rows, cancelled)
        return reroute

    def _account(self, commit: Commit, where: Stream, counts: BatchCounts) -> None:
        commit.add(counts)
        t = self.totals
        t.partitions_created += counts.partitions
        t.retries += counts.retries
        t.fallbacks += counts.fell_back
        name = self.writers[where].fragment.shard_name
        t.per_fragment[name] = t.per_fragment.get(name, 0) + counts.staged
        for pair, stored in counts.marks.items():
            self._marks[pair] = max(stored, self._marks.get(pair, NO_ROWS))

    def _report(self, commit: Commit) -> None:
        outcome = commit.finish()
        t = self.totals
        t.rows += outcome.rows
        t.inserted += outcome.inserted
        t.replaced += outcome.replaced
        t.unchanged += outcome.unchanged
        t.copied += outcome.copied
        if self.on_commit is not None:
            self.on_commit(outcome)

    def _rows_of(self, part: Part) -> ReadingBatch:
        """A part's rows again (after a re-route): the new rows from their COPY BINARY tuples, the
        others from their CSV (both in an order that keeps each key's lines in order)."""
        batches = []
        if part.fast:
            rows = binary_rows_of(part.fast)
            stamps = [(EPOCH + timedelta(microseconds=t)).isoformat() for _, _, t, _ in rows]
            batches.append(
                batch_of(
                    [(0, b, m, ts, repr(k)) for (b, m, _, k), ts in zip(rows, stamps, strict=True)],
                    [t for _, _, t, _ in rows],
                )
            )
        if part.slow:
            table = pacsv.read_csv(
                io.BytesIO(part.slow),
                read_options=pacsv.ReadOptions(column_names=list(COLUMNS)),
                convert_options=pacsv.ConvertOptions(column_types=dict.fromkeys(COLUMNS, pa.string()), strings_can_be_null=False),
            )
            b, m, t, k = (table.column(c).combine_chunks() for c in COLUMNS)
            instants = self._checks.columns(b, m, t)
            assert instants is not None, "rows that passed validation failed it again"
            plain = plain_texts(pc.unique(b).to_pylist()) and plain_texts(pc.unique(m).to_pylist())
            batches.append(ReadingBatch(b, m, t, k, instants, np.zeros(len(instants), dtype=np.int64), plain))
        return ReadingBatch.concat(batches)

    def _drain(self) -> tuple[int, int]:
        """After a failure: cancel every later part that has not started, wait for those already
        running. Returns (rows those committed, parts cancelled)."""
        futures = [fut for c in self.in_flight for _, _, fut in c.parts]
        cancelled = sum(1 for fut in futures if fut.cancel())
        committed = 0
        for fut in futures:
            if not fut.cancelled() and fut.exception() is None:
                committed += fut.result().staged
        self.in_flight.clear()
        self._bytes_in_flight = 0
        return committed, cancelled

    def close(self) -> None:
        """Stop the writers (batches not yet settled are waited for, not reported)."""
        for where, pool in self.pools.items():
            writer = self.writers.get(where)
            if writer is not None:
                pool.submit(writer.close)
            pool.shutdown(wait=True, cancel_futures=True)
        self.gate.close()


def dense_ids(codes: np.ndarray, space: int) -> tuple[np.ndarray, np.ndarray]:
    """Ids 0..k-1 for the distinct values of ``codes`` (ints in [0, space)) in ascending order,
    and those values; counting instead of sorting when the space is small."""
    if space <= max(4 * len(codes), 1 << 16):
        present = np.flatnonzero(np.bincount(codes, minlength=space))
        lut = np.empty(space, dtype=np.int64)
        lut[present] = np.arange(len(present), dtype=np.int64)
        return lut[codes], present
    values, ids = np.unique(codes, return_inverse=True)
    return ids.astype(np.int64), values


def _by_leaf(batch: ReadingBatch, rows: np.ndarray, leaf: np.ndarray, leaves: LeafMap) -> tuple[bytes, tuple[Segment, ...]]:
    """COPY BINARY tuples of ``rows`` grouped by time partition (``leaf``: index into ``leaves``,
    -1 unknown), in line order within each, with the byte range of each group; rows of partitions
    not known yet, or too few for a COPY of their own, go to the fragment, which routes them."""
    if not len(rows):
        return b"", ()
    if len(leaf) and not (leaf < 0).all():
        # A partition's rows go straight to it only when there are enough of them to be worth a
        # COPY statement of their own (each costs a round trip); the rest share one through the
        # fragment.
        sizes = np.bincount(leaf[leaf >= 0], minlength=len(leaves.names))
        leaf = np.where((leaf >= 0) & (sizes[np.maximum(leaf, 0)] >= MIN_LEAF_ROWS), leaf, -1)
    order = np.argsort(leaf, kind="stable")  # a merge of runs: fast on time-ordered input
    leaf = leaf[order]
    data, offsets = binary_tuples(batch.take(rows[order]))
    cuts = [0, *(np.flatnonzero(leaf[1:] != leaf[:-1]) + 1).tolist(), len(leaf)]
    segments = tuple(
        (leaves.names[leaf[start]] if leaf[start] >= 0 else None, int(offsets[start]), int(offsets[end]))
        for start, end in itertools.pairwise(cuts)
    )
    return data, segments


def _fixed(values: np.ndarray, width: int) -> pa.Array:
    return pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(values), [None, pa.py_buffer(values)]).cast(pa.binary())


def binary_tuples(batch: ReadingBatch) -> tuple[bytes, np.ndarray]:
    """The rows as COPY BINARY tuples (no file header or trailer) and the byte offset of each
    (one more than rows). Why binary: PostgreSQL then parses no text; the same COPY into a
    fragment cost about a fifth less server CPU (measured). Exact: ``ts`` becomes the instant
    the validator computed (microseconds), ``kwh`` the double of its text (pyarrow's conversion,
    correctly rounded like PostgreSQL's)."""
    n = batch.rows
    building = batch.building.cast(pa.binary())
    meter = batch.meter.cast(pa.binary())
    head = np.empty(n, dtype=[("fields", ">i2"), ("len", ">i4")])
    head["fields"] = 4
    head["len"] = pc.binary_length(building).to_numpy(zero_copy_only=False)
    middle = pc.binary_length(meter).to_numpy(zero_copy_only=False).astype(">i4")
    tail = np.empty(n, dtype=[("len_ts", ">i4"), ("ts", ">i8"), ("len_kwh", ">i4"), ("kwh", ">f8")])
    tail["len_ts"] = 8
    tail["ts"] = batch.instant - PG_EPOCH_US
    tail["len_kwh"] = 8
    tail["kwh"] = pc.cast(batch.kwh, pa.float64()).to_numpy(zero_copy_only=False)
    joined = pc.binary_join_element_wise(
        _fixed(head, 6), building, _fixed(middle, 4), meter, _fixed(tail, 24), pa.scalar(b"", pa.binary())
    )
    offsets = np.frombuffer(joined.buffers()[1], dtype=np.int32, count=n + 1, offset=joined.offset * 4).astype(np.int64)
    data = joined.buffers()[2]
    return data.to_pybytes()[offsets[0] : offsets[-1]], offsets - offsets[0]


def binary_rows_of(data: bytes) -> list[tuple[str, str, int, float]]:
    """COPY BINARY tuples back to (building, meter, instant µs since 1970, kwh) (after a re-route)."""
    out = []
    at = 0
    unpack = struct.unpack_from
    while at < len(data):
        lb = unpack(">i", data, at + 2)[0]
        building = data[at + 6 : at + 6 + lb].decode()
        at += 6 + lb
        lm = unpack(">i", data, at)[0]
        meter = data[at + 4 : at + 4 + lm].decode()
        at += 4 + lm
        ts, kwh = unpack(">q", data, at + 4)[0], unpack(">d", data, at + 16)[0]
        at += 24
        out.append((building, meter, ts + PG_EPOCH_US, kwh))
    return out


def _csv(batch: ReadingBatch, rows: np.ndarray) -> bytes:
    if not len(rows):
        return b""
    sink = io.BytesIO()
    pacsv.write_csv(batch.take(rows).table(), sink, _CSV_PLAIN if batch.plain else _CSV_QUOTED)
    return sink.getvalue()
