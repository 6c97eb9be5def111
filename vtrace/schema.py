"""The events table: one schema for every part of vtrace, and the tables that name exit reasons.

Column names and types are a contract (docs/events.md): importers, the collector, the
lab, analyses, the model and notebooks all rely on them.

Exit-reason tables come from the kernel's own definitions: the print fmt of the
``kvm:kvm_exit`` and ``kvm:kvm_userspace_exit`` tracepoints carries the VMX, SVM and
KVM_EXIT_* symbol tables. A static copy of those format files ships in
``vtrace/formats/kvm`` for traces read on other machines; at capture time the host's own
files are preferred (:func:`load_reason_tables` with ``prefer_host=True``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import polars as pl

from vtrace.errors import VtraceError

EVENTS_SCHEMA = pl.Schema(
    {
        "ts_ns": pl.Int64,
        "source": pl.Categorical(),
        "event": pl.Categorical(),
        "pid": pl.Int32,
        "tid": pl.Int32,
        "cpu": pl.Int16,
        "vcpu": pl.Int32,
        "reason": pl.Int64,
        "reason_name": pl.Categorical(),
        "isa": pl.Categorical(),
        "flags": pl.Int64,
        "addr": pl.UInt64,
        "size": pl.Int32,
        "write": pl.Boolean,
        "value": pl.UInt64,
        "count": pl.Int32,
        "queue": pl.Int32,
        "device": pl.Categorical(),
        "rip": pl.UInt64,
        "raw": pl.String,
    }
)
COLUMNS: tuple[str, ...] = tuple(EVENTS_SCHEMA.names())

# Sources (the `source` column).
SOURCE_KVM = "kvm"
SOURCE_KPROBE = "kprobe"
SOURCE_QEMU = "qemu"
SOURCE_LAB = "lab"
SOURCE_GUEST = "guest"
SOURCE_SCHED = "sched"  # the host scheduler's tracepoints (vtrace.lab.sched)
SOURCES = (SOURCE_KVM, SOURCE_KPROBE, SOURCE_QEMU, SOURCE_LAB, SOURCE_GUEST, SOURCE_SCHED)

# Event names (the `event` column): the original names of the tracepoints and trace events.
KVM_EXIT = "kvm_exit"
KVM_ENTRY = "kvm_entry"
KVM_PIO = "kvm_pio"
KVM_MMIO = "kvm_mmio"
KVM_FAST_MMIO = "kvm_fast_mmio"
KVM_USERSPACE_EXIT = "kvm_userspace_exit"
KVM_SET_IRQ = "kvm_set_irq"
KVM_MSI_SET_IRQ = "kvm_msi_set_irq"
KVM_INJ_VIRQ = "kvm_inj_virq"
KVM_EMULATE_INSN = "kvm_emulate_insn"
KVM_TRACEPOINTS = (
    KVM_EXIT,
    KVM_ENTRY,
    KVM_PIO,
    KVM_MMIO,
    KVM_FAST_MMIO,
    KVM_USERSPACE_EXIT,
    KVM_SET_IRQ,
    KVM_MSI_SET_IRQ,
    KVM_INJ_VIRQ,
)
VIRTIO_QUEUE_NOTIFY = "virtio_queue_notify"
VIRTQUEUE_POP = "virtqueue_pop"
VIRTQUEUE_FILL = "virtqueue_fill"
VIRTQUEUE_FLUSH = "virtqueue_flush"
VIRTIO_NOTIFY = "virtio_notify"
VIRTIO_NOTIFY_IRQFD = "virtio_notify_irqfd"
MEMORY_REGION_OPS_READ = "memory_region_ops_read"
MEMORY_REGION_OPS_WRITE = "memory_region_ops_write"
KVM_RUN_EXIT = "kvm_run_exit"
# Kernel kick and interrupt paths (kprobes, where the host has them).
IOEVENTFD_WRITE = "ioeventfd_write"
IRQFD_WAKEUP = "irqfd_wakeup"
# The lab VMM's own back end (source=lab).
LAB_POP = "lab_pop"
LAB_COMPLETE = "lab_complete"
LAB_KICK = "lab_kick"

# Events that stand for "a request's interrupt reached KVM".
IRQ_EVENTS = (KVM_SET_IRQ, KVM_MSI_SET_IRQ, KVM_INJ_VIRQ)

# `isa` values, as the kvm_exit tracepoint encodes them (KVM_ISA_VMX, KVM_ISA_SVM).
KVM_ISA_VMX = 1
KVM_ISA_SVM = 2
ISA_NAMES = {KVM_ISA_VMX: "vmx", KVM_ISA_SVM: "svm"}
VMX_REASON_MASK = 0xFFFF
VMX_FLAG_NAMES = {0x80000000: "FAILED_VMENTRY"}

FORMATS_DIR = Path(__file__).with_name("formats") / "kvm"
HOST_EVENTS_DIR = Path("/sys/kernel/tracing/events/kvm")


def empty_events() -> pl.DataFrame:
    """An events frame with no rows and the full schema."""
    return pl.DataFrame(schema=EVENTS_SCHEMA)


def conform(frame: pl.DataFrame | pl.LazyFrame) -> pl.DataFrame | pl.LazyFrame:
    """Add missing columns as nulls, cast to the schema's types and order the columns.

    Extra columns are an error: the table is a contract, not a bag.
    """
    names = frame.collect_schema().names()
    extra = [c for c in names if c not in EVENTS_SCHEMA]
    if extra:
        raise VtraceError(f"events frame has columns not in the schema: {', '.join(extra)}")
    return frame.select(
        (pl.col(c) if c in names else pl.lit(None)).cast(t).alias(c)
        for c, t in EVENTS_SCHEMA.items()
    )


def validate(frame: pl.DataFrame | pl.LazyFrame, *, where: str = "events") -> None:
    """Check a frame against the schema: same columns, same order, same types.

    Raises :class:`VtraceError` with one line naming every mismatch.
    """
    got = frame.collect_schema()
    problems: list[str] = []
    missing = [c for c in COLUMNS if c not in got]
    if missing:
        problems.append("missing " + ", ".join(missing))
    extra = [c for c in got.names() if c not in EVENTS_SCHEMA]
    if extra:
        problems.append("unexpected " + ", ".join(extra))
    for name, want in EVENTS_SCHEMA.items():
        if name in got and got[name] != want:
            problems.append(f"{name} is {got[name]}, want {want}")
    if not problems and tuple(got.names()) != COLUMNS:
        problems.append("columns out of order")
    if problems:
        raise VtraceError(f"{where}: not an events table: " + "; ".join(problems))


# --- exit-reason tables -------------------------------------------------------------------

_SYMBOLIC = re.compile(r"__print_symbolic\((.*?)\)\s*(?:,|:|\))", re.S)
_PAIR = re.compile(r"\{\s*([-+0-9a-fx\s]+?)\s*,\s*((?:\"[^\"]*\"\s*)+)\}", re.I)


def _symbol_table(text: str) -> dict[int, str]:
    """Parse the `{ value, "NAME" }` pairs of one __print_symbolic() call."""
    table: dict[int, str] = {}
    for value, names in _PAIR.findall(text):
        # Values may be expressions like `0x040 + 14`; names may be split literals
        # like `"KVM_EXIT_" "IO"` that C concatenates.
        code = sum(int(term, 0) for term in value.replace(" ", "").replace("+", " ").split())
        table[code & 0xFFFFFFFF] = "".join(re.findall(r"\"([^\"]*)\"", names))
    return table


@dataclass(frozen=True)
class ReasonTables:
    """Exit reason code -> name for VMX, SVM and KVM_EXIT_* (user-space exits)."""

    vmx: dict[int, str]
    svm: dict[int, str]
    userspace: dict[int, str]
    origin: str


def parse_reason_tables(
    kvm_exit_format: str, userspace_exit_format: str, origin: str
) -> ReasonTables:
    """Build the reason tables from the text of the two tracepoint format files."""
    calls = _SYMBOLIC.findall(kvm_exit_format.split("print fmt:", 1)[-1])
    if len(calls) < 2:
        raise VtraceError(f"{origin}: kvm_exit format has no VMX/SVM reason tables")
    user_calls = _SYMBOLIC.findall(userspace_exit_format.split("print fmt:", 1)[-1])
    if not user_calls:
        raise VtraceError(f"{origin}: kvm_userspace_exit format has no KVM_EXIT_* table")
    return ReasonTables(
        vmx=_symbol_table(calls[0]),
        svm=_symbol_table(calls[1]),
        userspace=_symbol_table(user_calls[0]),
        origin=origin,
    )


@lru_cache(maxsize=2)
def load_reason_tables(prefer_host: bool = False) -> ReasonTables:
    """The reason tables: the host's own when asked and readable, else the shipped copy."""
    dirs = [HOST_EVENTS_DIR, FORMATS_DIR] if prefer_host else [FORMATS_DIR]
    for d in dirs:
        exit_fmt, user_fmt = d / "kvm_exit" / "format", d / "kvm_userspace_exit" / "format"
        if d == FORMATS_DIR:
            exit_fmt, user_fmt = d / "kvm_exit.format", d / "kvm_userspace_exit.format"
        try:
            return parse_reason_tables(exit_fmt.read_text(), user_fmt.read_text(), str(d))
        except OSError:
            continue
    raise VtraceError(f"no kvm_exit format file in {' or '.join(map(str, dirs))}")


def _names_expr(codes: pl.Expr, table: dict[int, str]) -> pl.Expr:
    return codes.replace_strict(
        list(table), list(table.values()), default=None, return_dtype=pl.String
    )


def decode_exit_reason(
    exit_reason: pl.Expr, isa: pl.Expr, tables: ReasonTables | None = None
) -> list[pl.Expr]:
    """Vectorised decoding of kvm_exit's raw `exit_reason` and `isa` (1 = VMX, 2 = SVM).

    Returns expressions for the `reason`, `flags`, `reason_name` and `isa` columns:
    VMX keeps `exit_reason & 0xffff` as the reason and the high bits (FAILED_VMENTRY, ...)
    in `flags`; SVM codes are kept whole.
    """
    tables = tables or load_reason_tables()
    raw = exit_reason.cast(pl.Int64)
    is_vmx = isa == KVM_ISA_VMX
    reason = pl.when(is_vmx).then(raw & VMX_REASON_MASK).otherwise(raw)
    flags = pl.when(is_vmx).then(raw & ~VMX_REASON_MASK & 0xFFFFFFFF).otherwise(0)
    name = (
        pl.when(is_vmx)
        .then(_names_expr(raw & VMX_REASON_MASK, tables.vmx))
        .otherwise(_names_expr(raw, tables.svm))
    )
    return [
        reason.alias("reason"),
        flags.alias("flags"),
        name.cast(pl.Categorical).alias("reason_name"),
        _names_expr(isa.cast(pl.Int64), ISA_NAMES).cast(pl.Categorical).alias("isa"),
    ]


def userspace_reason_name(reason: pl.Expr, tables: ReasonTables | None = None) -> pl.Expr:
    """KVM_EXIT_* code -> name (`KVM_EXIT_IO`, `KVM_EXIT_MMIO`, ...)."""
    tables = tables or load_reason_tables()
    return _names_expr(reason.cast(pl.Int64), tables.userspace).cast(pl.Categorical)
