"""The split virtqueue (virtio 1.x, section 2.7) as the device sees it in guest memory.

Three areas, each aligned as the spec requires: the descriptor table (16 bytes per
descriptor: addr, len, flags, next), the driver area or *avail* ring (flags, idx,
ring[size], used_event) and the device area or *used* ring (flags, idx, ring[size] of
{id, len}, avail_event). The driver owns avail and the descriptors; the device owns used.
"""

from __future__ import annotations

import ctypes
import mmap
import struct
from dataclasses import dataclass

import numpy as np

from vtrace.lab import layout as L

DESC_DTYPE = np.dtype([("addr", "<u8"), ("len", "<u4"), ("flags", "<u2"), ("next", "<u2")])
USED_ELEM_DTYPE = np.dtype([("id", "<u4"), ("len", "<u4")])
_PAGE_BYTES = 4096
# Descriptors, avail-ring entries and used elements are only read or written before the
# index that publishes them, so byte-wise struct access is safe for them.
_HEAD = struct.Struct("<H")
_DESC_ADDR_LEN = struct.Struct("<QI")
_USED_ELEM = struct.Struct("<II")


def _align(value: int, to: int) -> int:
    return -(-value // to) * to


@dataclass(frozen=True)
class RingLayout:
    """Guest-physical addresses of one split virtqueue and its request buffers."""

    ring_size: int
    desc: int
    avail: int
    used: int
    data: int
    request_bytes: int

    @property
    def end(self) -> int:
        """First address past the last request buffer."""
        return self.data + self.ring_size * self.request_bytes


def ring_layout(ring_size: int, request_bytes: int, base: int = L.RING_BASE) -> RingLayout:
    """Place the descriptor table, avail ring, used ring and one buffer per descriptor.

    Each area starts on its own page (stricter than the spec's 16/2/4-byte alignment),
    so the areas the driver writes and the one the device writes never share a page.
    """
    desc = base
    avail = _align(desc + 16 * ring_size, _PAGE_BYTES)
    used = _align(avail + 6 + 2 * ring_size, _PAGE_BYTES)
    data = _align(used + 6 + 8 * ring_size, _PAGE_BYTES)
    return RingLayout(ring_size, desc, avail, used, data, request_bytes)


class DeviceQueue:
    """The device's side of a split virtqueue in guest memory.

    Indices are free-running 16-bit counters as in the spec; ``last_avail`` and
    ``used_count`` count without wrapping so the back end can number requests. The hot
    path reads and writes the rings with ``struct`` on the mapping (a numpy scalar access
    costs several times more). Requests' buffers are written through the mapping too
    (:meth:`fill`).
    """

    def __init__(self, memory: mmap.mmap, ring: RingLayout) -> None:
        self.memory = memory
        self.ring = ring
        self.mask = ring.ring_size - 1
        self.last_avail = 0
        self.used_count = 0
        self._avail_ring = ring.avail + 4
        self._used_ring = ring.used + 4
        # The indices and flags the two sides exchange are read and written as whole
        # 16-bit words (a C uint16 load or store), never byte by byte as struct's "<H"
        # does: a guest reading used.idx half-written would see it jump back.
        u16 = ctypes.c_uint16.from_buffer
        self._avail_flags = u16(memory, ring.avail)
        self._avail_idx = u16(memory, ring.avail + 2)
        self._used_flags = u16(memory, ring.used)
        self._used_idx = u16(memory, ring.used + 2)

    def avail_idx(self) -> int:
        """The driver's avail.idx (free-running, modulo 2^16)."""
        return self._avail_idx.value

    def used_idx(self) -> int:
        """The device's published used.idx (free-running, modulo 2^16)."""
        return self._used_idx.value

    def used_flags(self) -> int:
        """The device's used.flags (VRING_USED_F_NO_NOTIFY)."""
        return self._used_flags.value

    def avail_pending(self) -> int:
        """Descriptors the driver has made available that the device has not taken."""
        return (self._avail_idx.value - self.last_avail) & 0xFFFF

    def interrupts_wanted(self) -> bool:
        """False while the driver set VRING_AVAIL_F_NO_INTERRUPT (it polls instead)."""
        return not self._avail_flags.value & L.VRING_AVAIL_F_NO_INTERRUPT

    def set_no_notify(self, on: bool) -> None:
        """Set or clear VRING_USED_F_NO_NOTIFY: ask the driver not to kick while draining."""
        self._used_flags.value = L.VRING_USED_F_NO_NOTIFY if on else 0

    def pop(self) -> tuple[int, int, int]:
        """Take the next available descriptor chain head: (head, addr, len)."""
        slot = self.last_avail & self.mask
        head = _HEAD.unpack_from(self.memory, self._avail_ring + 2 * slot)[0]
        self.last_avail += 1
        addr, length = _DESC_ADDR_LEN.unpack_from(self.memory, self.ring.desc + 16 * head)
        return head, addr, length

    def push(self, head: int, written_bytes: int) -> None:
        """Write a used element (not yet visible: :meth:`flush` publishes used.idx)."""
        slot = self.used_count & self.mask
        _USED_ELEM.pack_into(self.memory, self._used_ring + 8 * slot, head, written_bytes)
        self.used_count += 1

    def fill(self, addr: int, length: int, value: int) -> None:
        """Write ``length`` bytes of ``value`` at guest address ``addr``: a copy into the
        mapping, during which the thread keeps Python's interpreter lock (numpy's fill of
        a view lets go of it, so another back-end thread would run in the middle of this
        one's pass)."""
        self.memory[addr : addr + length] = bytes((value,)) * length

    def flush(self) -> None:
        """Publish every pushed element by storing used.idx once."""
        self._used_idx.value = self.used_count & 0xFFFF

    def release(self) -> None:
        """Drop the views of guest memory so the VM can unmap it."""
        del self._avail_flags, self._avail_idx, self._used_flags, self._used_idx
        del self.memory
