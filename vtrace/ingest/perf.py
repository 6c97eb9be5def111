"""``perf script`` default output of tracepoints.

A line::

    python3  4790 [000]   411.345015:   kvm:kvm_pio: pio_write at 0x500 size 1 count 1 val 0x41

``COMM``, ``TID`` (or ``PID/TID`` with ``-F +pid``), ``[CPU]``, the timestamp in seconds,
optionally the sample period, ``SYSTEM:EVENT:`` and the tracepoint's text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from vtrace.ingest.tracepoint_text import LineFormat, read_tracepoint_text

PERF = LineFormat(
    name="perf",
    # "SEC.FRAC: [PERIOD] SYSTEM:EVENT:" after "COMM TID [CPU] " or "COMM PID/TID [CPU] ".
    stamp=r"(?:^|\s)\d+\.\d+:\s+(?:\d+\s+)?\w+:\w+:(?:\s|$)",
    tid=r"\s(?:-?\d+/)?(-?\d+)$",
    pid=r"\s(-?\d+)/-?\d+$",
    system_prefix=True,
    ignore=r"^\s*(?:#.*)?$",
    lost=None,
    clock="perf clock (sched_clock-based, like CLOCK_MONOTONIC)",
)


def read_perf(path: str | Path, *, strict: bool = False) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Parse `perf script` text into an events frame and meta."""
    return read_tracepoint_text(PERF, path, strict=strict)
