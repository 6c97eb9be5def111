"""Run a tiny real-mode guest on /dev/kvm and (optionally) record its kvm tracepoints.

The guest is vtrace/lab/guest/real_io_mix.asm (40 bytes of 16-bit code, run by the lab's
VMM, vtrace.lab.vmm.Vm); on every loop it does:

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

Usage (as root, from the repository root):
    .venv/bin/python tests/data/make_kvm_capture.py guest --loops N
        run the guest only (for perf/trace-cmd)
    .venv/bin/python tests/data/make_kvm_capture.py tracefs OUT --loops N
        record every kvm event of this process through a private tracefs instance and
        write its `trace` text to OUT
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vtrace.lab.layout import GUEST_DIR, read_layout
from vtrace.lab.vmm import GuestStopped, Vm, guest_program

GUEST = "real_io_mix"
G = read_layout(GUEST_DIR / f"{GUEST}.asm")
MEMORY_BYTES = 0x1000  # one page: everything from MMIO_SEG x 16 up is unbacked, i.e. MMIO
MMIO_BASE = G["MMIO_SEG"] << 4
IRQ_GSI = 5
MSI_ADDRESS = 0xFEE00000
MSI_DATA = 0x31  # vector 0x31, fixed, edge
IN_VALUE = 0x5A  # what the guest's `in` reads


def run_guest(loops: int) -> dict[str, int]:
    """Run the guest for ``loops`` loops; return counts of what the VMM saw."""
    seen = {"loops": 0, "io_out": 0, "io_in": 0, "mmio_write": 0, "mmio_read": 0}
    kicks: list[int] = []
    # The vCPU runs in this (the main) thread: tracefs' set_event_pid matches it.
    with Vm(MEMORY_BYTES, irqchip=True, memory_align_bytes=MEMORY_BYTES) as vm:
        vm.load_real_mode(guest_program(GUEST), entry=G["CODE_AT"], segments={"es": G["MMIO_SEG"]})
        for addr, mmio in ((G["KICK_PORT"], False), (MMIO_BASE + G["MMIO_KICK"], True)):
            kicks.append(os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK))
            vm.add_ioeventfd(addr, 1, kicks[-1], mmio=mmio)

        # A loop starts with the write of LOOP_FIRST and ends with the last byte of `rep
        # outsb` (LOOP_LAST); the in-kernel emulator repeats `rep outsb` as one exit per byte.
        def on_out(value: int) -> None:
            if value == G["LOOP_FIRST"] and seen["loops"] == loops:
                raise GuestStopped
            seen["io_out"] += 1
            if value == G["LOOP_LAST"]:
                seen["loops"] += 1
                for level in (1, 0):
                    vm.set_irq_line(IRQ_GSI, level)
                vm.signal_msi(MSI_ADDRESS, MSI_DATA)

        def on_in() -> int:
            seen["io_in"] += 1
            return IN_VALUE

        def on_mmio_write(value: int) -> None:
            seen["mmio_write"] += 1

        def on_mmio_read() -> int:
            seen["mmio_read"] += 1
            return IN_VALUE  # the byte the guest stored at MMIO_OUT just before

        vm.out_handlers[G["OUT_PORT"]] = on_out
        vm.in_handlers[G["OUT_PORT"]] = on_in
        vm.mmio_write_handlers[MMIO_BASE + G["MMIO_OUT"]] = on_mmio_write
        vm.mmio_read_handlers[MMIO_BASE + G["MMIO_IN"]] = on_mmio_read
        try:
            vm.run()
            seen["kicks"] = sum(_eventfd_count(fd) for fd in kicks)
        finally:
            for fd in kicks:
                os.close(fd)
    return seen


def _eventfd_count(fd: int) -> int:
    try:
        return os.eventfd_read(fd)
    except BlockingIOError:  # never signalled
        return 0


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
