"""The host's CPUs, when the VM has more threads than the host has CPUs (``vm.host_cpus``).

A vCPU thread holds a CPU while it runs guest code, spinning included; it gives it up only
when the guest halts (an interrupt-driven driver waiting for a completion). A back-end
thread holds one while it works: its passes, and of a wake-up only the part it spends on a
CPU (``backend.wakeup_cpu_share``); for the rest of a wake-up it waits to be scheduled, or
for an idle CPU to wake, and holds none. When a back-end thread has work and every CPU is
held, it takes the CPU of a running vCPU for that work, as Linux's scheduler lets a thread
that wakes after a sleep pre-empt the running one (CFS places a sleeper's virtual run time
behind the current thread's; Documentation/scheduler/sched-design-CFS.rst). The vCPU's time
line moves on by the back end's work: what the guest was doing finishes that much later. It
prefers a vCPU of the queue it serves (the waker's CPU, where the wake-up lands when the
waker's CPU is busy), then any running vCPU not already pre-empted. When no vCPU can give
way (more busy back-end threads than CPUs beside the halted vCPUs), the back-end threads
share what is left and each one's work takes proportionally longer.

vCPUs sharing CPUs among themselves (fewer CPUs than vCPUs) is not modelled: the loader
refuses it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vtrace.sim.vcpu import Vcpu


class HostCpus:
    """Which threads hold the host's CPUs, and what the back end took from the vCPUs."""

    def __init__(self, cpus: int) -> None:
        self.cpus = cpus
        self.vcpus: list[Vcpu] = []
        self.preempted_until: list[float] = []
        self.backends_busy = 0
        self.preempted_ns = 0.0  # vCPU time the back end's work took

    def add_vcpu(self, vcpu: Vcpu) -> None:
        self.vcpus.append(vcpu)
        self.preempted_until.append(0.0)

    def cpu_free(self, now: float) -> bool:
        """Is a host CPU free now (neither a running vCPU's nor a busy back end's)?"""
        until = self.preempted_until
        running = sum(1 for v in self.vcpus if v.running and until[v.index] <= now)
        return running + self.backends_busy < self.cpus

    def backend_done(self, _event: object) -> None:
        """A back-end thread's work on a CPU ended."""
        self.backends_busy -= 1

    def backend_runs(self, now: float, cost_ns: float, home: list[Vcpu]) -> float:
        """A back-end thread works ``cost_ns`` from ``now`` (``home``: the vCPUs of the queue
        it serves); returns how long the work takes on the CPUs it gets."""
        until = self.preempted_until
        running = [v for v in self.vcpus if v.running and until[v.index] <= now]
        if len(running) + self.backends_busy < self.cpus:
            return cost_ns  # a free CPU
        victim = next((v for v in home if v in running), running[0] if running else None)
        if victim is None:  # every CPU is a busy back end's: they share them
            return cost_ns * (self.backends_busy + 1) / self.cpus
        victim.timeline.occupy(now, cost_ns)
        until[victim.index] = now + cost_ns
        self.preempted_ns += cost_ns
        return cost_ns
