"""Bad input: one-line VtraceError naming the file (and line), exit 2, no partial trace directory."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vtrace.errors import VtraceError
from vtrace.ingest import import_file, read_events

DATA = Path(__file__).parent / "data"
TRACEFS = DATA / "kvm_tracefs.txt"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "import", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def one_line_error(run: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert run.returncode == 2
    assert "Traceback" not in run.stderr
    err = run.stderr.strip()
    assert "\n" not in err and err.startswith("vtrace: error: ")
    for text in expected:
        assert text in err


def test_missing_file_cli(tmp_path: Path) -> None:
    run = cli("ftrace", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "out"))
    one_line_error(run, "nope.txt: no such file")
    assert not (tmp_path / "out").exists()


def test_truncated_file_cli(tmp_path: Path) -> None:
    text = TRACEFS.read_text()
    cut = tmp_path / "cut.txt"
    cut.write_text(text[: text.index("kvm_pio: pio_write", 8000) + 12])  # ends mid-line
    run = cli("ftrace", str(cut), "-o", str(tmp_path / "out"))
    lines = cut.read_text().count("\n") + 1
    one_line_error(run, f"cut.txt:{lines}: truncated")
    assert not (tmp_path / "out").exists()


def test_wrong_format_name_cli(tmp_path: Path) -> None:
    run = cli("systemtap", str(TRACEFS), "-o", str(tmp_path / "out"))
    one_line_error(run, "unknown format 'systemtap'", "ftrace, perf, qemu")
    assert not (tmp_path / "out").exists()


def test_existing_output_cli(tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    one_line_error(cli("ftrace", str(TRACEFS), "-o", str(out)), "out: output exists")
    assert (out / "keep.txt").read_text() == "mine"


def test_strict_cli(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text(TRACEFS.read_text() + "not an event\n")
    one_line_error(
        cli("ftrace", str(bad), "-o", str(tmp_path / "out"), "--strict"),
        "bad.txt:327: not a ftrace line",
    )
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"", "empty file"),
        (b"\n  \n", "empty file"),
        (b"PERFILE2h\x00\x00\x00\x00\x00\x01\x02", "binary file"),
        (b"hello\nworld\n", "t.txt:1: no ftrace events"),
        (b"# tracer: nop\n#\n", "no ftrace events"),
        ("python3-1 [000] .... 1.0: kvm_pio: x\n\xff\n".encode("latin-1"), "t.txt:2: not UTF-8"),
    ],
    ids=["empty", "blank", "binary", "text", "header-only", "latin1"],
)
def test_bad_files(tmp_path: Path, content: bytes, message: str) -> None:
    path = tmp_path / "t.txt"
    path.write_bytes(content)
    names = {"ftrace": "ftrace", "perf": "perf", "qemu": "QEMU trace"}
    for fmt, name in names.items():
        expected = message.replace("ftrace", name)
        with pytest.raises(VtraceError) as err:
            import_file(fmt, path, tmp_path / f"out-{fmt}")
        assert str(err.value).startswith(str(path))
        assert "\n" not in str(err.value)
        assert expected in str(err.value)
        assert not (tmp_path / f"out-{fmt}").exists()


def test_directory_as_input(tmp_path: Path) -> None:
    with pytest.raises(VtraceError, match="is a directory"):
        read_events("perf", tmp_path)


def test_other_tool_output_is_no_events(tmp_path: Path) -> None:
    with pytest.raises(VtraceError, match=r"kvm_tracefs\.txt:\d+: no perf events"):
        read_events("perf", TRACEFS)
    with pytest.raises(VtraceError, match=r"kvm_perf_script\.txt:1: no ftrace events"):
        read_events("ftrace", DATA / "kvm_perf_script.txt")


def test_write_failure_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A failure while writing parts removes the half-written directory."""
    import pyarrow.parquet as pq

    def fail(*_a, **_k):
        raise OSError("disk full")

    monkeypatch.setattr(pq, "write_table", fail)  # the importers' Parquet writer
    # One line naming the part (tests/test_collect_disk_full.py does it on a real full disk).
    with pytest.raises(VtraceError, match=r"part-000000\.parquet: disk full"):
        import_file("ftrace", TRACEFS, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_timestamps_too_large_for_ns_are_not_events(tmp_path: Path) -> None:
    path = tmp_path / "t.txt"
    line = "python3-1 [000] .....  {sec}.000001: kvm_pio: pio_write at 0x1 size 1 count 1 val 0x0"
    path.write_text(line.format(sec=9_223_372_036) + "\n" + line.format(sec=9_223_372_035) + "\n")
    events, meta = read_events("ftrace", path)
    assert (meta["events"], meta["unparsed_first_lines"]) == (1, [1])
    assert events.get_column("ts_ns").to_list() == [9_223_372_035_000_001_000]
