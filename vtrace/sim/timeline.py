"""A vCPU's time line: when the vCPU is next free to run guest code.

Everything a vCPU does is serial: the driver's work, the exits it takes (synchronous: the
vCPU does nothing else until KVM re-enters it), and interrupt handlers that pre-empt it.
The model folds these into one number, the time the vCPU is busy until, instead of an
event per step: same timing, fewer events. :meth:`VcpuTimeline.occupy` is the one
operation that moves it.
"""

from __future__ import annotations


class VcpuTimeline:
    """When one vCPU is free, and how much of its time went to exits."""

    __slots__ = ("busy_until_ns", "exit_ns", "handler_free_ns")

    def __init__(self) -> None:
        self.busy_until_ns = 0.0
        self.exit_ns = 0.0  # vCPU time spent in exits (kicks, register accesses, EOIs)
        self.handler_free_ns = 0.0  # when its last interrupt handler ends

    def occupy(self, now: float, cost_ns: float) -> float:
        """Occupy the vCPU for ``cost_ns`` from ``now`` or from when it is next free;
        returns when it is free again."""
        free = self.busy_until_ns
        end = (free if free > now else now) + cost_ns
        self.busy_until_ns = end
        return end

    def exit(self, now: float, cost_ns: float) -> None:
        """An exit of ``cost_ns``: the vCPU's time, counted as exit time."""
        self.exit_ns += cost_ns
        self.occupy(now, cost_ns)
