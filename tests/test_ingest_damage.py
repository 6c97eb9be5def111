"""Damaged input: values matched whole, cut files, non-regular files, a full output disk."""

from __future__ import annotations

import contextlib
import os
import resource
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from vtrace.errors import VtraceError
from vtrace.ingest import import_file, read_events

DATA = Path(__file__).parent / "data"
TRACEFS = DATA / "kvm_tracefs.txt"
QEMU_LOG = DATA / "qemu" / "virtio-blk-qd1.log"


def ftrace_line(event: str, payload: str, ts: str = "1234.567890") -> str:
    return f"       CPU 0/KVM-2345    [001] d..2.  {ts}: {event}: {payload}"


def perf_line(event: str, payload: str) -> str:
    return f"       CPU 0/KVM  2345 [001]  1234.567890: kvm:{event}: {payload}"


def trace_cmd_line(event: str, payload: str) -> str:
    return f"       CPU 0/KVM-2345  [001]  1234.567890: {event}:  {payload}"


LINE = {"ftrace": ftrace_line, "perf": perf_line, "trace-cmd": trace_cmd_line}


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vtrace.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _bounded_memory() -> None:
    # A reader that does not refuse /dev/zero would take all the machine's memory: 4 GiB
    # of address space ends it with a MemoryError instead.
    resource.setrlimit(resource.RLIMIT_AS, (4 << 30, 4 << 30))


def bounded_cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The CLI with bounded memory and time: for input that never ends."""
    return subprocess.run(
        [sys.executable, "-m", "vtrace.cli", *args],
        capture_output=True,
        text=True,
        timeout=30,
        preexec_fn=_bounded_memory,
    )


def one_line_error(run: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    err = run.stderr.strip()
    assert "\n" not in err and err.startswith("vtrace: error: "), err
    for text in expected:
        assert text in err, err


# --- every field matched whole ----------------------------------------------------------------

# (event, payload with one field damaged, the columns that must not hold a prefix of it)
CORRUPT = [
    ("kvm_pio", "pio_write at 0x500 size 1 count 1 val 0x7#6", "value"),
    ("kvm_pio", "pio_write at 0x500 size 1 count 1 val 0x5!a", "value"),
    ("kvm_pio", "pio_write at 0x500 size 1 count 1 val 0x1ffffffffffffffff", "value"),
    ("kvm_pio", "pio_write at 0x5z0 size 1 count 1 val 0x41", "addr"),
    ("kvm_pio", "pio_write at 0x500 size 1 count 3000000000 val 0x41", "count"),
    ("kvm_mmio", "mmio write len 4 gpa 0x10008 val 0x1;", "value"),
    ("kvm_fast_mmio", "fast mmio at gpa 0xfebf3000zz", "addr"),
    ("kvm_userspace_exit", "reason KVM_EXIT_IO (2) and more", "reason"),
    ("kvm_set_irq", "gsi 5 level 1 source 0x", "flags"),
    ("kvm_set_irq", "gsi 5 level -1 source 0", "value"),
    ("kvm_msi_set_irq", "dst 1 vec 36 (Fixed|logical|level)junk", "value"),
    ("kvm_msi_set_irq", "dst 1 vec 36 (Bogus|logical|level)", "value"),
    ("kvm_inj_virq", "IRQ 0xec!", "value"),
    ("kvm_entry", "vcpu 3, rip 0x10z intr_info 0x00000000 error_code 0x00000000", "rip"),
    ("kvm_exit", "vcpu 1 reason HLT rip 0xffff#81 info1 0x0 info2 0x0", "rip"),
    ("kvm_exit", "vcpu 1 reason HL#T rip 0xffff81 info1 0x0 info2 0x0", "reason"),
    ("kvm_emulate_insn", "0:5z:ee (real)", "rip"),
]


@pytest.mark.parametrize("tool", ["ftrace", "perf", "trace-cmd"])
@pytest.mark.parametrize(("event", "payload", "column"), CORRUPT)
def test_damaged_field_is_malformed_not_a_prefix(
    tmp_path: Path, tool: str, event: str, payload: str, column: str
) -> None:
    good = LINE[tool]("kvm_pio", "pio_write at 0x500 size 1 count 1 val 0x41")
    path = tmp_path / "t.txt"
    path.write_text(f"{good}\n{LINE[tool](event, payload)}\n")
    fmt = "perf" if tool == "perf" else "ftrace"
    events, meta = read_events(fmt, path)
    assert (meta["events"], meta["malformed"], meta["malformed_first_lines"]) == (2, 1, [2])
    bad = events.row(1, named=True)
    assert bad["raw"] == payload  # the whole text is kept where a reader can see it
    assert bad[column] is None
    assert events.row(0, named=True)["value"] == 0x41
    with pytest.raises(VtraceError, match=rf"t\.txt:2: {event} text does not match"):
        read_events(fmt, path, strict=True)


def test_well_formed_lines_still_parse_whole(tmp_path: Path) -> None:
    """The delimiters each field is anchored to are the ones the kernel prints."""
    lines = [
        ftrace_line("kvm_pio", "pio_read at 0x1f0 size 2 count 256 val 0xabcd (...)"),
        ftrace_line("kvm_pio", "pio_write at 0x500 size 1 count 1 val 0x41 "),
        ftrace_line("kvm_exit", "reason HLT rip 0xffffffff8100a1b2 info 0 0"),
        ftrace_line("kvm_exit", "vcpu 0 reason 0x5 rip 0x10 info1 0x0 info2 0x0"),
        ftrace_line("kvm_entry", "vcpu 3, rip 0x10"),
        ftrace_line("kvm_set_irq", "gsi 5 level 1 source 0"),
        ftrace_line("kvm_emulate_insn", "0:5:ee (real) failed"),
    ]
    path = tmp_path / "t.txt"
    path.write_text("\n".join(lines) + "\n")
    events, meta = read_events("ftrace", path, strict=True)
    assert (meta["events"], meta["malformed"]) == (7, 0)
    assert events.get_column("count").to_list()[:2] == [256, 1]
    assert events.get_column("reason").to_list()[2:4] == [12, 5]
    assert events.get_column("flags").to_list()[6] == 1


def test_timestamp_with_more_than_nanoseconds_is_not_an_event(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    pio = "pio_write at 0x500 size 1 count 1 val 0x41"
    path.write_text(
        f"{ftrace_line('kvm_pio', pio)}\n{ftrace_line('kvm_pio', pio, ts='12.1234567891')}\n"
    )
    events, meta = read_events("ftrace", path)
    assert (meta["events"], meta["unparsed_first_lines"]) == (1, [2])
    assert events.get_column("ts_ns").to_list() == [1_234_567_890_000]


def test_nul_inside_a_value_after_the_binary_probe(tmp_path: Path) -> None:
    """A NUL past the first 64 KiB (a zero-filled block after a crash) is no value."""
    good = TRACEFS.read_text()
    copies = 65536 // len(good) + 2
    bad = ftrace_line("kvm_pio", "pio_write at 0x500 size 1 count 1 val 0x5\0a")
    path = tmp_path / "t.txt"
    path.write_text(good * copies + bad + "\n")
    lineno = good.count("\n") * copies + 1
    events, meta = read_events("ftrace", path)
    assert (meta["malformed"], meta["malformed_first_lines"]) == (1, [lineno])
    assert events.get_column("value").to_list()[-1] is None
    with pytest.raises(VtraceError, match=rf"t\.txt:{lineno}: kvm_pio text does not match"):
        read_events("ftrace", path, strict=True)


@pytest.mark.parametrize(
    ("payload", "column"),
    [
        ("vq 0x1 count 99999999999", "count"),  # does not fit the column
        ("vq 0x1 count 1x", "count"),
    ],
)
def test_qemu_value_that_does_not_fit_is_malformed(
    tmp_path: Path, payload: str, column: str
) -> None:
    path = tmp_path / "q.log"
    path.write_text(f"virtqueue_flush vq 0x1 count 1\nvirtqueue_flush {payload}\n")
    events, meta = read_events("qemu", path)
    assert (meta["malformed"], meta["malformed_first_lines"]) == (1, [2])
    assert events.get_column(column).to_list() == [1, None]
    with pytest.raises(VtraceError, match=r"q\.log:2: virtqueue_flush arguments do not match"):
        read_events("qemu", path, strict=True)


def test_qemu_device_pointer_matched_whole(tmp_path: Path) -> None:
    path = tmp_path / "q.log"
    path.write_text("virtio_set_status vdev 0x55!a val 4\nvirtio_set_status vdev 0x55 val 4\n")
    events, meta = read_events("qemu", path)
    assert (meta["malformed"], meta["malformed_first_lines"]) == (1, [1])
    assert events.get_column("device").cast(pl.String).to_list() == [None, "virtio"]


# --- a file cut in the middle of a line -------------------------------------------------------


@pytest.mark.parametrize(
    ("fmt", "path", "marker"),
    [
        ("ftrace", TRACEFS, "kvm_emulate_insn: 0:0:ba 0"),
        ("ftrace", DATA / "kvm_trace_cmd_report.txt", "kvm_emulate_insn:     0:5: e"),
        ("perf", DATA / "kvm_perf_script.txt", "kvm:kvm_emulate_insn: 0:3:b0"),
        ("ftrace", TRACEFS, "kvm_pio: pio_write at 0x500 size 1 count 1 val 0x4"),
        ("qemu", QEMU_LOG, "virtio_queue_notify vdev 0x55fcad9edd70 n 0 vq 0x7f4a500"),
    ],
    ids=["tracefs-insn", "trace-cmd-insn", "perf-insn", "pio-value", "qemu-pointer"],
)
def test_cut_last_line_is_always_reported(
    tmp_path: Path, fmt: str, path: Path, marker: str
) -> None:
    """A last line without its newline may be cut anywhere, even where it still parses."""
    text = path.read_text()
    cut = tmp_path / "cut.txt"
    cut.write_text(text[: text.index(marker, 4000) + len(marker)])
    lineno = cut.read_text().count("\n") + 1
    with pytest.raises(VtraceError, match=rf"cut\.txt:{lineno}: truncated"):
        read_events(fmt, cut)
    run = cli("import", fmt, str(cut), "-o", str(tmp_path / "out"))
    one_line_error(run, f"cut.txt:{lineno}: truncated")
    assert not (tmp_path / "out").exists()


# --- input that is not a regular file ---------------------------------------------------------


def test_device_is_refused(tmp_path: Path) -> None:
    run = bounded_cli("import", "ftrace", "/dev/zero", "-o", str(tmp_path / "out"))
    one_line_error(run, "/dev/zero: not a regular file")
    assert not (tmp_path / "out").exists()


def test_fifo_is_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    run = bounded_cli("import", "perf", str(fifo), "-o", str(tmp_path / "out"))
    one_line_error(run, f"{fifo}: not a regular file")
    assert not (tmp_path / "out").exists()


def test_symlink_to_a_device_is_refused(tmp_path: Path) -> None:
    link = tmp_path / "trace.txt"
    link.symlink_to("/dev/zero")
    one_line_error(
        bounded_cli("import", "ftrace", str(link), "-o", str(tmp_path / "out")),
        "trace.txt: not a regular file",
    )


# --- a full output filesystem -----------------------------------------------------------------


@contextlib.contextmanager
def small_tmpfs(size: str) -> Iterator[Path]:
    """A real tmpfs of ``size`` mounted for the test (root only)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to mount a small tmpfs")
    where = Path(tempfile.mkdtemp(prefix="vtrace-full-"))
    try:
        mounted = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
            capture_output=True,
            text=True,
        )
        if mounted.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
        try:
            yield where
        finally:
            subprocess.run(["umount", str(where)], check=True)
    finally:
        where.rmdir()


@pytest.fixture(scope="module")
def big_trace(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """20k PIO lines with values that do not compress: a Parquet part well over 64 KiB."""
    path = tmp_path_factory.mktemp("big") / "big.txt"
    lines = [
        ftrace_line(
            "kvm_pio",
            f"pio_write at 0x{i % 65536:x} size 4 count 1 val 0x{(i * 2654435761) % 2**32:x}",
            ts=f"{1000 + i // 1000}.{i % 1000 * 997:06d}",
        )
        for i in range(20_000)
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.mark.root
def test_full_filesystem_during_import(tmp_path: Path, big_trace: Path) -> None:
    with small_tmpfs("64k") as fs:
        run = cli("import", "ftrace", str(big_trace), "-o", str(fs / "out"))
        one_line_error(run, f"{fs / 'out'}: cannot write", "No space left on device")
        assert list(fs.iterdir()) == []  # nothing left behind, not even the directory
        with pytest.raises(VtraceError, match="No space left on device"):
            import_file("ftrace", big_trace, fs / "out")
        assert list(fs.iterdir()) == []


@pytest.mark.root
def test_filesystem_full_from_the_start(tmp_path: Path) -> None:
    with small_tmpfs("64k") as fs:
        filler = fs / "filler"
        with filler.open("wb") as f, contextlib.suppress(OSError):
            f.write(b"x" * 1024 * 1024)
        run = cli("import", "ftrace", str(TRACEFS), "-o", str(fs / "out"))
        one_line_error(run, f"{fs / 'out'}: cannot write", "No space left on device")
        assert [p.name for p in fs.iterdir()] == ["filler"]
