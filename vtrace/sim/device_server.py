"""A device that serves several requests at once: AIO threads, an NVMe queue, a disk's depth.

With ``device.max_outstanding`` above one (virtio) or ``queue.servers`` (reference queue),
the back-end thread hands each popped request to the device and goes on popping; the
device serves up to that many at once, in the order it got them, each for its drawn
service time, and hands each completion back to the thread that submitted it. Requests
with different service times come back out of order, as they do from a real device.

A back end that merges a pass (``backend.submit = "pass"``, QEMU virtio-blk's multireq)
hands the pass's requests over as one I/O: it takes one slot and one service draw, plus
``device.per_byte_ns`` for each byte of the requests after the first (the draw has the
first's), and they all complete together.
"""

from __future__ import annotations

from collections import deque
from typing import TYPE_CHECKING

import simpy

from vtrace.sim.draws import Draws
from vtrace.sim.monitors import RunMonitor

if TYPE_CHECKING:
    from vtrace.sim.backend import BackendThread
    from vtrace.sim.queuepath import QueuePath


class DeviceServer:
    """``slots`` requests in service at once; the rest wait in submission order."""

    def __init__(
        self,
        env: simpy.Environment,
        slots: int,
        service: Draws,
        monitor: RunMonitor,
        merged_extra_ns: float = 0.0,
    ) -> None:
        self.env = env
        self.slots = slots
        self.service = service
        self.monitor = monitor
        self.merged_extra_ns = merged_extra_ns  # a merged I/O: per request after the first
        self.busy = 0
        self.waiting: deque[tuple[int | list[int], BackendThread, QueuePath]] = deque()
        self.most_in_service = 0

    def submit(self, request: int | list[int], thread: BackendThread, path: QueuePath) -> None:
        """Serve ``request``, or a list of requests as one merged I/O."""
        if self.busy < self.slots:
            self._start(request, thread, path)
        else:
            self.waiting.append((request, thread, path))

    def _start(self, request: int | list[int], thread: BackendThread, path: QueuePath) -> None:
        self.busy += 1
        if self.busy > self.most_in_service:
            self.most_in_service = self.busy
        env = self.env
        service_ns = self.service.next()
        if isinstance(request, list):
            for r in request:
                self.monitor.started(r, env.now)
            service_ns += self.merged_extra_ns * (len(request) - 1)
        else:
            self.monitor.started(request, env.now)

        def done(_event: simpy.Event) -> None:
            self.busy -= 1
            if isinstance(request, list):
                for r in request:
                    thread.device_completed(r, path)
            else:
                thread.device_completed(request, path)
            if self.waiting:
                self._start(*self.waiting.popleft())

        env.timeout(service_ns).callbacks.append(done)
