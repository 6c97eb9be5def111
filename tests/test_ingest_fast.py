"""The tracefs fast path in runs of lines parsed by parallel threads, and quick payload patterns.

Whatever the run length (one line, a few, the whole file), and whether lines take the
fast path or the general one, the same file gives the same events table and meta; where a
payload format has a quick pattern, quick-then-full extraction gives the groups of the full
pattern alone.
"""

from __future__ import annotations

import tempfile
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vtrace.ingest.tracepoint_text as tt
from vtrace import schema as s
from vtrace.errors import VtraceError
from vtrace.ingest.ftrace import FTRACE
from vtrace.ingest.kvm_payloads import PAYLOADS

DATA = Path(__file__).parent / "data"
TRACEFS = (DATA / "kvm_tracefs.txt").read_text().splitlines()
SETTINGS = settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)
# Lines the fast path must hand to the general one (or count as unparsed), between plain ones.
ODD = [
    "       CPU 0/KVM-2345    [001] ..... 123456.567890: kvm_fpu: load",
    "       CPU 0/KVM-2345    (   2340) [001] .....  1234.567890: kvm_fpu: load",
    "       CPU 0/KVM-2345    [001] .....  1234.567890: kvm_fpu:",
    "       CPU 0/KVM-2345    [001] .....  1234.567890: kvm-fpu: load",
    "       CPU 0/KVM-2345    [001]  1234.567890: kvm_fpu: load",
    "      CPU 0/KVMé-2345    [001] .....  1234.567890: kvm_fpu: load",
    "       CPU 0/KVM-2345    [001] .....  1234.567890: kvm_exit: reason HLT rip 0x12junk",
    "       CPU 0/KVM-2345    [001] .....  1234.567890: kvm_exit: reason 0x7#6 rip 0x12",
    "       CPU 0/KVM-2345    [001] .....  1234.567890: kvm_pio: pio_write at 0x5#0 size 1",
    "CPU:1 [LOST 42 EVENTS]",
    "# comment",
    "",
    "not a trace line",
]


def read(lines: list[str], *, run_lines: int | None, fast: bool = True) -> object:
    """The table (categoricals as strings) and meta of ``lines``, or the error text."""
    fmt = FTRACE if fast else replace(FTRACE, tracefs_layout=False)
    saved = tt.FAST_RUN_LINES
    try:
        if run_lines is not None:
            tt.FAST_RUN_LINES = run_lines
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "t.txt"
            path.write_text("\n".join(lines) + "\n", encoding="utf-8", errors="surrogatepass")
            try:
                events, meta = tt.read_tracepoint_text(fmt, path)
            except VtraceError as e:
                return str(e).replace(str(path), "FILE")
            meta = {k: v for k, v in meta.items() if k != "source_files"}
            return events.with_columns(pl.col(pl.Categorical).cast(pl.String)), meta
    finally:
        tt.FAST_RUN_LINES = saved


def assert_same(a: object, b: object) -> None:
    if isinstance(a, str) or isinstance(b, str):
        assert a == b
        return
    (fa, ma), (fb, mb) = a, b  # type: ignore[misc]
    assert fa.equals(fb)
    assert ma == mb


@pytest.mark.parametrize("run_lines", [1, 2, 7, 100])
def test_runs_of_the_real_capture_give_one_table(run_lines: int) -> None:
    """The shipped capture, with odd lines mixed in, in runs of any length."""
    lines = TRACEFS[:40] + ODD + TRACEFS[40:200] + ODD[::-1] + TRACEFS[200:]
    whole = read(lines, run_lines=10**9)
    assert not isinstance(whole, str)
    assert whole[1]["unparsed"] > 0 and whole[1]["malformed"] > 0  # the odd lines counted
    assert_same(read(lines, run_lines=run_lines), whole)
    assert_same(read(lines, run_lines=None, fast=False), whole)


def test_runs_keep_line_numbers_of_unparsed_and_malformed() -> None:
    lines = [*TRACEFS[:30], "garbage line", *TRACEFS[30:60], ODD[6]]
    table, meta = read(lines, run_lines=4)  # type: ignore[misc]
    assert meta["unparsed_first_lines"] == [31]
    assert meta["malformed_first_lines"] == [len(lines)]
    assert table.height == meta["events"]


@st.composite
def mutated(draw: st.DrawFn) -> str:
    line = draw(st.sampled_from(TRACEFS + ODD))
    for _ in range(draw(st.integers(0, 2))):
        i = draw(st.integers(0, len(line)))
        cut = draw(st.integers(0, 3))
        line = (
            line[:i]
            + draw(st.text(st.sampled_from(list(" :-[].0x9aé\t")), max_size=3))
            + line[i + cut :]
        )
    return line


@SETTINGS
@given(lines=st.lists(mutated(), min_size=1, max_size=25), run_lines=st.integers(1, 6))
def test_fast_runs_match_general_parser(lines: list[str], run_lines: int) -> None:
    """Mutated real lines: runs of the fast path, one run, and the general parser agree."""
    general = read(lines, run_lines=None, fast=False)
    assert_same(read(lines, run_lines=run_lines), general)
    assert_same(read(lines, run_lines=10**9), general)


# kvm_exit reason texts: one word, two words (SVM `DE excp`, VMX `HLT FAILED_VMENTRY`), codes.
REASON_TEXTS = [
    "HLT", "IO_INSTRUCTION", "EPT_VIOLATION", "npf", "DE excp", "idle-halt",
    "HLT FAILED_VMENTRY", "0x45", "0x45 FAILED_VMENTRY", "NOPE", "rip", "",
]  # fmt: skip
PAYLOAD_PIECES = st.sampled_from(
    ["vcpu 1 ", "vcpu 12345678901234567890 ", "reason ", " rip 0x", "ffffffff81000000", "12", "0x7#6", " info1 0x0", " ", "\t", "rip 0x", "zz", " rip 0x1", *REASON_TEXTS]
)  # fmt: skip


@st.composite
def exit_payload(draw: st.DrawFn) -> str:
    if draw(st.booleans()):
        vcpu = draw(st.sampled_from(["", "vcpu 0 ", "vcpu 3 "]))
        rip = draw(st.sampled_from(["1", "ffffffff81000000", "12345678901234567", "1g"]))
        tail = draw(st.sampled_from(["", " info1 0x0 info2 0x0", "\tx", "junk"]))
        return f"{vcpu}reason {draw(st.sampled_from(REASON_TEXTS))} rip 0x{rip}{tail}"
    return "".join(draw(st.lists(PAYLOAD_PIECES, max_size=8)))


@SETTINGS
@given(payloads=st.lists(exit_payload(), min_size=1, max_size=30))
def test_quick_pattern_captures_what_the_full_one_does(payloads: list[str]) -> None:
    spec = PAYLOADS[s.KVM_EXIT]
    assert spec.quick is not None
    lines = pl.DataFrame({"lineno": range(len(payloads)), "payload": payloads})
    lines = lines.with_columns(pl.col("lineno").cast(pl.UInt32))
    both = tt._extract(lines, spec).collect().sort("lineno")
    full = tt._extract(lines, replace(spec, quick=None)).collect()
    assert both.equals(full)


def test_exit_reasons_with_a_blank_still_parse() -> None:
    """Two-word names miss the quick pattern and are taken by the full one."""
    head = "       CPU 0/KVM-2345    [001] .....  1234.5678{}: kvm_exit: "
    texts = ["reason DE excp rip 0x10", "reason HLT FAILED_VMENTRY rip 0x11", "reason HLT rip 0x12"]
    table, meta = read([head.format(f"{i:02d}") + t for i, t in enumerate(texts)], run_lines=2)  # type: ignore[misc]
    assert meta["malformed"] == 0
    assert table.get_column("reason_name").to_list() == ["DE excp", "HLT", "HLT"]
    assert table.get_column("isa").to_list() == ["svm", "vmx", "vmx"]
    assert table.get_column("flags").to_list() == [0, 0x80000000, 0]
    assert table.get_column("rip").to_list() == [0x10, 0x11, 0x12]


# From `%5lu` to 10 digits, the last that fits Int64 nanoseconds.
SECONDS = [99_999, 100_000, 123_456, 1_234_567, 12_345_678, 9_223_372_035]


def test_seconds_wider_than_five_digits_take_the_fast_path() -> None:
    """A host up for more than 27.7 hours prints 6 or more digits of seconds (`%5lu` only
    pads): those lines are read by position too, and give what the general parser gives."""
    from vtrace.ingest.textlines import read_text_lines

    lines = []
    for i, sec in enumerate(SECONDS):
        lines.append(f"       CPU 0/KVM-2345    [001] d..1. {sec:5d}.{i:06d}: kvm_fpu: load")
    lines.append("       CPU 0/KVM-2345    [001] ....12345678901.000001: kvm_fpu: load")
    lines.append("       CPU 0/KVM-2345    [001] .....x123456.000001: kvm_fpu: load")
    lines.append("       CPU 0/KVM-2345    [001] ..... 9223372037.000001: kvm_fpu: load")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "t.txt"
        path.write_text("\n".join(lines) + "\n")
        text = read_text_lines(path)
        events, rest = tt.split_tracefs_run(text.lines, text.data, text.starts, ascii=True)
    assert events.get_column("lineno").to_list() == [1, 2, 3, 4, 5, 6]
    assert events.get_column("ts_ns").to_list() == [
        sec * 10**9 + i * 1000 for i, sec in enumerate(SECONDS)
    ]
    assert rest.get_column("lineno").to_list() == [7, 8, 9]
    assert_same(read(lines, run_lines=3), read(lines, run_lines=None, fast=False))
