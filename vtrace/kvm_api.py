"""The /dev/kvm interface the lab VMM needs: ioctl numbers, structures, and thin wrappers.

Numbers and layouts follow ``include/uapi/linux/kvm.h`` (x86-64). Everything is
``ctypes``: a structure is passed to ``ioctl`` by address, and ``struct kvm_run`` is read
in place from the vCPU's shared mapping.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os

from vtrace.errors import VtraceError

KVM_PATH = "/dev/kvm"
KVM_API_VERSION = 12
_KVMIO = 0xAE


def _ioc(direction: int, nr: int, size: int) -> int:
    # asm-generic/ioctl.h: dir(2 bits) | size(14) | type(8) | nr(8)
    return (direction << 30) | (size << 16) | (_KVMIO << 8) | nr


def _io(nr: int) -> int:
    return _ioc(0, nr, 0)


def _iow(nr: int, size: int) -> int:
    return _ioc(1, nr, size)


def _ior(nr: int, size: int) -> int:
    return _ioc(2, nr, size)


class UserspaceMemoryRegion(ctypes.Structure):
    """struct kvm_userspace_memory_region."""

    _fields_ = (
        ("slot", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("guest_phys_addr", ctypes.c_uint64),
        ("memory_size", ctypes.c_uint64),
        ("userspace_addr", ctypes.c_uint64),
    )


class Regs(ctypes.Structure):
    """struct kvm_regs (general-purpose registers, rip, rflags)."""

    _fields_ = tuple(
        (name, ctypes.c_uint64)
        for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9",
                     "r10", "r11", "r12", "r13", "r14", "r15", "rip", "rflags")
    )  # fmt: skip


class Segment(ctypes.Structure):
    """struct kvm_segment (a segment register with its hidden descriptor cache)."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint32),
        ("selector", ctypes.c_uint16),
        ("type", ctypes.c_uint8),
        ("present", ctypes.c_uint8),
        ("dpl", ctypes.c_uint8),
        ("db", ctypes.c_uint8),
        ("s", ctypes.c_uint8),
        ("l", ctypes.c_uint8),
        ("g", ctypes.c_uint8),
        ("avl", ctypes.c_uint8),
        ("unusable", ctypes.c_uint8),
        ("padding", ctypes.c_uint8),
    )


class DTable(ctypes.Structure):
    """struct kvm_dtable (GDTR/IDTR)."""

    _fields_ = (
        ("base", ctypes.c_uint64),
        ("limit", ctypes.c_uint16),
        ("padding", ctypes.c_uint16 * 3),
    )


class Sregs(ctypes.Structure):
    """struct kvm_sregs (segments, descriptor tables, control registers)."""

    _fields_ = (
        *((name, Segment) for name in ("cs", "ds", "es", "fs", "gs", "ss", "tr", "ldt")),
        ("gdt", DTable),
        ("idt", DTable),
        *((name, ctypes.c_uint64) for name in ("cr0", "cr2", "cr3", "cr4", "cr8", "efer")),
        ("apic_base", ctypes.c_uint64),
        ("interrupt_bitmap", ctypes.c_uint64 * 4),
    )


class IoEventFd(ctypes.Structure):
    """struct kvm_ioeventfd."""

    _fields_ = (
        ("datamatch", ctypes.c_uint64),
        ("addr", ctypes.c_uint64),
        ("len", ctypes.c_uint32),
        ("fd", ctypes.c_int32),
        ("flags", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 36),
    )


class IrqFd(ctypes.Structure):
    """struct kvm_irqfd."""

    _fields_ = (
        ("fd", ctypes.c_uint32),
        ("gsi", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("resamplefd", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 16),
    )


class IrqLevel(ctypes.Structure):
    """struct kvm_irq_level."""

    _fields_ = (("irq", ctypes.c_uint32), ("level", ctypes.c_uint32))


class Msi(ctypes.Structure):
    """struct kvm_msi (KVM_SIGNAL_MSI)."""

    _fields_ = (
        ("address_lo", ctypes.c_uint32),
        ("address_hi", ctypes.c_uint32),
        ("data", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
        ("devid", ctypes.c_uint32),
        ("pad", ctypes.c_uint8 * 12),
    )


class RunIo(ctypes.Structure):
    """The `io` member of kvm_run's exit union (KVM_EXIT_IO)."""

    _fields_ = (
        ("direction", ctypes.c_uint8),
        ("size", ctypes.c_uint8),
        ("port", ctypes.c_uint16),
        ("count", ctypes.c_uint32),
        ("data_offset", ctypes.c_uint64),
    )


class RunMmio(ctypes.Structure):
    """The `mmio` member of kvm_run's exit union (KVM_EXIT_MMIO)."""

    _fields_ = (
        ("phys_addr", ctypes.c_uint64),
        ("data", ctypes.c_uint8 * 8),
        ("len", ctypes.c_uint32),
        ("is_write", ctypes.c_uint8),
    )


class RunInternal(ctypes.Structure):
    """The `internal` member of kvm_run's exit union (KVM_EXIT_INTERNAL_ERROR)."""

    _fields_ = (
        ("suberror", ctypes.c_uint32),
        ("ndata", ctypes.c_uint32),
        ("data", ctypes.c_uint64 * 16),
    )


class RunExit(ctypes.Union):
    _fields_ = (
        ("io", RunIo),
        ("mmio", RunMmio),
        ("internal", RunInternal),
        ("hardware_exit_reason", ctypes.c_uint64),
        ("padding", ctypes.c_uint8 * 256),
    )


class Run(ctypes.Structure):
    """The head of struct kvm_run, shared between KVM and the VMM through the vCPU mapping."""

    _fields_ = (
        ("request_interrupt_window", ctypes.c_uint8),
        ("immediate_exit", ctypes.c_uint8),
        ("padding1", ctypes.c_uint8 * 6),
        ("exit_reason", ctypes.c_uint32),
        ("ready_for_interrupt_injection", ctypes.c_uint8),
        ("if_flag", ctypes.c_uint8),
        ("flags", ctypes.c_uint16),
        ("cr8", ctypes.c_uint64),
        ("apic_base", ctypes.c_uint64),
        ("exit", RunExit),
    )


# System, VM and vCPU ioctls.
KVM_GET_API_VERSION = _io(0x00)
KVM_CREATE_VM = _io(0x01)
KVM_CHECK_EXTENSION = _io(0x03)
KVM_GET_VCPU_MMAP_SIZE = _io(0x04)
KVM_CREATE_VCPU = _io(0x41)
KVM_SET_USER_MEMORY_REGION = _iow(0x46, ctypes.sizeof(UserspaceMemoryRegion))
KVM_CREATE_IRQCHIP = _io(0x60)
KVM_IRQ_LINE = _iow(0x61, ctypes.sizeof(IrqLevel))
KVM_IRQFD = _iow(0x76, ctypes.sizeof(IrqFd))
KVM_IOEVENTFD = _iow(0x79, ctypes.sizeof(IoEventFd))
KVM_RUN = _io(0x80)
KVM_GET_REGS = _ior(0x81, ctypes.sizeof(Regs))
KVM_SET_REGS = _iow(0x82, ctypes.sizeof(Regs))
KVM_GET_SREGS = _ior(0x83, ctypes.sizeof(Sregs))
KVM_SET_SREGS = _iow(0x84, ctypes.sizeof(Sregs))
KVM_SIGNAL_MSI = _iow(0xA5, ctypes.sizeof(Msi))

KVM_CAP_IRQCHIP = 0
KVM_CAP_IOEVENTFD = 36
KVM_CAP_IRQFD = 32

KVM_IOEVENTFD_FLAG_DATAMATCH = 1 << 0
KVM_IOEVENTFD_FLAG_PIO = 1 << 1
KVM_IRQFD_FLAG_DEASSIGN = 1 << 0

# kvm_run.exit_reason values (KVM_EXIT_*).
KVM_EXIT_UNKNOWN = 0
KVM_EXIT_IO = 2
KVM_EXIT_HLT = 5
KVM_EXIT_MMIO = 6
KVM_EXIT_SHUTDOWN = 8
KVM_EXIT_FAIL_ENTRY = 9
KVM_EXIT_INTR = 10
KVM_EXIT_INTERNAL_ERROR = 17
KVM_EXIT_IO_IN = 0
KVM_EXIT_IO_OUT = 1

_libc = ctypes.CDLL(None, use_errno=True)
_libc.ioctl.argtypes = (ctypes.c_int, ctypes.c_ulong, ctypes.c_void_p)
_libc.ioctl.restype = ctypes.c_int


def ioctl(fd: int, request: int, arg: ctypes.Structure | int | None = None) -> int:
    """ioctl(2) through libc: releases the GIL (KVM_RUN blocks) and returns the result.

    Raises OSError with the errno; EINTR is retried.
    """
    ptr = ctypes.addressof(arg) if isinstance(arg, ctypes.Structure) else (arg or 0)
    while True:
        ret = _libc.ioctl(fd, request, ptr)
        if ret >= 0:
            return ret
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, f"ioctl {request:#x}: {os.strerror(err)}")


def open_kvm() -> int:
    """Open /dev/kvm and check the API version; VtraceError when KVM is not usable."""
    try:
        fd = os.open(KVM_PATH, os.O_RDWR | os.O_CLOEXEC)
    except FileNotFoundError:
        raise VtraceError(
            f"{KVM_PATH}: not found; the lab needs a KVM host (kvm_intel/kvm_amd loaded)"
        ) from None
    except PermissionError:
        raise VtraceError(
            f"{KVM_PATH}: permission denied; run as root or join the kvm group"
        ) from None
    version = ioctl(fd, KVM_GET_API_VERSION)
    if version != KVM_API_VERSION:
        os.close(fd)
        raise VtraceError(f"{KVM_PATH}: KVM API version {version}, want {KVM_API_VERSION}")
    return fd


def map_run(vcpu_fd: int, size: int) -> tuple[mmap.mmap, Run]:
    """Map the vCPU's kvm_run area and view its head as a :class:`Run`."""
    area = mmap.mmap(vcpu_fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    return area, Run.from_buffer(area)
