"""Trace directories: `meta.json` plus time-ordered Parquet parts, written crash-safely.

A part is written completely under a temporary name, closed, then renamed into place: a
Parquet file killed before its footer is written cannot be read at all, so a crash loses at
most the part being written. Files are created with mode 0640, directories 0750: traces of
production hosts carry guest addresses and process ids. The writer makes its directory itself
and opens every file relative to it without following links (:mod:`vtrace.output`).

A write that fails (a full disk) stops the writer: the part it was writing is removed, every
part before it stays readable, and ``close`` rewrites meta to match the parts on disk, with the
error and the events not written.

A writer given ``max_bytes`` keeps its parts within that many bytes: in ring mode it drops the
oldest parts (never the newest, never meta), rewriting meta before removing them; in stop
mode it says ``full`` and leaves stopping to its caller. Meta's ``dropped`` counts what went
(parts, events, bytes, the first kept timestamp): the parts numbered below ``dropped.parts``
are gone on purpose, and readers take the rest as a whole trace that starts later.

Nothing outside this module reads the files: everyone else calls :func:`open_trace`.
"""

from __future__ import annotations

import io
import json
import os
import platform
import re
import socket
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from itertools import pairwise
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl
import pyarrow as pa

from vtrace.errors import VtraceError
from vtrace.output import OutputDir, OutputError
from vtrace.schema import EVENTS_SCHEMA, conform, empty_events, validate
from vtrace.version import __version__

if TYPE_CHECKING:
    import pandas as pd

META_NAME = "meta.json"
PART_GLOB = "part-*.parquet"
# Space held back by a writer that must be able to finish (the collector): released to
# write the last meta.json when the disk is full (a recording's meta is about 10 KB).
RESERVE_NAME = ".space-reserve"
META_RESERVE_BYTES = 64 * 1024
# A second's worth of collector events, or an importer's chunk: big enough for few row
# groups, small enough to bound the memory the writer holds.
DEFAULT_PART_ROWS = 1_000_000
# Parquet compression of the parts: zstd is the smallest; lz4 writes and reads faster for
# about 1.5x the size (what the importers use).
DEFAULT_COMPRESSION = "zstd"
# The events table as Arrow: categorical columns are the dictionary type polars reads back.
EVENTS_ARROW_SCHEMA: pa.Schema = empty_events().to_arrow().schema
# Parquet encodings of parts written with ``column_encodings``: ts_ns (distinct, nearly
# sorted) as deltas, every other column through a dictionary (few distinct values per part;
# Parquet falls back to plain encoding by itself where a column has too many), statistics
# for ts_ns only (time ranges are what readers prune parts by). Faster to write and smaller
# than plain pages with the general-purpose compressor doing all the work.
_DELTA_COLUMNS = ("ts_ns",)
_DICTIONARY_COLUMNS = [c for c in EVENTS_SCHEMA.names() if c not in _DELTA_COLUMNS]
# The most bytes of one column chunk's dictionary before Parquet gives up on it and writes
# plain pages: 4 MiB, not the default 1 MiB, keeps `raw` (texts repeated thousands of times,
# tens of thousands distinct in a big part) dictionary-encoded: half its size, same CPU.
_DICTIONARY_PAGE_BYTES = 4 << 20
# What a writer with ``max_bytes`` does when its parts reach it.
ON_FULL = ("ring", "stop")


def host_meta() -> dict[str, Any]:
    """What every trace records about the machine that made it."""
    uname = platform.uname()
    return {
        "host": socket.gethostname(),
        "kernel": uname.release,
        "machine": uname.machine,
        "vtrace_version": __version__,
    }


class TraceWriter:
    """Streaming writer of one trace directory.

    ``append`` takes events frames (or Arrow tables with the events schema) and buffers them;
    a part is written when ``part_rows`` are buffered or when ``flush`` is called (the
    collector flushes every second). ``close`` writes the final part and meta. Used as a
    context manager, an exception removes the directory when ``keep_on_error`` is false
    (importers: no partial output) and keeps what was flushed when true (the collector).

    The directory must not exist (:class:`~vtrace.output.OutputDir`). A failed write raises
    :class:`~vtrace.output.OutputError` and stops the writer: ``failure`` holds it, later
    flushes drop their rows, counted in ``unwritten``. ``reserve_bytes`` holds that much disk
    space from the start so that meta can still be rewritten on a full disk.

    ``max_bytes`` bounds the parts' bytes on disk (see the module's docstring): ``on_full``
    "ring" drops the oldest parts after each part written, "stop" sets ``full`` once the
    parts reach it (the caller stops appending).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        meta: dict[str, Any] | None = None,
        *,
        part_rows: int = DEFAULT_PART_ROWS,
        keep_on_error: bool = False,
        sort: bool = True,
        compression: str = DEFAULT_COMPRESSION,
        column_encodings: bool = False,
        reserve_bytes: int = 0,
        max_bytes: int | None = None,
        on_full: str = "ring",
    ) -> None:
        if on_full not in ON_FULL:
            raise ValueError(f"on_full must be one of {ON_FULL}, not {on_full!r}")
        self.path = Path(path)
        self._dir = OutputDir(self.path)
        self.part_rows = part_rows
        self.keep_on_error = keep_on_error
        self.sort = sort
        self.compression = compression
        self.column_encodings = column_encodings
        self.meta: dict[str, Any] = {**host_meta(), **(meta or {})}
        self.meta.setdefault("created_unix", time.time())
        self.meta["complete"] = False
        self._buffer: list[pl.DataFrame | pa.Table] = []
        self._buffered = 0
        self.parts = 0
        self.rows = 0
        self.unwritten = 0
        self.failure: OutputError | None = None
        self._removed = False
        self.max_bytes = max_bytes
        self.on_full = on_full
        self.full = False
        # Parts on disk, oldest first: (number, bytes, rows, first ts_ns); kept only when
        # bounded (the ring needs each part's size and rows when it drops it).
        self._kept: deque[tuple[int, int, int, int | None]] = deque()
        self.part_bytes = 0  # bytes of the parts on disk
        self.dropped: dict[str, Any] = {"parts": 0, "events": 0, "bytes": 0}
        if max_bytes is not None:
            self.meta["max_size"] = {"bytes": max_bytes, "on_full": on_full}
        try:
            if reserve_bytes:
                self._dir.reserve(RESERVE_NAME, reserve_bytes)
            self.write_meta()
        except OSError as e:
            self._dir.remove()
            raise OutputError(f"{self.path}: cannot write: {e.strerror or e}", e.errno) from None
        except BaseException:  # a full disk at the start: nothing is left behind
            self._dir.remove()
            raise

    # -- writing ---------------------------------------------------------------------------
    def append(self, events: pl.DataFrame | pa.Table | pa.RecordBatch) -> None:
        """Buffer a batch of events; write a part once enough rows are buffered.

        With ``column_encodings``, an Arrow table already in :data:`EVENTS_ARROW_SCHEMA`
        (the collector's decoder builds one) is kept as it is; anything else is conformed
        to the schema first.
        """
        batch: pl.DataFrame | pa.Table
        if isinstance(events, pa.RecordBatch):
            events = pa.Table.from_batches([events])
        if (
            self.column_encodings
            and isinstance(events, pa.Table)
            and events.schema.equals(EVENTS_ARROW_SCHEMA)
        ):
            batch = events
        else:
            frame = events if isinstance(events, pl.DataFrame) else pl.from_arrow(events)
            assert isinstance(frame, pl.DataFrame)
            if frame.schema != EVENTS_SCHEMA:
                frame = conform(frame)  # type: ignore[assignment]
            batch = frame
        rows = len(batch)
        if rows == 0:
            return
        self._buffer.append(batch)
        self._buffered += rows
        if self._buffered >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered as one complete part (no-op when nothing is buffered).

        Raises :class:`~vtrace.output.OutputError` when the part cannot be written; after
        that, buffered rows are dropped and counted in ``unwritten``.
        """
        if not self._buffered:
            return
        buffer, self._buffer, self._buffered = self._buffer, [], 0
        if self.failure is not None:
            self.unwritten += sum(len(b) for b in buffer)
            return
        pieces: Iterable[tuple[int, Any, Callable[[Any], None]]]
        if self.column_encodings:
            table = self._sorted(pa.concat_tables([_arrow(b) for b in buffer]))
            left = table.num_rows
            pieces = self._arrow_parts(table)
        else:
            frame = pl.concat(buffer, rechunk=True)  # type: ignore[type-var]
            # A stable sort of sorted rows changes nothing: checking is much cheaper.
            if self.sort and not frame.get_column("ts_ns").is_sorted():
                frame = frame.sort("ts_ns", maintain_order=True)
            left = frame.height

            def write(f: Any) -> None:
                # Through memory: polars reports a failed write to a Python file as a
                # ComputeError without its errno; f.write raises the OSError itself.
                data = io.BytesIO()
                frame.write_parquet(data, compression=self.compression, statistics=True)
                f.write(data.getbuffer())

            pieces = [(left, frame.get_column("ts_ns"), write)]
        for rows, ts, write in pieces:
            self._write_part(rows, ts, write, left)
            left -= rows

    def _write_part(self, rows: int, ts: Any, write: Callable[[Any], None], left: int) -> None:
        """Write the next part (``rows`` rows, their ``ts_ns``); on failure the ``left``
        rows of this flush (this part's and the next ones') are counted unwritten."""
        name = f"part-{self.parts:06d}.parquet"
        try:
            self._dir.write_atomic(name, write)
        except OutputError as e:
            self.unwritten += left
            self.failure = e
            raise
        self.parts += 1
        self.rows += rows
        if self.max_bytes is not None:
            size = os.stat(name, dir_fd=self._dir.fd).st_size
            self._kept.append((self.parts - 1, size, rows, _first_ts(ts)))
            self.part_bytes += size
            self._bound()

    def _bound(self) -> None:
        """Apply ``max_bytes`` after a part was written: drop the oldest parts (ring) or
        say ``full`` (stop)."""
        assert self.max_bytes is not None
        if self.on_full == "stop":
            self.full = self.full or self.part_bytes >= self.max_bytes
            return
        gone: list[int] = []
        while self.part_bytes > self.max_bytes and len(self._kept) > 1:
            number, size, rows, _ = self._kept.popleft()
            gone.append(number)
            self.part_bytes -= size
            self.dropped["parts"] += 1
            self.dropped["events"] += rows
            self.dropped["bytes"] += size
        if not gone:
            return
        self.dropped["first_kept_ts_ns"] = self._kept[0][3]
        # Meta first: a part meta counts as dropped is never read, so a crash between the
        # two leaves a readable trace (the part is only not yet removed).
        self.write_meta()
        for number in gone:
            self._dir.unlink(f"part-{number:06d}.parquet")

    def _sorted(self, table: pa.Table) -> pa.Table:
        if not self.sort:
            return table
        if table.column("ts_ns").null_count:
            frame = pl.from_arrow(table).sort("ts_ns", maintain_order=True)  # type: ignore[union-attr]
            return frame.to_arrow().cast(EVENTS_ARROW_SCHEMA)
        chunks = [c.to_numpy() for c in table.column("ts_ns").chunks]
        ts = chunks[0] if len(chunks) == 1 else np.concatenate(chunks)
        # A stable sort of sorted rows changes nothing: checking is much cheaper.
        if np.any(ts[1:] < ts[:-1]):
            table = table.take(np.argsort(ts, kind="stable"))
        return table

    def _arrow_parts(self, table: pa.Table) -> Iterator[tuple[int, Any, Callable[[Any], None]]]:
        """``table`` as the parts to write, in order: (rows, ts_ns, write). More than
        ``part_rows`` rows are cut into equal parts of at most that many, encoded into
        memory on threads, as many at once as there are cores: pyarrow's Parquet writer uses
        one thread, and the parts are still written to disk one after the other."""
        count = -(-table.num_rows // self.part_rows)
        if count <= 1:
            yield table.num_rows, table.column("ts_ns"), lambda f: self._encode(table, f)
            return
        ends = [table.num_rows * i // count for i in range(count + 1)]
        slices = [table.slice(a, b - a) for a, b in pairwise(ends)]

        def encoded(piece: pa.Table) -> memoryview:
            data = io.BytesIO()
            self._encode(piece, data)
            return data.getbuffer()

        workers = min(count, os.cpu_count() or 1)
        with ThreadPoolExecutor(workers) as pool:
            # A window of parts at a time: memory holds at most ``workers`` encoded parts.
            for start in range(0, count, workers):
                window = slices[start : start + workers]
                for piece, data in zip(window, pool.map(encoded, window), strict=True):
                    yield piece.num_rows, piece.column("ts_ns"), partial(_put, data)

    def _encode(self, table: pa.Table, f: Any) -> None:
        import pyarrow.parquet as pq  # here: it adds to every `vtrace` start-up otherwise

        pq.write_table(
            table,
            f,
            compression=self.compression,
            use_dictionary=_DICTIONARY_COLUMNS,
            column_encoding=dict.fromkeys(_DELTA_COLUMNS, "DELTA_BINARY_PACKED"),
            write_statistics=list(_DELTA_COLUMNS),
            dictionary_pagesize_limit=_DICTIONARY_PAGE_BYTES,
        )

    def write_meta(self) -> None:
        """Write meta.json (atomically) with the parts and events written so far; a failure
        is an :class:`~vtrace.output.OutputError` and stops the writer like a failed part."""
        self.meta["parts"] = self.parts
        # Events in the parts on disk: those dropped by the ring are counted in `dropped`.
        self.meta["events"] = self.rows - self.dropped["events"]
        if self.dropped["parts"]:
            self.meta["dropped"] = dict(self.dropped)
        data = json.dumps(self.meta, indent=2, sort_keys=True, default=str).encode()
        try:
            self._dir.write_atomic(META_NAME, lambda f: f.write(data))
        except OutputError as e:
            self.failure = self.failure or e
            raise

    def close(self, **meta: Any) -> Trace:
        """Write the last part, finalise meta (merged with ``meta``) and open the trace.

        After a failed write (``failure``): with ``keep_on_error`` meta is rewritten to match
        the parts on disk, with ``error`` and ``events_not_written`` (``meta`` may set its
        own), then the failure is raised; without, the failure is raised (the context
        manager then removes everything).
        """
        try:
            self.flush()
        except OutputError:
            if not self.keep_on_error:
                raise
        if self.failure is not None:
            self.meta["error"] = str(self.failure)
            self.meta["events_not_written"] = self.unwritten
        self.meta.update(meta)
        self.meta["complete"] = True
        self._finish_meta()
        if self.failure is not None:
            raise self.failure
        return open_trace(self.path)

    def _finish_meta(self) -> None:
        # The reserve's space is what lets this last meta be written on a full disk.
        self._dir.unlink(RESERVE_NAME)
        self.write_meta()
        self._dir.close()

    def abort(self) -> None:
        """Remove everything this writer made: no partial output for a failed import."""
        self._buffer, self._buffered = [], 0
        if not self._removed:
            self._removed = True
            self._dir.remove()

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        if self.keep_on_error:
            try:
                self.flush()
            except OutputError:
                pass  # counted in unwritten; the meta below says so
            finally:
                self.meta["error"] = f"{exc_type.__name__}: {exc}"
                if self.failure is not None:
                    self.meta["error"] += f"; {self.failure}"
                    self.meta["events_not_written"] = self.unwritten
                self._finish_meta()
        else:
            self.abort()


def _arrow(batch: pl.DataFrame | pa.Table) -> pa.Table:
    if isinstance(batch, pa.Table):
        return batch
    table = batch.to_arrow()
    return table if table.schema.equals(EVENTS_ARROW_SCHEMA) else table.cast(EVENTS_ARROW_SCHEMA)


def _put(data: memoryview, f: Any) -> None:
    f.write(data)


def _first_ts(ts: Any) -> int | None:
    """The first timestamp of a sorted part's ts_ns column (polars or Arrow)."""
    if isinstance(ts, pl.Series):
        value = ts.drop_nulls().min()
    else:
        import pyarrow.compute as pc

        value = pc.min(ts).as_py()
    return None if value is None else int(value)  # type: ignore[arg-type]


def write_trace(
    path: str | os.PathLike[str],
    events: pl.DataFrame | Iterable[pl.DataFrame],
    meta: dict[str, Any],
    *,
    compression: str = DEFAULT_COMPRESSION,
    column_encodings: bool = False,
) -> Trace:
    """Write a whole trace at once (importers, tests); removes it again on failure.

    ``column_encodings``: the parts' encodings of :class:`TraceWriter` (what importers use).
    """
    frames = [events] if isinstance(events, pl.DataFrame) else events
    with TraceWriter(
        path, meta, compression=compression, column_encodings=column_encodings
    ) as writer:
        for frame in frames:
            writer.append(frame)
        return writer.close()


# The most events Trace.to_pandas converts unless told otherwise: pandas holds about 90 bytes
# an event with every column (3 to 4 times that while converting), and a trace can hold 10^8.
PANDAS_MAX_ROWS = 10_000_000


def pandas_types(arrow_type: pa.DataType) -> pd.ArrowDtype | None:
    """pyarrow's ``types_mapper`` for pandas: integers and booleans as pyarrow-backed pandas
    dtypes (64-bit values exact, nulls as ``<NA>``; numpy would turn a column with a null into
    float64 or object), everything else pandas' default (dictionaries as ``category``, strings
    as ``str``, floats as float64).

    What :meth:`Trace.to_pandas` uses; pass it to polars' own conversion of any result,
    ``frame.to_pandas(types_mapper=pandas_types)``.
    """
    if pa.types.is_integer(arrow_type) or pa.types.is_boolean(arrow_type):
        import pandas as pd  # here: it adds to every `vtrace` start-up otherwise

        return pd.ArrowDtype(arrow_type)
    return None


# The name the writer gives part n; a reader finds numbering gaps from it.
PART_NAME = re.compile(r"part-(\d{6,})\.parquet")
# Parquet files start and end with these 4 bytes; a file cut short lacks the last ones.
PARQUET_MAGIC = b"PAR1"
# How many missing part names one message lists.
MISSING_SHOWN = 3


@dataclass
class Trace:
    """An opened trace directory: ``events`` is a LazyFrame over every complete part.

    ``missing_parts``: names of parts that should be there and are not (a gap in the
    numbering, or fewer parts than meta counts).
    """

    path: Path
    meta: dict[str, Any]
    parts: list[Path]
    missing_parts: list[str] = field(default_factory=list)

    @property
    def events(self) -> pl.LazyFrame:
        if not self.parts:
            return empty_events().lazy()
        return pl.scan_parquet(self.parts, schema=EVENTS_SCHEMA)

    @property
    def name(self) -> str:
        return self.path.name

    def events_on_disk(self) -> int:
        """Rows in the parts, from their footers (no data is read)."""
        if not self.parts:
            return 0
        try:
            return int(pl.scan_parquet(self.parts).select(pl.len()).collect().item())
        except (pl.exceptions.PolarsError, OSError) as e:
            raise VtraceError(
                f"{self.path}: cannot read the parts' footers: {_first_line(e)}"
            ) from None

    def to_pandas(
        self,
        columns: Sequence[str] | None = None,
        events: str | Sequence[str] | None = None,
        *,
        max_rows: int = PANDAS_MAX_ROWS,
        datetime: bool = False,
    ) -> pd.DataFrame:
        """The events as a pandas DataFrame: ``columns`` (default all, in schema order) of the
        events named in ``events`` (default all), in time order.

        Categorical columns are ``category``, integers and booleans pyarrow-backed with their
        own width and sign (``ts_ns`` ``int64[pyarrow]``), ``raw`` ``str``
        (:func:`pandas_types`). ``datetime`` adds ``time``, ``ts_ns`` as ``datetime64[ns]``
        (the same nanoseconds on the trace's clock), after ``ts_ns`` or first. More than
        ``max_rows`` matching events is a :class:`VtraceError`, counted before any other
        column is read.
        """
        names = list(EVENTS_SCHEMA.names()) if columns is None else columns
        if isinstance(names, str) or not names:
            raise VtraceError(f"{self.path}: columns must be a non-empty list of column names")
        seen: set[str] = set()
        for name in names:
            if name not in EVENTS_SCHEMA:
                known = ", ".join(EVENTS_SCHEMA.names())
                raise VtraceError(f"{self.path}: no column {name!r} in the events ({known})")
            if name in seen:
                raise VtraceError(f"{self.path}: column {name!r} named twice")
            seen.add(name)
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise VtraceError(f"{self.path}: max_rows must be a positive integer, not {max_rows!r}")
        frame = self.events
        if events is not None:
            wanted = [events] if isinstance(events, str) else list(events)
            if not all(isinstance(e, str) for e in wanted):
                raise VtraceError(f"{self.path}: events must be event names, not {events!r}")
            frame = frame.filter(pl.col("event").cast(pl.String).is_in(wanted))
        try:
            # Without a filter the parts' footers hold the count; with one only `event` is read.
            rows = int(frame.select(pl.len()).collect().item())
            if rows > max_rows:
                which = "events" if events is None else f"events named {', '.join(wanted)}"
                raise VtraceError(
                    f"{self.path}: {rows:,} {which}, more than max_rows={max_rows:,} to convert "
                    "to pandas; choose events=, filter trace.events in polars first, or raise "
                    "max_rows (about 90 bytes an event with every column, 3 to 4 times that "
                    "while converting)"
                )
            selected = [pl.col(n) for n in names]
            if datetime:
                at = names.index("ts_ns") + 1 if "ts_ns" in names else 0
                selected.insert(at, pl.col("ts_ns").cast(pl.Datetime("ns")).alias("time"))
            result = frame.select(selected).collect()
        except (pl.exceptions.PolarsError, OSError) as e:
            raise VtraceError(f"{self.path}: cannot read events: {_first_line(e)}") from None
        return result.to_pandas(types_mapper=pandas_types)

    def problem(self, events_on_disk: int | None = None) -> str | None:
        """One line saying what this trace lacks against its meta, or None when nothing.

        Parts missing from the numbering or from meta's count; with ``events_on_disk``,
        fewer events than meta counts (or, once the writer closed the trace, a different
        number). A writer that has not closed the trace writes meta now and then, so parts
        and events beyond meta's counts are no problem then.
        """
        meta_parts, meta_events = _count(self.meta, "parts"), _count(self.meta, "events")
        complete = self.meta.get("complete") is True
        short = (
            events_on_disk is not None
            and meta_events is not None
            and (events_on_disk < meta_events or (complete and events_on_disk != meta_events))
        )
        extra = complete and meta_parts is not None and len(self.parts) > meta_parts
        if not (self.missing_parts or short or extra):
            return None
        what = []
        if self.missing_parts:
            names = self.missing_parts[:MISSING_SHOWN]
            more = len(self.missing_parts) - len(names)
            what.append(
                ", ".join(names)
                + (f" and {more} more" if more else "")
                + (" missing" if len(self.missing_parts) == 1 else " are missing")
            )
        said = f"{META_NAME} says {_n(meta_parts, 'part')}"
        said += f" with {_n(meta_events, 'event')}" if meta_events is not None else ""
        has = f"the directory has {_n(len(self.parts), 'part')}"
        has += f" with {_n(events_on_disk, 'event')}" if events_on_disk is not None else ""
        what.append(f"{said}, {has}")
        return "; ".join(what)

    def __repr__(self) -> str:
        return (
            f"Trace({str(self.path)!r}, parts={len(self.parts)}, events={self.meta.get('events')})"
        )


def _count(meta: dict[str, Any], key: str) -> int | None:
    value = meta.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _n(count: int | None, noun: str) -> str:
    if count is None:
        return f"an unknown number of {noun}s"
    return f"{count:,} {noun}{'' if count == 1 else 's'}"


def _first_line(error: BaseException) -> str:
    """The first line of an error's text, printable ASCII only (one-line messages)."""
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return "".join(c if c.isascii() and c.isprintable() else "?" for c in text)


def _check_part_ends(part: Path) -> None:
    """A part must start and end with Parquet's magic bytes: one cut short (a copy that
    stopped, a full disk elsewhere) is named here, not met later as a reader's traceback."""
    try:
        with part.open("rb") as f:
            head = f.read(len(PARQUET_MAGIC))
            size = f.seek(0, os.SEEK_END)
            if size >= 2 * len(PARQUET_MAGIC):
                f.seek(size - len(PARQUET_MAGIC))
            tail = f.read(len(PARQUET_MAGIC))
    except OSError as e:
        raise VtraceError(f"{part}: cannot read: {e.strerror or e}") from None
    if size < 3 * len(PARQUET_MAGIC) or head != PARQUET_MAGIC or tail != PARQUET_MAGIC:
        raise VtraceError(
            f"{part}: not a whole Parquet part ({size:,} bytes, no Parquet "
            f"{'header' if head != PARQUET_MAGIC else 'footer'}): truncated or overwritten; "
            "move it out of the trace to read the rest"
        )


def _missing_parts(meta: dict[str, Any], parts: list[Path]) -> list[str]:
    """Part names absent from the numbering d..n-1, d the parts a writer with a size bound
    dropped (:func:`dropped_parts`), n the larger of meta's count and the highest number
    on disk + 1."""
    numbers = {int(m.group(1)) for x in parts if (m := PART_NAME.fullmatch(x.name))}
    expected = max(_count(meta, "parts") or 0, max(numbers, default=-1) + 1)
    return [
        f"part-{n:06d}.parquet" for n in range(dropped_parts(meta), expected) if n not in numbers
    ]


def dropped_parts(meta: dict[str, Any]) -> int:
    """How many of the first parts a writer with ``max_bytes`` dropped on purpose (ring):
    parts 0 to this - 1 are gone and not missing."""
    dropped = meta.get("dropped")
    return (_count(dropped, "parts") or 0) if isinstance(dropped, dict) else 0


def _part_number(part: Path) -> int:
    m = PART_NAME.fullmatch(part.name)
    return int(m.group(1)) if m else -1


def open_trace(path: str | os.PathLike[str], *, strict: bool = False) -> Trace:
    """Open a trace directory; a clear :class:`VtraceError` when it is not one.

    Every part must be a whole Parquet file (an error names the one that is not). Parts
    missing against meta are in ``missing_parts`` (see :meth:`Trace.problem`). With
    ``strict`` a trace that is not complete is an error: parts or events missing against
    meta, a writer that did not close it, parts left half-written, events it could not
    write. The oldest parts a size-bounded writer dropped (meta's ``dropped``) are neither
    missing nor an error: the trace holds the rest whole, from a later start.
    """
    p = Path(path)
    if not p.exists():
        raise VtraceError(f"{p}: no such trace directory")
    if not p.is_dir():
        raise VtraceError(f"{p}: not a trace directory (expected a folder with {META_NAME})")
    meta_path = p / META_NAME
    try:
        meta = json.loads(meta_path.read_text())
    except FileNotFoundError:
        raise VtraceError(f"{meta_path}: missing; not a vtrace trace directory") from None
    except (OSError, ValueError) as e:
        raise VtraceError(f"{meta_path}: unreadable meta: {e}") from None
    if not isinstance(meta, dict):
        raise VtraceError(f"{meta_path}: meta must be a JSON object")
    parts = sorted(p.glob(PART_GLOB))
    # A part meta counts as dropped (ring) is not read even if it is still there: its
    # writer rewrites meta before removing it and may have been killed in between.
    first = dropped_parts(meta)
    parts = [x for x in parts if _part_number(x) >= first]
    # Parts left as temporary files by a crash are not events; say so in meta, never hide it.
    leftovers = sorted(x.name for x in p.glob(".part-*.tmp"))
    if leftovers:
        meta = {**meta, "incomplete_parts": leftovers}
    for part in parts:
        _check_part_ends(part)
    if parts:
        try:
            schema = pl.read_parquet_schema(parts[0])
        except (pl.exceptions.PolarsError, OSError) as e:
            raise VtraceError(f"{parts[0]}: cannot read its schema: {_first_line(e)}") from None
        validate(pl.DataFrame(schema=schema), where=str(parts[0]))
    trace = Trace(path=p, meta=meta, parts=parts, missing_parts=_missing_parts(meta, parts))
    if strict:
        _check_complete(trace)
    return trace


def check_whole(trace: Trace, why: str) -> None:
    """Raise a one-line :class:`VtraceError` when parts or events are missing against meta
    (readers whose result would be skewed by what is missing, e.g. a calibration)."""
    problem = trace.problem(trace.events_on_disk())
    if problem is not None:
        raise VtraceError(f"{trace.path}: incomplete trace: {problem}; {why}")


def _check_complete(trace: Trace) -> None:
    """Raise a one-line :class:`VtraceError` when ``trace`` is not complete (strict readers)."""
    meta = trace.meta
    problem = trace.problem(trace.events_on_disk())
    if problem is None and meta.get("complete") is not True:
        problem = "its writer did not close it (stopped early)"
    if problem is None and meta.get("incomplete_parts"):
        problem = f"half-written parts left: {', '.join(meta['incomplete_parts'])}"
    if problem is None and _count(meta, "events_not_written"):
        problem = f"{meta['events_not_written']:,} events were not written ({meta.get('error')})"
    if problem is not None:
        raise VtraceError(f"{trace.path}: incomplete trace: {problem}")
