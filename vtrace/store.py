"""Trace directories: `meta.json` plus time-ordered Parquet parts, written crash-safely.

A part is written completely under a temporary name, closed, then renamed into place: a
Parquet file killed before its footer is written cannot be read at all, so a crash loses at
most the part being written. Files are created with mode 0640, directories 0750: traces of
production hosts carry guest addresses and process ids.

Nothing outside this module reads the files: everyone else calls :func:`open_trace`.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import socket
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa

from vtrace import __version__
from vtrace.errors import VtraceError
from vtrace.schema import EVENTS_SCHEMA, conform, empty_events, validate

META_NAME = "meta.json"
PART_GLOB = "part-*.parquet"
FILE_MODE = 0o640
DIR_MODE = 0o750
# A second's worth of collector events, or an importer's chunk: big enough for few row
# groups, small enough to bound the memory the writer holds.
DEFAULT_PART_ROWS = 1_000_000
# Parquet compression of the parts: zstd is the smallest; lz4 writes and reads faster for
# about 1.5x the size (what the importers use).
DEFAULT_COMPRESSION = "zstd"


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    os.replace(tmp, path)


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
    ) -> None:
        self.path = Path(path)
        if self.path.exists() and (not self.path.is_dir() or any(self.path.iterdir())):
            raise VtraceError(f"{self.path}: output exists; choose a new directory")
        self.path.mkdir(mode=DIR_MODE, parents=True, exist_ok=True)
        os.chmod(self.path, DIR_MODE)
        self.part_rows = part_rows
        self.keep_on_error = keep_on_error
        self.sort = sort
        self.compression = compression
        self.meta: dict[str, Any] = {**host_meta(), **(meta or {})}
        self.meta.setdefault("created_unix", time.time())
        self.meta["complete"] = False
        self._buffer: list[pl.DataFrame] = []
        self._buffered = 0
        self.parts = 0
        self.rows = 0
        self.write_meta()

    # -- writing ---------------------------------------------------------------------------
    def append(self, events: pl.DataFrame | pa.Table | pa.RecordBatch) -> None:
        """Buffer a batch of events; write a part once enough rows are buffered."""
        if not isinstance(events, pl.DataFrame):
            events = pl.from_arrow(events)  # type: ignore[assignment]
        if events.height == 0:
            return
        if events.schema != EVENTS_SCHEMA:
            events = conform(events)  # type: ignore[assignment]
        self._buffer.append(events)
        self._buffered += events.height
        if self._buffered >= self.part_rows:
            self.flush()

    def flush(self) -> None:
        """Write what is buffered as one complete part (no-op when nothing is buffered)."""
        if not self._buffered:
            return
        frame = pl.concat(self._buffer, rechunk=True)
        self._buffer, self._buffered = [], 0
        # A stable sort of sorted rows changes nothing: checking is much cheaper.
        if self.sort and not frame.get_column("ts_ns").is_sorted():
            frame = frame.sort("ts_ns", maintain_order=True)
        final = self.path / f"part-{self.parts:06d}.parquet"
        tmp = self.path / f".{final.name}.tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
        try:
            with os.fdopen(fd, "wb") as f:
                frame.write_parquet(f, compression=self.compression, statistics=True)
                f.flush()
                os.fsync(f.fileno())
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, final)
        self.parts += 1
        self.rows += frame.height

    def write_meta(self) -> None:
        self.meta["parts"] = self.parts
        self.meta["events"] = self.rows
        _write_bytes_atomic(
            self.path / META_NAME,
            json.dumps(self.meta, indent=2, sort_keys=True, default=str).encode(),
        )

    def close(self, **meta: Any) -> Trace:
        """Write the last part, finalise meta (merged with ``meta``) and open the trace."""
        self.flush()
        self.meta.update(meta)
        self.meta["complete"] = True
        self.write_meta()
        return open_trace(self.path)

    def abort(self) -> None:
        """Remove everything this writer made: no partial output for a failed import."""
        self._buffer, self._buffered = [], 0
        shutil.rmtree(self.path, ignore_errors=True)

    def __enter__(self) -> TraceWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            return
        if self.keep_on_error:
            try:
                self.flush()
            finally:
                self.meta["error"] = f"{exc_type.__name__}: {exc}"
                self.write_meta()
        else:
            self.abort()


def write_trace(
    path: str | os.PathLike[str],
    events: pl.DataFrame | Iterable[pl.DataFrame],
    meta: dict[str, Any],
    *,
    compression: str = DEFAULT_COMPRESSION,
) -> Trace:
    """Write a whole trace at once (importers, tests); removes it again on failure."""
    frames = [events] if isinstance(events, pl.DataFrame) else events
    with TraceWriter(path, meta, compression=compression) as writer:
        for frame in frames:
            writer.append(frame)
        return writer.close()


@dataclass
class Trace:
    """An opened trace directory: ``events`` is a LazyFrame over every complete part."""

    path: Path
    meta: dict[str, Any]
    parts: list[Path]

    @property
    def events(self) -> pl.LazyFrame:
        if not self.parts:
            return empty_events().lazy()
        return pl.scan_parquet(self.parts, schema=EVENTS_SCHEMA)

    @property
    def name(self) -> str:
        return self.path.name

    def __repr__(self) -> str:
        return (
            f"Trace({str(self.path)!r}, parts={len(self.parts)}, events={self.meta.get('events')})"
        )


def open_trace(path: str | os.PathLike[str]) -> Trace:
    """Open a trace directory; a clear :class:`VtraceError` when it is not one."""
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
    # Parts left as temporary files by a crash are not events; say so in meta, never hide it.
    leftovers = sorted(x.name for x in p.glob(".part-*.tmp"))
    if leftovers:
        meta = {**meta, "incomplete_parts": leftovers}
    if parts:
        schema = pl.read_parquet_schema(parts[0])
        validate(pl.DataFrame(schema=schema), where=str(parts[0]))
    return Trace(path=p, meta=meta, parts=parts)
