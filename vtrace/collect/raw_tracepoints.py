"""Which KVM tracepoints the BPF programs read as raw tracepoints, and why not the others.

A classic tracepoint program runs after the kernel has formatted the event's record (the
layout of its format file); a raw tracepoint program gets the tracepoint's C arguments
before any formatting. On a VM exit that takes about a microsecond, that formatting is a
visible part of the tracer's cost (benchmarks/bench_collector.py measures both).

The raw handlers in probes.c and stat.c are written against the prototypes below (the
``TP_PROTO`` of each tracepoint in the kernel's arch/x86/kvm/trace.h and
include/trace/events/kvm.h). A raw handler is used only where the running kernel's BTF shows
exactly that prototype and the format file has the fields it fills; otherwise the classic
handler, driven by the format file, records the event (and meta.json says why). kvm_exit
and kvm_entry stay classic: their record is computed from the vCPU inside the tracepoint.
"""

from __future__ import annotations

from pathlib import Path

from vtrace.collect import btf
from vtrace.collect.formats import TRACEPOINT_SLOTS, Field

# TP_PROTO argument types as BTF shows them (btf.Param's text), in order.
PROTOTYPES: dict[str, tuple[str, ...]] = {
    # rw, port, size, count, data (the value is read from data: 1, 2 or 4 bytes)
    "kvm_pio": ("u32", "u32", "u32", "u32", "ptr"),
    # type, len, gpa, val (a pointer; the value is read from it, len bytes up to 8)
    "kvm_mmio": ("s32", "s32", "u64", "ptr"),
    "kvm_fast_mmio": ("u64",),  # gpa
    "kvm_userspace_exit": ("u32", "s32"),  # reason, errno
    "kvm_set_irq": ("u32", "s32", "s32"),  # gsi, level, irq_source_id
    "kvm_msi_set_irq": ("u64", "u64"),  # address, data
    "kvm_inj_virq": ("u32", "bool", "bool"),  # vector, soft, reinjected
}
# Events only `vtrace stat` reads: prototype, and the fields its classic handler needs (the
# recorder's are formats.TRACEPOINT_SLOTS).
STAT_PROTOTYPES: dict[str, tuple[str, ...]] = {"kvm_fpu": ("s32",)}  # load: a KVM_RUN starts
STAT_ONLY_FIELDS: dict[str, tuple[str, ...]] = {"kvm_fpu": ("load",)}


def raw_problem(event: str, fields: dict[str, Field], btf_dir: Path = btf.BTF_DIR) -> str | None:
    """Why ``event`` cannot be read as a raw tracepoint here, or None when it can."""
    want = PROTOTYPES.get(event) or STAT_PROTOTYPES.get(event)
    if want is None:
        return "recorded from the formatted record (its fields are computed in the kernel)"
    needed = TRACEPOINT_SLOTS.get(event) or STAT_ONLY_FIELDS[event]
    missing = [n for n in needed if n not in fields]
    if missing:
        return f"the format file lacks {', '.join(missing)}"
    have = btf.tracepoint_params(event, btf_dir=btf_dir)
    if isinstance(have, str):
        return have
    got = tuple(str(p) for p in have)
    if got != want:
        return f"kernel prototype ({', '.join(got)}) is not the known ({', '.join(want)})"
    return None
