"""Importers: text traces from ftrace / trace-cmd, perf script and QEMU's log backend.

:func:`read_events` parses one file into an events frame (the schema of
:mod:`vtrace.schema`) and a meta dict; :func:`import_file` also writes it as a trace
directory. Parsing is vectorised: the file becomes one column of lines and every step is a
polars expression over whole columns; in ftrace files, a compiled reader
(:mod:`vtrace.ingest.native`) takes the lines with tracefs' layout that it is sure of first.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl

from vtrace.errors import VtraceError
from vtrace.store import Trace, write_trace

Reader = Callable[..., tuple[pl.DataFrame, dict[str, Any]]]


def _readers() -> dict[str, Reader]:
    from vtrace.ingest.ftrace import read_ftrace
    from vtrace.ingest.perf import read_perf
    from vtrace.ingest.qemu import read_qemu

    return {"ftrace": read_ftrace, "perf": read_perf, "qemu": read_qemu}


FORMATS = ("ftrace", "perf", "qemu")
# Imported traces are written once and read often: the fast codec (see vtrace.store).
IMPORT_COMPRESSION = "lz4"
# How imported events are written (vtrace.store.write_trace's options): lz4 and the parts'
# own encodings (ts_ns as deltas, every other column through a dictionary, statistics for
# ts_ns only), as the collector writes them: less CPU and about half the size of plain
# pages with statistics of every column.
IMPORT_WRITE: dict[str, Any] = {"compression": IMPORT_COMPRESSION, "column_encodings": True}


def read_events(
    fmt: str, path: str | os.PathLike[str], *, strict: bool = False
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Parse one text trace: ``fmt`` is ``ftrace``, ``perf`` or ``qemu``.

    Returns the events frame and meta (importer, source_files, lines, events, unparsed,
    unparsed_first_lines, malformed, clock, ...). Raises :class:`VtraceError` naming the
    file (and line) for bad input; with ``strict`` any unparsed line is an error.
    """
    readers = _readers()
    if fmt not in readers:
        raise VtraceError(f"{path}: unknown format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return readers[fmt](Path(path), strict=strict)


def import_file(
    fmt: str,
    path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    strict: bool = False,
    extra_meta: dict[str, Any] | None = None,
    progress: Callable[[str], None] | None = None,
) -> Trace:
    """Parse ``path`` and write it as the trace directory ``out``; return the opened trace.

    ``out`` must not exist. Nothing is left behind on any error. ``progress`` is called
    with the name of each step as it starts (``parse``, ``write``).
    """
    out_path = Path(out)
    if out_path.exists() or out_path.is_symlink():
        raise VtraceError(f"{out_path}: output exists; choose a new directory")
    step = progress or (lambda _name: None)
    step("parse")
    events, meta = read_events(fmt, path, strict=strict)
    step("write")
    return write_trace(out_path, events, {**meta, **(extra_meta or {})}, **IMPORT_WRITE)


__all__ = ["FORMATS", "IMPORT_COMPRESSION", "IMPORT_WRITE", "import_file", "read_events"]
