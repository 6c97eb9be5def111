"""The interrupt path: the back end's decision, injection, coalescing, the guest handler.

After putting requests on a queue's used ring the back end asks the queue whether the guest
wants an interrupt (``used_event`` / ``VRING_AVAIL_F_NO_INTERRUPT``, or an emulated device's
interrupt line already asserted). It may hold that decision to gather completions: until
``coalesce_requests`` completions are waiting (flushed when it goes idle), or for
``coalesce_ns`` with a timer. An injected interrupt reaches the guest after
``delivery_ns`` (``halted_wake_ns`` more when the vCPU is halted); the handler then runs on
the queue's vCPU (pre-empting what it was doing) for ``guest_handler_ns`` plus its register
exits, and ``per_completion_ns`` for each used buffer beyond the first (those that come
while it runs included, as Linux's virtblk_done loops until the ring is empty), takes every
used buffer back and asks for the next interrupt. Each queue has its own vector, so its own
decisions and handler.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import simpy

if TYPE_CHECKING:
    from vtrace.sim.queuepath import QueuePath


def raise_interrupt(path: QueuePath, request: int, injection_ns: float) -> bool:
    """Decide and, if wanted, inject; the handler is scheduled. True when one was injected."""
    path.unsignalled = 0
    vq = path.vq
    if not vq.should_notify():
        return False
    vq.disable_cb()
    irq = path.irq
    if irq.counted:
        path.interrupts += 1
        path.monitor.interrupt(request)
    env = path.env
    timeline = path.irq_timeline
    thread = path.thread
    if thread is not None and thread.lock_held:
        # QEMU under TCG: the back end sets the interrupt's event and injects it when it
        # lets go of its big lock; the guest runs on until then
        thread.hold_interrupt(path)
        return True
    start = env.now + injection_ns + irq.delivery_ns
    if timeline.halted:  # the vCPU's thread sleeps in HLT: it is woken first
        start += irq.halted_wake_ns
    start_handler(path, request, start)
    return True


def start_handler(path: QueuePath, request: int, start: float) -> None:
    """Schedule the guest's handler for the interrupt ``request``'s completion raised, on
    the queue's vCPU from ``start``."""
    env = path.env
    irq = path.irq
    timeline = path.irq_timeline
    if timeline.handler_free_ns > start:
        start = timeline.handler_free_ns
    cost = irq.handler_ns
    if irq.per_completion_ns > 0:  # each used buffer beyond the first it takes back
        taken = len(path.vq.used)
        path.handler_taken = max(taken, 1)  # the first is in guest_handler_ns
        cost += irq.per_completion_ns * max(0, taken - 1)
    if timeline.speed is not None:  # a slow stretch slows the handler's own work
        cost *= timeline.speed.factor(env.now)
    exits = irq.exits
    if exits.exits:
        path.monitor.exit(request, exits.exits, exits.userspace_exits)
        timeline.exit_ns += exits.time_ns
        cost += exits.time_ns
    end = start + cost
    timeline.handler_free_ns = end
    # the handler pre-empts the vCPU when it starts: whatever the vCPU was doing then
    # finishes `cost` later. Until it starts the vCPU goes on running guest code (adding
    # requests, kicking), and completions the back end publishes meanwhile find
    # used_event where it was: they share this interrupt.
    timeline.preempt(start, cost)
    env.timeout(end - env.now).callbacks.append(path.guest_interrupt_handler)


def handler_goes_on(path: QueuePath) -> bool:
    """At the end of its work so far, does the handler find used buffers that came while
    it ran? Then it takes them too (``per_completion_ns`` each, its vCPU busy that much
    longer) and is called again at the end of that; False when it is done."""
    irq = path.irq
    if irq.per_completion_ns <= 0:
        return False
    now_used = len(path.vq.used)
    more = now_used - path.handler_taken
    if more <= 0:
        return False
    path.handler_taken = now_used
    env = path.env
    timeline = path.irq_timeline
    cost = irq.per_completion_ns * more
    if timeline.speed is not None:
        cost *= timeline.speed.factor(env.now)
    timeline.handler_free_ns = env.now + cost
    timeline.preempt(env.now, cost)
    env.timeout(cost).callbacks.append(path.guest_interrupt_handler)
    return True


def inject_interrupt(path: QueuePath, request: int) -> Generator[simpy.Event, None, None]:
    """The back end's side: decide, and pay ``injection_ns`` (an irqfd write) if it injects."""
    injection_ns = path.irq.injection_ns
    if raise_interrupt(path, request, injection_ns) and injection_ns > 0:
        path.monitor.backend_busy_ns += injection_ns
        yield path.env.timeout(injection_ns)


def completed(path: QueuePath, request: int, count: int) -> Generator[simpy.Event, None, None]:
    """``count`` completions (the last ``request``) are on the used ring: signal them now,
    hold them for more, or arm the coalescing timer."""
    path.last_used_request = request
    path.unsignalled += count
    irq = path.irq
    if irq.coalesce_ns > 0:
        if not path.coalesce_timer_armed:
            coalescing_timer(path)
    elif path.unsignalled >= irq.coalesce_requests:
        yield from inject_interrupt(path, request)


def coalescing_timer(path: QueuePath) -> None:
    """Arm the interrupt coalescing timer; when it fires, interrupt for what was gathered."""
    path.coalesce_timer_armed = True

    def fire(_event: simpy.Event) -> None:
        path.coalesce_timer_armed = False
        if path.unsignalled:
            raise_interrupt(path, path.last_used_request, 0.0)

    path.env.timeout(path.irq.coalesce_ns).callbacks.append(fire)
