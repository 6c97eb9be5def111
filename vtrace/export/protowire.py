"""Protocol Buffers wire format, one message per row, encoded for whole columns at once.

A timeline has millions of small messages of a few shapes (a packet with a timestamp and a
track event), so building them one Python object at a time would cost microseconds each.
Here each field's values are encoded with numpy for all rows at once (:class:`Rows`: a
matrix of bytes and each row's length), a message is a tree of such fields
(:class:`Message`, :class:`Field`), and :func:`encode` writes every row's message, an
absent value (a masked row) adding no bytes, as protobuf's optional fields do.

The encoding is the one the protobuf documentation specifies ("Encoding", protobuf.dev):
a field is a key ``(number << 3) | wire_type`` as a varint, then a varint (wire type 0),
eight little-endian bytes (wire type 1) or a varint length and that many bytes (wire type 2).
Negative int64 values are their two's complement as a 10-byte varint.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

VARINT = 0
FIXED64 = 1
LENGTH_DELIMITED = 2
_MAX_VARINT = 10


@dataclass(frozen=True)
class Rows:
    """One encoded message (or fragment) per row: row i's bytes are
    ``matrix[i, :lengths[i]]`` (the rest of the row is padding)."""

    matrix: np.ndarray  # (rows, width) uint8
    lengths: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.lengths)

    def tobytes(self) -> bytes:
        """Every row's bytes, back to back."""
        width = self.matrix.shape[1]
        return self.matrix[np.arange(width)[None, :] < self.lengths[:, None]].tobytes()


def _as_u64(values: np.ndarray) -> np.ndarray:
    # int64 -> uint64 keeps the bits: a negative value becomes its two's complement.
    return np.asarray(values).astype(np.int64, copy=False).view(np.uint64)


def _varint_lengths(v: np.ndarray) -> np.ndarray:
    n = np.ones(len(v), dtype=np.int64)
    for i in range(1, _MAX_VARINT):
        more = v >= np.uint64(1 << (7 * i))
        if not more.any():
            break
        n += more
    return n


def varints(values: np.ndarray, present: np.ndarray | None = None) -> Rows:
    """Each value as a varint (rows not ``present`` are empty)."""
    v = values if values.dtype == np.uint64 else _as_u64(values)
    lengths = _varint_lengths(v)
    if present is not None:
        lengths = np.where(present, lengths, 0)
    width = int(lengths.max()) if len(lengths) else 0
    matrix = np.empty((len(v), width), dtype=np.uint8)
    for i in range(width):
        group = (v >> np.uint64(7 * i)) & np.uint64(0x7F)
        matrix[:, i] = group | (np.uint64(0x80) * (lengths > i + 1))
    return Rows(matrix, lengths)


def varint(value: int) -> bytes:
    """One value as a varint (Python ints, for the few scalars outside the columns)."""
    value &= (1 << 64) - 1  # a negative int64 as its two's complement
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def key(number: int, wire_type: int) -> bytes:
    """The key of field ``number`` (a varint)."""
    return varint((number << 3) | wire_type)


def constant(blob: bytes, n: int, present: np.ndarray | None = None) -> Rows:
    """The same bytes in each of ``n`` rows (or in the ``present`` ones)."""
    one = np.frombuffer(blob, dtype=np.uint8)
    matrix = np.broadcast_to(one, (n, len(one)))
    if present is None:
        return Rows(matrix, np.full(n, len(one), dtype=np.int64))
    return Rows(matrix, np.where(present, len(one), 0).astype(np.int64))


@dataclass(frozen=True)
class Field:
    """A scalar field of every row: its key, and its value bytes (empty where absent)."""

    number: int
    wire_type: int
    value: Rows


@dataclass(frozen=True)
class Message:
    """An embedded message field of every row (absent where ``present`` is false)."""

    number: int
    children: tuple[Field | Message, ...]
    present: np.ndarray | None = None


def varint_field(number: int, values: np.ndarray, present: np.ndarray | None = None) -> Field:
    """Field ``number`` with a varint value (int32/int64/uint64/enum/bool) in each row."""
    return Field(number, VARINT, varints(values, present))


def fixed64_field(number: int, values: np.ndarray, present: np.ndarray | None = None) -> Field:
    """Field ``number`` with a fixed64 value in each row."""
    raw = _as_u64(values) if values.dtype != np.uint64 else values
    n = len(raw)
    data = raw.astype("<u8").view(np.uint8).reshape(n, 8)
    lengths = np.full(n, 8, dtype=np.int64) if present is None else np.where(present, 8, 0)
    return Field(number, FIXED64, Rows(data, lengths))


def constant_field(number: int, value: int, n: int) -> Field:
    """Field ``number`` with the same varint ``value`` in each of ``n`` rows."""
    return Field(number, VARINT, constant(varint(value), n))


def _leaves(node: Field | Message) -> list[np.ndarray]:
    """The per-row numbers that fix every length in ``node``: its fields' value lengths and
    its optional messages' presence."""
    if isinstance(node, Field):
        return [node.value.lengths]
    out = [] if node.present is None else [node.present.astype(np.int64)]
    for child in node.children:
        out += _leaves(child)
    return out


def _block(node: Field | Message, rows: np.ndarray, first: int) -> np.ndarray | None:
    """The bytes of ``node`` for ``rows``, which all have the same layout (that of row
    ``first``), as a (rows, width) matrix; None where the field is absent."""
    if isinstance(node, Field):
        width = int(node.value.lengths[first])
        if width == 0:
            return None
        head = np.frombuffer(key(node.number, node.wire_type), np.uint8)
        return np.hstack(
            [np.broadcast_to(head, (len(rows), len(head))), node.value.matrix[rows, :width]]
        )
    if node.present is not None and not node.present[first]:
        return None
    parts = [b for c in node.children if (b := _block(c, rows, first)) is not None]
    inner = np.hstack(parts) if parts else np.zeros((len(rows), 0), np.uint8)
    head = np.frombuffer(key(node.number, LENGTH_DELIMITED) + varint(inner.shape[1]), np.uint8)
    return np.hstack([np.broadcast_to(head, (len(rows), len(head))), inner])


def encode(message: Message) -> bytes:
    """Every row's ``message`` field, back to back, in row order.

    Rows are grouped by layout (which fields are there, how long each value is: a few dozen
    layouts in a timeline); within a group every length is the same, so each group is
    built with block copies, then its rows are put in their places in the output."""
    leaves = _leaves(message)
    n = len(leaves[0]) if leaves else 0
    if n == 0:
        return b""
    # The layout of a row as one integer (mixed radix over its leaves), else as a row of
    # the leaves (slower to group) when the radix product would not fit.
    radices = [int(lengths.max()) + 1 for lengths in leaves]
    if math.prod(radices) < 1 << 62:
        layout = np.zeros(n, dtype=np.int64)
        for lengths, radix in zip(leaves, radices, strict=True):
            layout = layout * radix + lengths
        kinds, first, group = np.unique(layout, return_index=True, return_inverse=True)
    else:
        kinds, first, group = np.unique(
            np.stack(leaves, axis=1), axis=0, return_index=True, return_inverse=True
        )
    group = group.reshape(-1)
    blocks, rows_of = [], []
    row_len = np.zeros(n, dtype=np.int64)
    for g in range(len(kinds)):
        rows = np.flatnonzero(group == g)
        block = _block(message, rows, int(first[g]))
        assert block is not None
        blocks.append(block)
        rows_of.append(rows)
        row_len[rows] = block.shape[1]
    ends = np.cumsum(row_len)
    out = np.empty(int(ends[-1]), dtype=np.uint8)
    starts = ends - row_len
    for rows, block in zip(rows_of, blocks, strict=True):
        at = starts[rows][:, None] + np.arange(block.shape[1])[None, :]
        out[at] = block
    return out.tobytes()


def string_message(fields: list[tuple[int, int | str | bytes | bool]]) -> bytes:
    """One small message from (field number, value) pairs: ints as varints, str/bytes as
    length-delimited. For the few descriptors of a timeline, not for its rows."""
    out = bytearray()
    for number, value in fields:
        if isinstance(value, (str, bytes)):
            blob = value.encode() if isinstance(value, str) else value
            out += key(number, LENGTH_DELIMITED) + varint(len(blob)) + blob
        else:
            out += key(number, VARINT) + varint(int(value))
    return bytes(out)
