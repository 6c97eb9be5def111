"""Run a tiny real-mode guest on /dev/kvm and (optionally) record its kvm tracepoints.

The guest is 40 bytes of 16-bit code that, on every loop, does:

    out 0x500, al        -> kvm_pio write, exits to user space (KVM_EXIT_IO)
    out 0x504, al        -> kvm_pio write claimed by an ioeventfd: handled in the kernel
    in  al, 0x500        -> kvm_pio read, exits to user space
    mov [es:0], al       -> kvm_mmio write at gpa 0x10000, exits to user space (KVM_EXIT_MMIO)
    mov [es:8], al       -> kvm_mmio write at gpa 0x10008, claimed by an ioeventfd
    mov al, [es:4]       -> kvm_mmio read at gpa 0x10004, exits to user space
    rep outsb (cx = 4)   -> kvm_pio write with count 4 to port 0x500 (KVM_EXIT_IO)
    jmp start

After each loop the VMM raises and lowers GSI 5 with KVM_IRQ_LINE (kvm_set_irq) and sends
one MSI with KVM_SIGNAL_MSI (kvm_msi_set_irq), both through the in-kernel irqchip.

Usage (as root):
    python make_kvm_capture.py guest --loops N         run the guest only (for perf/trace-cmd)
    python make_kvm_capture.py tracefs OUT --loops N   record every kvm event of this process
                                                       through a private tracefs instance and
                                                       write its `trace` text to OUT

Source of the assembly (nasm -f bin):
    bits 16
    start: mov dx, 0x500 / mov al, 0x41 / out dx, al / mov dx, 0x504 / out dx, al
           mov dx, 0x500 / in al, dx / mov [es:0], al / mov [es:8], al / mov al, [es:4]
           mov si, msg / mov cx, 4 / rep outsb / jmp start
    msg:   db "vtr", 10
"""

from __future__ import annotations

import argparse
import ctypes
import fcntl
import mmap
import os
import struct
from pathlib import Path

GUEST_CODE = bytes.fromhex(
    "ba0005b041ee ba0405ee ba0005ec 26a20000 26a20800 26a00400 be2400 b90400 f36e ebdc 7674720a"
)
USER_PORT = 0x500
KICK_PORT = 0x504
MMIO_BASE = 0x10000  # es = 0x1000; no memory there, so accesses are MMIO
KICK_GPA = MMIO_BASE + 8
IRQ_GSI = 5
MSI_ADDRESS = 0xFEE00000
MSI_DATA = 0x31  # vector 0x31, fixed, edge

KVMIO = 0xAE


def _io(nr: int) -> int:
    return (KVMIO << 8) | nr


def _iow(nr: int, size: int) -> int:
    return (1 << 30) | (size << 16) | (KVMIO << 8) | nr


def _ior(nr: int, size: int) -> int:
    return (2 << 30) | (size << 16) | (KVMIO << 8) | nr


KVM_CREATE_VM = _io(0x01)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, 32)
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, 8)
KVM_IOEVENTFD = _iow(0x79, 64)
KVM_SIGNAL_MSI = _iow(0xA5, 32)
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, 144)
KVM_SET_REGS = _iow(0x82, 144)
KVM_GET_SREGS = _ior(0x83, 312)
KVM_SET_SREGS = _iow(0x84, 312)
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_EXIT_IO = 2
KVM_EXIT_MMIO = 6
SEGMENT_BYTES = 24  # struct kvm_segment


def run_guest(loops: int) -> dict[str, int]:
    """Run the guest for ``loops`` loops; return counts of what the VMM saw."""
    kvm = os.open("/dev/kvm", os.O_RDWR | os.O_CLOEXEC)
    vm = fcntl.ioctl(kvm, KVM_CREATE_VM, 0)
    fcntl.ioctl(vm, KVM_CREATE_IRQCHIP, 0)
    mem = mmap.mmap(-1, 0x1000)
    mem.write(GUEST_CODE)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(mem))
    fcntl.ioctl(vm, KVM_SET_USER_MEMORY_REGION, struct.pack("=IIQQQ", 0, 0, 0, 0x1000, addr))
    kicks = []
    for gpa, flags in ((KICK_PORT, KVM_IOEVENTFD_FLAG_PIO), (KICK_GPA, 0)):
        efd = os.eventfd(0, os.EFD_NONBLOCK)
        fcntl.ioctl(vm, KVM_IOEVENTFD, struct.pack("=QQIiI36x", 0, gpa, 1, efd, flags))
        kicks.append(efd)
    vcpu = fcntl.ioctl(vm, KVM_CREATE_VCPU, 0)
    run_size = fcntl.ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0)
    run = mmap.mmap(vcpu, run_size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)

    sregs = bytearray(312)
    fcntl.ioctl(vcpu, KVM_GET_SREGS, sregs)
    struct.pack_into("=QIH", sregs, 0 * SEGMENT_BYTES, 0, 0xFFFF, 0)  # cs: base 0
    struct.pack_into("=QIH", sregs, 1 * SEGMENT_BYTES, 0, 0xFFFF, 0)  # ds: base 0
    struct.pack_into("=QIH", sregs, 2 * SEGMENT_BYTES, MMIO_BASE, 0xFFFF, MMIO_BASE >> 4)  # es
    fcntl.ioctl(vcpu, KVM_SET_SREGS, bytes(sregs))
    regs = bytearray(144)
    fcntl.ioctl(vcpu, KVM_GET_REGS, regs)
    struct.pack_into("=QQ", regs, 16 * 8, 0, 0x2)  # rip 0, rflags: reserved bit 1
    fcntl.ioctl(vcpu, KVM_SET_REGS, bytes(regs))

    # A loop starts with `out 0x500` of 0x41 and ends with the last byte of `rep outsb`
    # (0x0a); the in-kernel emulator repeats `rep outsb` as one exit per byte.
    seen = {"loops": 0, "io_out": 0, "io_in": 0, "mmio_write": 0, "mmio_read": 0}
    while True:
        fcntl.ioctl(vcpu, KVM_RUN, 0)
        reason = struct.unpack_from("=I", run, 8)[0]
        if reason == KVM_EXIT_IO:
            direction, _size, port, _count, offset = struct.unpack_from("=BBHIQ", run, 32)
            if port != USER_PORT:
                raise RuntimeError(f"unexpected port 0x{port:x}")
            if direction == 1 and run[offset] == 0x41 and seen["loops"] == loops:
                break
            if direction == 1:
                seen["io_out"] += 1
                if run[offset] == 0x0A:
                    seen["loops"] += 1
                    for level in (1, 0):
                        fcntl.ioctl(vm, KVM_IRQ_LINE, struct.pack("=II", IRQ_GSI, level))
                    msi = struct.pack("=IIII16x", MSI_ADDRESS, 0, MSI_DATA, 0)
                    fcntl.ioctl(vm, KVM_SIGNAL_MSI, msi)
            else:
                seen["io_in"] += 1
                run[offset] = 0x5A
        elif reason == KVM_EXIT_MMIO:
            is_write = run[32 + 8 + 8 + 4]
            seen["mmio_write" if is_write else "mmio_read"] += 1
        else:
            raise RuntimeError(f"unexpected exit reason {reason}")
    seen["kicks"] = sum(int.from_bytes(os.read(fd, 8), "little") for fd in kicks)
    for fd in (*kicks, vcpu, vm, kvm):
        os.close(fd)
    return seen


def record_tracefs(out: Path, loops: int) -> dict[str, int]:
    """Record all kvm events of this process through a private tracefs instance."""
    inst = Path("/sys/kernel/tracing/instances/vtrace_capture")
    inst.mkdir(exist_ok=True)
    try:
        (inst / "trace").write_text("")
        (inst / "set_event_pid").write_text(str(os.getpid()))
        (inst / "events/kvm/enable").write_text("1")
        (inst / "tracing_on").write_text("1")
        seen = run_guest(loops)
        (inst / "tracing_on").write_text("0")
        (inst / "events/kvm/enable").write_text("0")
        out.write_text((inst / "trace").read_text())
    finally:
        inst.rmdir()
    return seen


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("mode", choices=["guest", "tracefs"])
    ap.add_argument("out", nargs="?", type=Path)
    ap.add_argument("--loops", type=int, default=5)
    args = ap.parse_args()
    if args.mode == "guest":
        print(run_guest(args.loops))
    else:
        if args.out is None:
            ap.error("tracefs needs OUT")
        print(record_tracefs(args.out, args.loops))


if __name__ == "__main__":
    main()
