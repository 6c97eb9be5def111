"""A lab back-end pass holds Python's interpreter lock from its first pop to used.idx.

The lab's back-end threads are Python threads: one runs at a time. With a thread per queue,
a pass that let go of the interpreter lock in the middle (numpy's fill of a request's buffer
does, for each request) let the other queue's thread run, and this one waited for the lock
with NO_NOTIFY still set and no CPU held: its vCPU ran on and added its next batch without
a kick (0.088 to 0.125 kicks per request in 16 runs at batch 8 on 2 x 2; once the pass kept
the lock, 0.106 to 0.125 in 12, 11 of them 0.122 or more). A vhost worker's pass is never
stalled by another queue's worker, and the model has no such stall.
"""

from __future__ import annotations

import mmap
import struct
import sys
import threading
import time

import pytest

from vtrace.lab.backend import QueueServer
from vtrace.lab.records import EventLog
from vtrace.lab.virtqueue import DeviceQueue, ring_layout

RING = 256
REQUEST_BYTES = 1 << 16


def _driver_adds(memory: mmap.mmap, ring, count: int) -> None:
    """What the guest's driver does: a descriptor per request, then avail.idx once."""
    for i in range(count):
        addr = ring.data + i * REQUEST_BYTES
        struct.pack_into("<QIHH", memory, ring.desc + 16 * i, addr, REQUEST_BYTES, 2, 0)
        struct.pack_into("<H", memory, ring.avail + 4 + 2 * i, i)
    struct.pack_into("<H", memory, ring.avail + 2, count)


@pytest.fixture
def served():
    ring = ring_layout(RING, REQUEST_BYTES, base=0)
    memory = mmap.mmap(-1, ring.end)
    queue = DeviceQueue(memory, ring)
    server = QueueServer(0, queue, kick_fd=-1, irq_fd=None, pid=0, log=EventLog())
    yield memory, ring, queue, server
    queue.release()
    memory.close()


def test_a_pass_never_lets_another_thread_run(served) -> None:
    memory, ring, queue, server = served
    _driver_adds(memory, ring, RING)
    ran = 0
    stop = threading.Event()

    def other_back_end() -> None:
        # a step, then a sleep that lets go of the lock: it runs again only when the main
        # thread lets go of it too (the switch interval is too long to force a hand-over)
        nonlocal ran
        while not stop.is_set():
            ran += 1
            time.sleep(0)

    interval = sys.getswitchinterval()
    sys.setswitchinterval(100.0)  # no forced hand-over: only a release lets it run
    other = threading.Thread(target=other_back_end)
    try:
        other.start()
        while ran == 0:  # it has run once
            time.sleep(0.001)
        before = ran
        server._pass(0)
        during = ran - before
    finally:
        stop.set()
        sys.setswitchinterval(interval)
        other.join()
    assert queue.used_count == RING
    assert during == 0, f"another thread ran {during} steps inside one pass of {RING} requests"


def test_each_request_is_filled_with_its_number(served) -> None:
    memory, ring, _queue, server = served
    _driver_adds(memory, ring, RING)
    server._pass(0)
    for i in (0, 1, RING - 1):
        buffer = memory[ring.data + i * REQUEST_BYTES : ring.data + (i + 1) * REQUEST_BYTES]
        assert buffer == bytes([i & 0xFF]) * REQUEST_BYTES
    head, written = struct.unpack_from("<II", memory, ring.used + 4 + 8 * (RING - 1))
    assert (head, written) == (RING - 1, REQUEST_BYTES)
