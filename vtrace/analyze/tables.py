"""Every analysis of a whole trace in bounded memory: its rows written to Parquet, or its
aggregates, whatever the trace's length.

The trace is read a chunk of parts at a time (:func:`~vtrace.analyze.chunks.plan_chunks`),
with what crosses a chunk boundary carried over, as :func:`~vtrace.analyze.summary.summary`
does: per thread its last KVM events and an exit still open
(:class:`~vtrace.analyze.timeline.ThreadCarry`), per queue its counts and the requests in
flight (:class:`~vtrace.analyze.requests.RequestChunks`). Each chunk gives the rows that are
final, never one twice. The rows are the ones the in-memory analysis gives (`exits(events)`
...), and :func:`write_table` writes them in its order too: rows of the per-thread tables
come out of a chunk grouped by thread and those of :func:`~vtrace.analyze.requests.requests`
by queue, so each chunk's rows are held in a temporary Arrow file (lz4) next to the output,
a record batch per group, and written out group by group. Interrupts are in trace order: each
chunk's rows go straight to the output.

Aggregates (:data:`AGGREGATES`, :func:`table_percentiles`, :func:`table_histogram`) reduce
each chunk's rows to counts, sums and value counts that merge exactly
(:mod:`vtrace.analyze.partials`): the same frames as the in-memory functions, percentiles
exact up to ``exact_limit`` distinct (group, value) pairs (then within a documented bound).
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import polars as pl
import pyarrow as pa
import pyarrow.ipc as ipc
import pyarrow.parquet as pq

from vtrace.analyze.accesses import (
    access_counts,
    accesses_by_target_from_counts,
    accesses_by_target_plan,
    accesses_plan,
    kvm_accesses_from_timeline,
    qemu_accesses,
)
from vtrace.analyze.chunks import CHUNK_ROWS, Chunk, plan_chunks
from vtrace.analyze.distributions import (
    _unit,
    log2_bucket,
    log2_histogram,
    log2_histogram_from_counts,
    percentiles,
)
from vtrace.analyze.exits import (
    DEFAULT_TOLERANCE_NS,
    by_reason,
    by_reason_from_stats,
    exits_from_timeline,
    exits_plan,
    user_exits_from_timeline,
    user_exits_plan,
)
from vtrace.analyze.interrupts import interrupts_by_line_plan, interrupts_plan
from vtrace.analyze.kicks import (
    kick_counts,
    kicks_by_queue_from_counts,
    kicks_by_queue_plan,
    kicks_plan,
    kvm_kicks,
    vmm_kicks,
)
from vtrace.analyze.partials import EXACT_LIMIT, MERGE_EVERY, DurationStats
from vtrace.analyze.requests import (
    QUEUE_KEYS,
    RequestChunks,
    batching_plan,
    queue_events,
    requests_plan,
)
from vtrace.analyze.timeline import TIMELINE_COLUMNS, ThreadCarry, thread_order
from vtrace.errors import VtraceError
from vtrace.output import check_new_file, write_file
from vtrace.store import Trace, open_trace

# The row tables, by name, with the in-memory plan whose rows and order they keep.
ROW_TABLES: dict[str, Callable[[pl.LazyFrame], pl.LazyFrame]] = {
    "exits": exits_plan,
    "user_exits": user_exits_plan,
    "accesses": accesses_plan,
    "kicks": kicks_plan,
    "requests": requests_plan,
    "interrupts": interrupts_plan,
}
# Rows per row group of a written table (polars' own default).
ROW_GROUP_ROWS = 512 * 512
# A group's rows of one chunk: (its position key, the rows).
Piece = tuple[tuple[Any, ...], pl.DataFrame]


def _trace(trace: Trace | str | os.PathLike[str]) -> Trace:
    return trace if isinstance(trace, Trace) else open_trace(trace)


def _check_name(name: str, names: Sequence[str], what: str) -> None:
    if name not in names:
        raise VtraceError(f"{name}: not {what}; one of {', '.join(names)}")


# --- the rows of a table, a chunk at a time --------------------------------------------------


class _ThreadRows:
    """Exits, user-space exits, accesses or kicks: the KVM rows follow each thread through
    the chunks (key ``(0, tid)``: by thread, as the in-memory plan sorts them); QEMU's
    accesses and the lab's and QEMU's kicks follow them in trace order (key ``(1, None)``)."""

    def __init__(self, name: str, tolerance_ns: int, columns: Sequence[str]) -> None:
        self.name = name
        self.columns = tuple(columns)
        self.tolerance_ns = tolerance_ns
        self.threads = ThreadCarry(tolerance_ns)

    def scan(self, events: pl.LazyFrame) -> list[pl.LazyFrame]:
        plans = [thread_order(events, self.columns, sort=False)]
        if self.name == "accesses":
            plans.append(qemu_accesses(events))
        elif self.name == "kicks":
            plans.append(vmm_kicks(events))
        return plans

    def _rows(self, timeline: pl.LazyFrame) -> pl.LazyFrame:
        keep = ["_emit"]
        if self.name == "exits":
            rows = exits_from_timeline(timeline, self.tolerance_ns, keep=keep)
        elif self.name == "user_exits":
            rows = user_exits_from_timeline(timeline, keep=keep)
        else:
            rows = kvm_accesses_from_timeline(timeline, keep=keep)
        rows = rows.filter(pl.col("_emit")).drop("_emit")
        return kvm_kicks(rows) if self.name == "kicks" else rows

    def step(self, chunk: Chunk, scanned: list[pl.DataFrame]) -> list[Piece]:
        ordered, *vmm = scanned
        timeline = self.threads.timeline(ordered, chunk.last_ts_ns, chunk.final).lazy()
        plans = [self._rows(timeline)]
        if not chunk.final:
            plans.append(self.threads.carry_plan(timeline))
        done = pl.collect_all(plans)
        if not chunk.final:
            self.threads.keep(done.pop())
        pieces: list[Piece] = [
            ((0, tid), rows)
            for (tid,), rows in done[0]
            .partition_by("tid", maintain_order=True, as_dict=True)
            .items()
        ]
        if vmm and vmm[0].height:
            pieces.append(((1, None), vmm[0]))
        return pieces

    @staticmethod
    def order(key: tuple[Any, ...]) -> tuple[Any, ...]:
        # The in-memory plans sort on tid with nulls first, then add the VMM's rows.
        part, tid = key
        return (part, tid is not None, tid or 0)


class _QueueRows:
    """Requests: each queue's requests once final (key: the queue, ordered as the in-memory
    plan sorts queues: nulls as -1 and "")."""

    def __init__(self) -> None:
        self.requests = RequestChunks()

    @staticmethod
    def scan(events: pl.LazyFrame) -> list[pl.LazyFrame]:
        return [queue_events(events)]

    def step(self, chunk: Chunk, scanned: list[pl.DataFrame]) -> list[Piece]:
        rows = self.requests.step(scanned[0], chunk.final)
        by_queue = rows.partition_by(list(QUEUE_KEYS), maintain_order=True, as_dict=True)
        # A queue's requests become final in `seq` order: each chunk's follow the last one's.
        return [(key, piece.sort("seq")) for key, piece in by_queue.items()]

    @staticmethod
    def order(key: tuple[Any, ...]) -> tuple[Any, ...]:
        source, pid, device, queue = key
        return (source, -1 if pid is None else pid, device or "", -1 if queue is None else queue)


class _TraceOrderRows:
    """Interrupts: rows of the chunk's events in trace order (one key)."""

    @staticmethod
    def scan(events: pl.LazyFrame) -> list[pl.LazyFrame]:
        return [interrupts_plan(events)]

    @staticmethod
    def step(chunk: Chunk, scanned: list[pl.DataFrame]) -> list[Piece]:
        return [((), scanned[0])] if scanned[0].height else []

    @staticmethod
    def order(key: tuple[Any, ...]) -> tuple[Any, ...]:
        return key


_Rows = _ThreadRows | _QueueRows | _TraceOrderRows


# The KVM event columns each per-thread table shows (the rest are not read: they stay null).
ROW_COLUMNS = {
    "exits": ("pid", "cpu", "vcpu", "reason_name", "isa", "flags", "rip"),
    "user_exits": ("pid", "cpu", "vcpu", "reason_name"),
    "accesses": ("pid", "cpu", "vcpu", "device", "addr", "size", "write", "value", "count",
                 "queue", "rip"),
    "kicks": ("pid", "vcpu", "device", "queue", "addr", "write", "value", "count"),
}  # fmt: skip


def _rows_of(
    name: str, tolerance_ns: int = DEFAULT_TOLERANCE_NS, columns: Sequence[str] | None = None
) -> _Rows:
    if name == "requests":
        return _QueueRows()
    if name == "interrupts":
        return _TraceOrderRows()
    return _ThreadRows(name, tolerance_ns, ROW_COLUMNS[name] if columns is None else columns)


def _unreadable(trace: Trace, chunk: Chunk, error: Exception) -> VtraceError:
    from vtrace.analyze.summary import _unreadable as which

    return VtraceError(which(Trace(trace.path, trace.meta, chunk.parts), error))


def _chunk_pieces(trace: Trace, rows: _Rows, chunk_rows: int) -> Iterator[list[Piece]]:
    """The pieces of the table, a chunk's at a time; the next chunk's scans run in a second
    thread while this one's rows are derived (polars releases the GIL)."""
    chunks = plan_chunks(trace, chunk_rows)
    with ThreadPoolExecutor(max_workers=1) as ahead:

        def scan(chunk: Chunk) -> list[pl.DataFrame]:
            return pl.collect_all(rows.scan(chunk.events))

        scanning = ahead.submit(scan, chunks[0])
        for i, chunk in enumerate(chunks):
            try:
                scanned = scanning.result()
                if i + 1 < len(chunks):
                    scanning = ahead.submit(scan, chunks[i + 1])
                pieces = rows.step(chunk, scanned)
            except (pl.exceptions.PolarsError, OSError) as e:
                # A damaged part is bad input, not a bug: name it.
                raise _unreadable(trace, chunk, e) from None
            yield pieces


def _pieces(trace: Trace, rows: _Rows, chunk_rows: int) -> Iterator[Piece]:
    """Every piece of the table, chunk by chunk."""
    for pieces in _chunk_pieces(trace, rows, chunk_rows):
        yield from pieces


def table_chunks(
    name: str,
    trace: Trace | str | os.PathLike[str],
    *,
    chunk_rows: int = CHUNK_ROWS,
    tolerance_ns: int = DEFAULT_TOLERANCE_NS,
) -> Iterator[pl.DataFrame]:
    """The rows of the row table ``name`` (:data:`ROW_TABLES`) of a trace, a frame at a time,
    in memory that does not grow with the trace: each row once, as soon as it is final, with
    the in-memory analysis's columns and values. Stacked they are its rows in another order
    (chunk by chunk; :func:`write_table` writes its order)."""
    _check_name(name, list(ROW_TABLES), "a row table")
    t = _trace(trace)
    for _, frame in _pieces(t, _rows_of(name, tolerance_ns), chunk_rows):
        yield frame


def _empty(name: str, tolerance_ns: int = DEFAULT_TOLERANCE_NS) -> pl.DataFrame:
    """The table ``name`` of no events: its columns and types."""
    from vtrace.store import empty_events

    events = empty_events().lazy()
    plan = exits_plan(events, tolerance_ns) if name == "exits" else ROW_TABLES[name](events)
    return plan.collect()


# --- writing a table ---------------------------------------------------------------------------


@dataclass(frozen=True)
class WrittenTable:
    """What :func:`write_table` wrote: the file, its rows, and the seconds it took."""

    path: Path
    table: str
    rows: int
    seconds: float


class _OrderedWriter:
    """Rows appended to a Parquet file in row groups of :data:`ROW_GROUP_ROWS`."""

    def __init__(self, sink: BinaryIO | str, schema: pa.Schema) -> None:
        self.writer = pq.ParquetWriter(sink, schema, compression="zstd")
        self.schema = schema
        self.held: list[pa.Table] = []
        self.count = 0
        self.rows = 0

    def add(self, table: pa.Table) -> None:
        self.held.append(table)
        self.count += table.num_rows
        self.rows += table.num_rows
        if self.count >= ROW_GROUP_ROWS:
            whole = pa.concat_tables(self.held)
            cut = self.count - self.count % ROW_GROUP_ROWS
            self.writer.write_table(whole.slice(0, cut), row_group_size=ROW_GROUP_ROWS)
            self.held = [whole.slice(cut)] if cut < self.count else []
            self.count -= cut

    def close(self) -> None:
        if self.held:
            self.writer.write_table(pa.concat_tables(self.held), row_group_size=ROW_GROUP_ROWS)
        elif self.rows == 0:
            self.writer.write_table(self.schema.empty_table())
        self.writer.close()


def _write_rows(
    f: BinaryIO, trace: Trace, name: str, schema: pa.Schema, chunk_rows: int, tolerance_ns: int,
    where: Path,
) -> int:  # fmt: skip
    """Write the table's rows to ``f`` in the in-memory plan's order; their count."""
    out = _OrderedWriter(f, schema)
    try:
        return _write_ordered(out, trace, name, schema, chunk_rows, tolerance_ns, where)
    finally:
        out.writer.close()  # again after close() is nothing; after an error, the file


def _write_ordered(
    out: _OrderedWriter, trace: Trace, name: str, schema: pa.Schema, chunk_rows: int,
    tolerance_ns: int, where: Path,
) -> int:  # fmt: skip
    rows = _rows_of(name, tolerance_ns)
    if isinstance(rows, _TraceOrderRows):
        # One group in trace order: each chunk's rows go straight to the output.
        for _, frame in _pieces(trace, rows, chunk_rows):
            out.add(frame.to_arrow())
        out.close()
        return out.rows
    # Each chunk's pieces go to a temporary Arrow file (one record batch a piece) in a
    # directory next to the output; then the groups are copied in order, a batch at a time.
    spill = _spill_dir(where, name)
    groups: dict[tuple[Any, ...], list[tuple[int, int]]] = {}
    try:
        files = 0
        for pieces in _chunk_pieces(trace, rows, chunk_rows):
            if not pieces:
                continue
            # One table for the chunk: one dictionary per column, as an Arrow file needs.
            whole = pl.concat([f for _, f in pieces], rechunk=True).to_arrow()
            with ipc.new_file(spill / f"{files}.arrow", whole.schema, options=_LZ4) as w:
                at = batch = 0
                for key, frame in pieces:
                    for part in whole.slice(at, frame.height).to_batches():
                        w.write_batch(part)
                        groups.setdefault(key, []).append((files, batch))
                        batch += 1
                    at += frame.height
            files += 1
        for key in sorted(groups, key=rows.order):
            for file, batch in groups[key]:
                with pa.OSFile(str(spill / f"{file}.arrow")) as f:
                    out.add(pa.Table.from_batches([ipc.open_file(f).get_batch(batch)]))
        out.close()
    finally:
        shutil.rmtree(spill, ignore_errors=True)
    return out.rows


_LZ4 = ipc.IpcWriteOptions(compression="lz4")


def _spill_dir(where: Path, name: str) -> Path:
    """A new, private (0700) temporary directory for the pieces of table ``name`` in
    ``where``: the output's directory, on the disk chosen for the table's size."""
    import tempfile

    return Path(tempfile.mkdtemp(prefix=f".vtrace-{name}-", suffix=".tmp", dir=where))


def write_table(
    name: str,
    trace: Trace | str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
    chunk_rows: int = CHUNK_ROWS,
    tolerance_ns: int = DEFAULT_TOLERANCE_NS,
) -> WrittenTable:
    """Write the row table ``name`` (:data:`ROW_TABLES`: exits, user_exits, accesses, kicks,
    requests, interrupts) of a trace to the Parquet file ``out``, in memory that does not
    grow with the trace: the rows, columns, types and order of the in-memory analysis
    (``pl.read_parquet(out)`` equals ``exits(trace.events)``).

    ``out`` is checked before any work (an existing file is replaced only with ``force``)
    and written under a temporary name, renamed when complete: never a partial file. The
    per-thread and per-queue tables hold temporary files of about the table's size in a
    hidden directory next to ``out`` while they run."""
    _check_name(name, list(ROW_TABLES), "a row table")
    check_new_file(out, force=force)
    t = _trace(trace)
    schema = _empty(name, tolerance_ns).to_arrow().schema
    started = time.perf_counter()
    written: list[int] = []

    def write(f: BinaryIO) -> None:
        where = Path(os.path.abspath(out)).parent
        written.append(_write_rows(f, t, name, schema, chunk_rows, tolerance_ns, where))

    write_file(out, write, force=force)
    return WrittenTable(Path(out), name, written[0], time.perf_counter() - started)


# --- aggregates ---------------------------------------------------------------------------------


def _reduce_counts(
    pieces: Iterator[pl.DataFrame], count: Callable[[pl.LazyFrame], pl.LazyFrame],
    merge: Callable[[pl.LazyFrame], pl.LazyFrame],
) -> pl.DataFrame | None:  # fmt: skip
    """Counts of every piece, merged every :data:`MERGE_EVERY` pieces; None for no rows."""
    held: list[pl.DataFrame] = []
    for frame in pieces:
        held.append(count(frame.lazy()).collect())
        if len(held) > MERGE_EVERY:
            held = [merge(pl.concat(held, how="vertical_relaxed").lazy()).collect()]
    return pl.concat(held, how="vertical_relaxed") if held else None


def _frames(
    trace: Trace, name: str, chunk_rows: int, columns: Sequence[str]
) -> Iterator[pl.DataFrame]:
    rows = _rows_of(name, DEFAULT_TOLERANCE_NS, columns)
    for _, frame in _pieces(trace, rows, chunk_rows):
        yield frame


def _by_reason(
    trace: Trace, table: str, col: str, chunk_rows: int, exact_limit: int
) -> pl.DataFrame:
    stats = DurationStats(["reason_name"], col, exact_limit=exact_limit)
    for frame in _frames(trace, table, chunk_rows, ("reason_name",)):
        stats.add(frame.select("reason_name", col))
    counted = stats.table(["reason_name"])
    if not counted.width:
        return by_reason(_empty(table), col)
    return by_reason_from_stats(counted).collect()


# The columns each per-thread aggregate reads of the KVM events (the rest stay null).
_ACCESS_COLUMNS = ("addr", "write", "device")
_KICK_COLUMNS = ("addr", "write", "device", "queue", "value", "count", "vcpu", "pid")


def _accesses_by_target(trace: Trace, chunk_rows: int) -> pl.DataFrame:
    counts = _reduce_counts(
        _frames(trace, "accesses", chunk_rows, _ACCESS_COLUMNS), access_counts, _access_merge
    )
    if counts is None:
        return accesses_by_target_plan(_empty("accesses")).collect()
    return accesses_by_target_from_counts(counts).collect()


def _access_merge(stacked: pl.LazyFrame) -> pl.LazyFrame:
    from vtrace.analyze.accesses import ACCESS_KEYS

    return stacked.group_by(ACCESS_KEYS).agg(pl.all().sum())


def _kicks_by_queue(trace: Trace, chunk_rows: int) -> pl.DataFrame:
    from vtrace.analyze.kicks import KICK_KEYS

    def merge(stacked: pl.LazyFrame) -> pl.LazyFrame:
        return stacked.group_by(KICK_KEYS).agg(
            pl.col("kicks", "events").sum(),
            pl.col("first_ts_ns").min(),
            pl.col("last_ts_ns").max(),
        )

    counts = _reduce_counts(_frames(trace, "kicks", chunk_rows, _KICK_COLUMNS), kick_counts, merge)
    if counts is None:
        return kicks_by_queue_plan(_empty("kicks")).collect()
    return kicks_by_queue_from_counts(counts).collect()


def _streaming(
    plan: Callable[[pl.LazyFrame], pl.LazyFrame],
) -> Callable[[Trace, int, int], pl.DataFrame]:
    """An aggregate the streaming engine runs in bounded memory as it is (a filter, then a
    group-by of few groups)."""
    return lambda trace, chunk_rows, exact_limit: plan(trace.events).collect(engine="streaming")


# Aggregate name -> (trace, chunk_rows, exact_limit) -> the in-memory function's frame.
AGGREGATES: dict[str, Callable[[Trace, int, int], pl.DataFrame]] = {
    "exits_by_reason": lambda t, c, e: _by_reason(t, "exits", "duration_ns", c, e),
    "user_exits_by_reason": lambda t, c, e: _by_reason(t, "user_exits", "until_next_ns", c, e),
    "accesses_by_target": lambda t, c, e: _accesses_by_target(t, c),
    "kicks_by_queue": lambda t, c, e: _kicks_by_queue(t, c),
    "interrupts_by_line": _streaming(lambda ev: interrupts_by_line_plan(interrupts_plan(ev))),
    "batching": _streaming(batching_plan),
}
# What each aggregate is, in the in-memory functions' terms (for help texts and docs).
AGGREGATE_OF = {
    "exits_by_reason": 'by_reason(exits(events), "duration_ns")',
    "user_exits_by_reason": 'by_reason(user_exits(events), "until_next_ns")',
    "accesses_by_target": "accesses_by_target(accesses(events))",
    "kicks_by_queue": "kicks_by_queue(kicks(events))",
    "interrupts_by_line": "interrupts_by_line(interrupts(events))",
    "batching": "batching(events)",
}


def aggregate(
    name: str,
    trace: Trace | str | os.PathLike[str],
    *,
    chunk_rows: int = CHUNK_ROWS,
    exact_limit: int = EXACT_LIMIT,
) -> pl.DataFrame:
    """The aggregate ``name`` of a trace (:data:`AGGREGATES`; :data:`AGGREGATE_OF` says which
    in-memory call each equals) in memory that does not grow with the trace. Percentiles are
    exact up to ``exact_limit`` distinct (reason, value) pairs (:mod:`vtrace.analyze.partials`)."""
    _check_name(name, list(AGGREGATES), "an aggregate")
    return AGGREGATES[name](_trace(trace), chunk_rows, exact_limit)


def _numeric_column(table: str, col: str, by: Sequence[str]) -> None:
    schema = _empty(table).schema
    for c in (col, *by):
        if c not in schema:
            raise VtraceError(f"{table}: no column {c}; its columns: {', '.join(schema.names())}")
    if schema[col] != pl.Int64:
        raise VtraceError(f"{table}.{col}: not an Int64 column (a time or duration in ns)")


def _keys(by: str | Sequence[str] | None) -> list[str]:
    return [] if by is None else ([by] if isinstance(by, str) else list(by))


def _read_for(table: str, cols: Sequence[str]) -> tuple[str, ...]:
    """The KVM event columns a table's ``cols`` need: where an access was handled is read off
    `addr` and `write`; every other column not asked for stays null, unread."""
    need = ("addr", "write") if table in ("accesses", "kicks") else ()
    return tuple(dict.fromkeys([*need, *(c for c in cols if c in TIMELINE_COLUMNS)]))


def table_percentiles(
    table: str,
    trace: Trace | str | os.PathLike[str],
    col: str,
    by: str | Sequence[str] | None = None,
    *,
    chunk_rows: int = CHUNK_ROWS,
    exact_limit: int = EXACT_LIMIT,
) -> pl.DataFrame:
    """``percentiles(<table>(events), col, by)`` of a trace in bounded memory: the same
    frame, percentiles exact up to ``exact_limit`` distinct (group, value) pairs."""
    _check_name(table, list(ROW_TABLES), "a row table")
    keys = _keys(by)
    _numeric_column(table, col, keys)
    t = _trace(trace)
    group = keys or ["_all"]
    stats = DurationStats(group, col, exact_limit=exact_limit)
    for frame in _frames(t, table, chunk_rows, _read_for(table, [*keys, col])):
        stats.add(frame.select(*keys, col) if keys else frame.select(pl.lit(0).alias("_all"), col))
    counted = stats.table(group)
    if not counted.width:
        return percentiles(_empty(table), col, by)
    unit = _unit(col)
    counted = counted.drop("rows")
    if not keys:
        return counted.drop("_all")
    return counted.sort(
        [f"total{unit}", *keys], descending=[True] + [False] * len(keys), nulls_last=True
    )


def table_histogram(
    table: str,
    trace: Trace | str | os.PathLike[str],
    col: str,
    by: str | Sequence[str] | None = None,
    *,
    chunk_rows: int = CHUNK_ROWS,
) -> pl.DataFrame:
    """``log2_histogram(<table>(events), col, by)`` of a trace in bounded memory: the same
    frame (counts are exact)."""
    _check_name(table, list(ROW_TABLES), "a row table")
    keys = _keys(by)
    _numeric_column(table, col, keys)
    t = _trace(trace)

    def count(frame: pl.LazyFrame) -> pl.LazyFrame:
        return (
            frame.filter(pl.col(col).is_not_null() & (pl.col(col) >= 0))
            .group_by([*keys, log2_bucket(col)])
            .agg(pl.len().cast(pl.Int64).alias("count"))
        )

    def merge(stacked: pl.LazyFrame) -> pl.LazyFrame:
        return stacked.group_by([*keys, "bucket"]).agg(pl.col("count").sum())

    frames = _frames(t, table, chunk_rows, _read_for(table, [*keys, col]))
    counts = _reduce_counts(frames, count, merge)
    if counts is None:
        return log2_histogram(_empty(table), col, by)
    return log2_histogram_from_counts(merge(counts.lazy()), col, keys).collect()
