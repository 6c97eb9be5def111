"""ftrace text: tracefs ``trace`` / ``trace_pipe`` and ``trace-cmd report`` output.

A tracefs line::

    python3-4111    [001] .....   393.292792: kvm_pio: pio_write at 0x500 size 1 count 1 val 0x41

``TASK-TID``, optionally ``(TGID)`` (the ``record-tgid`` option), ``[CPU]``, the latency
flags (tracefs, ``trace-cmd report -l``), the timestamp in seconds, the event name and its
text. ``trace-cmd report`` writes the same without the flags, with a ``BUFFER:`` prefix for
an instance buffer, and pads the event name.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from vtrace.ingest.tracepoint_text import LineFormat, read_tracepoint_text

FTRACE = LineFormat(
    name="ftrace",
    # "SEC.FRAC: EVENT:" after "[BUFFER:] TASK-TID [(TGID)] [CPU] [FLAGS] ".
    stamp=r"(?:^|\s)\d+(?:\.\d+)?: \s*\w+:(?:\s|$)",
    tid=r"-(\d+)(?:\s+\(\s*(?:\d+|-+)\))?$",
    pid=r"\(\s*(\d+)\)$",
    system_prefix=False,
    # Comments, blank lines, the per-CPU banner of tracefs, trace-cmd's report header.
    ignore=(
        r"^\s*(?:#.*)?$|^##### CPU \d+ buffer started ####$|^cpus=\d+$|^version = \S+$"
        r"|^CPU ?\d+ is empty$"
    ),
    # tracefs: "CPU:1 [LOST 42 EVENTS]"; trace-cmd report: "CPU:1 [42 EVENTS DROPPED]".
    lost=r"^\s*CPU:?\s*\d+\s*\[(?:LOST )?(\d+) EVENTS(?: DROPPED)?\]\s*$",
    clock="ftrace trace_clock (tracefs 'local' by default; see trace_clock)",
    tracefs_layout=True,
)


def read_ftrace(path: str | Path, *, strict: bool = False) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Parse tracefs or trace-cmd report text into an events frame and meta."""
    return read_tracepoint_text(FTRACE, path, strict=strict)
