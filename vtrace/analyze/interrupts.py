"""Interrupts: a device's completion reaching the guest.

Where each source records one (column use as the importers and the collector write it):

=====================  =========================================================
kvm_set_irq            `gsi` = addr, `level` = value (an edge is 1 then 0)
kvm_msi_set_irq        `msi_address` = addr, `vector` = data & 0xff (value)
kvm_inj_virq           `vector` = value: KVM injecting the interrupt into a vCPU
virtio_notify(_irqfd)  QEMU's virtio core notifying the guest: `device`, `queue`
ioapic_set_irq (qemu)  QEMU's IOAPIC (emulated devices under TCG or a user-space irqchip):
                       `gsi` = the pin QEMU prints as "vector", `level`, read from `raw`
lab_* (source=lab)     none yet; the lab's interrupts are seen through kvm_set_irq
=====================  =========================================================
"""

from __future__ import annotations

import polars as pl

from vtrace.analyze.requires import requires_events
from vtrace.schema import (
    KVM_INJ_VIRQ,
    KVM_MSI_SET_IRQ,
    KVM_SET_IRQ,
    SOURCE_QEMU,
    VIRTIO_NOTIFY,
    VIRTIO_NOTIFY_IRQFD,
)

QEMU_IOAPIC_SET_IRQ = "ioapic_set_irq"
INTERRUPT_EVENTS = (
    KVM_SET_IRQ,
    KVM_MSI_SET_IRQ,
    KVM_INJ_VIRQ,
    VIRTIO_NOTIFY,
    VIRTIO_NOTIFY_IRQFD,
    QEMU_IOAPIC_SET_IRQ,
)


def raw_int(pattern: str) -> pl.Expr:
    """The first group of ``pattern`` in the `raw` text, as an integer (null when absent)."""
    return pl.col("raw").str.extract(pattern, 1).cast(pl.Int64, strict=False)


@requires_events(*INTERRUPT_EVENTS)
def interrupts_plan(events: pl.LazyFrame) -> pl.LazyFrame:
    """The lazy plan of :func:`interrupts`."""
    ev = pl.col("event")
    ioapic = (ev == QEMU_IOAPIC_SET_IRQ) & (pl.col("source") == SOURCE_QEMU)
    return (
        events.lazy()
        .filter(ev.is_in(INTERRUPT_EVENTS))
        .select(
            "ts_ns",
            "source",
            "event",
            "pid",
            "tid",
            "cpu",
            "vcpu",
            "device",
            "queue",
            pl.when(ev == KVM_SET_IRQ)
            .then(pl.col("addr").cast(pl.Int64))
            .when(ioapic)
            .then(pl.coalesce(pl.col("addr").cast(pl.Int64), raw_int(r"vector: (\d+)")))
            .alias("gsi"),
            pl.when(ev == KVM_SET_IRQ)
            .then(pl.col("value").cast(pl.Int64))
            .when(ioapic)
            .then(pl.coalesce(pl.col("value").cast(pl.Int64), raw_int(r"level: (-?\d+)")))
            .alias("level"),
            pl.when(ev == KVM_MSI_SET_IRQ)
            .then(pl.col("value") & 0xFF)
            .when(ev == KVM_INJ_VIRQ)
            .then(pl.col("value"))
            .cast(pl.Int64)
            .alias("vector"),
            pl.when(ev == KVM_MSI_SET_IRQ).then(pl.col("addr")).alias("msi_address"),
        )
    )


def interrupts(events: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """One row per interrupt event. Columns: `ts_ns`, `source`, `event`, `pid`, `tid`,
    `cpu`, `vcpu`, `device`, `queue`, `gsi`, `level`, `vector`, `msi_address`."""
    return interrupts_plan(events.lazy()).collect()


LINE_KEYS = ("source", "event", "device", "queue", "gsi", "vector")


def interrupt_counts(frame: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """`count` and `raised` per line (:data:`LINE_KEYS`): what :func:`interrupts_by_line` is
    made of, and what the counts of several chunks of a trace merge into
    (:func:`interrupts_by_line_from_counts`)."""
    return (
        frame.lazy()
        .group_by(LINE_KEYS)
        .agg(
            pl.len().cast(pl.Int64).alias("count"),
            (pl.col("level") == 1).sum().cast(pl.Int64).alias("raised"),
        )
    )


def interrupts_by_line_from_counts(counts: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """:func:`interrupts_by_line` from one or more :func:`interrupt_counts` stacked."""
    return (
        counts.lazy()
        .group_by(LINE_KEYS)
        .agg(pl.col("count", "raised").sum())
        .with_columns(pl.col("source", "event", "device").cast(pl.String))
        # Every key breaks ties: the order never depends on the order rows came in.
        .sort(["count", *LINE_KEYS], descending=[True] + [False] * len(LINE_KEYS))
    )


def interrupts_by_line_plan(frame: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """The lazy plan of :func:`interrupts_by_line`."""
    return interrupts_by_line_from_counts(interrupt_counts(frame))


def interrupts_by_line(frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame:
    """Interrupts per (source, event, device, queue, gsi, vector): `count`, and `raised`
    (kvm_set_irq or ioapic_set_irq with level 1; an edge-triggered line is raised then lowered, so `raised`
    counts interrupts where `count` counts both halves). Sorted by `count` descending."""
    return interrupts_by_line_plan(frame).collect()
