"""Readers of a damaged trace directory: a part missing, a part cut short."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vtrace import open_trace
from vtrace.analyze import summary
from vtrace.errors import VtraceError
from vtrace.store import TraceWriter

TRACES = Path(__file__).resolve().parent.parent / "traces"


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vtrace.cli", *args], capture_output=True, text=True, timeout=120
    )


def one_line_error(run: subprocess.CompletedProcess[str], *expected: str) -> None:
    assert run.returncode == 2, (run.stdout, run.stderr)
    assert "Traceback" not in run.stderr
    err = run.stderr.strip()
    assert "\n" not in err and err.startswith("vtrace: error: "), err
    for text in expected:
        assert text in err, err


@pytest.fixture
def seven_parts(tmp_path: Path) -> Path:
    """The shipped lab trace rewritten as 7 parts (400 events each, 296 in the last)."""
    source = open_trace(TRACES / "lab-virtio-b8")
    out = tmp_path / "t"
    with TraceWriter(out, {**source.meta, "note": "split"}, part_rows=400) as w:
        for chunk in source.events.collect().iter_slices(400):
            w.append(chunk)
        w.close()
    assert len(open_trace(out).parts) == 7
    return out


MISSING = (
    "part-000003.parquet missing; meta.json says 7 parts with 2,696 events, "
    "the directory has 6 parts with 2,296 events"
)


def test_summary_says_which_part_is_missing(seven_parts: Path) -> None:
    (seven_parts / "part-000003.parquet").unlink()
    data = summary(seven_parts)
    assert data["missing_parts"] == ["part-000003.parquet"]
    assert data["integrity"] == MISSING
    assert (data["trace"]["events"], data["trace"]["meta_events"]) == (2296, 2696)
    run = cli("summary", str(seven_parts))
    assert run.returncode == 0, run.stderr
    assert f"incomplete trace: {MISSING}" in " ".join(run.stdout.split())
    as_json = json.loads(cli("summary", str(seven_parts), "--json").stdout)
    assert as_json["integrity"] == MISSING
    one_line_error(cli("summary", str(seven_parts), "--strict"), f"incomplete trace: {MISSING}")
    with pytest.raises(VtraceError, match="incomplete trace: part-000003"):
        summary(seven_parts, strict=True)


def test_summary_of_a_whole_trace_has_no_integrity_line(seven_parts: Path) -> None:
    data = summary(seven_parts, strict=True)
    assert (data["missing_parts"], data["integrity"]) == ([], None)
    assert "incomplete" not in cli("summary", str(seven_parts)).stdout


@pytest.mark.parametrize(
    "command",
    [
        ("summary", "{trace}"),
        ("summary", "{trace}", "--json"),
        ("replay", "{trace}", "--model", "lab-virtio", "--requests", "200"),
        ("calibrate", "{trace}", "--model", "lab-virtio", "-o", "{tmp}/fit.toml"),
    ],
    ids=["summary", "summary-json", "replay", "calibrate"],
)
def test_truncated_first_part_is_one_line_naming_it(
    tmp_path: Path, seven_parts: Path, command: tuple[str, ...]
) -> None:
    part = seven_parts / "part-000000.parquet"
    part.write_bytes(part.read_bytes()[:1000])
    args = [a.format(trace=seven_parts, tmp=tmp_path) for a in command]
    one_line_error(cli(*args), f"{part}: not a whole Parquet part")
    assert not (tmp_path / "fit.toml").exists()
