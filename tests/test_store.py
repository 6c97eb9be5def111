"""Trace directories: crash safety, modes, meta, and clear errors."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from vtrace import open_trace
from vtrace.errors import VtraceError
from vtrace.schema import EVENTS_SCHEMA
from vtrace.store import TraceWriter, write_trace


def _events(n: int, start: int = 0) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "ts_ns": list(range(start + n - 1, start - 1, -1)),  # reversed: parts get sorted
            "source": ["kvm"] * n,
            "event": ["kvm_pio"] * n,
            "addr": [0x10] * n,
            "write": [True] * n,
        }
    )


def test_round_trip_parts_sorted_and_modes(tmp_path: Path) -> None:
    out = tmp_path / "t"
    with TraceWriter(out, {"importer": "test"}, part_rows=100) as w:
        w.append(_events(150))
        w.append(_events(30, start=1000))
        trace = w.close(unparsed=0)
    assert len(trace.parts) == 2  # one part at 150 >= 100 rows, one at close
    assert trace.meta["events"] == 180 and trace.meta["complete"] is True
    assert trace.meta["importer"] == "test" and "kernel" in trace.meta
    df = trace.events.collect()
    assert df.schema == EVENTS_SCHEMA
    assert df.height == 180
    first = pl.read_parquet(trace.parts[0])
    assert first["ts_ns"].is_sorted()
    assert stat.S_IMODE(os.stat(out).st_mode) == 0o750
    for f in [*trace.parts, out / "meta.json"]:
        assert stat.S_IMODE(os.stat(f).st_mode) == 0o640


def test_exception_removes_partial_output(tmp_path: Path) -> None:
    out = tmp_path / "t"
    with pytest.raises(RuntimeError), TraceWriter(out, part_rows=10) as w:
        w.append(_events(25))
        raise RuntimeError("parser failed")
    assert not out.exists()


def test_keep_on_error_keeps_flushed_parts(tmp_path: Path) -> None:
    out = tmp_path / "t"
    with pytest.raises(RuntimeError), TraceWriter(out, keep_on_error=True) as w:
        w.append(_events(5))
        raise RuntimeError("collector died")
    trace = open_trace(out)
    assert trace.events.collect().height == 5
    assert "collector died" in trace.meta["error"]


def test_existing_output_is_refused(tmp_path: Path) -> None:
    (tmp_path / "t").mkdir()
    (tmp_path / "t" / "x").write_text("mine")
    with pytest.raises(VtraceError, match="output exists"):
        write_trace(tmp_path / "t", _events(1), {})
    assert (tmp_path / "t" / "x").read_text() == "mine"


def test_open_errors_name_the_path(tmp_path: Path) -> None:
    with pytest.raises(VtraceError, match="no such trace directory"):
        open_trace(tmp_path / "nope")
    (tmp_path / "f").write_text("x")
    with pytest.raises(VtraceError, match="not a trace directory"):
        open_trace(tmp_path / "f")
    (tmp_path / "d").mkdir()
    with pytest.raises(VtraceError, match=r"meta\.json: missing"):
        open_trace(tmp_path / "d")
    (tmp_path / "d" / "meta.json").write_text("{not json")
    with pytest.raises(VtraceError, match="unreadable meta"):
        open_trace(tmp_path / "d")


def test_empty_trace_has_the_schema(tmp_path: Path) -> None:
    trace = write_trace(tmp_path / "t", [], {})
    assert trace.parts == []
    assert trace.events.collect().schema == EVENTS_SCHEMA


def test_kill_9_loses_at_most_the_part_being_written(tmp_path: Path) -> None:
    """A writer process killed mid-stream leaves every closed part readable."""
    out = tmp_path / "t"
    code = f"""
import sys, polars as pl
from vtrace.store import TraceWriter
w = TraceWriter({str(out)!r}, {{"importer": "kill-test"}})
for i in range(3):
    w.append(pl.DataFrame({{"ts_ns": list(range(i * 100, i * 100 + 100)), "event": ["kvm_pio"] * 100}}))
    w.flush()
w.append(pl.DataFrame({{"ts_ns": [10**9], "event": ["kvm_pio"]}}))
print("ready", flush=True)
sys.stdin.read()
"""
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        proc.kill()
    finally:
        proc.kill()
        proc.wait()
    trace = open_trace(out)
    assert trace.meta["complete"] is False
    assert trace.events.collect().height == 300
    assert json.loads((out / "meta.json").read_text())["importer"] == "kill-test"


# --- a trace that lacks parts, or has a damaged one ----------------------------------------------


def _seven_parts(out: Path) -> None:
    with TraceWriter(out, {"importer": "test"}, part_rows=100) as w:
        for i in range(7):
            w.append(_events(100, start=i * 1000))
        w.close()


def test_missing_part_is_named(tmp_path: Path) -> None:
    out = tmp_path / "t"
    _seven_parts(out)
    (out / "part-000003.parquet").unlink()
    trace = open_trace(out)
    assert trace.missing_parts == ["part-000003.parquet"]
    problem = trace.problem(trace.events_on_disk())
    assert problem == (
        "part-000003.parquet missing; meta.json says 7 parts with 700 events, "
        "the directory has 6 parts with 600 events"
    )
    with pytest.raises(VtraceError, match=r"t: incomplete trace: part-000003\.parquet missing"):
        open_trace(out, strict=True)


def test_last_part_missing_is_found_from_meta(tmp_path: Path) -> None:
    """No gap in the numbering: only meta's count shows it."""
    out = tmp_path / "t"
    _seven_parts(out)
    (out / "part-000006.parquet").unlink()
    assert open_trace(out).missing_parts == ["part-000006.parquet"]


def test_fewer_events_than_meta(tmp_path: Path) -> None:
    """A part replaced by a smaller one: the names agree, the counts do not."""
    out = tmp_path / "t"
    _seven_parts(out)
    pl.read_parquet(out / "part-000002.parquet").head(10).write_parquet(out / "part-000002.parquet")
    trace = open_trace(out)
    assert trace.missing_parts == []
    assert trace.problem(trace.events_on_disk()) == (
        "meta.json says 7 parts with 700 events, the directory has 7 parts with 610 events"
    )
    with pytest.raises(VtraceError, match=r"incomplete trace: meta\.json says 7 parts"):
        open_trace(out, strict=True)


def test_complete_trace_has_no_problem(tmp_path: Path) -> None:
    out = tmp_path / "t"
    _seven_parts(out)
    trace = open_trace(out, strict=True)
    assert trace.missing_parts == [] and trace.problem(trace.events_on_disk()) is None


def test_strict_refuses_a_trace_its_writer_did_not_close(tmp_path: Path) -> None:
    out = tmp_path / "t"
    w = TraceWriter(out, {"importer": "test"}, part_rows=10)
    w.append(_events(25))  # two parts written, meta still says 0 of them: no problem yet
    trace = open_trace(out)
    assert trace.problem(trace.events_on_disk()) is None
    with pytest.raises(VtraceError, match="incomplete trace: its writer did not close it"):
        open_trace(out, strict=True)


@pytest.mark.parametrize("which", [0, 1])
@pytest.mark.parametrize("keep", [0, 100, 4], ids=["empty", "cut", "no-header"])
def test_truncated_part_is_one_line_naming_it(tmp_path: Path, which: int, keep: int) -> None:
    out = tmp_path / "t"
    _seven_parts(out)
    part = out / f"part-{which:06d}.parquet"
    data = part.read_bytes()
    part.write_bytes(data[:keep] if keep != 4 else b"junk" + data[4:])
    with pytest.raises(VtraceError) as err:
        open_trace(out)
    message = str(err.value)
    assert message.startswith(f"{part}: not a whole Parquet part") and "\n" not in message
