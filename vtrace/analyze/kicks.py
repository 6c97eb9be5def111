"""Kicks: the guest telling a device that new requests are in a virtqueue.

Three views of the same act, by where it was seen:

* `kvm`: a notify write KVM handled in the kernel, i.e. claimed by an ioeventfd:
  `kvm_fast_mmio`, or a `kvm_pio`/`kvm_mmio` write with no user-space exit after it (see
  :mod:`vtrace.analyze.accesses`). Writes to the devices KVM itself emulates (the legacy
  PIC, PIT and ELCR ports, the local APIC and IOAPIC pages) are in-kernel accesses, not
  kicks, and are left out.
* `lab`: `lab_kick`, the lab VMM's back end seeing a notification.
* `qemu`: `virtio_queue_notify`, QEMU's virtio core handling one.

A kick through an ioeventfd can appear twice when KVM and QEMU events are merged in one
trace (once per source); group by `source` to count each view once.
"""

from __future__ import annotations

import polars as pl

from vtrace.analyze.accesses import accesses_plan
from vtrace.analyze.requires import requires_events
from vtrace.schema import (
    KVM_FAST_MMIO,
    KVM_MMIO,
    KVM_PIO,
    LAB_KICK,
    SOURCE_LAB,
    SOURCE_QEMU,
    VIRTIO_QUEUE_NOTIFY,
)

# Devices inside KVM (arch/x86/kvm: i8259.c, i8254.c, lapic.c, ioapic.c): their writes
# stay in the kernel without being kicks. Inclusive (first, last) ranges.
IN_KERNEL_DEVICE_PORTS = (
    (0x20, 0x21),  # PIC master
    (0x40, 0x43),  # PIT
    (0x61, 0x61),  # PIT channel 2 gate / speaker
    (0xA0, 0xA1),  # PIC slave
    (0x4D0, 0x4D1),  # ELCR
)
IN_KERNEL_DEVICE_GPAS = (
    (0xFEC00000, 0xFEC00FFF),  # IOAPIC
    (0xFEE00000, 0xFEEFFFFF),  # local APIC
)

KICK_COLUMNS = (
    "ts_ns",
    "source",
    "event",
    "pid",
    "tid",
    "vcpu",
    "device",
    "queue",
    "addr",
    "value",
    "count",
)


def _in_ranges(ranges: tuple[tuple[int, int], ...]) -> pl.Expr:
    inside = pl.lit(False)
    for lo, hi in ranges:
        inside = inside | pl.col("addr").is_between(lo, hi)
    return inside


@requires_events(KVM_FAST_MMIO, KVM_PIO, KVM_MMIO, LAB_KICK, VIRTIO_QUEUE_NOTIFY)
def kicks_plan(events: pl.LazyFrame) -> pl.LazyFrame:
    """The lazy plan of :func:`kicks`."""
    events = events.lazy()
    return kicks_from_accesses(accesses_plan(events), events)


def kicks_from_accesses(access: pl.LazyFrame, events: pl.LazyFrame) -> pl.LazyFrame:
    """:func:`kicks` from :func:`~vtrace.analyze.accesses.accesses` (KVM kicks) and the
    events (lab and QEMU kicks)."""
    return pl.concat([kvm_kicks(access), vmm_kicks(events)], how="vertical")


def is_kvm_kick() -> pl.Expr:
    """Over :func:`~vtrace.analyze.accesses.accesses` rows: a write KVM handled in the
    kernel to no device of its own, i.e. an ioeventfd's (every `kvm_fast_mmio`)."""
    ev = pl.col("event")
    in_kernel_device = (
        pl.when(ev == KVM_PIO)
        .then(_in_ranges(IN_KERNEL_DEVICE_PORTS))
        .when(ev == KVM_MMIO)
        .then(_in_ranges(IN_KERNEL_DEVICE_GPAS))
        .otherwise(False)
    )
    return (pl.col("handled") == "kernel") & pl.col("write") & ~in_kernel_device


def kvm_kicks(access: pl.LazyFrame) -> pl.LazyFrame:
    """The `kvm` rows of :func:`kicks`: notify writes KVM handled in the kernel."""
    return access.filter((pl.col("source") == "kvm") & is_kvm_kick()).select(KICK_COLUMNS)


def vmm_kicks(events: pl.LazyFrame) -> pl.LazyFrame:
    """The `lab` and `qemu` rows of :func:`kicks`: the back ends seeing a notification."""
    ev = pl.col("event")
    return events.filter(
        ((pl.col("source") == SOURCE_LAB) & (ev == LAB_KICK))
        | ((pl.col("source") == SOURCE_QEMU) & (ev == VIRTIO_QUEUE_NOTIFY))
    ).select(KICK_COLUMNS)


def kicks(events: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """One row per kick. Columns: `ts_ns`, `source`, `event`, `pid`, `tid`, `vcpu`,
    `device`, `queue`, `addr` (notify port or address for `kvm` kicks), `value` (the value
    written: the queue index for virtio-pci notify writes), `count` (rep count of a PIO
    write; kicks merged into a `lab_kick` wake-up)."""
    return kicks_plan(events.lazy()).collect()


KICK_KEYS = ("source", "event", "device", "queue", "addr")


def kick_counts(frame: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """Kicks, rows, first and last timestamp per queue (:data:`KICK_KEYS`): what
    :func:`kicks_by_queue` is made of, and what the counts of several chunks of a trace
    merge into (:func:`kicks_by_queue_from_counts`)."""
    return (
        frame.lazy()
        .group_by(KICK_KEYS)
        .agg(
            pl.col("count").fill_null(1).cast(pl.Int64).sum().alias("kicks"),
            pl.len().cast(pl.Int64).alias("events"),
            pl.col("ts_ns").min().alias("first_ts_ns"),
            pl.col("ts_ns").max().alias("last_ts_ns"),
        )
    )


def kicks_by_queue_from_counts(counts: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """:func:`kicks_by_queue` from one or more :func:`kick_counts` stacked."""
    span_s = (pl.col("last_ts_ns") - pl.col("first_ts_ns")) / 1e9
    return (
        counts.lazy()
        .group_by(KICK_KEYS)
        .agg(
            pl.col("kicks", "events").sum(),
            pl.col("first_ts_ns").min(),
            pl.col("last_ts_ns").max(),
        )
        .with_columns(
            pl.when(span_s > 0).then(pl.col("kicks") / span_s).alias("rate_per_s"),
            pl.col("source", "event", "device").cast(pl.String),
        )
        # Every key breaks ties: the order never depends on the order rows came in.
        .sort(
            ["kicks", "source", "device", "queue", "addr", "event"],
            descending=[True] + [False] * 5,
        )
    )


def kicks_by_queue_plan(frame: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """The lazy plan of :func:`kicks_by_queue`."""
    return kicks_by_queue_from_counts(kick_counts(frame))


def kicks_by_queue(frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """Kicks per (source, event, device, queue, addr).

    Columns: the keys, `kicks` (notify writes: a row's `count`, 1 when null; a `lab_kick`
    row counts the kicks merged into one wake-up of the back end, a `rep outs` its
    repeats), `events` (rows), `first_ts_ns`, `last_ts_ns`, `rate_per_s` (kicks over the
    span from first to last). Sorted by `kicks`, most first.
    """
    return kicks_by_queue_plan(frame).collect()
