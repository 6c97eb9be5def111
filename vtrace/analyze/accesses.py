"""Device register accesses (PIO and MMIO) and where each was handled.

KVM traces the accesses it decodes: `kvm_pio`, `kvm_mmio`, `kvm_fast_mmio`. Where the
access went is read off the events that follow it on the same thread (the kernel's own
order, see arch/x86/kvm/x86.c):

* a write (`out`, MMIO store) is traced *before* KVM tries in-kernel devices; when none
  claims it, a `kvm_userspace_exit` (KVM_EXIT_IO / KVM_EXIT_MMIO) follows: user space.
  With no such exit it was handled in the kernel (an in-kernel device or an ioeventfd).
* a PIO read (`in`) handled in user space is traced only when it *completes*, right after
  the `kvm_userspace_exit` (KVM_EXIT_IO) on re-entry; a read with no such exit just before
  it was answered in the kernel.
* an MMIO read that goes to user space is traced twice: `unsatisfied-read` before the
  KVM_EXIT_MMIO, then `read` with the value on re-entry. The first is the access (user
  space); the second is its completion and is not counted again.
* `kvm_fast_mmio` is an ioeventfd write that never left the kernel.

A `kvm_userspace_exit` (KVM_EXIT_IO) directly followed by a PIO read belongs to that read.
With neither `kvm_exit` nor `kvm_entry` in the trace, an in-kernel `in` straight after a
user-space `out` therefore reads as a user-space `in`; with them the order is exact.

QEMU's `memory_region_ops_read/write` are accesses QEMU emulated (user space); their
`device` is the memory region's name and `addr` the offset in it.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from vtrace.analyze.exits import HANDLED
from vtrace.analyze.requires import requires_events
from vtrace.analyze.timeline import kvm_timeline
from vtrace.schema import (
    KVM_FAST_MMIO,
    KVM_MMIO,
    KVM_PIO,
    KVM_USERSPACE_EXIT,
    MEMORY_REGION_OPS_READ,
    MEMORY_REGION_OPS_WRITE,
    SOURCE_QEMU,
)

# KVM_EXIT_* codes (include/uapi/linux/kvm.h) that carry an access to user space.
KVM_EXIT_IO = 2
KVM_EXIT_MMIO = 6

ACCESS_COLUMNS = (
    "ts_ns", "source", "event", "pid", "tid", "cpu", "vcpu", "device", "addr", "size",
    "write", "value", "count", "queue", "rip", "handled",
)  # fmt: skip


def kvm_accesses_from_timeline(t: pl.LazyFrame, keep: Sequence[str] = ()) -> pl.LazyFrame:
    """The KVM rows of :func:`accesses` from a :func:`~vtrace.analyze.timeline.kvm_timeline`
    (plus its columns named in ``keep``)."""
    same2_prev = pl.col("tid").shift(2) == pl.col("tid")
    same2_next = pl.col("tid").shift(-2) == pl.col("tid")
    t = t.with_columns(
        pl.when(same2_prev).then(pl.col("event").shift(2)).alias("prev2_event"),
        pl.when(same2_prev).then(pl.col("write").shift(2)).alias("prev2_write"),
        pl.when(same2_prev).then(pl.col("addr").shift(2)).alias("prev2_addr"),
        pl.when(same2_next).then(pl.col("event").shift(-2)).alias("next2_event"),
        pl.when(same2_next).then(pl.col("write").shift(-2)).alias("next2_write"),
    )
    ev, write = pl.col("event"), pl.col("write").fill_null(False)
    is_pio, is_mmio = ev == KVM_PIO, ev == KVM_MMIO
    io_reason = pl.when(is_pio).then(KVM_EXIT_IO).otherwise(KVM_EXIT_MMIO)
    next_user = (pl.col("next_event") == KVM_USERSPACE_EXIT) & (pl.col("next_reason") == io_reason)
    prev_user = (pl.col("prev_event") == KVM_USERSPACE_EXIT) & (pl.col("prev_reason") == io_reason)
    # An `in` exits before it is traced: when a PIO read completes right after the user-space
    # exit that follows a PIO write, the exit was the read's and the write stayed in the kernel.
    next_claimed_by_read = (
        (pl.col("next2_event") == KVM_PIO) & ~pl.col("next2_write").fill_null(False)
    ).fill_null(False)
    mmio_completion = (
        is_mmio
        & ~write
        & prev_user
        & (pl.col("prev2_event") == KVM_MMIO)
        & ~pl.col("prev2_write").fill_null(False)
        & (pl.col("prev2_addr") == pl.col("addr"))
    )
    next_user, prev_user = next_user.fill_null(False), prev_user.fill_null(False)
    mmio_completion = mmio_completion.fill_null(False)
    user = (
        pl.when(ev == KVM_FAST_MMIO)
        .then(False)
        .when(is_pio & write)
        .then(next_user & ~next_claimed_by_read)
        .when(is_pio)
        .then(prev_user)
        .otherwise(next_user)  # MMIO: writes and unsatisfied reads precede their exit
    )
    return (
        t.filter(ev.is_in([KVM_PIO, KVM_MMIO, KVM_FAST_MMIO]) & ~mmio_completion)
        .with_columns(
            pl.lit("kvm").cast(pl.Categorical).alias("source"),
            pl.col("event").cast(pl.String).cast(pl.Categorical),
            pl.when(user)
            .then(pl.lit("user", HANDLED))
            .otherwise(pl.lit("kernel", HANDLED))
            .alias("handled"),
            # kvm_fast_mmio is always a write; it has no direction field.
            pl.when(ev == KVM_FAST_MMIO).then(True).otherwise(pl.col("write")).alias("write"),
        )
        .select(*ACCESS_COLUMNS, *keep)
    )


def qemu_accesses(events: pl.LazyFrame) -> pl.LazyFrame:
    """The QEMU rows of :func:`accesses` (`memory_region_ops_read/write`)."""
    return (
        events.filter(
            (pl.col("source") == SOURCE_QEMU)
            & pl.col("event").is_in([MEMORY_REGION_OPS_READ, MEMORY_REGION_OPS_WRITE])
        )
        .with_columns(
            pl.coalesce(pl.col("write"), pl.col("event") == MEMORY_REGION_OPS_WRITE).alias("write"),
            pl.lit("user", HANDLED).alias("handled"),
        )
        .select(ACCESS_COLUMNS)
    )


@requires_events(KVM_PIO, KVM_MMIO, KVM_FAST_MMIO, MEMORY_REGION_OPS_READ, MEMORY_REGION_OPS_WRITE)
def accesses_plan(events: pl.LazyFrame) -> pl.LazyFrame:
    """The lazy plan of :func:`accesses`."""
    events = events.lazy()
    return pl.concat(
        [kvm_accesses_from_timeline(kvm_timeline(events)), qemu_accesses(events)], how="vertical"
    )


def accesses(events: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """One row per device register access, with where it was handled.

    Columns: `ts_ns`, `source` (kvm or qemu), `event`, `pid`, `tid`, `cpu`, `vcpu`,
    `device`, `addr` (port, guest-physical address, or region offset), `size` (bytes),
    `write`, `value`, `count` (rep count), `rip`, `handled` ("kernel" or "user"). KVM rows
    are sorted by (tid, ts_ns), then QEMU rows in trace order.
    """
    return accesses_plan(events.lazy()).collect()


ACCESS_KEYS = ("source", "event", "device", "addr")


def access_counts(frame: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """Accesses, reads, writes, in user space and in the kernel per target
    (:data:`ACCESS_KEYS`): what :func:`accesses_by_target` is made of, and what the counts of
    several chunks of a trace merge into (:func:`accesses_by_target_from_counts`)."""
    return (
        frame.lazy()
        .group_by(ACCESS_KEYS)
        .agg(
            pl.len().cast(pl.Int64).alias("count"),
            (~pl.col("write")).sum().cast(pl.Int64).alias("reads"),
            pl.col("write").sum().cast(pl.Int64).alias("writes"),
            (pl.col("handled") == "user").sum().cast(pl.Int64).alias("user"),
            (pl.col("handled") == "kernel").sum().cast(pl.Int64).alias("kernel"),
        )
    )


def accesses_by_target_from_counts(counts: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """:func:`accesses_by_target` from one or more :func:`access_counts` stacked."""
    return (
        counts.lazy()
        .group_by(ACCESS_KEYS)
        .agg(pl.col("count", "reads", "writes", "user", "kernel").sum())
        .with_columns(
            pl.col("source", "event", "device").cast(pl.String),
            (pl.col("user") / pl.col("count")).alias("user_share"),
        )
        # Every key breaks ties: the order never depends on the order rows came in.
        .sort(["count", "source", "event", "addr", "device"], descending=[True] + [False] * 4)
    )


def accesses_by_target_plan(frame: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """The lazy plan of :func:`accesses_by_target`."""
    return accesses_by_target_from_counts(access_counts(frame))


def accesses_by_target(frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """Accesses per (source, event, device, addr): counts of reads, writes, in user space.

    Columns: `source`, `event`, `device`, `addr`, `count`, `reads`, `writes`,
    `user`, `kernel`, `user_share`; sorted by `count` descending.
    """
    return accesses_by_target_plan(frame).collect()
