"""The collector's fixed record layout and its vectorised decoding into the events table.

Records come out of the ring buffer as raw bytes; :data:`RECORD_DTYPE` is a numpy structured
view over them (ring-buffer header included), and :func:`decode_records` turns a whole batch
into an events frame with polars expressions over whole columns: no Python object per event.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from vtrace import schema as s
from vtrace.collect.formats import TRACEPOINT_SLOTS, Field, signed_slots

# Event ids shared with probes.c (passed as EV_* defines). The order is part of the record
# format; add new ids at the end.
EVENT_IDS: dict[str, int] = {
    s.KVM_EXIT: 0,
    s.KVM_ENTRY: 1,
    s.KVM_PIO: 2,
    s.KVM_MMIO: 3,
    s.KVM_FAST_MMIO: 4,
    s.KVM_USERSPACE_EXIT: 5,
    s.KVM_SET_IRQ: 6,
    s.KVM_MSI_SET_IRQ: 7,
    s.KVM_INJ_VIRQ: 8,
    s.IOEVENTFD_WRITE: 9,
    s.IRQFD_WAKEUP: 10,
    "handle_tx_kick": 11,
    "handle_rx_kick": 12,
    s.VIRTIO_QUEUE_NOTIFY: 13,
    s.VIRTQUEUE_POP: 14,
    s.VIRTQUEUE_FLUSH: 15,
    s.VIRTIO_NOTIFY: 16,
    s.VIRTIO_NOTIFY_IRQFD: 17,
}
# The C names of the handlers (on_<NAME>) and of their EV_* defines.
C_NAMES: dict[str, str] = {
    name: (
        "VHOST_TX_KICK"
        if name == "handle_tx_kick"
        else "VHOST_RX_KICK"
        if name == "handle_rx_kick"
        else name.upper()
    )
    for name in EVENT_IDS
}
EVENT_SOURCES: dict[str, str] = {
    name: s.SOURCE_KVM if i <= 8 else s.SOURCE_KPROBE if i <= 12 else s.SOURCE_QEMU
    for name, i in EVENT_IDS.items()
}

# Ring-buffer record: the kernel's 8-byte header (length with BUSY/DISCARD bits, page
# offset), then probes.c's struct rec (64 bytes). Every record has this size.
RECORD_DTYPE = np.dtype(
    [
        ("hdr_len", "<u4"),
        ("hdr_pgoff", "<u4"),
        ("ts_ns", "<u8"),
        ("pid", "<u4"),
        ("tid", "<u4"),
        ("cpu", "<u2"),
        ("event", "u1"),
        ("pad", "u1"),
        ("vcpu", "<i4"),
        ("a", "<u8", (5,)),
    ]
)
PAYLOAD_BYTES = RECORD_DTYPE.itemsize - 8  # what probes.c reserves: sizeof(struct rec)
RINGBUF_BUSY_BIT = 1 << 31
RINGBUF_DISCARD_BIT = 1 << 30


def _sign_extend(values: np.ndarray, size_bytes: int) -> np.ndarray:
    shift = 64 - 8 * size_bytes
    return (values.astype(np.int64) << shift) >> shift


def raw_frame(records: np.ndarray, signed: dict[str, dict[int, int]]) -> pl.DataFrame:
    """Records -> a frame of raw columns (ev, ts, pid, tid, cpu, vcpu, a0..a4 and signed s1, s2)."""
    ev = records["event"]
    slots = records["a"]
    cols: dict[str, np.ndarray] = {
        "ev": ev,
        "ts_ns": records["ts_ns"].astype(np.int64),
        "pid": records["pid"].astype(np.int32),
        "tid": records["tid"].astype(np.int32),
        "cpu": records["cpu"].astype(np.int16),
        "vcpu_raw": records["vcpu"],
    }
    for i in range(5):
        cols[f"a{i}"] = np.ascontiguousarray(slots[:, i])
    # Signed fields (errno, IRQ level, source id), sign-extended from the width the kernel's
    # format file gives; other events keep their raw slot.
    for i in (1, 2):
        col = slots[:, i].astype(np.int64)
        for event, sizes in signed.items():
            if i in sizes:
                rows = np.flatnonzero(ev == EVENT_IDS[event])
                if len(rows):
                    col[rows] = _sign_extend(col[rows], sizes[i])
        cols[f"s{i}"] = col
    return pl.DataFrame(cols)


def signed_fields(formats: dict[str, dict[str, Field]]) -> dict[str, dict[int, int]]:
    """Per tracepoint: slot -> size of its signed fields, from the host's format files."""
    return {ev: signed_slots(ev, f) for ev, f in formats.items() if ev in TRACEPOINT_SLOTS}


def decode_frame(raw: pl.DataFrame, tables: s.ReasonTables) -> pl.DataFrame:
    """Raw columns -> the events table."""
    ev = pl.col("ev")
    a = [pl.col(f"a{i}") for i in range(5)]

    def on(name: str) -> pl.Expr:
        return ev == EVENT_IDS[name]

    reason, flags, reason_name, isa = (
        e.alias("x") for e in s.decode_exit_reason(a[0], a[1], tables)
    )
    errno = pl.col("s1")
    user_name = (
        pl.when(errno == 0)
        .then(s.userspace_reason_name(a[0], tables).cast(pl.String))
        .when(errno == -4)
        .then(pl.lit("restart"))
        .otherwise(pl.lit("error"))
    )
    names = list(EVENT_IDS)
    ids = list(EVENT_IDS.values())
    return raw.select(
        pl.col("ts_ns"),
        ev.replace_strict(ids, [EVENT_SOURCES[n] for n in names], return_dtype=pl.String)
        .cast(pl.Categorical)
        .alias("source"),
        ev.replace_strict(ids, names, return_dtype=pl.String).cast(pl.Categorical).alias("event"),
        pl.col("pid"),
        pl.col("tid"),
        pl.col("cpu"),
        pl.when(pl.col("vcpu_raw") >= 0).then(pl.col("vcpu_raw")).alias("vcpu"),
        pl.when(on(s.KVM_EXIT))
        .then(reason)
        .when(on(s.KVM_USERSPACE_EXIT))
        .then(a[0].cast(pl.Int64))
        .alias("reason"),
        pl.when(on(s.KVM_EXIT))
        .then(reason_name.cast(pl.String))
        .when(on(s.KVM_USERSPACE_EXIT))
        .then(user_name)
        .cast(pl.Categorical)
        .alias("reason_name"),
        pl.when(on(s.KVM_EXIT)).then(isa.cast(pl.String)).cast(pl.Categorical).alias("isa"),
        pl.when(on(s.KVM_EXIT))
        .then(flags)
        .when(on(s.KVM_USERSPACE_EXIT))
        .then(errno)  # 0, or -errno of a KVM_RUN that failed or was interrupted
        .when(on(s.KVM_SET_IRQ))
        .then(pl.col("s2"))  # irq_source_id
        .when(on(s.KVM_INJ_VIRQ))
        .then((a[1] + a[2] * 2).cast(pl.Int64))  # soft | reinjected << 1
        .when(on(s.KVM_ENTRY))
        .then(a[1].cast(pl.Int64))  # immediate_exit
        .alias("flags"),
        pl.when(on(s.KVM_PIO))
        .then(a[1])  # port
        .when(on(s.KVM_MMIO))
        .then(a[2])  # gpa
        .when(on(s.KVM_FAST_MMIO) | on(s.KVM_SET_IRQ) | on(s.KVM_MSI_SET_IRQ))
        .then(a[0])  # gpa, gsi, MSI address
        .alias("addr"),
        pl.when(on(s.KVM_PIO))
        .then(a[2])
        .when(on(s.KVM_MMIO))
        .then(a[1])
        .cast(pl.Int32)
        .alias("size"),
        pl.when(on(s.KVM_PIO))
        .then(a[0] != 0)
        .when(on(s.KVM_MMIO))
        .then(a[0] == 2)  # KVM_TRACE_MMIO_WRITE
        .alias("write"),
        pl.when(on(s.KVM_PIO))
        .then(a[4])
        .when(on(s.KVM_MMIO))
        .then(a[3])
        .when(on(s.KVM_SET_IRQ))
        .then(pl.col("s1").cast(pl.UInt64, strict=False))  # level
        .when(on(s.KVM_MSI_SET_IRQ))
        .then(a[1])  # MSI data
        .when(on(s.KVM_INJ_VIRQ))
        .then(a[0])  # vector
        .alias("value"),
        pl.when(on(s.KVM_PIO)).then(a[3]).cast(pl.Int32).alias("count"),
        pl.lit(None, pl.Int32).alias("queue"),
        pl.lit(None, pl.Categorical).alias("device"),
        pl.when(on(s.KVM_EXIT)).then(a[2]).when(on(s.KVM_ENTRY)).then(a[0]).alias("rip"),
        pl.lit(None, pl.String).alias("raw"),
    ).select(pl.col(c).cast(t) for c, t in s.EVENTS_SCHEMA.items())


def decode_records(
    records: np.ndarray, tables: s.ReasonTables, signed: dict[str, dict[int, int]]
) -> pl.DataFrame:
    """A batch of ring-buffer records -> an events frame (in record order)."""
    if len(records) == 0:
        return s.empty_events()
    return decode_frame(raw_frame(records, signed), tables)
