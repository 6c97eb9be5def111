"""The guest's own block-layer and interrupt events in a QEMU lab run
(``vtrace qemu-lab run --guest-trace``).

The host sees when QEMU took a kick and when the vCPU thread signalled it, not when the
guest's block layer issued each request, nor how long the guest spent in the disk's
interrupt handler. With ``--guest-trace`` the guest records its ``block_rq_issue`` and
``block_rq_complete`` tracepoints, and ``irq_handler_entry``/``irq_handler_exit`` of the
disk's request-queue interrupts (tracefs, over the workload window), and prints them on its
console after the workload, one compact line each::

    vtrace-guest: gt 2.576220 0 i RS 128 8
    vtrace-guest: gt 2.576412 0 h 25

(guest clock in seconds, guest CPU, then ``i`` issue or ``c`` complete with the request's
RWBS flags, its first sector and sector count, or ``h`` handler entry or ``x`` exit with
the IRQ number). Sectors are 512 bytes.

The guest's clock is not the host's. Every request the guest issued to a virtio-blk disk
is one QEMU read or wrote at the same byte offset (``virtio_blk_handle_read``/``_write``),
so the guest's clock is placed on the host's by the issue-to-QEMU lags: the offset makes
the shortest of them (their 1st percentile) zero, so a request QEMU took at once lies on
its issue and the rest come after it. The guest's own intervals (between two issues, an
issue and its completion) need no offset.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import polars as pl

from vtrace import schema as s
from vtrace.errors import VtraceError

GUEST_ISSUE = "block_rq_issue"
GUEST_COMPLETE = "block_rq_complete"
GUEST_IRQ_ENTRY = "irq_handler_entry"
GUEST_IRQ_EXIT = "irq_handler_exit"
SECTOR_BYTES = 512
# a block event: ... i|c RWBS SECTOR COUNT; an interrupt handler's entry or exit: ... h|x IRQ
_LINE = (
    r"^(?<secs>\d+)\.(?<frac>\d{1,9}) (?<cpu>\d+) (?:(?<kind>[ic]) (?<rwbs>[A-Z]+) "
    r"(?<sector>\d+) (?<count>\d+)|(?<irqkind>[hx]) (?<irq>\d+))$"
)
_QEMU_IO = ("virtio_blk_handle_read", "virtio_blk_handle_write")


def parse_lines(lines: Iterable[str], disk: str) -> pl.DataFrame:
    """The guest's lines (without the ``vtrace-guest: gt`` prefix) as events on the guest's
    clock (``ts_ns``); a malformed line is an error naming it. One regex over the column:
    a run prints two lines a request, and two an interrupt (its handler's entry and exit;
    ``value`` is the IRQ number)."""
    text = pl.Series("line", list(lines), dtype=pl.String).str.strip_chars()
    f = text.str.extract_groups(_LINE).struct.unnest()
    bad = f["secs"].is_null()
    if bad.any():
        n = int(bad.arg_true()[0])
        raise VtraceError(
            f"guest trace line {n + 1}: not 'SECONDS CPU i|c RWBS SECTOR COUNT' or "
            f"'SECONDS CPU h|x IRQ': {text[n]!r}"
        )
    frac = pl.col("frac").str.pad_end(9, "0").cast(pl.Int64)
    kind = pl.coalesce("kind", "irqkind")
    return f.select(
        ts_ns=pl.col("secs").cast(pl.Int64) * 1_000_000_000 + frac,
        vcpu=pl.col("cpu").cast(pl.Int32),
        event=pl.when(kind == "i")
        .then(pl.lit(GUEST_ISSUE))
        .when(kind == "c")
        .then(pl.lit(GUEST_COMPLETE))
        .when(kind == "h")
        .then(pl.lit(GUEST_IRQ_ENTRY))
        .otherwise(pl.lit(GUEST_IRQ_EXIT)),
        write=pl.col("rwbs").str.contains("W"),
        addr=pl.col("sector").cast(pl.UInt64) * SECTOR_BYTES,
        size=pl.col("count").cast(pl.Int32) * SECTOR_BYTES,
        value=pl.col("irq").cast(pl.UInt64),
    ).with_columns(
        source=pl.lit(s.SOURCE_GUEST), device=pl.lit(disk), cpu=pl.col("vcpu").cast(pl.Int16)
    )


def clock_offset(guest: pl.DataFrame, host: pl.DataFrame) -> tuple[int, dict[str, Any]]:
    """The offset that places the guest's clock on the host's, and how it was found.

    Each issued request is paired with QEMU's read or write at its byte offset, the n-th
    issue at an offset with the n-th QEMU I/O there; the offset makes the 1st percentile of
    the issue-to-QEMU lags zero."""
    issues = (
        guest.filter(pl.col("event") == GUEST_ISSUE)
        .select("ts_ns", "addr")
        .with_columns(n=pl.int_range(pl.len()).over("addr"))
    )
    io = (
        host.filter(pl.col("event").cast(pl.String).is_in(_QEMU_IO))
        .select(host_ns="ts_ns", addr="addr")
        .sort("host_ns")
        .with_columns(n=pl.int_range(pl.len()).over("addr"))
    )
    pairs = issues.join(io, on=["addr", "n"], how="inner")
    if pairs.is_empty():
        raise VtraceError(
            "guest trace: no request the guest issued matches one QEMU read or wrote "
            "(virtio_blk_handle_read/_write at the same byte offset)"
        )
    lag = (pairs["host_ns"] - pairs["ts_ns"]).to_numpy()
    offset = int(np.percentile(lag, 1))
    spread = lag - offset
    return offset, {
        "paired": pairs.height,
        "issued": issues.height,
        "clock_offset_ns": offset,
        "aligned_by": "each issue's QEMU read or write at the same offset: the 1st percentile "
        "of the issue-to-QEMU lags made zero",
        "issue_to_qemu_median_ns": int(np.median(spread)),
    }


def guest_events(
    lines: list[str], disk: str, host: pl.DataFrame, lost: int
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """The guest's block events on the host's clock, conformed to the events table, and
    the trace's ``guest_trace`` meta. A recording that lost events is refused."""
    if lost:
        raise VtraceError(
            f"the guest's trace lost {lost} events (its tracefs ring buffer filled); run "
            "with fewer --requests"
        )
    frame = parse_lines(lines, disk)
    if not frame["event"].is_in([GUEST_ISSUE, GUEST_COMPLETE]).any():
        raise VtraceError("guest trace: the guest printed no block events")
    offset, meta = clock_offset(frame, host)
    frame = frame.with_columns(pl.col("ts_ns") + offset)
    handlers = int((frame["event"] == GUEST_IRQ_ENTRY).sum())
    meta = {"recorded": True, "events": frame.height, "lost": lost, "interrupts": handlers,
            **meta}  # fmt: skip
    conformed = s.conform(frame)
    assert isinstance(conformed, pl.DataFrame)
    return conformed, meta
