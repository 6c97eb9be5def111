"""The compiled reader of tracefs event lines (``vtrace/ingest/_tracefs.c``) and its columns.

The C code reads a file's bytes line by line and takes only the lines it is sure of: the
fixed-width header tracefs writes, printable ASCII, an event name, and for the kvm events
that have a pattern (:data:`vtrace.ingest.kvm_payloads.PAYLOADS`) a text of exactly that
pattern's shape whose numbers fit their columns. It fills preallocated numpy buffers; here
they become Arrow arrays and one polars frame without copying (strings are Arrow string
views into the file's bytes). Every other line is handed back, with its line number, to the
polars parser (:mod:`vtrace.ingest.tracepoint_text`), which decides everything about it:
unparsed and malformed lines, and every check on them, stay in one place.

The extension is built when the package is installed (``scripts/setup-python.sh``). When it
is missing, was built from another version of the C file, or ``VTRACE_PURE_PARSER=1`` is set,
:func:`module` is None and every line goes the polars way.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from types import ModuleType

import numpy as np
import polars as pl
import pyarrow as pa

from vtrace import schema as s
from vtrace.ingest.kvm_payloads import PAYLOADS, exit_reason_lookup

# Set to 1 to read every line with the polars parser (tests compare both ways).
PURE_ENV = "VTRACE_PURE_PARSER"
# The TRACEFS_ABI of the C file this code was written for.
ABI = 1
# Event names whose text the C code reads (every other name's text goes to ``raw``).
NATIVE_PAYLOADS = frozenset(
    {
        s.KVM_EXIT,
        s.KVM_ENTRY,
        s.KVM_PIO,
        s.KVM_MMIO,
        s.KVM_FAST_MMIO,
        s.KVM_USERSPACE_EXIT,
        s.KVM_SET_IRQ,
        s.KVM_MSI_SET_IRQ,
        s.KVM_INJ_VIRQ,
        s.KVM_EMULATE_INSN,
    }
)
# Output buffers in the C code's order: (name, numpy dtype; "view": 16-byte Arrow string views).
OUTPUTS = (
    ("lineno", np.uint32),
    ("ts_ns", np.int64),
    ("tid", np.int32),
    ("cpu", np.int16),
    ("event", np.uint32),
    ("vcpu", np.int32),
    ("reason", np.int64),
    ("reason_name", np.uint32),
    ("isa", np.uint32),
    ("flags", np.int64),
    ("addr", np.uint64),
    ("size", np.int32),
    ("write", np.uint8),
    ("value", np.uint64),
    ("count", np.int32),
    ("rip", np.uint64),
    ("raw", "view"),
    ("valid", np.uint16),
    ("rest_lineno", np.uint32),
    ("rest_start", np.int64),
    ("rest_view", "view"),
)
# Bits of the C code's per-row ``valid`` mask.
VALID_BITS = {
    "vcpu": 1 << 0,
    "reason": 1 << 1,
    "reason_name": 1 << 2,
    "isa": 1 << 3,
    "flags": 1 << 4,
    "addr": 1 << 5,
    "size": 1 << 6,
    "write": 1 << 7,
    "value": 1 << 8,
    "count": 1 << 9,
    "rip": 1 << 10,
    "raw": 1 << 11,
}
ARROW_TYPES = {
    np.uint32: pa.uint32(),
    np.int64: pa.int64(),
    np.int32: pa.int32(),
    np.int16: pa.int16(),
    np.uint64: pa.uint64(),
}
DICTIONARY_COLUMNS = ("reason_name", "isa")


def module() -> ModuleType | None:
    """The extension, or None: not built, built from another version, or turned off."""
    if os.environ.get(PURE_ENV, "") not in ("", "0"):
        return None
    return _load()


@contextmanager
def pure_parser(on: bool = True) -> Iterator[None]:
    """Within the block, every line goes the polars way (``on``) or the compiled reader is
    used where built: sets :data:`PURE_ENV` and restores it after."""
    saved = os.environ.get(PURE_ENV)
    os.environ[PURE_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[PURE_ENV]
        else:
            os.environ[PURE_ENV] = saved


@lru_cache(maxsize=1)
def _load() -> ModuleType | None:
    try:
        from vtrace.ingest import _tracefs  # type: ignore[attr-defined]
    except ImportError:
        return None
    return _tracefs if getattr(_tracefs, "ABI", None) == ABI else None


@lru_cache(maxsize=1)
def _reasons() -> list[tuple[bytes, int | None, int | None, bytes | None, bytes | None]]:
    """kvm_exit's reason texts and their columns (the polars parser's lookup table)."""

    def enc(v: str | None) -> bytes | None:
        return None if v is None else v.encode()

    return [
        (enc(k), r, f, enc(n), enc(i))  # type: ignore[misc]
        for k, r, f, n, i in exit_reason_lookup().iter_rows()
    ]


@dataclass(frozen=True)
class NativeLines:
    """What the C code made of a file.

    ``rows``: the accepted lines as parsed events (the columns of
    :func:`vtrace.ingest.tracepoint_text.parse_event_lines`, line order); ``rest``:
    ``lineno``/``line`` of every other line and ``rest_starts`` their byte offsets;
    ``lines``: the file's line count. The flags say what the other lines hold: carriage
    returns or the unit separator (the polars path splits such files another way), NUL
    bytes, bytes that are not ASCII.
    """

    rows: pl.DataFrame
    rest: pl.DataFrame
    rest_starts: np.ndarray
    lines: int
    cr: bool
    unit_separator: bool
    nul: bool
    non_ascii: bool


def _buffers(data: bytes, shift: int) -> list[pa.Buffer]:
    """The file's bytes as the string views see them: a view at byte offset ``o`` names
    buffer ``o >> shift``, the bytes from ``k << shift`` to ``(k + 2) << shift`` (so that
    32-bit offsets reach every line of a file of any size)."""
    whole = pa.py_buffer(data)
    n = len(data)
    return [
        whole.slice(k << shift, min(n, (k + 2) << shift) - (k << shift))
        for k in range(max(1, ((n - 1) >> shift) + 1))
    ]


def _validity(mask: np.ndarray) -> pa.Buffer | None:
    return None if mask.all() else pa.py_buffer(np.packbits(mask, bitorder="little"))


def _views(views: np.ndarray, n: int, valid: np.ndarray | None, data: list[pa.Buffer]) -> pl.Series:
    validity = None if valid is None else _validity(valid)
    arr = pa.Array.from_buffers(pa.string_view(), n, [validity, pa.py_buffer(views[:n]), *data])
    return pl.from_arrow(arr)  # type: ignore[return-value]


def _dictionary(names: list[bytes]) -> pl.Series:
    return pl.Series([b.decode() for b in names], dtype=pl.Categorical)


def parse(data: bytes) -> NativeLines | None:
    """Read ``data`` with the extension; None when it is not there (see :func:`module`)."""
    mod = module()
    if mod is None:
        return None
    capacity = mod.count_lines(data)
    bufs = {
        name: np.empty(
            (capacity, 16) if dtype == "view" else capacity, np.uint8 if dtype == "view" else dtype
        )
        for name, dtype in OUTPUTS
    }
    refused = [name.encode() for name in PAYLOADS if name not in NATIVE_PAYLOADS]
    got = mod.parse(data, tuple(bufs.values()), _reasons(), refused)
    if got is None:
        return None
    n, n_rest, lines, events, names, flags = got
    buffers = _buffers(data, mod.VIEW_SHIFT)
    rest = pl.DataFrame(
        [
            pl.Series("lineno", bufs["rest_lineno"][:n_rest]),
            _views(bufs["rest_view"], n_rest, None, buffers).alias("line"),
        ]
    )
    return NativeLines(
        rows=_rows(bufs, n, events, names, buffers),
        rest=rest,
        rest_starts=bufs["rest_start"][:n_rest].copy(),
        lines=lines,
        cr=bool(flags["cr"]),
        unit_separator=bool(flags["unit_separator"]),
        nul=bool(flags["nul"]),
        non_ascii=bool(flags["non_ascii"]),
    )


def _rows(
    bufs: dict[str, np.ndarray],
    n: int,
    events: list[bytes],
    names: list[bytes],
    buffers: list[pa.Buffer],
) -> pl.DataFrame:
    """The first ``n`` rows of the buffers as the frame of parsed events (no copies but the
    validity bitmaps; dictionary columns are gathered from their names)."""
    valid = bufs["valid"][:n]
    columns: dict[str, pl.Series] = {
        "lineno": pl.Series(bufs["lineno"][:n]),
        "ts_ns": pl.Series(bufs["ts_ns"][:n]),
        "event": _dictionary(events).gather(bufs["event"][:n]),
        "pid": pl.repeat(None, n, dtype=pl.Int32, eager=True),
        "tid": pl.Series(bufs["tid"][:n]),
        "cpu": pl.Series(bufs["cpu"][:n]),
        "ok": pl.repeat(True, n, dtype=pl.Boolean, eager=True),
    }
    name_dict = _dictionary(names)
    for c in (col for col in s.COLUMNS if col in VALID_BITS or col in ("queue", "device")):
        mask = (valid & VALID_BITS[c]) != 0 if c in VALID_BITS else None
        if mask is None or not mask.any():  # a column this reader never fills, or all null
            columns[c] = pl.repeat(None, n, dtype=s.EVENTS_SCHEMA[c], eager=True)
        elif c == "raw":
            columns[c] = _views(bufs["raw"], n, mask, buffers)
        else:
            values = bufs[c][:n]
            if c == "write":  # Arrow booleans are bits
                kind, data = pa.bool_(), np.packbits(values != 0, bitorder="little")
            else:
                kind, data = ARROW_TYPES[values.dtype.type], values
            series = pl.from_arrow(
                pa.Array.from_buffers(kind, n, [_validity(mask), pa.py_buffer(data)])
            )
            assert isinstance(series, pl.Series)
            columns[c] = name_dict.gather(series) if c in DICTIONARY_COLUMNS else series
    return pl.DataFrame([v.alias(k) for k, v in columns.items()])
