"""A trace read a chunk of parts at a time, each chunk later than everything before it.

Parts are written in time order, so consecutive parts make chunks in time order. Parts
whose time ranges overlap (events of one part earlier than the end of the part before it)
go into the same chunk: a chunk starts only where every event after it is later than every
event before it. The analyses that follow each thread or queue through time
(:class:`~vtrace.analyze.timeline.ThreadCarry`,
:class:`~vtrace.analyze.requests.RequestChunks`) rely on that.

The time ranges come from the parts' footers (Parquet statistics of `ts_ns`), read without
reading any data; a part written without them is scanned for its range.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq

from vtrace.errors import VtraceError
from vtrace.store import Trace

# Events a chunk holds, about: the memory of `summary()` is a few hundred bytes per event of
# a chunk (the KVM events with their neighbours, the derived tables, the parts' pages).
CHUNK_ROWS = 1_000_000


@dataclass(frozen=True)
class Chunk:
    """Consecutive parts of a trace: `rows` events up to `last_ts_ns`; `final` when no
    chunk follows. Every event of a later chunk is later than `last_ts_ns`."""

    trace: Trace
    parts: list[Path]
    rows: int
    last_ts_ns: int | None
    final: bool

    @property
    def events(self) -> pl.LazyFrame:
        """The chunk's events, read like the trace's (:attr:`vtrace.store.Trace.events`)."""
        return Trace(self.trace.path, self.trace.meta, self.parts).events


def _footer_range(part: Path) -> tuple[int, int | None, int | None]:
    """Rows, first and last `ts_ns` of a part from its footer; (rows, None, None) when the
    footer has no statistics for it."""
    try:
        meta = pq.read_metadata(part)
    except Exception as e:  # pyarrow's errors for a damaged footer have no common base
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise VtraceError(f"{part}: cannot read events: {text}") from None
    names = [meta.schema.column(i).name for i in range(meta.num_columns)]
    if meta.num_rows == 0:
        return 0, None, None
    if "ts_ns" not in names:
        return meta.num_rows, None, None
    at = names.index("ts_ns")
    lo: int | None = None
    hi: int | None = None
    for g in range(meta.num_row_groups):
        group = meta.row_group(g)
        if group.num_rows == 0:
            continue
        stats = group.column(at).statistics
        if stats is None or not stats.has_min_max:
            return meta.num_rows, None, None
        lo = stats.min if lo is None else min(lo, stats.min)
        hi = stats.max if hi is None else max(hi, stats.max)
    return meta.num_rows, lo, hi


def part_ranges(trace: Trace) -> list[tuple[int, int | None, int | None]]:
    """(rows, first ts_ns, last ts_ns) of each part of ``trace``, in part order; None for
    the timestamps of an empty part."""
    ranges = []
    for part in trace.parts:
        rows, lo, hi = _footer_range(part)
        if rows and (lo is None or hi is None):
            lo, hi = (
                Trace(trace.path, trace.meta, [part])
                .events.select(pl.col("ts_ns").min().alias("lo"), pl.col("ts_ns").max().alias("hi"))
                .collect()
                .row(0)
            )
        ranges.append((rows, lo, hi))
    return ranges


def plan_chunks(trace: Trace, rows: int = CHUNK_ROWS) -> list[Chunk]:
    """Cut ``trace`` into chunks of at least ``rows`` events where it can (see the module's
    docstring): the last chunk may be smaller, and overlapping parts make a larger one."""
    ranges = part_ranges(trace)
    n = len(ranges)
    if n == 0:
        return [Chunk(trace, [], 0, None, True)]
    # A cut before part i is allowed when every event of the parts before it is earlier
    # than every event from part i on.
    later: list[int | None] = [None] * (n + 1)  # the first ts of parts i..n-1
    for i in range(n - 1, -1, -1):
        firsts = [t for t in (ranges[i][1], later[i + 1]) if t is not None]
        later[i] = min(firsts) if firsts else None
    chunks: list[Chunk] = []
    start, held, last = 0, 0, None
    for i, (count, _, hi) in enumerate(ranges):
        held += count
        if hi is not None:
            last = hi if last is None else max(last, hi)
        cut_ok = later[i + 1] is None or last is None or last < later[i + 1]
        if i == n - 1 or (held >= rows and cut_ok):
            chunks.append(Chunk(trace, trace.parts[start : i + 1], held, last, i == n - 1))
            start, held = i + 1, 0
    return chunks
