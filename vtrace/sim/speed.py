"""A vCPU thread's speed: stretches of time in which the guest's code runs slower.

A vCPU thread does not always run guest code at one speed on a shared host: for a while
it runs slower, then fast again (what slows it, a busy sibling hyperthread or the host's
own scheduling, is not in the trace). In the QEMU lab's runs under TCG
(traces/qemu-virtio-blk-sched), whole lots of four requests halted either about 41 or
about 70 µs after their first kick, in stretches of up to a few hundred lots; in the slow
stretches the guest adds a request about every 8 to 10 µs instead of 5, slower than QEMU
pops (about 4 µs), and a deep lot goes in many small pieces.

With ``vcpu.slow_share`` above 0 each vCPU alternates between fast and slow stretches of
exponential length: slow ones of mean ``slow_stretch_ns``, fast ones of mean
``slow_stretch_ns x (1 - share) / share``, so that ``share`` of its time is slow. In a slow
stretch the guest's own work (the driver's per-request work, the interrupt handler) takes
``slow_factor`` times as long; exits are the host's work and keep their cost. The state is
advanced lazily when the vCPU asks for it: no simulation event per stretch.
"""

from __future__ import annotations

import math

import numpy as np

from vtrace.sim.draws import Draws


class GuestSpeed:
    """One vCPU's fast and slow stretches."""

    __slots__ = ("_draws", "_factor", "_fast_ns", "_slow", "_slow_ns", "_until")

    def __init__(
        self, share: float, factor: float, stretch_ns: float, rng: np.random.Generator
    ) -> None:
        self._factor = factor
        self._slow_ns = stretch_ns
        self._fast_ns = stretch_ns * (1.0 - share) / share
        self._draws = Draws(lambda k: rng.exponential(1.0, k))
        # the stationary state: slow with probability share; an exponential stretch's
        # remainder is again that exponential
        self._slow = bool(rng.random() < share)
        self._until = math.inf if share >= 1.0 else self._next_stretch()

    def _next_stretch(self) -> float:
        return self._draws.next() * (self._slow_ns if self._slow else self._fast_ns)

    def factor(self, now: float) -> float:
        """How many times longer the guest's own work takes at ``now``."""
        while now >= self._until:
            self._slow = not self._slow
            self._until += self._next_stretch()
        return self._factor if self._slow else 1.0


def guest_speed(
    share: float, factor: float, stretch_ns: float, rng: np.random.Generator
) -> GuestSpeed | None:
    """A vCPU's speed, or None when it always runs at one speed."""
    if share <= 0.0 or factor == 1.0:
        return None
    return GuestSpeed(share, factor, stretch_ns, rng)
