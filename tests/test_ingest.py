"""Importers on real captures (exact counts) and on the kernel's exact text for kvm_exit/kvm_entry."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from vtrace import open_trace
from vtrace import schema as s
from vtrace.errors import VtraceError
from vtrace.ingest import import_file, read_events

DATA = Path(__file__).parent / "data"
KVM_CAPTURES = [
    ("ftrace", DATA / "kvm_tracefs.txt", 326, 12),
    ("ftrace", DATA / "kvm_trace_cmd_report.txt", 315, 1),
    ("perf", DATA / "kvm_perf_script.txt", 314, 0),
]
EVENT = pl.col("event").cast(pl.String)


def counts(frame: pl.DataFrame, *by: str | pl.Expr) -> dict:
    rows = frame.group_by(*by).len().rows()
    return {r[:-1] if len(r) > 2 else r[0]: r[-1] for r in rows}


@pytest.mark.parametrize(
    ("fmt", "path", "lines", "ignored"), KVM_CAPTURES, ids=lambda x: getattr(x, "name", None)
)
def test_real_kvm_capture_exact_counts(fmt: str, path: Path, lines: int, ignored: int) -> None:
    events, meta = read_events(fmt, path)
    s.validate(events)
    assert (meta["lines"], meta["events"], meta["ignored_lines"]) == (lines, 314, ignored)
    assert (meta["unparsed"], meta["malformed"], meta["lost_events"]) == (0, 0, 0)
    by_event = counts(events, EVENT)
    assert {k: by_event[k] for k in ("kvm_pio", "kvm_userspace_exit", "kvm_mmio", "kvm_set_irq",
                                      "kvm_msi_set_irq", "kvm_emulate_insn", "kvm_fpu")} == {
        "kvm_pio": 36, "kvm_userspace_exit": 41, "kvm_mmio": 20, "kvm_set_irq": 10,
        "kvm_msi_set_irq": 5, "kvm_emulate_insn": 93, "kvm_fpu": 82,
    }  # fmt: skip
    assert len(by_event) == 14  # 7 more kvm events kept as raw
    assert events.get_column("source").cast(pl.String).unique().to_list() == ["kvm"]
    assert events.get_column("ts_ns").is_sorted()
    assert events.get_column("tid").n_unique() == 1

    pio = events.filter(EVENT == "kvm_pio")
    # Port 0x500: 6 `out` of 0x41 (5 loops + the first exit of loop 6), 5 `in` reading the
    # VMM's 0x5a, 4 bytes "vtr\n" of rep outsb per loop; port 0x504: the ioeventfd kick.
    assert counts(pio, "addr", "write", "value") == {
        (0x500, True, 0x41): 6, (0x500, False, 0x5A): 5, (0x500, True, ord("v")): 5,
        (0x500, True, ord("t")): 5, (0x500, True, ord("r")): 5, (0x500, True, ord("\n")): 5,
        (0x504, True, 0x41): 5,
    }  # fmt: skip
    assert pio.select((pl.col("size") == 1) & (pl.col("count") == 1)).to_series().all()
    exits = events.filter(EVENT == "kvm_userspace_exit")
    assert counts(exits, pl.col("reason_name").cast(pl.String), "reason") == {
        ("KVM_EXIT_IO", 2): 31,
        ("KVM_EXIT_MMIO", 6): 10,
    }
    mmio = events.filter(EVENT == "kvm_mmio")
    assert counts(mmio, "addr", "flags", "write") == {
        (0x10000, 2, True): 5, (0x10008, 2, True): 5, (0x10004, 0, False): 5, (0x10004, 1, False): 5,
    }  # fmt: skip
    irq = events.filter(EVENT == "kvm_set_irq")
    assert counts(irq, "addr", "value", "flags") == {(5, 1, 0): 5, (5, 0, 0): 5}
    msi = events.filter(EVENT == "kvm_msi_set_irq").select("addr", "value").unique()
    assert msi.rows() == [(0xFEE00000, 0x31)]
    insn = events.filter(EVENT == "kvm_emulate_insn")
    assert insn.get_column("rip").min() == 0 and insn.get_column("rip").max() == 0x22
    # Columns hold all of kvm_pio's text; the rest keeps its text in raw.
    assert pio.get_column("raw").null_count() == pio.height
    assert events.filter(EVENT == "kvm_fpu").get_column("raw").unique().sort().to_list() == [
        "load",
        "unload",
    ]


def test_three_tools_agree_on_the_same_guest() -> None:
    """The three captures of one guest program give the same columns apart from time and thread."""
    cols = ["event", "addr", "size", "write", "value", "count", "reason", "flags", "rip"]
    frames = [
        read_events(fmt, path)[0].select(pl.col(cols).cast(pl.String)).sort(cols, nulls_last=True)
        for fmt, path, _, _ in KVM_CAPTURES
    ]
    assert frames[0].equals(frames[2])
    # trace-cmd's plugin prints kvm_emulate_insn differently; the columns still agree.
    assert frames[0].equals(frames[1])


def test_import_writes_a_trace_directory(tmp_path: Path) -> None:
    trace = import_file(
        "perf", DATA / "kvm_perf_script.txt", tmp_path / "t", extra_meta={"note": "x"}
    )
    again = open_trace(tmp_path / "t")
    assert again.events.select(pl.len()).collect().item() == 314
    assert again.meta["importer"] == "perf" and again.meta["note"] == "x"
    assert again.meta["complete"] is True and trace.meta["unparsed"] == 0
    assert again.meta["source_files"] == [str((DATA / "kvm_perf_script.txt").resolve())]


# --- kvm_exit / kvm_entry: the kernel's exact text, built from the real print fmt ---------------


def print_fmt(event: str) -> str:
    """The tracepoint's format string from the shipped format file, as Python %-format."""
    text = (s.FORMATS_DIR / f"{event}.format").read_text()
    fmt = re.search(r'print fmt: "((?:[^"\\]|\\.)*)"', text).group(1)
    return re.sub(
        r"%(0?\d*)(?:ll|l)?([xud])", lambda m: f"%{m[1]}{'d' if m[2] == 'u' else m[2]}", fmt
    )


def tracefs_line(
    event: str, payload: str, ts: str = "1234.567890", task: str = "CPU 0/KVM-2345"
) -> str:
    return f"{task:>16}    [001] d..2.  {ts}: {event}: {payload}"


def exit_payload(reason: str, flags: str = "", rip: int = 0xFFFFFFFF81000000) -> str:
    # vcpu, reason, " " before flags, flags, rip, info1, info2, intr_info, error_code, requests
    return print_fmt("kvm_exit") % (
        1,
        reason,
        " " if flags else "",
        flags,
        rip,
        0xC00040,
        0,
        0,
        0,
        0,
    )


def parse_lines(tmp_path: Path, lines: list[str], fmt: str = "ftrace") -> tuple[pl.DataFrame, dict]:
    path = tmp_path / "t.txt"
    path.write_text("\n".join(lines) + "\n")
    return read_events(fmt, path, strict=True)


def test_kvm_exit_vmx_svm_and_failed_vmentry(tmp_path: Path) -> None:
    lines = [
        tracefs_line("kvm_exit", exit_payload("IO_INSTRUCTION")),
        tracefs_line("kvm_exit", exit_payload("EPT_VIOLATION")),
        tracefs_line("kvm_exit", exit_payload("INVALID_STATE", "FAILED_VMENTRY")),
        tracefs_line("kvm_exit", exit_payload("io")),
        tracefs_line("kvm_exit", exit_payload("npf")),
        tracefs_line("kvm_exit", exit_payload("PF excp")),
        tracefs_line("kvm_exit", exit_payload("0x5")),  # a code the kernel has no name for
    ]
    events, meta = parse_lines(tmp_path, lines)
    assert meta["events"] == 7
    got = events.select(
        "vcpu",
        "reason",
        pl.col("reason_name").cast(pl.String),
        pl.col("isa").cast(pl.String),
        "flags",
        "rip",
    ).rows()
    rip = 0xFFFFFFFF81000000
    assert got == [
        (1, 30, "IO_INSTRUCTION", "vmx", 0, rip),
        (1, 48, "EPT_VIOLATION", "vmx", 0, rip),
        (1, 33, "INVALID_STATE", "vmx", 0x80000000, rip),
        (1, 0x7B, "io", "svm", 0, rip),
        (1, 0x400, "npf", "svm", 0, rip),
        (1, 0x40 + 14, "PF excp", "svm", 0, rip),
        (1, 5, None, None, None, rip),
    ]
    # info1/info2/... have no column: the text is kept.
    assert events.get_column("raw")[0].endswith("requests 0x0000000000000000")


def test_kvm_exit_trace_cmd_plugin_text(tmp_path: Path) -> None:
    # trace-cmd's kvm plugin: "reason NAME rip 0x... info INFO1 INFO2", no vcpu.
    line = "vtcap:  CPU 0/KVM-2345  [001]  1234.567890: kvm_exit:             reason HLT rip 0xffffffff8100a1b2 info 0 0"
    events, _ = parse_lines(tmp_path, [line])
    assert events.select("vcpu", "reason", pl.col("reason_name").cast(pl.String), "rip").row(0) == (
        None, 12, "HLT", 0xFFFFFFFF8100A1B2,
    )  # fmt: skip


def test_kvm_entry_and_other_formats(tmp_path: Path) -> None:
    entry = print_fmt("kvm_entry")
    lines = [
        tracefs_line("kvm_entry", entry % (3, 0xFFFFFFFF81000010, 0, 0, "")),
        tracefs_line("kvm_entry", entry % (3, 0x10, 0x800000EC, 0, "[immediate exit]")),
        tracefs_line("kvm_inj_virq", print_fmt("kvm_inj_virq") % ("IRQ", 0xEC, "")),
        tracefs_line(
            "kvm_inj_virq", print_fmt("kvm_inj_virq") % ("Soft/INTn", 0x80, " [reinjected]")
        ),
        tracefs_line("kvm_fast_mmio", print_fmt("kvm_fast_mmio") % 0xFEBF3000),
        tracefs_line("kvm_userspace_exit", "reason restart (4)"),
        tracefs_line("kvm_msi_set_irq", "dst 1 vec 36 (Fixed|logical|level|rh)"),
        tracefs_line("kvm_pio", print_fmt("kvm_pio") % ("read", 0x1F0, 2, 256, 0xABCD, "(...)")),
    ]
    events, meta = parse_lines(tmp_path, lines)
    assert meta["events"] == len(lines)
    rows = events.select("vcpu", "rip", "flags", "value", "addr", "count", "size", "write").rows()
    assert rows[0][:3] == (3, 0xFFFFFFFF81000010, 0)
    assert rows[1][:3] == (3, 0x10, 1)
    assert rows[2][2:4] == (0, 0xEC) and rows[3][2:4] == (3, 0x80)
    assert rows[4][4] == 0xFEBF3000 and rows[4][7] is True
    restart = events.row(5, named=True)
    # flags holds errno like the collector: -EINTR
    assert (restart["reason"], restart["reason_name"], restart["flags"]) == (None, "restart", -4)
    # dst 1, logical, redirection hint; data: vector 36, fixed, level.
    assert rows[6][3:5] == (36 | (1 << 15), 0xFEE00000 | (1 << 12) | 4 | 8)
    assert rows[7][4:] == (0x1F0, 256, 2, False)


def test_malformed_known_event_is_kept_as_raw(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    path.write_text(tracefs_line("kvm_pio", "pio_sideways at 0x1 size 1") + "\n")
    events, meta = read_events("ftrace", path)
    assert meta["malformed"] == 1 and meta["malformed_first_lines"] == [1]
    assert events.get_column("raw").to_list() == ["pio_sideways at 0x1 size 1"]
    assert events.get_column("addr").to_list() == [None]
    with pytest.raises(VtraceError, match=r"t\.txt:1: kvm_pio text does not match"):
        read_events("ftrace", path, strict=True)


def test_unparsed_lines_counted_with_line_numbers(tmp_path: Path) -> None:
    good = (DATA / "kvm_tracefs.txt").read_text().splitlines()
    lines = [*good[:20], "garbage one", *good[20:40], "garbage two", *good[40:]]
    path = tmp_path / "t.txt"
    path.write_text("\n".join(lines) + "\n")
    _events, meta = read_events("ftrace", path)
    assert (meta["events"], meta["unparsed"], meta["unparsed_first_lines"]) == (314, 2, [21, 42])
    with pytest.raises(VtraceError, match=r"t\.txt:21: not a ftrace line \(2 unparsed in all\)"):
        read_events("ftrace", path, strict=True)


def test_lost_events_marker_counted(tmp_path: Path) -> None:
    good = (DATA / "kvm_tracefs.txt").read_text().splitlines()
    path = tmp_path / "t.txt"
    path.write_text("\n".join([*good[:30], "CPU:1 [LOST 42 EVENTS]", *good[30:]]) + "\n")
    _, meta = read_events("ftrace", path, strict=True)
    assert (meta["lost_events"], meta["unparsed"], meta["events"]) == (42, 0, 314)


def test_cli_import_prints_summary(tmp_path: Path) -> None:
    out = tmp_path / "t"
    run = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "import", "ftrace", str(DATA / "kvm_tracefs.txt"), "-o", str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "314 events from 326 lines" in run.stdout
    assert open_trace(out).meta["events"] == 314


def test_header_variants(tmp_path: Path) -> None:
    """record-tgid, instance buffers, a per-CPU banner, ns timestamps, perf's PID/TID and period."""
    pio = "pio_write at 0x500 size 1 count 1 val 0x41 "
    ftrace = [
        "##### CPU 1 buffer started ####",
        f"       CPU 0/KVM-2345    (   2340) [001] d..2.  1234.567890: kvm_pio: {pio}",
        f"vtcap:   kworker/u8:2-77    [000]  1234.567891234: kvm_pio:    {pio}",
        f"   <...>-9 [003] ....  42: kvm_pio: {pio}",  # a counter clock: integer timestamps
    ]
    events, meta = parse_lines(tmp_path, ftrace)
    assert (meta["events"], meta["ignored_lines"]) == (3, 1)
    assert events.select("pid", "tid", "cpu", "ts_ns").rows() == [
        (2340, 2345, 1, 1_234_567_890_000),
        (None, 77, 0, 1_234_567_891_234),
        (None, 9, 3, 42),
    ]
    perf = [
        f"     CPU 0/KVM  2340/2345 [001]  1234.567890:          1 kvm:kvm_pio: {pio}",
        f"         python3  4790 [000]   411.345015:        kvm:kvm_pio: {pio}",
    ]
    events, _ = parse_lines(tmp_path, perf, fmt="perf")
    assert events.select("pid", "tid", "cpu", "ts_ns").rows() == [
        (2340, 2345, 1, 1_234_567_890_000),
        (None, 4790, 0, 411_345_015_000),
    ]
    assert events.get_column("addr").to_list() == [0x500, 0x500]


@pytest.mark.kvm
@pytest.mark.root
def test_fresh_capture_from_dev_kvm(tmp_path: Path) -> None:
    """Record the guest again through tracefs and import it: the same I/O counts."""
    if not Path("/sys/kernel/tracing/instances").is_dir():
        pytest.skip("no tracefs: mount -t tracefs nodev /sys/kernel/tracing")
    out = tmp_path / "fresh.txt"
    script = DATA / "make_kvm_capture.py"
    run = subprocess.run(
        [sys.executable, str(script), "tracefs", str(out), "--loops", "3"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    events, meta = read_events("ftrace", out, strict=True)
    by_event = counts(events, EVENT)
    # 3 loops + the first exit of loop 4 (see tests/data/README.md).
    expected = {
        "kvm_pio": 22, "kvm_userspace_exit": 25, "kvm_mmio": 12, "kvm_set_irq": 6, "kvm_msi_set_irq": 3,
    }  # fmt: skip
    assert {k: by_event.get(k) for k in expected} == expected
    assert meta["unparsed"] == 0


@pytest.mark.parametrize("fmt", ["ftrace", "perf"])
def test_non_ascii_task_names_keep_their_fields(tmp_path: Path, fmt: str) -> None:
    """str.find counts bytes, slices count characters: a non-ASCII task name must not
    shift the fields after it."""
    lines = {
        "ftrace": [
            "      CPU 0/KVMé-4774    [000] .....   411.064950: kvm_pio: pio_write at 0x500 size 1 count 1 val 0x41 ",
            "         python3-4775    [001] .....   411.065001: kvm_pio: pio_read at 0x504 size 2 count 1 val 0x7 ",
        ],
        "perf": [
            "   CPU 0/KVMé  4774 [000]   411.064950: kvm:kvm_pio: pio_write at 0x500 size 1 count 1 val 0x41 ",
            "      python3  4775 [001]   411.065001: kvm:kvm_pio: pio_read at 0x504 size 2 count 1 val 0x7 ",
        ],
    }[fmt]
    df, meta = parse_lines(tmp_path, lines, fmt)
    assert meta["unparsed"] == 0
    assert df["ts_ns"].to_list() == [411_064_950_000, 411_065_001_000]
    assert df["tid"].to_list() == [4774, 4775]
    assert df["cpu"].to_list() == [0, 1]
    assert df["addr"].to_list() == [0x500, 0x504]
    assert df["write"].to_list() == [True, False]
