"""Draining a BPF ring buffer in batches, straight from its memory mapping.

bcc's ``ring_buffer_poll`` calls a Python function once per record, which cannot keep up
with half a million events per second. A BPF ring buffer map can be mapped into user space
(the kernel's documented consumer interface): one read-write page holding the consumer
position, then a read-only page holding the producer position followed by the data area,
mapped twice in a row so that a record that wraps around the end is still contiguous.
Because every record here has the same size, the bytes between the two positions are an
array of records that numpy can view and copy in one step (transposed: one row per 64-bit
word of the record, the layout the decoder reads).
"""

from __future__ import annotations

import mmap

import numpy as np

from vtrace.collect.decode import (
    PAYLOAD_BYTES,
    RECORD_DTYPE,
    RINGBUF_BUSY_BIT,
    RINGBUF_DISCARD_BIT,
)
from vtrace.errors import VtraceError


class RingReader:
    """Batch consumer of one BPF ring buffer map holding fixed-size records."""

    def __init__(self, map_fd: int, data_bytes: int) -> None:
        page = mmap.PAGESIZE
        if data_bytes <= 0 or data_bytes & (data_bytes - 1) or data_bytes % page:
            raise VtraceError(f"ring buffer size {data_bytes} is not a power-of-two of pages")
        self.data_bytes = data_bytes
        self._mask = data_bytes - 1
        self._consumer = mmap.mmap(
            map_fd, page, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE, offset=0
        )
        self._producer = mmap.mmap(
            map_fd, page + 2 * data_bytes, mmap.MAP_SHARED, mmap.PROT_READ, offset=page
        )
        self._data = np.frombuffer(self._producer, dtype=np.uint8, offset=page)
        # The positions are read and written as single aligned 8-byte loads and stores (numpy
        # element access): a byte-wise store (struct.pack_into) can be seen half-done by
        # the kernel, whose reservation then sees a bogus consumer position and fails.
        self._cons_pos = np.frombuffer(self._consumer, dtype=np.uint64, count=1)
        self._prod_pos = np.frombuffer(self._producer, dtype=np.uint64, count=1)
        self._size = RECORD_DTYPE.itemsize
        self.peak_pending_bytes = 0  # the fullest the buffer was seen: how close to loss

    def _positions(self) -> tuple[int, int]:
        return int(self._cons_pos[0]), int(self._prod_pos[0])

    def produced_records(self) -> int:
        """Records the kernel has reserved since the map was made (the producer position
        only grows; every record has one size and none is discarded)."""
        return int(self._prod_pos[0]) // self._size

    def pending_bytes(self) -> int:
        cons, prod = self._positions()
        return prod - cons

    def drain_words(self, out: np.ndarray, at: int) -> int:
        """Copy committed records, as words in rows (``out`` is 8 x capacity uint64; records
        land in columns ``at`` onwards, as many as fit), release their space and return how
        many were stored. Transposing while copying hands the decoder contiguous columns and
        reads each record once, while it is still in cache from the BUSY check."""
        cons, prod = self._positions()
        self.peak_pending_bytes = max(self.peak_pending_bytes, prod - cons)
        n = min((prod - cons) // self._size, out.shape[1] - at)
        if n <= 0:
            return 0
        start = cons & self._mask
        view = self._data[start : start + n * self._size].view(np.uint64).reshape(n, -1)
        header = view[:, 0].astype(np.uint32)  # the length word, with BUSY and DISCARD bits
        # A record still being written (BUSY) ends the batch; everything after it waits.
        busy = np.flatnonzero(header & RINGBUF_BUSY_BIT)
        if len(busy):
            n = int(busy[0])
            view, header = view[:n], header[:n]
        if n == 0:
            return 0
        if np.any((header & ~np.uint32(RINGBUF_DISCARD_BIT)) != PAYLOAD_BYTES):
            raise VtraceError(
                "ring buffer holds a record of unexpected size: probes.c and decode.py disagree"
            )
        out[:, at : at + n] = view[:, 1:].T
        # Release the space only after the copy: the kernel may reuse it at once.
        self._cons_pos[0] = cons + n * self._size
        kept = np.flatnonzero((header & RINGBUF_DISCARD_BIT) == 0)
        if len(kept) < n:
            out[:, at : at + len(kept)] = out[:, at + kept]
        return len(kept)

    def close(self) -> None:
        del self._data, self._cons_pos, self._prod_pos
        self._producer.close()
        self._consumer.close()
