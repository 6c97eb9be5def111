"""What one PIO write costs: handled in user space (an exit to this VMM and back) versus
handled in the kernel (a port registered with ``KVM_IOEVENTFD``: no user-space exit).

The guest (``guest/pio_loop.asm``) writes one byte to PORT_LOOP in a tight loop; a second
guest (``guest/spin_loop.asm``) runs the same loop with a ``nop`` in place of the write,
so the loop's own cost can be subtracted. On a host without VMX/SVM every guest
instruction goes through KVM's emulator, and that baseline is large.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from typing import Any, Literal

from vtrace.errors import VtraceError
from vtrace.lab import layout as L
from vtrace.lab.vmm import Vm, guest_program

Handling = Literal["userspace", "ioeventfd", "none"]
HANDLINGS: tuple[str, ...] = ("userspace", "ioeventfd", "none")


@dataclass(frozen=True)
class ExitCost:
    """One timed loop of ``writes`` iterations."""

    handling: str  # userspace, ioeventfd, or none (the loop without the write)
    writes: int
    duration_s: float
    per_write_ns: float  # loop time per iteration, loop instructions included
    userspace_exits: int  # KVM_RUN returns, the final PORT_DONE write included
    eventfd_count: int  # what the ioeventfd counted (ioeventfd only)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def measure_exit_cost(writes: int = 100_000, handling: str = "userspace") -> ExitCost:
    """Run the write loop once under ``handling`` and time it with CLOCK_MONOTONIC."""
    if not 1 <= writes <= 1 << 31:
        raise VtraceError(f"--writes: {writes} is not between 1 and {1 << 31}")
    if handling not in HANDLINGS:
        raise VtraceError(f"--handling: {handling!r} is not one of {', '.join(HANDLINGS)}")
    eventfd = -1
    with Vm(L.RING_BASE) as vm:
        vm.load(guest_program("spin_loop" if handling == "none" else "pio_loop"))
        vm.write_u32(L.PARAM_BASE + L.P_REQUESTS, writes)
        done = vm.stop_on(L.PORT_DONE, L.PORT_STALL)
        if handling == "ioeventfd":
            eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            vm.add_ioeventfd(L.PORT_LOOP, 1, eventfd)
        else:
            vm.out_handlers[L.PORT_LOOP] = _ignore
        try:
            t0 = time.monotonic_ns()
            vm.run(10.0 + writes * 1e-4)
            t1 = time.monotonic_ns()
            counted = 0
            if eventfd >= 0:
                try:
                    counted = os.eventfd_read(eventfd)
                except BlockingIOError:
                    counted = 0
        finally:
            if eventfd >= 0:
                os.close(eventfd)
        exits = vm.userspace_exits
    if done != [0]:
        raise VtraceError(f"exit-cost guest stopped early ({done})")
    return ExitCost(handling, writes, (t1 - t0) / 1e9, (t1 - t0) / writes, exits, counted)


def _ignore(value: int) -> None:
    """A register write the device model accepts and drops."""
