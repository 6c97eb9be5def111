"""A minimal VMM on /dev/kvm: one VM, one memory slot, one vCPU in flat 32-bit mode.

The vCPU runs in the thread that calls :meth:`Vm.run`; every return from ``KVM_RUN`` is a
user-space exit this VMM handles and counts. Port I/O is dispatched to handlers the device
models register; ports registered with ``KVM_IOEVENTFD`` never reach user space.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path

from vtrace.errors import VtraceError
from vtrace.lab import kvm
from vtrace.lab import layout as L

OutHandler = Callable[[int], None]
InHandler = Callable[[], int]

# exit_reason (u32 at 8) ... io {direction u8, size u8, port u16, count u32, data_offset u64}
# at 32: one unpack per exit instead of several ctypes attribute walks.
_EXIT_IO = struct.Struct("<I20xBBHIQ")
_EXIT_IO_OFFSET = 8
_MEMORY_ALIGN_BYTES = 2 << 20


class GuestStopped(Exception):
    """Raised by a port handler to end :meth:`Vm.run` (the guest said it is done)."""


def _flat_segment(selector: int, type_: int) -> kvm.Segment:
    return kvm.Segment(
        base=0, limit=0xFFFFFFFF, selector=selector, type=type_, present=1, dpl=0, db=1,
        s=1, l=0, g=1, avl=0, unusable=0,
    )  # fmt: skip


class Vm:
    """One lab VM: guest memory, an optional in-kernel irqchip, one vCPU."""

    def __init__(self, memory_bytes: int, *, irqchip: bool = False) -> None:
        self._fds: list[int] = []
        try:
            self._create(memory_bytes, irqchip)
        except BaseException:
            for fd in reversed(self._fds):
                os.close(fd)
            raise

    def _create(self, memory_bytes: int, irqchip: bool) -> None:
        self.kvm_fd = self._keep(kvm.open_kvm())
        self.vm_fd = self._keep(kvm.ioctl(self.kvm_fd, kvm.KVM_CREATE_VM, 0))
        size = -(-memory_bytes // _MEMORY_ALIGN_BYTES) * _MEMORY_ALIGN_BYTES
        # Anonymous and lazily backed: only pages the guest and back end touch cost RAM.
        self.memory = mmap.mmap(-1, size, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._memory_anchor = ctypes.c_char.from_buffer(self.memory)
        region = kvm.UserspaceMemoryRegion(
            slot=0, flags=0, guest_phys_addr=0, memory_size=size,
            userspace_addr=ctypes.addressof(self._memory_anchor),
        )  # fmt: skip
        kvm.ioctl(self.vm_fd, kvm.KVM_SET_USER_MEMORY_REGION, region)
        self.memory_bytes = size
        self.irqchip = False
        if irqchip:
            # Before the vCPU exists, so the vCPU gets an in-kernel local APIC.
            try:
                kvm.ioctl(self.vm_fd, kvm.KVM_CREATE_IRQCHIP, 0)
                self.irqchip = True
            except OSError as e:
                raise VtraceError(f"KVM_CREATE_IRQCHIP failed: {e.strerror}") from None
        self.vcpu_fd = self._keep(kvm.ioctl(self.vm_fd, kvm.KVM_CREATE_VCPU, 0))
        run_size = kvm.ioctl(self.kvm_fd, kvm.KVM_GET_VCPU_MMAP_SIZE, 0)
        self._run_area, self._run = kvm.map_run(self.vcpu_fd, run_size)
        self.out_handlers: dict[int, OutHandler] = {}
        self.in_handlers: dict[int, InHandler] = {}
        self.userspace_exits = 0
        self.exit_reasons: dict[int, int] = {}
        self.hung = False
        self.vcpu_tid = 0  # the thread that ran KVM_RUN, once the vCPU has run

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    # -- set-up ----------------------------------------------------------------------------
    def load(self, program: bytes, *, entry: int = L.CODE_BASE) -> None:
        """Copy the guest program to ``entry`` and point the vCPU at it in flat 32-bit mode."""
        self.memory[entry : entry + len(program)] = program
        # A GDT in guest memory matching the cached segments below, so anything that
        # reloads a segment (an interrupt gate, iret) finds the same flat descriptors.
        gdt = struct.pack("<QQQ", 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)
        self.memory[L.GDT_BASE : L.GDT_BASE + len(gdt)] = gdt
        sregs = kvm.Sregs()
        kvm.ioctl(self.vcpu_fd, kvm.KVM_GET_SREGS, sregs)
        sregs.cs = _flat_segment(L.CODE_SEL, 0xB)  # execute/read, accessed
        for name in ("ds", "es", "fs", "gs", "ss"):
            setattr(sregs, name, _flat_segment(L.DATA_SEL, 0x3))  # read/write, accessed
        sregs.gdt = kvm.DTable(base=L.GDT_BASE, limit=len(gdt) - 1)
        sregs.idt = kvm.DTable(base=L.IDT_BASE, limit=256 * 8 - 1)
        sregs.cr0 = (sregs.cr0 | 0x1) & ~0x80000000  # protected mode, no paging
        kvm.ioctl(self.vcpu_fd, kvm.KVM_SET_SREGS, sregs)
        regs = kvm.Regs(rip=entry, rsp=L.STACK_TOP, rflags=0x2)
        kvm.ioctl(self.vcpu_fd, kvm.KVM_SET_REGS, regs)

    def write_u32(self, addr: int, value: int) -> None:
        struct.pack_into("<I", self.memory, addr, value)

    def read_u32(self, addr: int) -> int:
        return struct.unpack_from("<I", self.memory, addr)[0]

    def add_ioeventfd(self, port: int, length: int, fd: int) -> None:
        """Let KVM signal ``fd`` for guest writes of ``length`` bytes to ``port``, in kernel."""
        req = kvm.IoEventFd(
            datamatch=0, addr=port, len=length, fd=fd, flags=kvm.KVM_IOEVENTFD_FLAG_PIO
        )
        try:
            kvm.ioctl(self.vm_fd, kvm.KVM_IOEVENTFD, req)
        except OSError as e:
            raise VtraceError(f"KVM_IOEVENTFD on port {port:#x} failed: {e.strerror}") from None

    def add_irqfd(self, fd: int, gsi: int) -> None:
        """Let a write to eventfd ``fd`` raise interrupt line ``gsi`` (needs the irqchip)."""
        try:
            kvm.ioctl(self.vm_fd, kvm.KVM_IRQFD, kvm.IrqFd(fd=fd, gsi=gsi))
        except OSError as e:
            raise VtraceError(f"KVM_IRQFD on GSI {gsi} failed: {e.strerror}") from None

    def stop_on(self, done_port: int, stall_port: int) -> list[int]:
        """End :meth:`run` on a write to either port; the returned list gets what was written
        (a write to ``stall_port`` is recorded as ``0x100 | value``)."""
        written: list[int] = []

        def on_done(value: int) -> None:
            written.append(value)
            raise GuestStopped

        def on_stall(value: int) -> None:
            written.append(0x100 | value)
            raise GuestStopped

        self.out_handlers[done_port] = on_done
        self.out_handlers[stall_port] = on_stall
        return written

    # -- running ---------------------------------------------------------------------------
    def run(self, timeout_s: float | None = None) -> None:
        """Run the vCPU until a handler raises :class:`GuestStopped`.

        Every ``KVM_RUN`` return is counted in ``userspace_exits`` (by reason in
        ``exit_reasons``; -1 for a return interrupted by a signal). With ``timeout_s`` the
        vCPU runs in its own thread and a guest that has not finished by then (say, asleep
        in ``hlt`` waiting for an interrupt that never comes) raises :class:`VtraceError`;
        that VM is then left to the process's exit, since nothing can pull a vCPU out of
        the kernel from another thread without signals.
        """
        if timeout_s is None:
            self._run_vcpu()
            return
        failure: list[BaseException] = []

        def vcpu() -> None:
            try:
                self._run_vcpu()
            except BaseException as e:
                failure.append(e)

        thread = threading.Thread(target=vcpu, name="vtrace-lab-vcpu0", daemon=True)
        thread.start()
        try:
            thread.join(timeout_s)
        except BaseException:  # Ctrl-C: the vCPU still uses the VM, leave it to the exit
            self.hung = True
            raise
        if thread.is_alive():
            self.hung = True
            raise VtraceError(
                f"the guest did not finish within {timeout_s:g} s "
                f"({self.userspace_exits} user-space exits so far)"
            )
        if failure:
            raise failure[0]

    def _run_vcpu(self) -> None:
        self.vcpu_tid = threading.get_native_id()
        area, vcpu_fd = self._run_area, self.vcpu_fd
        outs, ins = self.out_handlers, self.in_handlers
        libc_ioctl, run_request = kvm._libc.ioctl, kvm.KVM_RUN
        unpack, from_bytes = _EXIT_IO.unpack_from, int.from_bytes
        reasons = self.exit_reasons
        try:
            while True:
                ret = libc_ioctl(vcpu_fd, run_request, 0)
                self.userspace_exits += 1
                if ret < 0:
                    err = ctypes.get_errno()
                    if err in (errno.EINTR, errno.EAGAIN):
                        reasons[-1] = reasons.get(-1, 0) + 1
                        continue
                    raise VtraceError(f"KVM_RUN failed: {os.strerror(err)}")
                reason, direction, size, port, count, offset = unpack(area, _EXIT_IO_OFFSET)
                reasons[reason] = reasons.get(reason, 0) + 1
                if reason != kvm.KVM_EXIT_IO or count != 1:
                    self._unexpected_exit(reason, count)
                if direction == kvm.KVM_EXIT_IO_OUT:
                    handler = outs.get(port)
                    if handler is None:
                        raise VtraceError(f"guest wrote to unhandled port {port:#x}")
                    handler(from_bytes(area[offset : offset + size], "little"))
                else:
                    read = ins.get(port)
                    if read is None:
                        raise VtraceError(f"guest read from unhandled port {port:#x}")
                    area[offset : offset + size] = read().to_bytes(size, "little")
        except GuestStopped:
            return

    def _unexpected_exit(self, reason: int, count: int) -> None:
        regs = kvm.Regs()
        kvm.ioctl(self.vcpu_fd, kvm.KVM_GET_REGS, regs)
        detail = ""
        if reason == kvm.KVM_EXIT_IO:
            detail = f" (string I/O, count {count}, is not emulated)"
        elif reason == kvm.KVM_EXIT_INTERNAL_ERROR:
            detail = f" (suberror {self._run.exit.internal.suberror})"
        raise VtraceError(f"guest stopped with exit reason {reason}{detail} at rip {regs.rip:#x}")

    def close(self) -> None:
        """Release the vCPU mapping, guest memory and file descriptors.

        A hung vCPU still uses them: they are left for the process's exit.
        """
        if self.hung:
            return
        del self._run
        self._run_area.close()
        del self._memory_anchor
        self.memory.close()
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def guest_program(name: str) -> bytes:
    """The assembled bytes of ``vtrace/lab/guest/<name>.bin``."""
    path = Path(L.GUEST_DIR, f"{name}.bin")
    return path.read_bytes()
