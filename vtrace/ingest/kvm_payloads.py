"""The text of kvm tracepoints (what follows `event:` in ftrace and perf output) into columns.

Each parser is a regular expression written from the tracepoint's ``print fmt`` (the copies
in ``vtrace/formats/kvm``), matched against a whole column of payloads of one event at once.
Every field is matched whole, up to the text the format prints after it (or the end): a
damaged value (``val 0x7#6``) is no value at all, never the digits before the damage, and
numbers have at most the digits their column can hold. A payload that does not match is a
malformed event: counted, its text kept in ``raw``, none of its columns filled.
Column use follows the collector, so an imported trace and a recorded one read the same:

==================  ==============================================================
kvm_exit            vcpu, reason, reason_name, isa, flags (VMX flag bits), rip
kvm_entry           vcpu, rip, flags = immediate exit (0/1)
kvm_pio             addr = port, size, count, write, value
kvm_mmio            addr = gpa, size, write, value, flags = type (0 unsatisfied-read,
                    1 read, 2 write)
kvm_fast_mmio       addr = gpa, write = true
kvm_userspace_exit  reason = KVM_EXIT_* code, reason_name; for a failed or interrupted
                    KVM_RUN reason_name = "restart"/"error", flags = errno (< 0)
kvm_set_irq         addr = gsi, value = level, flags = irq source id
kvm_msi_set_irq     addr = MSI address, value = MSI data (both rebuilt from the printed
                    destination, vector and mode)
kvm_inj_virq        value = vector, flags = soft | reinjected << 1
kvm_emulate_insn    rip, flags = failed (0/1)
==================  ==============================================================

``raw`` keeps the payload text of every event whose columns do not hold all of it (kvm_exit's
info fields, kvm_entry's intr_info, instruction bytes, ...) and of every other event.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache

import polars as pl

from vtrace import schema as s

# At most 16 hex digits (64 bits) and 18 decimal digits: every matched number converts to
# Int64/UInt64 without overflow; a value too big for its column is caught by the cast.
HEX = "[0-9a-fA-F]{1,16}"
DEC = r"\d{1,18}"
# What may follow the last field that has a column when the rest of the text stays in raw.
MORE = r"(?:\s|$)"


def hex_u64(e: pl.Expr) -> pl.Expr:
    return e.str.to_integer(base=16, dtype=pl.UInt64, strict=False)


def dec_i64(e: pl.Expr) -> pl.Expr:
    return e.str.to_integer(base=10, dtype=pl.Int64, strict=False)


def field(name: str) -> pl.Expr:
    """A named group of the extracted struct column ``f``."""
    return pl.col("f").struct.field(name)


@dataclass(frozen=True)
class PayloadFormat:
    """One tracepoint's text: ``pattern`` and the columns made from its groups.

    ``pattern`` (named groups) is matched from the start of the text and ends either with
    ``$`` (the whole text) or with :data:`MORE` after the last field that has a column, when
    the fields after it have none (they stay in ``raw``; not capturing them keeps the work
    short). The payload matched when its ``required`` group did and ``valid`` (if any) holds.
    ``columns`` builds the column expressions over :func:`field` (and the ``payload``
    column); ``keep_raw`` keeps the payload text in ``raw`` because the columns do not hold
    all of it.
    """

    pattern: str
    required: str
    columns: Callable[[], dict[str, pl.Expr]]
    keep_raw: bool
    # (group, table): a left join of the group's text with the table's ``key`` column first.
    lookup: tuple[str, Callable[[], pl.DataFrame]] | None = None
    # A condition beyond the match (a name the lookup table knows).
    valid: Callable[[], pl.Expr] | None = None
    # A cheaper pattern with the same groups, tried first: where it matches, ``pattern``
    # would match with the same captures; ``pattern`` runs on the rest.
    quick: str | None = None


def _pio() -> dict[str, pl.Expr]:
    return {
        "write": field("dir") == "write",
        "addr": hex_u64(field("port")),
        "size": dec_i64(field("size")),
        "count": dec_i64(field("count")),
        "value": hex_u64(field("val")),
    }


MMIO_TYPES = {"unsatisfied-read": 0, "read": 1, "write": 2}


def _mmio() -> dict[str, pl.Expr]:
    return {
        "write": field("type") == "write",
        "flags": field("type").replace_strict(MMIO_TYPES, default=None, return_dtype=pl.Int64),
        "addr": hex_u64(field("gpa")),
        "size": dec_i64(field("len")),
        "value": hex_u64(field("val")),
    }


def _fast_mmio() -> dict[str, pl.Expr]:
    return {"addr": hex_u64(field("gpa")), "write": pl.lit(True)}


def _userspace_exit() -> dict[str, pl.Expr]:
    name, code = field("name"), dec_i64(field("code"))
    failed = name.is_in(["restart", "error"])
    return {
        "reason": pl.when(failed).then(None).otherwise(code),
        "reason_name": name,
        "flags": pl.when(failed).then(-code).otherwise(0),
    }


def _set_irq() -> dict[str, pl.Expr]:
    return {
        "addr": dec_i64(field("gsi")),
        "value": dec_i64(field("level")),
        "flags": dec_i64(field("src")),
    }


# APIC delivery modes as kvm_msi_set_irq prints them (bits 8-10 of the MSI data).
DELIVERY_MODES = {
    "Fixed": 0, "LowPrio": 1, "SMI": 2, "Res3": 3, "NMI": 4, "INIT": 5, "SIPI": 6, "ExtINT": 7,
}  # fmt: skip
MSI_ADDRESS_BASE = 0xFEE00000


def _bit(cond: pl.Expr, value: int) -> pl.Expr:
    return pl.when(cond).then(pl.lit(value, pl.UInt64)).otherwise(pl.lit(0, pl.UInt64))


def _msi_set_irq() -> dict[str, pl.Expr]:
    dst = hex_u64(field("dst"))
    mode = field("mode").replace_strict(DELIVERY_MODES, default=None, return_dtype=pl.UInt64)
    # The print fmt folds address bits 12-19 and 40-63 into `dst`; undo that.
    address = (
        pl.lit(MSI_ADDRESS_BASE, pl.UInt64)
        | ((dst & 0xFF) * (1 << 12))
        | ((dst & ~pl.lit(0xFF, pl.UInt64)) * (1 << 32))
        | _bit(field("dest") == "logical", 1 << 2)
        | _bit(field("rh").is_not_null(), 1 << 3)
    )
    data = (
        dec_i64(field("vec")).cast(pl.UInt64)
        | (mode * (1 << 8))
        | _bit(field("trig") == "level", 1 << 15)
    )
    return {"addr": address, "value": data}


def _inj_virq() -> dict[str, pl.Expr]:
    soft = (field("kind") == "Soft/INTn").cast(pl.Int64)
    reinjected = field("re").is_not_null().cast(pl.Int64)
    return {"value": hex_u64(field("vec")), "flags": soft | (reinjected * 2)}


def _emulate_insn() -> dict[str, pl.Expr]:
    text = pl.col("payload")
    failed = text.str.ends_with(" failed") | text.str.ends_with(" FAIL")
    return {"rip": hex_u64(field("rip")), "flags": failed.cast(pl.Int64)}


def _entry() -> dict[str, pl.Expr]:
    return {
        "vcpu": dec_i64(field("vcpu")),
        "rip": hex_u64(field("rip")),
        "flags": pl.col("payload").str.ends_with("[immediate exit]").cast(pl.Int64),
    }


FAILED_VMENTRY = next(k for k, v in s.VMX_FLAG_NAMES.items() if v == "FAILED_VMENTRY")


@lru_cache(maxsize=1)
def exit_reason_lookup() -> pl.DataFrame:
    """Every reason text kvm_exit can print -> the decoded columns, computed once.

    The text names the reason; the ISA is the table the name belongs to (VMX names are
    upper case, SVM names lower case), and a VMX name may be followed by its flag bits
    (``FAILED_VMENTRY``). Each text is turned back into the raw ``exit_reason`` and decoded
    with :func:`vtrace.schema.decode_exit_reason`, like the collector's raw fields. A join
    with this small table replaces a string lookup per event.
    """
    tables = s.load_reason_tables()
    rows = [(name, code, s.KVM_ISA_VMX) for code, name in tables.vmx.items()]
    rows += [(f"{n} FAILED_VMENTRY", c | FAILED_VMENTRY, isa) for n, c, isa in rows]
    rows += [(name, code, s.KVM_ISA_SVM) for code, name in tables.svm.items()]
    frame = pl.DataFrame(
        rows, schema={"key": pl.String, "exit_reason": pl.Int64, "isa_code": pl.Int64}, orient="row"
    ).unique("key", keep="first", maintain_order=True)
    reason, flags, name, isa = s.decode_exit_reason(
        pl.col("exit_reason"), pl.col("isa_code"), tables
    )
    return frame.select(
        "key",
        reason.alias("x_reason"),
        flags.alias("x_flags"),
        name.cast(pl.String).alias("x_reason_name"),
        isa.cast(pl.String).alias("x_isa"),
    )


def _exit_reason() -> pl.Expr:
    """The reason of the name (:func:`exit_reason_lookup`), or the code printed in hex."""
    name = field("name")
    code = pl.when(name.str.starts_with("0x")).then(
        name.str.strip_prefix("0x").str.to_integer(base=16, dtype=pl.Int64, strict=False)
    )
    return pl.coalesce(pl.col("x_reason"), code)


def _exit() -> dict[str, pl.Expr]:
    """kvm_exit: the kernel's text, and trace-cmd's kvm plugin text (no vcpu, `info a b`).

    Names come from :func:`exit_reason_lookup` (joined on the ``name`` group); a code the
    kernel printed in hex because it has no name keeps that code, with no ISA, name or flags.
    A name that is neither is malformed.
    """
    return {
        "vcpu": dec_i64(field("vcpu")),
        "rip": hex_u64(field("rip")),
        "reason": _exit_reason(),
        "flags": pl.col("x_flags"),
        "reason_name": pl.col("x_reason_name"),
        "isa": pl.col("x_isa"),
    }


PAYLOADS: dict[str, PayloadFormat] = {
    # Kernel: "... rip 0x%lx info1 0x%016llx ...", older kernels and trace-cmd: "... info %llx %llx".
    s.KVM_EXIT: PayloadFormat(
        rf"(?:vcpu (?P<vcpu>{DEC}) )?reason (?P<name>.+?) rip 0x(?P<rip>{HEX}){MORE}",
        "rip",
        _exit,
        True,
        lookup=("name", exit_reason_lookup),
        valid=lambda: _exit_reason().is_not_null(),
        # A one-word name (nearly all): no lazy `.+?`, so the regex engine can capture in
        # one pass; a name with a blank (`DE excp`, `HLT FAILED_VMENTRY`) has no shorter
        # match, so the full pattern gives the same groups.
        quick=rf"(?:vcpu (?P<vcpu>{DEC}) )?reason (?P<name>[^ ]+) rip 0x(?P<rip>{HEX}){MORE}",
    ),
    s.KVM_ENTRY: PayloadFormat(
        rf"vcpu (?P<vcpu>{DEC}), rip 0x(?P<rip>{HEX}){MORE}", "rip", _entry, True
    ),
    # "val 0x%x %s": the %s is "(...)" for a string instruction, else empty.
    s.KVM_PIO: PayloadFormat(
        rf"pio_(?P<dir>read|write) at 0x(?P<port>{HEX}) size (?P<size>-?{DEC}) "
        rf"count (?P<count>{DEC}) val 0x(?P<val>{HEX})(?: \(\.\.\.\))?$",
        "val",
        _pio,
        False,
    ),
    s.KVM_MMIO: PayloadFormat(
        rf"mmio (?P<type>unsatisfied-read|read|write) len (?P<len>{DEC}) "
        rf"gpa 0x(?P<gpa>{HEX}) val 0x(?P<val>{HEX})$",
        "val",
        _mmio,
        False,
    ),
    s.KVM_FAST_MMIO: PayloadFormat(
        rf"fast mmio at gpa 0x(?P<gpa>{HEX})$", "gpa", _fast_mmio, False
    ),
    s.KVM_USERSPACE_EXIT: PayloadFormat(
        rf"reason (?P<name>\S+) \((?P<code>-?{DEC})\)$", "code", _userspace_exit, False
    ),
    s.KVM_SET_IRQ: PayloadFormat(
        rf"gsi (?P<gsi>{DEC}) level (?P<level>-?{DEC}) source (?P<src>-?{DEC})$",
        "src",
        _set_irq,
        False,
    ),
    s.KVM_MSI_SET_IRQ: PayloadFormat(
        rf"dst (?P<dst>{HEX}) vec (?P<vec>{DEC}) \((?P<mode>{'|'.join(DELIVERY_MODES)})\|"
        r"(?P<dest>logical|physical)\|(?P<trig>level|edge)(?P<rh>\|rh)?\)$",
        "trig",
        _msi_set_irq,
        True,
    ),
    s.KVM_INJ_VIRQ: PayloadFormat(
        rf"(?P<kind>IRQ|Soft/INTn) 0x(?P<vec>{HEX})(?P<re> \[reinjected\])?$",
        "vec",
        _inj_virq,
        False,
    ),
    # Kernel: "csbase:rip:bytes (mode)[ failed]"; trace-cmd's kvm plugin: "csbase:rip: insn[ FAIL]".
    s.KVM_EMULATE_INSN: PayloadFormat(
        rf"(?P<cs>{HEX}):(?P<rip>{HEX}):", "rip", _emulate_insn, True
    ),
}
