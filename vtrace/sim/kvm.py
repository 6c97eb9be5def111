"""KVM exit handling: what one trapped register access costs the vCPU, and where it goes.

An exit is synchronous for the vCPU that took it: the vCPU does nothing else until KVM
re-enters it. Handled in the kernel (an ioeventfd kick, an in-kernel APIC access) it costs
``kvm.kernel_exit_ns``; returned to the VMM in user space (an emulated register) it costs
``kvm.userspace_exit_ns``; either way plus the access's own ``emulation_ns``. Because nothing
else can happen on that vCPU meanwhile, the model folds a sequence of exits into the vCPU's
busy time instead of scheduling one event per exit: same timing, fewer events.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ExitCost:
    """A sequence of exits: total vCPU time, how many exits, how many went to user space."""

    time_ns: float
    exits: int
    userspace_exits: int


NO_EXITS = ExitCost(0.0, 0, 0)


def exit_ns(kvm: dict[str, Any], handler: str, emulation_ns: float = 0.0) -> float:
    """Round trip of one exit handled by ``handler`` (kernel or user)."""
    base = kvm["userspace_exit_ns"] if handler == "user" else kvm["kernel_exit_ns"]
    return base + emulation_ns


def access_exits(kvm: dict[str, Any], accesses: list[dict[str, Any]]) -> ExitCost:
    """The cost of a list of register accesses, each one exit (``count`` times)."""
    time_ns = 0.0
    exits = user = 0
    for a in accesses:
        n = a["count"]
        time_ns += n * exit_ns(kvm, a["handler"], a["emulation_ns"])
        exits += n
        if a["handler"] == "user":
            user += n
    return ExitCost(time_ns, exits, user)
