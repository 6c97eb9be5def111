"""A device that serves several requests at once: AIO threads, an NVMe queue, a disk's depth.

With ``device.max_outstanding`` above one (virtio) or ``queue.servers`` (reference queue),
the back-end thread hands each popped request to the device and goes on popping; the
device serves up to that many at once, in the order it got them, each for its drawn
service time, and hands each completion back to the thread that submitted it. Requests
with different service times come back out of order, as they do from a real device.
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
        self, env: simpy.Environment, slots: int, service: Draws, monitor: RunMonitor
    ) -> None:
        self.env = env
        self.slots = slots
        self.service = service
        self.monitor = monitor
        self.busy = 0
        self.waiting: deque[tuple[int, BackendThread, QueuePath]] = deque()
        self.most_in_service = 0

    def submit(self, request: int, thread: BackendThread, path: QueuePath) -> None:
        if self.busy < self.slots:
            self._start(request, thread, path)
        else:
            self.waiting.append((request, thread, path))

    def _start(self, request: int, thread: BackendThread, path: QueuePath) -> None:
        self.busy += 1
        if self.busy > self.most_in_service:
            self.most_in_service = self.busy
        env = self.env
        self.monitor.started(request, env.now)

        def done(_event: simpy.Event) -> None:
            self.busy -= 1
            thread.device_completed(request, path)
            if self.waiting:
                self._start(*self.waiting.popleft())

        env.timeout(self.service.next()).callbacks.append(done)
