"""A minimal VMM on /dev/kvm: one VM, one memory slot, one or more vCPUs in flat 32-bit mode
(or one in 16-bit real mode, for tiny guests that need no set-up at all).

Each vCPU runs in its own thread (one vCPU without a timeout: the thread that calls
:meth:`Vm.run`); every return from ``KVM_RUN`` is a user-space exit this VMM handles and
counts. Port I/O and MMIO are dispatched to handlers
the device models register; ports and addresses registered with ``KVM_IOEVENTFD`` never
reach user space.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from vtrace import kvm_api as kvm
from vtrace.errors import VtraceError
from vtrace.lab import layout as L
from vtrace.lab.threadclock import ThreadClock

OutHandler = Callable[[int], None]
InHandler = Callable[[], int]

# exit_reason (u32 at 8) ... io {direction u8, size u8, port u16, count u32, data_offset u64}
# at 32: one unpack per exit instead of several ctypes attribute walks.
_EXIT_IO = struct.Struct("<I20xBBHIQ")
_EXIT_IO_OFFSET = 8
_MEMORY_ALIGN_BYTES = 2 << 20
_REAL_MODE_SEGMENT_BYTES = 0x10000


class GuestStopped(Exception):
    """Raised by a port handler to end :meth:`Vm.run` (the guest said it is done)."""


def _flat_segment(selector: int, type_: int) -> kvm.Segment:
    return kvm.Segment(
        base=0, limit=0xFFFFFFFF, selector=selector, type=type_, present=1, dpl=0, db=1,
        s=1, l=0, g=1, avl=0, unusable=0,
    )  # fmt: skip


class _Vcpu:
    """One vCPU: its fd, its ``kvm_run`` mapping and what its thread counted (each thread
    counts its own exits: ``+=`` on a shared counter is not atomic across threads)."""

    def __init__(self, index: int, fd: int, run_size: int) -> None:
        self.index = index
        self.fd = fd
        self.run_area, self.run = kvm.map_run(fd, run_size)
        self.userspace_exits = 0
        self.exit_reasons: dict[int, int] = {}
        self.tid = 0
        self.clock = ThreadClock("vcpu", index)  # its CPU and scheduler counters


class Vm:
    """One lab VM: guest memory, an optional in-kernel irqchip, ``vcpus`` vCPUs."""

    def __init__(
        self,
        memory_bytes: int,
        *,
        irqchip: bool = False,
        memory_align_bytes: int = _MEMORY_ALIGN_BYTES,
        vcpus: int = 1,
    ) -> None:
        """Guest memory is ``memory_bytes`` rounded up to ``memory_align_bytes`` (a multiple
        of the page size), at guest-physical 0; every address above it is MMIO."""
        if memory_align_bytes <= 0 or memory_align_bytes % mmap.PAGESIZE:
            raise ValueError(f"memory_align_bytes {memory_align_bytes} is not a page multiple")
        if not 1 <= vcpus <= L.MAX_VCPUS:
            raise ValueError(f"vcpus {vcpus} is not between 1 and {L.MAX_VCPUS}")
        self._fds: list[int] = []
        try:
            self._create(memory_bytes, irqchip, memory_align_bytes, vcpus)
        except BaseException:
            for fd in reversed(self._fds):
                os.close(fd)
            raise

    def _create(self, memory_bytes: int, irqchip: bool, align_bytes: int, vcpus: int) -> None:
        self.kvm_fd = self._keep(kvm.open_kvm())
        self.vm_fd = self._keep(kvm.ioctl(self.kvm_fd, kvm.KVM_CREATE_VM, 0))
        size = -(-memory_bytes // align_bytes) * align_bytes
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
        run_size = kvm.ioctl(self.kvm_fd, kvm.KVM_GET_VCPU_MMAP_SIZE, 0)
        self.vcpus: list[_Vcpu] = []
        for v in range(vcpus):
            fd = self._keep(kvm.ioctl(self.vm_fd, kvm.KVM_CREATE_VCPU, v))
            self.vcpus.append(_Vcpu(v, fd, run_size))
        self.vcpu_fd = self.vcpus[0].fd  # vCPU 0: the only one of a single-vCPU VM
        self.out_handlers: dict[int, OutHandler] = {}
        self.in_handlers: dict[int, InHandler] = {}
        # MMIO by guest-physical address; a write handler gets the value (little-endian).
        self.mmio_write_handlers: dict[int, OutHandler] = {}
        self.mmio_read_handlers: dict[int, InHandler] = {}
        self.stop_on_hlt = False  # a KVM_EXIT_HLT ends run() (no irqchip: nothing wakes it)
        self.hung = False

    @property
    def userspace_exits(self) -> int:
        """``KVM_RUN`` returns handled, all vCPUs together."""
        return sum(v.userspace_exits for v in self.vcpus)

    @property
    def exit_reasons(self) -> dict[int, int]:
        """The same by exit reason (-1: interrupted by a signal), all vCPUs together."""
        out: dict[int, int] = {}
        for v in self.vcpus:
            for reason, n in v.exit_reasons.items():
                out[reason] = out.get(reason, 0) + n
        return out

    @property
    def vcpu_tid(self) -> int:
        """The thread that ran vCPU 0, once it has run."""
        return self.vcpus[0].tid

    @property
    def vcpu_tids(self) -> list[int]:
        """The thread that ran each vCPU, once they have run."""
        return [v.tid for v in self.vcpus]

    def _keep(self, fd: int) -> int:
        self._fds.append(fd)
        return fd

    # -- set-up ----------------------------------------------------------------------------
    def load(self, program: bytes, *, entry: int = L.CODE_BASE) -> None:
        """Copy the guest program to ``entry`` and point every vCPU at it in flat 32-bit mode.

        vCPU v starts with esi at its parameter block (``PARAM_BASE + v * PARAM_STRIDE``)
        and its own stack (``STACK_TOP - v * STACK_STRIDE``).
        """
        self.memory[entry : entry + len(program)] = program
        # A GDT in guest memory matching the cached segments below, so anything that
        # reloads a segment (an interrupt gate, iret) finds the same flat descriptors.
        gdt = struct.pack("<QQQ", 0, 0x00CF9B000000FFFF, 0x00CF93000000FFFF)
        self.memory[L.GDT_BASE : L.GDT_BASE + len(gdt)] = gdt
        for v in self.vcpus:
            sregs = kvm.Sregs()
            kvm.ioctl(v.fd, kvm.KVM_GET_SREGS, sregs)
            sregs.cs = _flat_segment(L.CODE_SEL, 0xB)  # execute/read, accessed
            for name in ("ds", "es", "fs", "gs", "ss"):
                setattr(sregs, name, _flat_segment(L.DATA_SEL, 0x3))  # read/write, accessed
            sregs.gdt = kvm.DTable(base=L.GDT_BASE, limit=len(gdt) - 1)
            sregs.idt = kvm.DTable(base=L.IDT_BASE, limit=256 * 8 - 1)
            sregs.cr0 = (sregs.cr0 | 0x1) & ~0x80000000  # protected mode, no paging
            kvm.ioctl(v.fd, kvm.KVM_SET_SREGS, sregs)
            regs = kvm.Regs(
                rip=entry,
                rsp=L.STACK_TOP - v.index * L.STACK_STRIDE,
                rsi=param_block(v.index),
                rflags=0x2,
            )
            kvm.ioctl(v.fd, kvm.KVM_SET_REGS, regs)

    def load_real_mode(
        self, program: bytes, *, entry: int, segments: Mapping[str, int] | None = None
    ) -> None:
        """Copy a 16-bit program to ``entry`` and start the vCPU there in real mode.

        cs is 0 (so ``entry`` is below 64 KiB); ``segments`` gives the selectors of ds, es,
        fs, gs and ss (default 0), each a 64 KiB segment at selector x 16, as after a far
        jump or a segment load in real mode. All general-purpose registers start at 0.
        """
        if len(self.vcpus) != 1:
            raise ValueError("a real-mode program runs on a single-vCPU VM")
        if not 0 <= entry <= _REAL_MODE_SEGMENT_BYTES - len(program):
            raise ValueError(f"real-mode program of {len(program)} bytes at {entry:#x}")
        selectors = dict(segments or {})
        unknown = set(selectors) - {"ds", "es", "fs", "gs", "ss"}
        if unknown:
            raise ValueError(f"not a data segment register: {', '.join(sorted(unknown))}")
        self.memory[entry : entry + len(program)] = program
        sregs = kvm.Sregs()
        kvm.ioctl(self.vcpu_fd, kvm.KVM_GET_SREGS, sregs)  # reset state: real mode
        for name in ("cs", "ds", "es", "fs", "gs", "ss"):
            segment, selector = getattr(sregs, name), selectors.get(name, 0)
            segment.selector, segment.base = selector, selector << 4
            segment.limit = _REAL_MODE_SEGMENT_BYTES - 1
        kvm.ioctl(self.vcpu_fd, kvm.KVM_SET_SREGS, sregs)
        kvm.ioctl(self.vcpu_fd, kvm.KVM_SET_REGS, kvm.Regs(rip=entry, rflags=0x2))

    def write_u32(self, addr: int, value: int) -> None:
        struct.pack_into("<I", self.memory, addr, value)

    def read_u32(self, addr: int) -> int:
        return struct.unpack_from("<I", self.memory, addr)[0]

    def add_ioeventfd(self, port: int, length: int, fd: int, *, mmio: bool = False) -> None:
        """Let KVM signal ``fd`` for guest writes of ``length`` bytes to ``port``, in kernel
        (with ``mmio``, ``port`` is a guest-physical address)."""
        flags = 0 if mmio else kvm.KVM_IOEVENTFD_FLAG_PIO
        req = kvm.IoEventFd(datamatch=0, addr=port, len=length, fd=fd, flags=flags)
        try:
            kvm.ioctl(self.vm_fd, kvm.KVM_IOEVENTFD, req)
        except OSError as e:
            where = f"MMIO address {port:#x}" if mmio else f"port {port:#x}"
            raise VtraceError(f"KVM_IOEVENTFD on {where} failed: {e.strerror}") from None

    def add_irqfd(self, fd: int, gsi: int) -> None:
        """Let a write to eventfd ``fd`` raise interrupt line ``gsi`` (needs the irqchip)."""
        try:
            kvm.ioctl(self.vm_fd, kvm.KVM_IRQFD, kvm.IrqFd(fd=fd, gsi=gsi))
        except OSError as e:
            raise VtraceError(f"KVM_IRQFD on GSI {gsi} failed: {e.strerror}") from None

    def remove_irqfd(self, fd: int, gsi: int) -> None:
        """Unbind ``fd`` from ``gsi``; KVM finishes the injections already signalled first."""
        flags = kvm.KVM_IRQFD_FLAG_DEASSIGN
        kvm.ioctl(self.vm_fd, kvm.KVM_IRQFD, kvm.IrqFd(fd=fd, gsi=gsi, flags=flags))

    def set_irq_line(self, gsi: int, level: int) -> None:
        """Drive interrupt line ``gsi`` to ``level`` (KVM_IRQ_LINE; needs the irqchip)."""
        kvm.ioctl(self.vm_fd, kvm.KVM_IRQ_LINE, kvm.IrqLevel(irq=gsi, level=level))

    def signal_msi(self, address: int, data: int) -> None:
        """Inject one message-signalled interrupt (KVM_SIGNAL_MSI; needs the irqchip)."""
        msi = kvm.Msi(address_lo=address & 0xFFFFFFFF, address_hi=address >> 32, data=data)
        kvm.ioctl(self.vm_fd, kvm.KVM_SIGNAL_MSI, msi)

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
        """Run every vCPU until a handler raises :class:`GuestStopped` on it.

        Every ``KVM_RUN`` return is counted in ``userspace_exits`` (by reason in
        ``exit_reasons``; -1 for a return interrupted by a signal). Each vCPU runs in its
        own thread (``vtrace-lab-vcpu<v>``), except a single vCPU without ``timeout_s``,
        which runs in the caller's. A guest that has not finished within ``timeout_s``
        (say, asleep in ``hlt`` waiting for an interrupt that never comes) raises
        :class:`VtraceError`; that VM is then left to the process's exit, since nothing can
        pull a vCPU out of the kernel from another thread without signals.
        """
        if timeout_s is None and len(self.vcpus) == 1:
            self._run_vcpu(self.vcpus[0])
            return
        failure: list[BaseException] = []

        def run_one(v: _Vcpu) -> None:
            try:
                self._run_vcpu(v)
            except BaseException as e:
                failure.append(e)

        threads = [
            threading.Thread(
                target=run_one, args=(v,), name=f"vtrace-lab-vcpu{v.index}", daemon=True
            )
            for v in self.vcpus
        ]
        for thread in threads:
            thread.start()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        try:
            for thread in threads:
                thread.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
        except BaseException:  # Ctrl-C: the vCPUs still use the VM, leave it to the exit
            self.hung = True
            raise
        if any(thread.is_alive() for thread in threads):
            self.hung = True
            raise VtraceError(
                f"the guest did not finish within {timeout_s:g} s "
                f"({self.userspace_exits} user-space exits so far)"
            )
        if failure:
            raise failure[0]

    def _run_vcpu(self, vcpu: _Vcpu) -> None:
        vcpu.clock.start()
        try:
            self._run_loop(vcpu)
        finally:
            vcpu.clock.stop()

    def _run_loop(self, vcpu: _Vcpu) -> None:
        vcpu.tid = threading.get_native_id()
        area, vcpu_fd = vcpu.run_area, vcpu.fd
        outs, ins = self.out_handlers, self.in_handlers
        libc_ioctl, run_request = kvm._libc.ioctl, kvm.KVM_RUN
        unpack, from_bytes = _EXIT_IO.unpack_from, int.from_bytes
        reasons = vcpu.exit_reasons
        try:
            while True:
                ret = libc_ioctl(vcpu_fd, run_request, 0)
                vcpu.userspace_exits += 1
                if ret < 0:
                    err = ctypes.get_errno()
                    if err in (errno.EINTR, errno.EAGAIN):
                        reasons[-1] = reasons.get(-1, 0) + 1
                        continue
                    raise VtraceError(f"KVM_RUN failed: {os.strerror(err)}")
                reason, direction, size, port, count, offset = unpack(area, _EXIT_IO_OFFSET)
                reasons[reason] = reasons.get(reason, 0) + 1
                if reason != kvm.KVM_EXIT_IO or count != 1:
                    self._other_exit(vcpu, reason, count)
                    continue
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

    def _other_exit(self, vcpu: _Vcpu, reason: int, count: int) -> None:
        """An exit other than single port I/O: MMIO, a halt, or the end of the run."""
        if reason == kvm.KVM_EXIT_MMIO:
            mmio = vcpu.run.exit.mmio
            addr, size = mmio.phys_addr, mmio.len
            if mmio.is_write:
                handler = self.mmio_write_handlers.get(addr)
                if handler is None:
                    raise VtraceError(f"guest wrote to unhandled MMIO address {addr:#x}")
                handler(int.from_bytes(bytes(mmio.data)[:size], "little"))
            else:
                read = self.mmio_read_handlers.get(addr)
                if read is None:
                    raise VtraceError(f"guest read from unhandled MMIO address {addr:#x}")
                ctypes.memmove(mmio.data, read().to_bytes(size, "little"), size)
            return
        if reason == kvm.KVM_EXIT_HLT and self.stop_on_hlt:
            raise GuestStopped
        self._unexpected_exit(vcpu, reason, count)

    def _unexpected_exit(self, vcpu: _Vcpu, reason: int, count: int) -> None:
        regs = kvm.Regs()
        kvm.ioctl(vcpu.fd, kvm.KVM_GET_REGS, regs)
        detail = ""
        if reason == kvm.KVM_EXIT_IO:
            detail = f" (string I/O, count {count}, is not emulated)"
        elif reason == kvm.KVM_EXIT_INTERNAL_ERROR:
            detail = f" (suberror {vcpu.run.exit.internal.suberror})"
        where = f"vCPU {vcpu.index} " if len(self.vcpus) > 1 else ""
        raise VtraceError(
            f"guest {where}stopped with exit reason {reason}{detail} at rip {regs.rip:#x}"
        )

    def close(self) -> None:
        """Release the vCPU mapping, guest memory and file descriptors.

        A hung vCPU still uses them: they are left for the process's exit.
        """
        if self.hung:
            return
        for v in self.vcpus:
            del v.run
            v.run_area.close()
        del self._memory_anchor
        self.memory.close()
        for fd in reversed(self._fds):
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> Vm:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def param_block(vcpu: int) -> int:
    """Guest-physical address of vCPU ``vcpu``'s parameter block."""
    return L.PARAM_BASE + vcpu * L.PARAM_STRIDE


def guest_program(name: str) -> bytes:
    """The assembled bytes of ``vtrace/lab/guest/<name>.bin``."""
    path = Path(L.GUEST_DIR, f"{name}.bin")
    return path.read_bytes()
