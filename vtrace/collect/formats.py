"""Tracepoint format files -> field offsets and sizes -> ``-D`` defines for the BPF program.

The BPF program reads each field at the offset the running kernel's format file gives, so a
kernel that adds, moves or widens a field still records correctly; a field the kernel lacks
gets offset -1 and reads as 0.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from vtrace.errors import VtraceError

_FIELD = re.compile(
    r"^\s*field:(?P<decl>[^;]+);\s*offset:(?P<offset>\d+);\s*size:(?P<size>\d+);\s*signed:(?P<signed>\d+);",
    re.M,
)


@dataclass(frozen=True)
class Field:
    """One field of a tracepoint record."""

    name: str
    offset: int
    size: int
    signed: bool


def parse_format(text: str, origin: str) -> dict[str, Field]:
    """Fields of one tracepoint format file, by name (common_* included)."""
    fields: dict[str, Field] = {}
    for m in _FIELD.finditer(text):
        decl = m["decl"].strip()
        name = re.sub(r"\[.*\]$", "", decl.split()[-1]).lstrip("*")
        fields[name] = Field(name, int(m["offset"]), int(m["size"]), m["signed"] == "1")
    if not fields:
        raise VtraceError(f"{origin}: not a tracepoint format file (no field: lines)")
    return fields


def read_format(events_dir: Path, system: str, event: str) -> dict[str, Field] | None:
    """Fields of ``system:event`` from tracefs, or None when the kernel has no such event."""
    path = events_dir / system / event / "format"
    try:
        text = path.read_text()
    except OSError:
        return None
    return parse_format(text, str(path))


# What the collector reads of each tracepoint, in record slot order (a0..a4). The record
# layout is fixed (probes.c: struct rec); which field lands in which slot is this table.
TRACEPOINT_SLOTS: dict[str, tuple[str, ...]] = {
    "kvm_exit": ("exit_reason", "isa", "guest_rip", "info1", "info2"),
    "kvm_entry": ("rip", "immediate_exit"),
    "kvm_pio": ("rw", "port", "size", "count", "val"),
    "kvm_mmio": ("type", "len", "gpa", "val"),
    "kvm_fast_mmio": ("gpa",),
    "kvm_userspace_exit": ("reason", "errno"),
    "kvm_set_irq": ("gsi", "level", "irq_source_id"),
    "kvm_msi_set_irq": ("address", "data"),
    "kvm_inj_virq": ("vector", "soft", "reinjected"),
}
# The vCPU id, where the tracepoint carries one (never guessed from thread names).
VCPU_FIELD = {"kvm_exit": "vcpu_id", "kvm_entry": "vcpu_id"}


def slot_defines(event: str, fields: dict[str, Field]) -> dict[str, int]:
    """``-D`` values for one tracepoint: offset and size of each slot's field (-1/0 if absent)."""
    out: dict[str, int] = {}
    prefix = event.upper()
    names = TRACEPOINT_SLOTS[event]
    for i in range(5):
        f = fields.get(names[i]) if i < len(names) else None
        if f is not None and f.size not in (1, 2, 4, 8):
            raise VtraceError(f"{event}: field {f.name} has size {f.size}, expected 1, 2, 4 or 8")
        out[f"{prefix}_A{i}_OFF"] = f.offset if f else -1
        out[f"{prefix}_A{i}_SIZE"] = f.size if f else 0
    v = fields.get(VCPU_FIELD.get(event, ""))
    out[f"{prefix}_VCPU_OFF"] = v.offset if v else -1
    out[f"{prefix}_VCPU_SIZE"] = v.size if v else 0
    return out


def signed_slots(event: str, fields: dict[str, Field]) -> dict[int, int]:
    """Slot index -> field size for the signed fields (the decoder sign-extends them)."""
    names = TRACEPOINT_SLOTS[event]
    return {i: fields[n].size for i, n in enumerate(names) if n in fields and fields[n].signed}
