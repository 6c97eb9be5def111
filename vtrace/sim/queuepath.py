"""One queue between the guest and the back end, and what both sides know of it.

A :class:`QueuePath` holds the ring (:class:`~vtrace.sim.virtqueue.Virtqueue`, or an
emulated device's queue), the eventfd the guest's kick signals, the completions the back
end holds back from an interrupt, and the queue's interrupt vector: the vCPU whose time
line its handler takes (queue q on vCPU q mod N, as blk-mq and virtio-net spread their
vectors). The vCPUs that submit to it, the back-end thread that serves it and the
interrupt path act on it through the named operations below.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import simpy

from vtrace.sim.interrupts import handler_goes_on
from vtrace.sim.monitors import RunMonitor
from vtrace.sim.params import BackendParams, InterruptParams, RingParams
from vtrace.sim.timeline import VcpuTimeline
from vtrace.sim.virtqueue import DeviceQueue, Virtqueue

if TYPE_CHECKING:
    from vtrace.sim.backend import BackendThread
    from vtrace.sim.vcpu import Vcpu
    from vtrace.sim.workloads import Workload


class QueuePath:
    """A queue's ring, its notifications both ways, and the vCPUs that use it."""

    def __init__(
        self,
        env: simpy.Environment,
        index: int,
        ring: RingParams,
        interrupt: InterruptParams,
        backend: BackendParams,
        irq_timeline: VcpuTimeline,
        monitor: RunMonitor,
        workload: Workload,
    ) -> None:
        self.env = env
        self.index = index
        self.ring = ring
        self.irq = interrupt
        self.monitor = monitor
        self.workload = workload
        if ring.virtio:
            self.vq: Virtqueue = Virtqueue(ring.ring_size, ring.descs_per_request, ring.event_idx)
        else:
            self.vq = DeviceQueue(ring.ring_size)
        # a busy-polling back end never asks for a kick
        self.vq.device_polls = backend.mode == "poll"
        self.vq.avail_event_on_pop = backend.avail_event_on_pop
        self.irq_timeline = irq_timeline
        self.vcpus: list[Vcpu] = []
        self.thread: BackendThread | None = None
        self.eventfd = False  # signalled by a kick, read by the back end's handler
        self.draining = False  # the back end runs this queue's handler (kicks off on it)
        self.served_in_turn = 0  # requests served since the handler last gave way
        # the interrupt path's state
        self.unsignalled = 0  # completions put on the used ring and not yet signalled
        self.last_used_request = 0
        self.coalesce_timer_armed = False
        self.handler_taken = 0  # used buffers the running handler has counted so far
        self.space_wait: simpy.Event | None = None
        self.requests = 0  # submitted through this queue
        self.kicks = 0
        self.interrupts = 0

    # -- the guest's side ------------------------------------------------------------------
    def kick(self, timeline: VcpuTimeline, request: int, batch_prep_ns: float) -> None:
        """The driver's kick decision for what it added; a needed kick is an exit. When the
        back end holds the kick, the vCPU waits on ``timeline.lock_wait``."""
        vq = self.vq
        env = self.env
        if batch_prep_ns > 0:  # publish avail.idx, read the device's flags
            timeline.occupy(env.now, batch_prep_ns)
        if not vq.kick_prepare():
            self.monitor.kicks_suppressed += 1
            return
        if vq.counts_kicks:
            self.kicks += 1
            self.monitor.kick(request)
            if self.ring.kick_handler == "user":
                self.monitor.exit(request, 0, 1)
        thread = self.thread
        if thread.lock_held:  # the write, and the exit's way back, come once it has the lock
            timeline.lock_wait = thread.hold_kick(self, timeline)
            return
        if vq.counts_kicks:
            timeline.exit(env.now, self.ring.kick_exit_ns)
        thread.signal(self)

    def added(self) -> None:
        """A request was published on the avail ring: a polling back end sees it."""
        self.requests += 1
        if self.vq.device_polls:
            self.thread.poke()

    def wait_for_space(self) -> simpy.Event:
        """An event that fires when used buffers come back (room, or a poll that finds some)."""
        wait = self.space_wait
        if wait is None or wait.triggered:
            wait = self.space_wait = self.env.event()
        return wait

    def space_freed(self) -> None:
        wait = self.space_wait
        if wait is not None and not wait.triggered:
            wait.succeed()

    # -- completions -----------------------------------------------------------------------
    def take_used(self) -> None:
        """The driver takes every used buffer back; those requests complete now."""
        now = self.env.now
        monitor = self.monitor
        workload = self.workload
        for r in self.vq.get_used():
            monitor.completed_at(r, now)
            workload.completed(r, now)

    def guest_interrupt_handler(self, _event: simpy.Event) -> None:
        """The end of the guest's handler: take used buffers back, ask for the next interrupt."""
        if handler_goes_on(self):  # completions came meanwhile: its loop takes them too
            return
        self.take_used()
        self.vq.enable_cb()
        self.wake_guest()

    def wake_guest(self) -> None:
        """Wake the vCPUs that wait on this queue: for room, or to dispatch again."""
        for v in self.vcpus:
            v.wake()
        if self.vq.has_room():
            self.space_freed()
