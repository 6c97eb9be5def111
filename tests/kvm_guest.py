"""A tiny KVM guest for tests and benchmarks: real-mode code looping on `out dx, al`.

Run as a separate process so that recordings can filter on its pid:

    python tests/kvm_guest.py --exits N [--ioeventfd] [--wait]

prints one JSON line ``{"pid": ...}`` first (with ``--wait`` it then waits for a line on
stdin, so a recording can be attached before the guest runs), then one JSON line with what
the VMM counted: ``userspace_exits`` by reason, ``outs`` the guest made, ``kicks`` the
eventfd counted, ``duration_s`` and ``cpu_s`` (wall and CPU time of the KVM_RUN loop, which
runs in the main thread).

The guest is vtrace/lab/guest/real_pio_loop.asm (16-bit real mode, at 0x1000), run by the
lab's VMM (vtrace.lab.vmm.Vm) in this process's main thread:

    mov dx, 0x10
    mov ecx, [COUNT_AT]   ; N, written by the VMM
again:
    out dx, al
    dec ecx
    jnz again
    hlt

Without ``--ioeventfd`` each `out` is a KVM_EXIT_IO to this process (one kvm_pio and one
kvm_userspace_exit); with it the port is registered with KVM_IOEVENTFD, so each `out` is
handled in the kernel (one kvm_pio, no user-space exit, the eventfd counter goes up by one).
Either way the guest ends with `hlt`: one KVM_EXIT_HLT (without an irqchip; with one, made
by ``--irq-lines``/``--irqfd-signals``, KVM handles `hlt` in the kernel, so the guest is
given no interrupt and those options are for IRQ events only, with ``--exits 0``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from vtrace.kvm_api import KVM_EXIT_HLT
from vtrace.lab.layout import GUEST_DIR, read_layout
from vtrace.lab.vmm import Vm, guest_program

GUEST = "real_pio_loop"
G = read_layout(GUEST_DIR / f"{GUEST}.asm")
PORT = G["OUT_PORT"]
MEM_BYTES = 0x10000


class Guest:
    def __init__(self, outs: int, ioeventfd: bool, irqchip: bool = False) -> None:
        self.vm = Vm(MEM_BYTES, irqchip=irqchip)
        self.vm.load_real_mode(guest_program(GUEST), entry=G["CODE_AT"])
        self.vm.write_u32(G["COUNT_AT"], outs)
        self.vm.stop_on_hlt = True
        self.eventfd = -1
        if ioeventfd:
            self.eventfd = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            self.vm.add_ioeventfd(PORT, 1, self.eventfd)
        else:
            self.vm.out_handlers[PORT] = _ignore

    def restart(self, outs: int) -> None:
        """Back to the start of the program with a new count (the VM and its eventfd stay)."""
        self.vm.load_real_mode(guest_program(GUEST), entry=G["CODE_AT"])
        self.vm.write_u32(G["COUNT_AT"], outs)
        self.vm.exit_reasons.clear()

    def irq_lines(self, gsi: int, n: int) -> None:
        """``n`` KVM_IRQ_LINE calls from this process: one kvm_set_irq event each."""
        for i in range(n):
            self.vm.set_irq_line(gsi, (i + 1) % 2)

    def irqfd_signals(self, gsi: int, n: int) -> None:
        """Signal ``gsi`` through an irqfd ``n`` times; KVM injects from a kworker.

        Removing the irqfd waits for pending injections, so they are done when this returns."""
        efd = os.eventfd(0, os.EFD_CLOEXEC)
        self.vm.add_irqfd(efd, gsi)
        for _ in range(n):
            os.eventfd_write(efd, 1)
        self.vm.remove_irqfd(efd, gsi)
        os.close(efd)

    def run_to_halt(self) -> dict[str, object]:
        # The vCPU runs in this thread: its CPU time is the guest's and KVM's work (the
        # process's would add what the libraries imported above do in their own threads).
        t0, cpu0 = time.perf_counter(), time.thread_time()
        self.vm.run()
        duration, cpu = time.perf_counter() - t0, time.thread_time() - cpu0
        kicks = 0
        if self.eventfd >= 0:
            try:
                kicks = os.eventfd_read(self.eventfd)
            except BlockingIOError:
                kicks = 0
        exits = self.vm.exit_reasons
        return {
            "pid": os.getpid(),
            "userspace_exits": {str(k): v for k, v in exits.items()},
            "halted": exits.get(KVM_EXIT_HLT, 0) == 1,
            "kicks": kicks,
            "duration_s": duration,
            "cpu_s": cpu,  # the vCPU thread's CPU time in the loop
        }


def _ignore(value: int) -> None:
    """The port accepts and drops what the guest writes."""


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exits", type=int, required=True, help="`out` instructions the guest makes")
    ap.add_argument("--ioeventfd", action="store_true")
    ap.add_argument("--wait", action="store_true")
    ap.add_argument("--irq-lines", type=int, default=0, help="KVM_IRQ_LINE calls before running")
    ap.add_argument("--irqfd-signals", type=int, default=0, help="irqfd signals before running")
    ap.add_argument("--gsi", type=int, default=5)
    ap.add_argument(
        "--segments",
        action="store_true",
        help="after the pid, read one count per stdin line and run that many `out`s in the "
        "same VM, printing one JSON line each, until end of input (benchmarks alternate "
        "tracing on and off between segments)",
    )
    args = ap.parse_args()
    guest = Guest(args.exits, args.ioeventfd, irqchip=bool(args.irq_lines or args.irqfd_signals))
    print(json.dumps({"pid": os.getpid()}), flush=True)
    if args.segments:
        for line in sys.stdin:
            guest.restart(int(line))
            print(json.dumps({**guest.run_to_halt(), "outs": int(line)}), flush=True)
        return
    if args.wait:
        sys.stdin.readline()
    if args.irq_lines:
        guest.irq_lines(args.gsi, args.irq_lines)
    if args.irqfd_signals:
        guest.irqfd_signals(args.gsi, args.irqfd_signals)
    ran = guest.run_to_halt() if args.exits else {"pid": os.getpid(), "userspace_exits": {}}
    print(json.dumps({**ran, "outs": args.exits}), flush=True)


if __name__ == "__main__":
    main()
