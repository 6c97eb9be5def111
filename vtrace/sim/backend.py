"""The back end that serves the queue: a QEMU iothread, a vhost worker, or the VMM's thread.

All three run the same loop (virtio spec 2.7.13, "Supplying Buffers to The Device", seen
from the device): sleep until kicked; on wake-up turn kicks off; pop and serve every
available request (its ``per_request_ns`` plus the device's service time), put it on the
used ring and decide whether to interrupt; when the ring is empty turn kicks back on and
look once more, which closes the race with a driver that added just before. They differ in
their parameters: a vhost worker is a kernel thread woken straight from the ioeventfd, an
iothread pays a user-space wake-up, and the VMM thread of an emulated device is started by
the guest's last register write instead of a kick.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import simpy

if TYPE_CHECKING:
    from vtrace.sim.engine import Machine


def serve_queue(env: simpy.Environment, m: Machine) -> Generator[simpy.Event, None, None]:
    """The back end's loop, shared by every kind of back-end thread."""
    vq = m.vq
    service_ns = m.service_ns
    start_ns = m.start_ns
    per_request_ns = m.backend_per_request_ns
    wakeup_ns = m.wakeup_ns
    coalesce_requests = m.coalesce_requests
    timer_coalescing = m.coalesce_ns > 0
    poll = m.poll
    per_pass = m.publish_per_pass
    while True:
        if not vq.avail_pending():
            vq.enable_notification()
            if not vq.avail_pending():
                if m.unsignalled and not timer_coalescing:
                    yield from m.interrupt(vq.used_idx - 1)  # going idle: flush what is held
                    if vq.avail_pending():
                        continue
                if m.eventfd_signalled:
                    # a kick came while it was running: the eventfd is already readable
                    m.eventfd_signalled = False
                else:
                    m.backend_wait = env.event()
                    yield m.backend_wait
                    m.backend_wait = None
                    m.eventfd_signalled = False
                wake_ns = wakeup_ns[m.backend_wakeups % len(wakeup_ns)]
                m.backend_wakeups += 1
                if wake_ns > 0:
                    m.backend_busy_ns += wake_ns
                    yield env.timeout(wake_ns)
            vq.disable_notification()
            continue
        if per_pass:
            yield from serve_pass(env, m)
            continue
        request = vq.pop()
        now = env.now
        start_ns[request] = now
        busy = per_request_ns + service_ns[request]
        if busy > 0:
            m.backend_busy_ns += busy
            yield env.timeout(busy)
        vq.push_used(request)
        if poll:  # no interrupts: a guest spinning on used.idx sees it at once
            wait = m.space_wait
            if wait is not None and not wait.triggered:
                wait.succeed()
            continue
        m.last_used_request = request
        m.unsignalled += 1
        if timer_coalescing:
            if not m.coalesce_timer_armed:
                m.start_coalesce_timer()
        elif m.unsignalled >= coalesce_requests:
            yield from m.interrupt(request)


def serve_pass(env: simpy.Environment, m: Machine) -> Generator[simpy.Event, None, None]:
    """One pass: take every request available now, serve them in order, then publish
    used.idx once and decide on one interrupt for the lot (the lab's back end, and QEMU's
    batched notification). Nothing outside sees the pass half done, so it is one timeout."""
    vq = m.vq
    service_ns = m.service_ns
    start_ns = m.start_ns
    per_request_ns = m.backend_per_request_ns
    t = env.now
    taken = []
    for _ in range(vq.avail_idx - vq.last_avail_idx):
        request = vq.pop()
        start_ns[request] = t
        t += per_request_ns + service_ns[request]
        taken.append(request)
    t += m.backend_per_pass_ns
    busy = t - env.now
    if busy > 0:
        m.backend_busy_ns += busy
        yield env.timeout(busy)
    for request in taken:
        vq.push_used(request)
    if m.poll:
        wait = m.space_wait
        if wait is not None and not wait.triggered:
            wait.succeed()
        return
    m.last_used_request = taken[-1]
    m.unsignalled += len(taken)
    if m.coalesce_ns > 0:
        if not m.coalesce_timer_armed:
            m.start_coalesce_timer()
    elif m.unsignalled >= m.coalesce_requests:
        yield from m.interrupt(taken[-1])


def iothread(env: simpy.Environment, m: Machine) -> Generator[simpy.Event, None, None]:
    """A QEMU iothread (or main loop) serving a virtqueue in user space."""
    yield from serve_queue(env, m)


def vhost_worker(env: simpy.Environment, m: Machine) -> Generator[simpy.Event, None, None]:
    """A vhost kernel worker serving a virtqueue without leaving the host kernel."""
    yield from serve_queue(env, m)


def vmm_thread(env: simpy.Environment, m: Machine) -> Generator[simpy.Event, None, None]:
    """The VMM's device thread of an emulated device, started by a register write."""
    yield from serve_queue(env, m)


BACKEND_THREADS = {"iothread": iothread, "vhost_worker": vhost_worker, "vmm": vmm_thread}
