"""The compiled reader of tracefs lines (vtrace/ingest/_tracefs.c) against the polars parser.

The extension takes only the lines it is sure of and hands every other one to the polars
parser, so both ways must give the same events table and the same meta (unparsed and
malformed counts and first lines, ignored and lost lines), or the same one-line error, on
every file: the shipped captures, the benchmark's generator, odd files, and random damage
to valid lines. ``VTRACE_PURE_PARSER=1`` turns the extension off.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtrace.errors import VtraceError
from vtrace.ingest import native, read_events
from vtrace.ingest import tracepoint_text as tt
from vtrace.ingest.kvm_payloads import PAYLOADS

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"
SETTINGS = settings(
    max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True
)


def _bench() -> object:
    spec = importlib.util.spec_from_file_location(
        "bench_import", ROOT / "benchmarks/bench_import.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def read(path: Path, *, pure_parser: bool, strict: bool = False, fmt: str = "ftrace") -> object:
    """The events (categoricals as strings) and meta, or the error's text."""
    with native.pure_parser(pure_parser):
        try:
            events, meta = read_events(fmt, path, strict=strict)
        except VtraceError as e:
            return str(e)
    return events.with_columns(pl.col(pl.Categorical).cast(pl.String)), meta


def assert_same(path: Path, *, strict: bool = False, fmt: str = "ftrace") -> object:
    """Both parsers give the same result on ``path``; returns it."""
    compiled = read(path, pure_parser=False, strict=strict, fmt=fmt)
    polars_only = read(path, pure_parser=True, strict=strict, fmt=fmt)
    if isinstance(compiled, str) or isinstance(polars_only, str):
        assert compiled == polars_only
        return compiled
    (fa, ma), (fb, mb) = compiled, polars_only  # type: ignore[misc]
    assert fa.schema == fb.schema
    assert fa.equals(fb), _first_difference(fa, fb)
    assert ma == mb
    return compiled


def _first_difference(a: pl.DataFrame, b: pl.DataFrame) -> str:
    if a.height != b.height:
        return f"{a.height} rows vs {b.height}"
    for c in a.columns:
        differs = a.with_row_index().filter(pl.col(c).ne_missing(b.get_column(c)))
        if differs.height:
            i = int(differs.get_column("index")[0])
            return f"column {c}, row {i}: {a.row(i, named=True)} vs {b.row(i, named=True)}"
    return "same"


def write(tmp: Path, lines: list[str], *, end: str = "\n") -> Path:
    path = tmp / "t.txt"
    path.write_bytes(("\n".join(lines) + end).encode("utf-8", errors="surrogatepass"))
    return path


# --- the extension is there and used -------------------------------------------------------


def test_extension_is_built_from_this_source_and_used(tmp_path: Path) -> None:
    """This checkout has the module (scripts/setup-python.sh builds it), built from the
    current C file, and importing ftrace text goes through it."""
    mod = native.module()
    assert mod is not None, (
        "vtrace.ingest._tracefs is missing or stale: run `bash scripts/setup-python.sh --dev`"
    )
    assert mod.ABI == native.ABI
    source = ROOT / "vtrace/ingest/_tracefs.c"
    built = Path(mod.__file__)  # type: ignore[arg-type]
    if built.parent == source.parent:  # an editable install: next to its source
        assert built.stat().st_mtime >= source.stat().st_mtime, (
            "the module is older than vtrace/ingest/_tracefs.c: run scripts/setup-python.sh"
        )
    calls: list[int] = []
    real = native.parse

    def counting(data: bytes) -> native.NativeLines | None:
        got = real(data)
        calls.append(0 if got is None else got.rows.height)
        return got

    path = DATA / "kvm_tracefs.txt"
    try:
        native.parse = counting  # type: ignore[assignment]
        events, _ = read_events("ftrace", path)
    finally:
        native.parse = real  # type: ignore[assignment]
    assert calls and calls[0] > 0.9 * events.height


def test_pure_parser_env_turns_it_off() -> None:
    with native.pure_parser(True):
        assert native.module() is None
        assert native.parse(b"x\n") is None
    with native.pure_parser(False):
        assert native.module() is not None


def test_every_payload_pattern_is_read_or_refused() -> None:
    """An event with a pattern the C code does not know is handed back, never read as raw."""
    assert set(PAYLOADS) >= native.NATIVE_PAYLOADS
    line = "       CPU 0/KVM-2345    [001] .....  1234.567890: {}: some text"
    got = native.parse((line.format("kvm_pio") + "\n" + line.format("kvm_fpu") + "\n").encode())
    assert got is not None
    assert got.rows.get_column("lineno").to_list() == [2]  # kvm_fpu: raw only
    assert got.rest.get_column("lineno").to_list() == [1]  # kvm_pio text malformed: polars'


# --- the same results on real and generated files -------------------------------------------


@pytest.mark.parametrize("name", ["kvm_tracefs.txt", "kvm_trace_cmd_report.txt"])
@pytest.mark.parametrize("strict", [False, True])
def test_shipped_captures(name: str, strict: bool) -> None:
    assert_same(DATA / name, strict=strict)


def test_perf_and_qemu_files_do_not_use_it() -> None:
    assert_same(DATA / "kvm_perf_script.txt", fmt="perf")


def test_benchmark_file(tmp_path: Path) -> None:
    path = tmp_path / "bench.txt"
    _bench().generate(path, 3000)  # type: ignore[attr-defined]
    frame, meta = assert_same(path)  # type: ignore[misc]
    assert meta["malformed"] == 0 and meta["unparsed"] == 0 and frame.height == 3000
    got = native.parse(path.read_bytes())
    assert got is not None and got.rows.height == 3000  # every event line compiled


HEAD = "       CPU 0/KVM-2345    [001] d..1.  1234.5678{:02d}: "
# Lines at the edges of what the C code takes: each must give what the polars parser gives.
EDGES = [
    "kvm_exit: vcpu 0 reason HLT rip 0xffffffff81000000 info1 0x0 info2 0x0",
    "kvm_exit: reason EPT_VIOLATION rip 0x1 info 0 0",
    "kvm_exit: vcpu 2147483648 reason HLT rip 0x1",
    "kvm_exit: vcpu 2147483647 reason HLT rip 0x1",
    "kvm_exit: vcpu 1234567890123456789 reason HLT rip 0x1",
    "kvm_exit: vcpu 0 reason HLT FAILED_VMENTRY rip 0x1",
    "kvm_exit: vcpu 0 reason DE excp rip 0x1",
    "kvm_exit: vcpu 0 reason 0x45 rip 0x1",
    "kvm_exit: vcpu 0 reason npf rip 0x10 info1 0x0",
    "kvm_exit: vcpu 0 reason NOPE rip 0x1",
    "kvm_exit: vcpu 0 reason HLT rip 0x12345678901234567",
    "kvm_exit: vcpu 0 reason HLT rip 0x1234567890123456",
    "kvm_exit: vcpu 0 reason HLT rip 0x12junk",
    "kvm_exit: vcpu 0 reason HLT rip 0x1junk rip 0x2",
    "kvm_exit: vcpu 0 reason HLT  rip 0x1",
    "kvm_entry: vcpu 1, rip 0xffffffff81000003 intr_info 0x0",
    "kvm_entry: vcpu 1, rip 0x3 [immediate exit]",
    "kvm_entry: vcpu 1, rip 0x3",
    "kvm_entry: vcpu 1,rip 0x3",
    "kvm_pio: pio_write at 0xc004 size 2 count 1 val 0x4",
    "kvm_pio: pio_write at 0xc004 size 2 count 1 val 0x4 ",
    "kvm_pio: pio_read at 0x3f8 size 1 count 8 val 0x41 (...)",
    "kvm_pio: pio_read at 0x3f8 size 1 count 8 val 0x41 (..)",
    "kvm_pio: pio_read at 0x3f8 size 1 count 8 val 0x41 (...) x",
    "kvm_pio: pio_read at 0x3f8 size 1 count 8 val 0x41 (...)(...)",
    "kvm_pio: pio_write at 0xc004 size -1 count 1 val 0x4",
    "kvm_pio: pio_write at 0xc004 size 2 count 3000000000 val 0x4",
    "kvm_pio: pio_write at 0xc004 size 2147483648 count 1 val 0x4",
    "kvm_pio: pio_write at 0xc004 size 2 count 1 val 0x12345678901234567",
    "kvm_pio: pio_write at 0xc004 size 2 count 1 val 0x7#6",
    "kvm_pio: pio_write at 0xc004 size 2 count 1 val 0x",
    "kvm_pio: pio_write at 0xc004 size 2 count 1",
    "kvm_mmio: mmio write len 4 gpa 0xfebf0000 val 0x1",
    "kvm_mmio: mmio read len 4 gpa 0xfebf0000 val 0x1",
    "kvm_mmio: mmio unsatisfied-read len 8 gpa 0xfebf0000 val 0x0",
    "kvm_mmio: mmio unsatisfied len 8 gpa 0xfebf0000 val 0x0",
    "kvm_mmio: mmio write len 4 gpa 0xfebf0000 val 0x1 extra",
    "kvm_fast_mmio: fast mmio at gpa 0xfebf1000",
    "kvm_fast_mmio: fast mmio at gpa 0xfebf1000 x",
    "kvm_userspace_exit: reason KVM_EXIT_IO (2)",
    "kvm_userspace_exit: reason KVM_EXIT_MMIO (6)",
    "kvm_userspace_exit: reason restart (-4)",
    "kvm_userspace_exit: reason error (-14)",
    "kvm_userspace_exit: reason KVM_EXIT_IO (-0)",
    "kvm_userspace_exit: reason restart (-0)",
    "kvm_userspace_exit: reason KVM_EXIT_IO (123456789012345678)",
    "kvm_userspace_exit: reason KVM_EXIT_IO (1234567890123456789)",
    "kvm_userspace_exit: reason KVM_EXIT_IO(2) (2)",
    "kvm_userspace_exit: reason KVM_EXIT_IO 2",
    "kvm_set_irq: gsi 11 level 1 source 0",
    "kvm_set_irq: gsi 11 level -1 source 0",
    "kvm_set_irq: gsi 11 level 0 source -1",
    "kvm_set_irq: gsi 11 level -0 source -0",
    "kvm_msi_set_irq: dst 0 vec 47 (Fixed|physical|edge)",
    "kvm_msi_set_irq: dst 1f vec 33 (LowPrio|logical|level|rh)",
    "kvm_msi_set_irq: dst ffffffff vec 255 (ExtINT|logical|level)",
    "kvm_msi_set_irq: dst 1ffffffff vec 255 (ExtINT|logical|level)",
    "kvm_msi_set_irq: dst 0 vec 4000 (SIPI|physical|edge)",
    "kvm_msi_set_irq: dst 0 vec 47 (Fixd|physical|edge)",
    "kvm_inj_virq: IRQ 0x27",
    "kvm_inj_virq: Soft/INTn 0x80 [reinjected]",
    "kvm_inj_virq: IRQ 0x27 [reinjected] x",
    "kvm_emulate_insn: 0:ffffffff81000001:ee (prot64)",
    "kvm_emulate_insn: 0:ffffffff81000001:ee (prot64) failed",
    "kvm_emulate_insn: 0:ffffffff81000001: in al,dx FAIL",
    "kvm_emulate_insn: 0:ffffffff81000001ee (prot64)",
    "kvm_emulate_insn: 12345678901234567:1:ee",
    "kvm_fpu: load",
    "kvm_fpu:   load  ",
    # Strings of up to 12 bytes are stored inside their Arrow view, longer ones point to the file.
    "kvm_fpu: " + "x" * 11,
    "kvm_fpu: " + "y" * 12,
    "kvm_fpu: " + "z" * 13,
    "kvm_fpu:",
    "kvm_fpu: ",
    "sched_switch: prev_comm=x prev_pid=1 ==> next_comm=y",
    "kvm-fpu: load",
    "k" * 70 + ": load",
]


@pytest.mark.parametrize("strict", [False, True])
def test_edge_lines(tmp_path: Path, strict: bool) -> None:
    lines = [HEAD.format(i % 100) + text for i, text in enumerate(EDGES)]
    _, meta = assert_same(write(tmp_path, lines))  # type: ignore[misc]
    assert meta["malformed"] > 5  # the damaged ones were found
    assert_same(write(tmp_path, lines), strict=strict)
    for line in lines:  # one line alone: each error is the same too
        assert_same(write(tmp_path, [line]), strict=strict)


# Headers at the edges of tracefs' layout.
HEADERS = [
    "       CPU 0/KVM-2345    [001] .....  1234.567890: ",
    "       CPU 0/KVM-2345    [001] ..... 123456.567890: ",
    "       CPU 0/KVM-2345    [001] ..... 9223372035.567890: ",
    "       CPU 0/KVM-2345    [001] ..... 9223372036.567890: ",
    "       CPU 0/KVM-2345    [001] ..... 12345678901.567890: ",
    "       CPU 0/KVM-2345    [001] .....x123456.000001: ",
    "       CPU 0/KVM-2345    [001] .....     0.000000: ",
    "       CPU 0/KVM-2345    [001] ..... 1 234.567890: ",
    "       CPU 0/KVM-1234567 [001] .....  1234.567890: ",
    "       CPU 0/KVM-12345678 [001] .....  1234.567890: ",
    "       CPU 0/KVM-2345    [1001] .....  1234.567890: ",
    "       CPU 0/KVM-2345    (   2340) [001] .....  1234.567890: ",
    "       CPU 0/KVM-2345    [001]  1234.567890: ",
    "       CPU 0/KVM-2345    [001] .....  1234.5678901: ",
    "       CPU 0/KVM-2345    [001] .....  1234.56789: ",
    "     CPU [0]/KVM-2345    [001] .....  1234.567890: ",
    "      CPU 0: KVM-2345    [001] .....  1234.567890: ",
    "      CPU 0/KVMé-2345    [001] .....  1234.567890: ",
    "           <...>-2345    [001] .....  1234.567890: ",
    "  trace-cmd-2345  [001]  1234.567890: ",
    "CPU 0/KVM-2345 [001] 1234.567890: ",
]


def test_edge_headers(tmp_path: Path) -> None:
    lines = [h + t for h in HEADERS for t in ("kvm_fpu: load", "kvm_inj_virq: IRQ 0x27")]
    assert_same(write(tmp_path, lines))
    for line in lines:
        assert_same(write(tmp_path, [line]))


# --- whole files the compiled reader hands back or checks first ------------------------------

GOOD = HEAD.format(1) + "kvm_pio: pio_write at 0xc004 size 2 count 1 val 0x4"
OTHER = HEAD.format(2) + "kvm_fpu: load"


@pytest.mark.parametrize(
    ("body", "end"),
    [
        ("\r\n".join([GOOD, OTHER]), "\r\n"),  # CRLF: polars splits it
        ("\n".join([GOOD, "x\x1fy", OTHER]), "\n"),  # the unit separator
        ("\n".join([GOOD, OTHER]), ""),  # cut: no newline after the last line
        ("\n".join([GOOD, OTHER, "   "]), ""),  # blanks after the last newline
        ("\n".join([GOOD, "", "", OTHER, ""]), "\n"),  # blank lines
        ("\n".join(["# only", "# comments"]), "\n"),
        ("\n".join([GOOD, "CPU:1 [LOST 42 EVENTS]", OTHER, "garbage"]), "\n"),
        ("\n".join([GOOD.replace("CPU 0/KVM", "CPU 0/KVMé"), OTHER]), "\n"),  # UTF-8
        ("\n".join([GOOD, OTHER]), "\n\n\n"),
    ],
)
@pytest.mark.parametrize("strict", [False, True])
def test_odd_files(tmp_path: Path, body: str, end: str, strict: bool) -> None:
    assert_same(write(tmp_path, [body], end=end), strict=strict)


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes((GOOD + "\n").encode() * 3 + b"\xff\xfe bad\n" + (OTHER + "\n").encode())
    assert "not UTF-8" in str(assert_same(path))


def test_nul_bytes_after_the_binary_probe(tmp_path: Path) -> None:
    """A zero-filled block in a large file: those lines go to polars, which says malformed
    or unparsed; the rest is read by the compiled reader."""
    lines = [GOOD] * 1000 + ["\x00" * 40, GOOD.replace("0x4", "0x\x004"), OTHER]
    _, meta = assert_same(write(tmp_path, lines))  # type: ignore[misc]
    assert meta["unparsed"] == 1 and meta["malformed"] == 1


def test_line_order_with_lines_from_both_parsers(tmp_path: Path) -> None:
    """Lines taken by either parser come back in file order, with their line numbers."""
    lines = []
    for i in range(300):
        lines.append(HEAD.format(i % 100) + EDGES[i % len(EDGES)])
    _, meta = assert_same(write(tmp_path, lines))  # type: ignore[misc]
    got = native.parse(write(tmp_path, lines).read_bytes())
    assert got is not None and got.rows.height and got.rest.height
    assert meta["malformed"] > 0


# --- random damage to valid lines -------------------------------------------------------------

VALID = (
    [HEAD.format(i) + text for i, text in enumerate(EDGES[:2] + EDGES[15:17])]
    + [
        HEAD.format(50) + text
        for text in (
            "kvm_pio: pio_read at 0x3f8 size 1 count 8 val 0x41 (...)",
            "kvm_mmio: mmio unsatisfied-read len 8 gpa 0xfebf0000 val 0x0",
            "kvm_fast_mmio: fast mmio at gpa 0xfebf1000",
            "kvm_userspace_exit: reason restart (-4)",
            "kvm_set_irq: gsi 11 level 1 source -1",
            "kvm_msi_set_irq: dst 1f vec 33 (LowPrio|logical|level|rh)",
            "kvm_inj_virq: Soft/INTn 0x80 [reinjected]",
            "kvm_emulate_insn: 0:ffffffff81000001:ee (prot64) failed",
            "kvm_fpu: load",
        )
    ]
    + (DATA / "kvm_tracefs.txt").read_text().splitlines()[-40:]
)
# Bigger than their columns: Int32, Int64, UInt64, 16 hex digits and more.
HUGE = ["2147483648", "4294967296", "9223372036854775808", "18446744073709551616",
        "123456789012345678", "1234567890123456789", "ffffffffffffffff", "1ffffffffffffffff"]  # fmt: skip
PIECES = ["0", "9", "a", "f", "g", "x", "#", "-", " ", "  ", "\t", "\x00", "é", ":", ": ", "[", "]", "(", ")", "|"]  # fmt: skip


@st.composite
def damaged(draw: st.DrawFn) -> str:
    line = draw(st.sampled_from(VALID))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["digit", "cut", "insert", "delete", "huge", "spaces"]))
        i = draw(st.integers(0, len(line)))
        if kind == "digit":
            digits = [k for k, ch in enumerate(line) if ch.isdigit()]
            if digits:
                k = draw(st.sampled_from(digits))
                line = line[:k] + draw(st.sampled_from(PIECES)) + line[k + 1 :]
        elif kind == "cut":
            line = line[:i]
        elif kind == "insert":
            line = line[:i] + draw(st.sampled_from(PIECES)) + line[i:]
        elif kind == "delete":
            line = line[:i] + line[i + draw(st.integers(1, 4)) :]
        elif kind == "huge":  # a number made too big for its column
            runs = [k for k in range(1, len(line)) if line[k].isalnum() and line[k - 1] in " x("]
            if runs:
                k = draw(st.sampled_from(runs))
                end = k
                while end < len(line) and line[end].isalnum():
                    end += 1
                line = line[:k] + draw(st.sampled_from(HUGE)) + line[end:]
        else:
            line = line[:i] + " " * draw(st.integers(1, 3)) + line[i:]
    return line


# Valid lines of the benchmark's mix, enough to put the damaged ones past the binary probe.
_PREFIX: list[str] = []


def prefix() -> list[str]:
    if not _PREFIX:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "p.txt"
            _bench().generate(path, 600)  # type: ignore[attr-defined]
            _PREFIX.extend(path.read_text().splitlines())
    return _PREFIX


@SETTINGS
@given(
    lines=st.lists(damaged(), min_size=1, max_size=20),
    after_probe=st.booleans(),
    strict=st.booleans(),
)
def test_damaged_lines_give_the_same_result(
    lines: list[str], after_probe: bool, strict: bool
) -> None:
    """Mutations of valid lines (digits replaced, values cut, NULs, numbers too big, extra
    blanks): the compiled reader and polars agree on every table, count and error."""
    if after_probe:  # NUL bytes in the first 64 KiB make the file binary: put them later
        lines = prefix() + lines
    with tempfile.TemporaryDirectory() as tmp:
        assert_same(write(Path(tmp), lines), strict=strict)


def test_runs_and_compiled_lines_agree(tmp_path: Path) -> None:
    """The lines handed back are parsed in runs like any others (several runs here)."""
    lines = [HEAD.format(i % 100) + EDGES[i % len(EDGES)] for i in range(500)]
    saved = tt.FAST_RUN_LINES
    try:
        tt.FAST_RUN_LINES = 7
        assert_same(write(tmp_path, lines))
    finally:
        tt.FAST_RUN_LINES = saved


def test_views_reach_every_offset_of_a_large_file() -> None:
    """Files of more than 1 GiB: a view at offset ``o`` names buffer ``o >> shift`` with the
    offset within it; every string shorter than ``1 << shift`` lies inside its buffer. Checked
    with a small shift (the C code uses ``VIEW_SHIFT``, 1 GiB) on views made as it makes them."""
    shift = 4
    data = bytes(range(48, 48 + 75))  # 75 bytes: buffers of 32 bytes every 16
    spans = [(0, 13), (3, 15), (15, 15), (16, 13), (30, 15), (60, 15), (74, 1), (5, 2)]
    views = np.zeros((len(spans), 16), np.uint8)
    for row, (at, n) in enumerate(spans):
        views[row, 0:4] = np.frombuffer(np.int32(n).tobytes(), np.uint8)
        if n <= 12:
            views[row, 4 : 4 + n] = np.frombuffer(data[at : at + n], np.uint8)
        else:
            views[row, 4:8] = np.frombuffer(data[at : at + 4], np.uint8)
            views[row, 8:12] = np.frombuffer(np.int32(at >> shift).tobytes(), np.uint8)
            views[row, 12:16] = np.frombuffer(np.int32(at & ((1 << shift) - 1)).tobytes(), np.uint8)
    buffers = native._buffers(data, shift)
    assert len(buffers) == 5
    arr = pa.Array.from_buffers(pa.string_view(), len(spans), [None, pa.py_buffer(views), *buffers])
    assert arr.to_pylist() == [data[at : at + n].decode() for at, n in spans]
    assert len(native._buffers(b"x" * 10, 30)) == 1
