"""Decoding the collector's fixed records: built with numpy in the exact ring-buffer layout,
with field values as the kernel's format files describe them (no BPF needed)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtrace import schema as s
from vtrace.collect import program
from vtrace.collect.decode import (
    EVENT_IDS,
    PAYLOAD_BYTES,
    RECORD_DTYPE,
    decode_records,
    signed_fields,
)
from vtrace.collect.formats import TRACEPOINT_SLOTS, parse_format, slot_defines
from vtrace.errors import VtraceError


def shipped_formats() -> dict:
    return {
        ev: parse_format((s.FORMATS_DIR / f"{ev}.format").read_text(), ev)
        for ev in TRACEPOINT_SLOTS
    }


def records(rows: list[dict]) -> np.ndarray:
    out = np.zeros(len(rows), RECORD_DTYPE)
    out["hdr_len"] = PAYLOAD_BYTES
    out["vcpu"] = -1
    for i, row in enumerate(rows):
        for key, value in row.items():
            if key == "a":
                out["a"][i, : len(value)] = value
            elif key == "event":
                out["event"][i] = EVENT_IDS[value]
            else:
                out[key][i] = value
    return out


def test_record_layout_matches_probes_c():
    # struct rec in probes.c: u64 ts, u32 pid, u32 tid, u16 cpu, u8 event, u8 pad, s32 vcpu, u64 a[5]
    assert PAYLOAD_BYTES == 64
    assert RECORD_DTYPE.itemsize % 8 == 0  # the ring buffer rounds records to 8 bytes
    assert (
        "struct rec *r = events.ringbuf_reserve(sizeof(struct rec));" in program.SOURCE.read_text()
    )


def test_kvm_exit_fields_from_real_format_file():
    fields = shipped_formats()["kvm_exit"]
    assert (fields["exit_reason"].offset, fields["exit_reason"].size) == (8, 4)
    assert (fields["guest_rip"].offset, fields["guest_rip"].size) == (16, 8)
    assert (fields["isa"].offset, fields["vcpu_id"].offset) == (24, 56)
    d = slot_defines("kvm_exit", fields)
    assert d["KVM_EXIT_A0_OFF"] == 8 and d["KVM_EXIT_A1_OFF"] == 24 and d["KVM_EXIT_A2_OFF"] == 16
    assert (d["KVM_EXIT_VCPU_OFF"], d["KVM_EXIT_VCPU_SIZE"]) == (56, 4)
    entry = slot_defines("kvm_entry", shipped_formats()["kvm_entry"])
    assert (entry["KVM_ENTRY_VCPU_OFF"], entry["KVM_ENTRY_A0_OFF"], entry["KVM_ENTRY_A2_OFF"]) == (
        8,
        16,
        -1,
    )


def test_moved_and_missing_fields_follow_the_format_file():
    text = (s.FORMATS_DIR / "kvm_pio.format").read_text()
    # A kernel that moved `port` and dropped `count`.
    moved = text.replace("unsigned int port;\toffset:12", "unsigned int port;\toffset:28")
    moved = "\n".join(line for line in moved.splitlines() if "count;" not in line)
    d = slot_defines("kvm_pio", parse_format(moved, "moved"))
    assert d["KVM_PIO_A1_OFF"] == 28 and d["KVM_PIO_A3_OFF"] == -1 and d["KVM_PIO_A3_SIZE"] == 0


def test_not_a_format_file():
    with pytest.raises(VtraceError, match="not a tracepoint format file"):
        parse_format('name: x\nprint fmt: ""\n', "x.format")


def test_decode_kvm_exit_vmx_and_svm_and_entry():
    tables = s.load_reason_tables()
    vmx_io = next(k for k, v in tables.vmx.items() if v == "IO_INSTRUCTION")
    svm_npf = next(k for k, v in tables.svm.items() if v == "npf")
    recs = records(
        [
            # VMX exit with the FAILED_VMENTRY flag bit set: reason masked, flag kept.
            {"ts_ns": 100, "pid": 7, "tid": 8, "cpu": 1, "event": "kvm_exit", "vcpu": 0,
             "a": [0x80000000 | vmx_io, s.KVM_ISA_VMX, 0xFFF0, 0x10, 0]},
            {"ts_ns": 200, "pid": 7, "tid": 8, "cpu": 1, "event": "kvm_entry", "vcpu": 0,
             "a": [0xFFF2, 0]},
            # SVM codes are kept whole.
            {"ts_ns": 300, "pid": 7, "tid": 9, "cpu": 0, "event": "kvm_exit", "vcpu": 1,
             "a": [svm_npf, s.KVM_ISA_SVM, 0x1234, 0, 0]},
        ]
    )  # fmt: skip
    df = decode_records(recs, tables, signed_fields(shipped_formats()))
    s.validate(df)
    assert df["event"].cast(pl.String).to_list() == ["kvm_exit", "kvm_entry", "kvm_exit"]
    assert df["reason"].to_list() == [vmx_io, None, svm_npf]
    assert df["flags"].to_list() == [0x80000000, 0, 0]
    assert df["reason_name"].cast(pl.String).to_list() == ["IO_INSTRUCTION", None, "npf"]
    assert df["isa"].cast(pl.String).to_list() == ["vmx", None, "svm"]
    assert df["rip"].to_list() == [0xFFF0, 0xFFF2, 0x1234]
    assert df["vcpu"].to_list() == [0, 0, 1]
    assert df["source"].cast(pl.String).unique().to_list() == ["kvm"]


def test_decode_io_irq_and_userspace_events():
    tables = s.load_reason_tables()
    recs = records(
        [
            {"event": "kvm_pio", "a": [1, 0x10, 1, 1, 0xAB]},
            {"event": "kvm_mmio", "a": [2, 4, 0xFEB00000, 0x1]},  # KVM_TRACE_MMIO_WRITE
            {"event": "kvm_mmio", "a": [1, 2, 0xFEB00004, 0x2]},  # read
            {"event": "kvm_fast_mmio", "a": [0xFEB01000]},
            {"event": "kvm_userspace_exit", "a": [2, 0]},
            {"event": "kvm_userspace_exit", "a": [0, 0xFFFFFFFC]},  # errno -4: interrupted
            {"event": "kvm_set_irq", "a": [11, 1, 0xFFFFFFFF]},  # irq_source_id -1
            {"event": "kvm_msi_set_irq", "a": [0xFEE00000, 0x4021]},
            {"event": "kvm_inj_virq", "a": [0x21, 0, 1]},
        ]
    )
    df = decode_records(recs, tables, signed_fields(shipped_formats()))
    s.validate(df)
    cols = df.select("addr", "size", "write", "value", "count", "reason", "reason_name", "flags")
    rows = [
        tuple(r.values())
        for r in cols.with_columns(pl.col("reason_name").cast(pl.String)).to_dicts()
    ]
    assert rows == [
        (0x10, 1, True, 0xAB, 1, None, None, None),
        (0xFEB00000, 4, True, 1, None, None, None, None),
        (0xFEB00004, 2, False, 2, None, None, None, None),
        (0xFEB01000, None, None, None, None, None, None, None),
        (None, None, None, None, None, 2, "KVM_EXIT_IO", 0),
        (None, None, None, None, None, 0, "restart", -4),
        (11, None, None, 1, None, None, None, -1),
        (0xFEE00000, None, None, 0x4021, None, None, None, None),
        (None, None, None, 0x21, None, None, None, 2),
    ]


def test_decode_empty_batch_has_schema():
    s.validate(decode_records(np.empty(0, RECORD_DTYPE), s.load_reason_tables(), {}))


def test_options_are_validated_integers():
    assert program.buffer_pages(32) == 8192
    assert program.buffer_pages(3) == 1024  # rounded up to a power of two of pages
    for bad in (0, -1, 4096, "8", True):
        with pytest.raises(VtraceError, match="--buffer-mb"):
            program.buffer_pages(bad)  # type: ignore[arg-type]
    for bad in ([0], [-5], ["1; drop"], [1 << 30]):
        with pytest.raises(VtraceError, match="--pid"):
            program.validate_pids(bad)  # type: ignore[arg-type]
    with pytest.raises(VtraceError, match="unknown event kvm_bogus"):
        program.parse_events("kvm_pio,kvm_bogus")
    values = program.defines(program.ProbePlan(tracepoints=shipped_formats()), 1024, True)
    assert all(isinstance(v, int) for v in values.values())
    assert values["EVENT_MASK"] == 0x1FF and values["FILTER_PIDS"] == 1
    with pytest.raises(VtraceError, match="bad BPF define"):
        program.cflags({"X": "1; evil"})  # type: ignore[dict-item]


@given(
    layout=st.lists(
        st.tuples(st.integers(8, 4096), st.sampled_from([1, 2, 4, 8]), st.booleans()),
        min_size=5,
        max_size=5,
    ),
    missing=st.sets(st.integers(0, 4)),
)
def test_any_kvm_pio_layout_becomes_its_defines(layout, missing):
    """Whatever offsets, widths and signedness a kernel gives kvm_pio's fields (some absent),
    the defines say exactly that."""
    names = TRACEPOINT_SLOTS["kvm_pio"]
    lines = [
        "name: kvm_pio",
        "ID: 1",
        "format:",
        "\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;",
    ]
    for i, (name, (off, size, signed)) in enumerate(zip(names, layout, strict=True)):
        if i not in missing:
            lines.append(
                f"\tfield:unsigned int {name};\toffset:{off};\tsize:{size};\tsigned:{int(signed)};"
            )
    fields = parse_format("\n".join(lines) + '\n\nprint fmt: "x"\n', "generated")
    d = slot_defines("kvm_pio", fields)
    for i, (off, size, _signed) in enumerate(layout):
        want = (-1, 0) if i in missing else (off, size)
        assert (d[f"KVM_PIO_A{i}_OFF"], d[f"KVM_PIO_A{i}_SIZE"]) == want
    signed = signed_fields({"kvm_pio": fields})["kvm_pio"]
    assert signed == {i: size for i, (_, size, sg) in enumerate(layout) if sg and i not in missing}
