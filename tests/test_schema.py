"""The events schema and the exit-reason tables, against the kernel's own format files."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtrace import schema
from vtrace.errors import VtraceError

DESIGN_COLUMNS = [
    "ts_ns",
    "source",
    "event",
    "pid",
    "tid",
    "cpu",
    "vcpu",
    "reason",
    "reason_name",
    "isa",
    "flags",
    "addr",
    "size",
    "write",
    "value",
    "count",
    "queue",
    "device",
    "rip",
    "raw",
]


def test_columns_are_the_documented_contract() -> None:
    assert list(schema.COLUMNS) == DESIGN_COLUMNS
    assert schema.EVENTS_SCHEMA["ts_ns"] == pl.Int64
    assert schema.EVENTS_SCHEMA["addr"] == pl.UInt64
    assert schema.EVENTS_SCHEMA["write"] == pl.Boolean
    assert schema.EVENTS_SCHEMA["cpu"] == pl.Int16
    assert isinstance(schema.EVENTS_SCHEMA["event"], pl.Categorical)


def test_reason_tables_from_the_shipped_format_files() -> None:
    t = schema.load_reason_tables()
    assert t.vmx[30] == "IO_INSTRUCTION"
    assert t.vmx[48] == "EPT_VIOLATION"
    assert t.vmx[12] == "HLT"
    assert t.svm[0x7B] == "io"
    assert t.svm[0x400] == "npf"
    assert t.svm[0x40 + 14] == "PF excp"  # value written as an expression in the print fmt
    assert t.svm[0xFFFFFFFF] == "invalid_guest_state"  # -1 in the print fmt
    assert t.userspace[2] == "KVM_EXIT_IO"
    assert t.userspace[6] == "KVM_EXIT_MMIO"
    assert len(t.vmx) == 65 and len(t.svm) == 110 and len(t.userspace) == 31


@pytest.mark.skipif(
    not Path("/sys/kernel/tracing/events/kvm/kvm_exit/format").exists(),
    reason="no host kvm_exit format: mount tracefs (mount -t tracefs nodev /sys/kernel/tracing) "
    "on a host with KVM",
)
def test_host_tables_match_or_extend_the_static_copy() -> None:
    host = schema.load_reason_tables(prefer_host=True)
    static = schema.load_reason_tables()
    assert host.origin == str(schema.HOST_EVENTS_DIR)
    for code, name in static.vmx.items():
        assert host.vmx.get(code, name) == name


def test_decode_vmx_keeps_flags_and_svm_codes_whole() -> None:
    raw = pl.DataFrame({"exit_reason": [30, 0x80000021, 0x7B, 0x400, 9999], "isa": [1, 1, 2, 2, 1]})
    out = raw.select(schema.decode_exit_reason(pl.col("exit_reason"), pl.col("isa")))
    assert out["reason"].to_list() == [30, 33, 0x7B, 0x400, 9999]
    assert out["flags"].to_list() == [0, 0x80000000, 0, 0, 0]
    assert out["reason_name"].cast(pl.String).to_list() == [
        "IO_INSTRUCTION",
        "INVALID_STATE",
        "io",
        "npf",
        None,
    ]
    assert out["isa"].cast(pl.String).to_list() == ["vmx", "vmx", "svm", "svm", "vmx"]


def test_conform_fills_and_orders_and_validate_explains() -> None:
    frame = schema.conform(pl.DataFrame({"event": ["kvm_pio"], "ts_ns": [5]}))
    schema.validate(frame)
    assert frame.columns == DESIGN_COLUMNS
    with pytest.raises(VtraceError, match="unexpected bogus"):
        schema.validate(frame.with_columns(bogus=pl.lit(1)))
    with pytest.raises(VtraceError, match="ts_ns is Float64, want Int64"):
        schema.validate(frame.with_columns(pl.col("ts_ns").cast(pl.Float64)))
    with pytest.raises(VtraceError, match="missing raw"):
        schema.validate(frame.drop("raw"))
    with pytest.raises(VtraceError, match="not in the schema: nope"):
        schema.conform(pl.DataFrame({"nope": [1]}))


@given(
    st.lists(st.integers(min_value=0, max_value=2**32 - 1), min_size=1, max_size=50),
    st.sampled_from([1, 2]),
)
def test_decode_never_crashes_and_vmx_reason_is_masked(codes: list[int], isa: int) -> None:
    out = pl.DataFrame({"r": codes, "i": [isa] * len(codes)}).select(
        schema.decode_exit_reason(pl.col("r"), pl.col("i"))
    )
    if isa == 1:
        assert (out["reason"] <= 0xFFFF).all()
        assert ((out["reason"] | out["flags"]) == pl.Series(codes)).all()
    else:
        assert out["reason"].to_list() == codes
