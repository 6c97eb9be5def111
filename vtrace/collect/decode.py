"""The collector's fixed record layout and its vectorised decoding into the events table.

Records come out of the ring buffer as raw bytes; :data:`RECORD_DTYPE` is a numpy structured
view over them (ring-buffer header included). The collector drains them transposed, one row
per 64-bit word (:func:`record_words` does the same for record arrays), and
:func:`decode_words` turns a whole batch into an Arrow table in the events schema with numpy
over whole columns: no Python object per event, no string per row (categorical columns are
integer codes into small dictionaries), no copy between numpy and Arrow.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pyarrow as pa

from vtrace import schema as s
from vtrace.collect.formats import TRACEPOINT_SLOTS, Field, signed_slots
from vtrace.errors import VtraceError
from vtrace.store import EVENTS_ARROW_SCHEMA

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


def signed_fields(formats: dict[str, dict[str, Field]]) -> dict[str, dict[int, int]]:
    """Per tracepoint: slot -> size of its signed fields, from the host's format files."""
    return {ev: signed_slots(ev, f) for ev, f in formats.items() if ev in TRACEPOINT_SLOTS}


_EVENT_NAMES = list(EVENT_IDS)
_SOURCE_NAMES = list(dict.fromkeys(EVENT_SOURCES.values()))
# The events with fields to decode (kprobe and USDT events have none).
_TRACEPOINTS = [name for name in _EVENT_NAMES if EVENT_SOURCES[name] == s.SOURCE_KVM]
# Event id -> index of its source in _SOURCE_NAMES.
_SOURCE_CODE = np.array([_SOURCE_NAMES.index(EVENT_SOURCES[n]) for n in _EVENT_NAMES], np.uint32)


class _Names:
    """Code -> name tables as sorted numpy keys with indices into a dictionary of names
    (one for reason names, one for isa): categorical columns are built from these integer
    indices, never from a string per row."""

    def __init__(self, tables: s.ReasonTables) -> None:
        self.tables = tables
        names: dict[str, int] = {}
        self.lookups: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for key, table in (
            ("vmx", tables.vmx),
            ("svm", tables.svm),
            ("userspace", tables.userspace),
        ):
            codes = np.array(sorted(table), np.int64)
            idx = np.array([names.setdefault(table[c], len(names)) for c in codes], np.uint32)
            self.lookups[key] = (codes, idx)
        self.restart = names.setdefault("restart", len(names))
        self.error = names.setdefault("error", len(names))
        self.dictionary = pa.array(list(names), pa.large_string())
        isa = sorted(s.ISA_NAMES)
        self.lookups["isa"] = (np.array(isa, np.int64), np.arange(len(isa), dtype=np.uint32))
        self.isa_dictionary = pa.array([s.ISA_NAMES[c] for c in isa], pa.large_string())

    def lookup(self, key: str, codes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Codes -> (name index, found); unknown codes are not found (null names)."""
        keys, idx = self.lookups[key]
        if len(keys) == 0:
            return np.zeros(len(codes), np.uint32), np.zeros(len(codes), bool)
        pos = np.minimum(np.searchsorted(keys, codes), len(keys) - 1)
        return idx[pos], keys[pos] == codes


_names_cache: list[_Names] = []


def _names(tables: s.ReasonTables) -> _Names:
    # One recording decodes every batch with the same tables: build the lookups once.
    if not _names_cache or _names_cache[0].tables is not tables:
        _names_cache[:] = [_Names(tables)]
    return _names_cache[0]


_null_columns: dict[pa.DataType, pa.Array] = {}


def _nulls(typ: pa.DataType, n: int) -> pa.Array:
    """An all-null column: a slice of one kept per type, so that the columns an event does
    not fill cost no new memory in each batch."""
    have = _null_columns.get(typ)
    if have is None or len(have) < n:
        size = n if have is None else max(n, 2 * len(have))
        have = _null_columns[typ] = pa.nulls(size, typ)
    return have.slice(0, n)


def _column(typ: pa.DataType, values: np.ndarray, valid: np.ndarray | None) -> pa.Array:
    """A numpy column (already of ``typ``'s width) -> Arrow, nulls where not ``valid``."""
    n = len(values)
    if valid is None or valid.all():
        return pa.Array.from_buffers(typ, n, [None, pa.py_buffer(values)])
    if not valid.any():
        return _nulls(typ, n)
    bitmap = pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(typ, n, [bitmap, pa.py_buffer(values)])


def _bool_column(values: np.ndarray, valid: np.ndarray) -> pa.Array:
    if not valid.any():
        return _nulls(pa.bool_(), len(values))
    bits = pa.py_buffer(np.packbits(values & valid, bitorder="little"))
    bitmap = None if valid.all() else pa.py_buffer(np.packbits(valid, bitorder="little"))
    return pa.Array.from_buffers(pa.bool_(), len(values), [bitmap, bits])


def _categorical(codes: np.ndarray, valid: np.ndarray | None, dictionary: pa.Array) -> pa.Array:
    indices = _column(pa.uint32(), codes.astype(np.uint32, copy=False), valid)
    return pa.DictionaryArray.from_arrays(indices, dictionary)


# The record after the ring-buffer header as 8 little-endian 64-bit words: ts_ns,
# pid | tid << 32, cpu | event << 16 | pad << 24 | vcpu << 32, then a[0..4].
RECORD_WORDS = (RECORD_DTYPE.itemsize - 8) // 8


def record_words(batches: list[np.ndarray]) -> np.ndarray:
    """Record batches -> their words as rows (shape 8 x records), in one transposing copy:
    every column after that is a contiguous row instead of a strided pass over records."""
    n = sum(len(b) for b in batches)
    out = np.empty((RECORD_WORDS, n), np.uint64)
    start = 0
    for b in batches:
        words = b.view(np.uint64).reshape(len(b), RECORD_WORDS + 1)
        out[:, start : start + len(b)] = words[:, 1:].T
        start += len(b)
    return out


def decode_table(
    batches: np.ndarray | list[np.ndarray],
    tables: s.ReasonTables,
    signed: dict[str, dict[int, int]],
) -> pa.Table:
    """Batches of ring-buffer records -> an Arrow table in the events schema (record order)."""
    if isinstance(batches, np.ndarray):
        batches = [batches]
    return decode_words(record_words(batches), tables, signed)


def decode_words(
    words: np.ndarray, tables: s.ReasonTables, signed: dict[str, dict[int, int]]
) -> pa.Table:
    """Records as word rows (:func:`record_words`, or drained so from the ring buffer) -> an
    Arrow table in the events schema, in record order.

    Every column is computed with numpy over the whole batch and handed to Arrow without a
    copy (the table may share memory with ``words``); an event only touches the columns it
    fills.
    """
    if words.shape[1] == 0:
        return EVENTS_ARROW_SCHEMA.empty_table()
    ts_ns, who, where = words[0], words[1], words[2]
    # Narrow fields are read in place from their words (little-endian), without a shifted
    # 64-bit temporary per field.
    ev = np.ascontiguousarray(where.view(np.uint8)[2::8])
    if int(ev.max()) >= len(_EVENT_NAMES):
        raise VtraceError(
            f"record with unknown event id {int(ev.max())}: probes.c and decode.py disagree"
        )
    n = len(ev)
    a = list(words[3:])
    counts = np.bincount(ev, minlength=len(_EVENT_NAMES))
    absent = np.zeros(n, bool)
    is_ = {
        name: ev == EVENT_IDS[name] if counts[EVENT_IDS[name]] else absent for name in _TRACEPOINTS
    }
    present = {name for name in is_ if counts[EVENT_IDS[name]]}

    def slot_signed(i: int) -> np.ndarray:
        # Signed fields (errno, IRQ level, source id) sign-extended from the width in the
        # kernel's format file; other events keep their raw slot.
        col = a[i].view(np.int64).copy()
        for event, sizes in signed.items():
            if i in sizes and event in present:
                rows = is_[event]
                col[rows] = _sign_extend(col[rows], sizes[i])
        return col

    def on(*events: str) -> np.ndarray | None:
        """Rows of these events; None when the batch has none (the common case)."""
        rows = [is_[e] for e in events if e in present]
        return None if not rows else rows[0] if len(rows) == 1 else np.logical_or.reduce(rows)

    def pick(dtype: type, *cases: tuple[np.ndarray | None, np.ndarray]) -> pa.Array:
        """Per case, its rows take its values; every other row is null."""
        typ = pa.from_numpy_dtype(dtype)
        cases = tuple((rows, values) for rows, values in cases if rows is not None)
        if not cases:
            return _nulls(typ, n)
        if len(cases) == 1 and cases[0][0].all():
            # The case covers every row (one event in the whole batch, as in a busy loop):
            # its values are the column as they are.
            return _column(typ, np.ascontiguousarray(cases[0][1], dtype), None)
        out = np.zeros(n, dtype)
        valid = np.zeros(n, bool)
        for rows, values in cases:
            np.copyto(out, values, where=rows, casting="unsafe")
            valid |= rows
        return _column(typ, out, valid)

    names = _names(tables)
    exit_rows = is_[s.KVM_EXIT]
    user_rows = is_[s.KVM_USERSPACE_EXIT]
    zeros = np.zeros(n, np.int64)
    reason = flags = s1 = s2 = zeros
    name_idx = np.zeros(n, np.uint32)
    name_ok = np.zeros(n, bool)
    isa_idx = np.zeros(n, np.uint32)
    isa_ok = np.zeros(n, bool)
    if s.KVM_EXIT in present or s.KVM_SET_IRQ in present or s.KVM_USERSPACE_EXIT in present:
        s1, s2 = slot_signed(1), slot_signed(2)
    if s.KVM_EXIT in present:
        raw = a[0].view(np.int64)
        vmx = a[1] == s.KVM_ISA_VMX
        reason = np.where(vmx, raw & s.VMX_REASON_MASK, raw)
        flags = np.where(vmx, raw & ~s.VMX_REASON_MASK & 0xFFFFFFFF, 0)
        vi, vok = names.lookup("vmx", raw & s.VMX_REASON_MASK)
        si, sok = names.lookup("svm", raw)
        name_idx = np.where(exit_rows, np.where(vmx, vi, si), name_idx)
        name_ok |= exit_rows & np.where(vmx, vok, sok)
        ii, iok = names.lookup("isa", a[1].view(np.int64))
        isa_idx, isa_ok = ii, exit_rows & iok
    if s.KVM_USERSPACE_EXIT in present:
        ui, uok = names.lookup("userspace", a[0].view(np.int64))
        # The errno of KVM_RUN: 0, -EINTR (interrupted: restart) or another error.
        code = np.where(s1 == 0, ui, np.where(s1 == -4, names.restart, names.error))
        name_idx = np.where(user_rows, code, name_idx)
        name_ok |= user_rows & ((s1 != 0) | uok)
    irq_rows = on(s.KVM_SET_IRQ)
    vcpu = np.ascontiguousarray(where.view(np.int32)[1::2])
    columns = {
        "ts_ns": _column(pa.int64(), ts_ns.view(np.int64), None),
        "source": _categorical(_SOURCE_CODE[ev], None, pa.array(_SOURCE_NAMES, pa.large_string())),
        "event": _categorical(ev, None, pa.array(_EVENT_NAMES, pa.large_string())),
        "pid": _column(pa.int32(), np.ascontiguousarray(who.view(np.int32)[0::2]), None),
        "tid": _column(pa.int32(), np.ascontiguousarray(who.view(np.int32)[1::2]), None),
        "cpu": _column(pa.int16(), np.ascontiguousarray(where.view(np.int16)[0::4]), None),
        "vcpu": _column(pa.int32(), vcpu, vcpu >= 0),
        "reason": pick(
            np.int64, (on(s.KVM_EXIT), reason), (on(s.KVM_USERSPACE_EXIT), a[0].view(np.int64))
        ),
        "reason_name": _categorical(name_idx, name_ok, names.dictionary),
        "isa": _categorical(isa_idx, isa_ok, names.isa_dictionary),
        "flags": pick(
            np.int64,
            (on(s.KVM_EXIT), flags),
            # 0, or -errno of a KVM_RUN that failed or was interrupted
            (on(s.KVM_USERSPACE_EXIT), s1),
            (on(s.KVM_SET_IRQ), s2),  # irq_source_id
            (on(s.KVM_INJ_VIRQ), (a[1] + a[2] * 2).view(np.int64)),  # soft | reinjected << 1
            (on(s.KVM_ENTRY), a[1].view(np.int64)),  # immediate_exit
        ),
        "addr": pick(
            np.uint64,
            (on(s.KVM_PIO), a[1]),  # port
            (on(s.KVM_MMIO), a[2]),  # gpa
            (on(s.KVM_FAST_MMIO, s.KVM_SET_IRQ, s.KVM_MSI_SET_IRQ), a[0]),  # gpa, gsi, MSI address
        ),
        "size": pick(
            np.int32,
            (on(s.KVM_PIO), a[2].astype(np.int32)),
            (on(s.KVM_MMIO), a[1].astype(np.int32)),
        ),
        "write": _bool_column(
            np.where(is_[s.KVM_PIO], a[0] != 0, a[0] == 2),  # mmio: KVM_TRACE_MMIO_WRITE
            is_[s.KVM_PIO] | is_[s.KVM_MMIO],
        ),
        "value": pick(
            np.uint64,
            (on(s.KVM_PIO), a[4]),
            (on(s.KVM_MMIO), a[3]),
            # The IRQ level, signed in the kernel: a negative level has no unsigned value.
            (irq_rows & (s1 >= 0) if irq_rows is not None else None, s1.view(np.uint64)),
            (on(s.KVM_MSI_SET_IRQ), a[1]),  # MSI data
            (on(s.KVM_INJ_VIRQ), a[0]),  # vector
        ),
        "count": pick(np.int32, (on(s.KVM_PIO), a[3].astype(np.int32))),
        "queue": _nulls(pa.int32(), n),
        "device": pa.DictionaryArray.from_arrays(
            _nulls(pa.uint32(), n), pa.array([], pa.large_string())
        ),
        "rip": pick(np.uint64, (on(s.KVM_EXIT), a[2]), (on(s.KVM_ENTRY), a[0])),
        "raw": _nulls(pa.large_string(), n),
    }
    return pa.Table.from_arrays(list(columns.values()), schema=EVENTS_ARROW_SCHEMA)


def decode_records(
    records: np.ndarray | list[np.ndarray],
    tables: s.ReasonTables,
    signed: dict[str, dict[int, int]],
) -> pl.DataFrame:
    """A batch (or batches) of ring-buffer records -> an events frame (in record order)."""
    frame = pl.from_arrow(decode_table(records, tables, signed))
    assert isinstance(frame, pl.DataFrame)
    return frame
