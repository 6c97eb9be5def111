"""A vCPU's time line: when the vCPU is next free to run guest code.

Everything a vCPU does is serial: the driver's work, the exits it takes (synchronous: the
vCPU does nothing else until KVM re-enters it), and interrupt handlers that pre-empt it.
The model folds these into one number, the time the vCPU is busy until, instead of an
event per step: same timing, fewer events. :meth:`VcpuTimeline.occupy` is the one
operation that moves it.
"""

from __future__ import annotations

import math

import simpy

from vtrace.sim.speed import GuestSpeed


class VcpuTimeline:
    """When one vCPU is free, and how much of its time went to exits."""

    __slots__ = (
        "_preempts",
        "busy_until_ns",
        "exit_ns",
        "halted",
        "handler_free_ns",
        "lock_wait",
        "preempt_at_ns",
        "speed",
    )

    def __init__(self, speed: GuestSpeed | None = None) -> None:
        self.speed = speed  # its slow stretches (None: always one speed)
        self.halted = False  # the guest halted (HLT): an interrupt must wake its thread
        # its thread sleeps on the back end's lock (to write a kick) until this event: it
        # runs no guest code meanwhile
        self.lock_wait: simpy.Event | None = None
        self.busy_until_ns = 0.0
        self.exit_ns = 0.0  # vCPU time spent in exits (kicks, register accesses, EOIs)
        self.handler_free_ns = 0.0  # when its last interrupt handler ends
        # interrupt handlers still on their way: (start, cost) in start order; the vCPU
        # runs guest code until the first starts (``preempt_at_ns``, inf when none)
        self.preempt_at_ns = math.inf
        self._preempts: list[tuple[float, float]] = []

    def preempt(self, start_ns: float, cost_ns: float) -> None:
        """An interrupt handler will take the vCPU from ``start_ns`` for ``cost_ns``.

        A vCPU busy past ``start_ns`` is occupied at once (the handler runs when it would
        be free, as before); otherwise the handler waits in a list that :meth:`catch_up`
        folds in once the vCPU's time passes its start: no simulation event per handler."""
        if start_ns <= self.busy_until_ns:
            self.occupy(start_ns, cost_ns)
            return
        self._preempts.append((start_ns, cost_ns))
        if start_ns < self.preempt_at_ns:
            self.preempt_at_ns = start_ns

    def catch_up(self, now: float) -> None:
        """Fold in the handlers that have started by ``now``: the vCPU's work then ends
        their cost later."""
        waiting = self._preempts
        while waiting and waiting[0][0] <= now:
            start, cost = waiting.pop(0)
            free = self.busy_until_ns
            self.busy_until_ns = (free if free > start else start) + cost
        self.preempt_at_ns = waiting[0][0] if waiting else math.inf

    def occupy(self, now: float, cost_ns: float) -> float:
        """Occupy the vCPU for ``cost_ns`` from ``now`` or from when it is next free;
        returns when it is free again."""
        if self.preempt_at_ns <= now:
            self.catch_up(now)
        free = self.busy_until_ns
        end = (free if free > now else now) + cost_ns
        self.busy_until_ns = end
        return end

    def exit(self, now: float, cost_ns: float) -> None:
        """An exit of ``cost_ns``: the vCPU's time, counted as exit time."""
        self.exit_ns += cost_ns
        self.occupy(now, cost_ns)
