"""A tiny KVM guest for tests and benchmarks: real-mode code looping on `out dx, al`.

Run as a separate process so that recordings can filter on its pid:

    python tests/kvm_guest.py --exits N [--ioeventfd] [--wait]

prints one JSON line ``{"pid": ...}`` first (with ``--wait`` it then waits for a line on
stdin, so a recording can be attached before the guest runs), then one JSON line with what
the VMM counted: ``userspace_exits`` by reason, ``outs`` the guest made, ``kicks`` the
eventfd counted, ``duration_s`` and ``cpu_s`` (wall and CPU time of the KVM_RUN loop).

The guest (16-bit real mode, at 0x1000):

    mov dx, PORT          ; BA lo hi
    mov ecx, N            ; 66 B9 n0 n1 n2 n3
again:
    out dx, al            ; EE
    dec ecx               ; 66 49
    jnz again             ; 75 FB
    hlt                   ; F4

Without ``--ioeventfd`` each `out` is a KVM_EXIT_IO to this process (one kvm_pio and one
kvm_userspace_exit); with it the port is registered with KVM_IOEVENTFD, so each `out` is
handled in the kernel (one kvm_pio, no user-space exit, the eventfd counter goes up by one).
Either way the guest ends with `hlt`: one KVM_EXIT_HLT (without an irqchip; with one, made
by ``--irq-lines``/``--irqfd-signals``, KVM handles `hlt` in the kernel, so the guest is
given no interrupt and those options are for IRQ events only, with ``--exits 0``).
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import json
import mmap
import os
import struct
import sys
import time

KVM_GET_API_VERSION = 0xAE00
KVM_CREATE_VM = 0xAE01
KVM_GET_VCPU_MMAP_SIZE = 0xAE04
KVM_CREATE_VCPU = 0xAE41
KVM_SET_USER_MEMORY_REGION = 0x4020AE46
KVM_IOEVENTFD = 0x4040AE79
KVM_RUN = 0xAE80
KVM_GET_REGS, KVM_SET_REGS = 0x8090AE81, 0x4090AE82
KVM_GET_SREGS, KVM_SET_SREGS = 0x8138AE83, 0x4138AE84
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_CREATE_IRQCHIP = 0xAE60
KVM_IRQ_LINE = 0x4008AE61
KVM_IRQFD = 0x4020AE76
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0
KVM_EXIT_IO, KVM_EXIT_HLT = 2, 5
PORT = 0x10
CODE_AT = 0x1000
MEM_BYTES = 0x10000


def guest_code(outs: int, port: int = PORT) -> bytes:
    return (
        b"\xba" + struct.pack("<H", port)
        + b"\x66\xb9" + struct.pack("<I", outs)
        + b"\xee\x66\x49\x75\xfb\xf4"
    )  # fmt: skip


class Guest:
    def __init__(self, outs: int, ioeventfd: bool, irqchip: bool = False) -> None:
        self.kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
        assert fcntl.ioctl(self.kvm, KVM_GET_API_VERSION) == 12
        self.vm = fcntl.ioctl(self.kvm, KVM_CREATE_VM, 0)
        if irqchip:
            fcntl.ioctl(self.vm, KVM_CREATE_IRQCHIP, 0)  # before the vCPU
        self.mem = mmap.mmap(-1, MEM_BYTES, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self.mem[CODE_AT : CODE_AT + 32] = guest_code(outs).ljust(32, b"\xf4")
        addr = ctypes.addressof(ctypes.c_char.from_buffer(self.mem))
        region = struct.pack("<IIQQQ", 0, 0, 0, MEM_BYTES, addr)
        fcntl.ioctl(self.vm, KVM_SET_USER_MEMORY_REGION, region)
        self.eventfd = -1
        if ioeventfd:
            self.eventfd = os.eventfd(0, os.EFD_NONBLOCK)
            req = struct.pack("<QQIiI36x", 0, PORT, 1, self.eventfd, KVM_IOEVENTFD_FLAG_PIO)
            fcntl.ioctl(self.vm, KVM_IOEVENTFD, req)
        self.vcpu = fcntl.ioctl(self.vm, KVM_CREATE_VCPU, 0)
        size = fcntl.ioctl(self.kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
        self.run = mmap.mmap(self.vcpu, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        sregs = bytearray(312)
        fcntl.ioctl(self.vcpu, KVM_GET_SREGS, sregs)
        struct.pack_into("<Q", sregs, 0, 0)  # cs.base
        struct.pack_into("<H", sregs, 12, 0)  # cs.selector
        fcntl.ioctl(self.vcpu, KVM_SET_SREGS, bytes(sregs))
        regs = bytearray(144)
        struct.pack_into("<QQ", regs, 128, CODE_AT, 2)  # rip, rflags
        fcntl.ioctl(self.vcpu, KVM_SET_REGS, bytes(regs))

    def irq_lines(self, gsi: int, n: int) -> None:
        """``n`` KVM_IRQ_LINE calls from this process: one kvm_set_irq event each."""
        for i in range(n):
            fcntl.ioctl(self.vm, KVM_IRQ_LINE, struct.pack("<II", gsi, (i + 1) % 2))

    def irqfd_signals(self, gsi: int, n: int) -> None:
        """Signal ``gsi`` through an irqfd ``n`` times; KVM injects from a kworker.

        Deassigning waits for pending injections, so they are done when this returns."""
        efd = os.eventfd(0)
        fcntl.ioctl(self.vm, KVM_IRQFD, struct.pack("<IIII16x", efd, gsi, 0, 0))
        for _ in range(n):
            os.eventfd_write(efd, 1)
        fcntl.ioctl(
            self.vm, KVM_IRQFD, struct.pack("<IIII16x", efd, gsi, KVM_IRQFD_FLAG_DEASSIGN, 0)
        )
        os.close(efd)

    def run_to_halt(self) -> dict[str, object]:
        exits: dict[int, int] = {}
        t0, cpu0 = time.perf_counter(), time.process_time()
        while True:
            fcntl.ioctl(self.vcpu, KVM_RUN, 0)
            (reason,) = struct.unpack_from("<I", self.run, 8)
            exits[reason] = exits.get(reason, 0) + 1
            if reason != KVM_EXIT_IO:
                break
        duration, cpu = time.perf_counter() - t0, time.process_time() - cpu0
        kicks = 0
        if self.eventfd >= 0:
            try:
                kicks = os.eventfd_read(self.eventfd)
            except BlockingIOError:
                kicks = 0
        return {
            "pid": os.getpid(),
            "userspace_exits": {str(k): v for k, v in exits.items()},
            "halted": exits.get(KVM_EXIT_HLT, 0) == 1,
            "kicks": kicks,
            "duration_s": duration,
            "cpu_s": cpu,  # this process's CPU time in the loop: the guest's and KVM's work
        }


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--exits", type=int, required=True, help="`out` instructions the guest makes")
    ap.add_argument("--ioeventfd", action="store_true")
    ap.add_argument("--wait", action="store_true")
    ap.add_argument("--irq-lines", type=int, default=0, help="KVM_IRQ_LINE calls before running")
    ap.add_argument("--irqfd-signals", type=int, default=0, help="irqfd signals before running")
    ap.add_argument("--gsi", type=int, default=5)
    args = ap.parse_args()
    guest = Guest(args.exits, args.ioeventfd, irqchip=bool(args.irq_lines or args.irqfd_signals))
    print(json.dumps({"pid": os.getpid()}), flush=True)
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
