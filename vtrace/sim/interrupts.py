"""Interrupts: the back end's decision to interrupt, injection, coalescing, the guest handler.

After putting requests on the used ring the back end asks the queue whether the guest wants
an interrupt (``used_event`` / ``VRING_AVAIL_F_NO_INTERRUPT``, or an emulated device's
interrupt line already asserted). It may hold that decision to gather completions: until
``coalesce_requests`` completions are waiting (flushed when it goes idle), or for
``coalesce_ns`` with a timer. An injected interrupt reaches the guest after
``delivery_ns``; the handler then runs on the vCPU (pre-empting what it was doing) for
``guest_handler_ns`` plus its register exits, takes every used buffer back and asks for
the next interrupt.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import TYPE_CHECKING

import simpy

if TYPE_CHECKING:
    from vtrace.sim.engine import Machine


def raise_interrupt(m: Machine, request: int, injection_ns: float) -> bool:
    """Decide and, if wanted, inject; the handler is scheduled. True when one was injected."""
    m.unsignalled = 0
    vq = m.vq
    if not vq.should_notify():
        return False
    vq.disable_cb()
    if m.counts_irqs:
        m.irqs[request] += 1
    env = m.env
    start = env.now + injection_ns + m.irq_delivery_ns
    if m.handler_free_ns > start:
        start = m.handler_free_ns
    cost = m.irq_handler_ns
    cost_exits = m.irq_exits
    if cost_exits.exits:
        m.exits[request] += cost_exits.exits
        m.userspace_exits[request] += cost_exits.userspace_exits
        m.vcpu_exit_ns += cost_exits.time_ns
        cost += cost_exits.time_ns
    end = start + cost
    m.handler_free_ns = end
    # the handler pre-empts the vCPU: whatever it was doing finishes `cost` later
    m.vcpu_free_ns = (m.vcpu_free_ns if m.vcpu_free_ns > start else start) + cost
    env.timeout(end - env.now).callbacks.append(m.guest_interrupt_handler)
    return True


def inject_interrupt(m: Machine, request: int) -> Generator[simpy.Event, None, None]:
    """The back end's side: decide, and pay ``injection_ns`` (an irqfd write) if it injects."""
    injection_ns = m.irq_injection_ns
    if raise_interrupt(m, request, injection_ns) and injection_ns > 0:
        m.backend_busy_ns += injection_ns
        yield m.env.timeout(injection_ns)


def coalescing_timer(m: Machine) -> None:
    """Arm the interrupt coalescing timer; when it fires, interrupt for what was gathered."""
    m.coalesce_timer_armed = True

    def fire(_event: simpy.Event) -> None:
        m.coalesce_timer_armed = False
        if m.unsignalled:
            raise_interrupt(m, m.last_used_request, 0.0)

    m.env.timeout(m.coalesce_ns).callbacks.append(fire)
