"""`vtrace summary A B C` and `vtrace summary DIR-OF-TRACES`: one row per trace."""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from vtrace.analyze.summary import cost_totals, fleet, summary

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"
NAMES = ["qemu-ide", "lab-virtio-b8", "qemu-virtio-blk-qd4"]


def vtrace(*args: str, columns: int = 200) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vtrace.cli", *args],
        capture_output=True, text=True, cwd=ROOT, check=False,
        env={**os.environ, "COLUMNS": str(columns)},
    )  # fmt: skip


def test_several_traces_give_a_row_each_as_json() -> None:
    done = vtrace("summary", *(str(TRACES / n) for n in NAMES), "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["name"] for r in rows] == NAMES
    for row, name in zip(rows, NAMES, strict=True):
        data = summary(TRACES / name)
        totals = cost_totals(data)
        assert row["events"] == data["trace"]["events"]
        assert row["duration_ns"] == data["trace"]["duration_ns"] == totals["time_ns"]
        for key in ("exits", "userspace_exits", "trapping_accesses", "kicks", "interrupts"):
            assert row[key] == totals[key], (name, key)
        assert row["per_request"] == data["per_request"]
        assert row["requests"] == data["per_request"]["requests"]
    ide, lab, virtio = rows
    assert ide["requests_from"] == "meta.json" and ide["exits"] is None  # a QEMU log
    assert ide["per_request"]["trapping_accesses"] == pytest.approx(26.0)
    assert lab["kicks"] == 250 and lab["requests"] == 2000
    assert virtio["interrupts"] == 1435


def test_a_directory_of_traces_is_the_fleet(tmp_path: Path) -> None:
    for name in NAMES:
        shutil.copytree(TRACES / name, tmp_path / name)
    (tmp_path / "notes.txt").write_text("not a trace")
    (tmp_path / "empty").mkdir()
    done = vtrace("summary", str(tmp_path), "--json")
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["name"] for r in rows] == sorted(NAMES)
    assert rows == fleet([tmp_path / n for n in sorted(NAMES)])


def test_the_table_has_a_row_per_trace() -> None:
    done = vtrace("summary", *(str(TRACES / n) for n in NAMES))
    assert done.returncode == 0, done.stderr
    assert "3 traces" in done.stdout
    lines = {n: next(x for x in done.stdout.splitlines() if x.strip().startswith(n)) for n in NAMES}
    assert "34,816" in lines["qemu-ide"] and " 26.0 " in lines["qemu-ide"]  # events, traps/req
    assert "2,000" in lines["lab-virtio-b8"] and "0.125" in lines["lab-virtio-b8"]  # kicks/req


def test_same_names_are_told_apart_by_path(tmp_path: Path) -> None:
    for host in ("host1", "host2"):
        shutil.copytree(TRACES / "qemu-ide", tmp_path / host / "vm")
    rows = fleet([tmp_path / "host1" / "vm", tmp_path / "host2" / "vm"])
    assert [r["name"] for r in rows] == [str(tmp_path / h / "vm") for h in ("host1", "host2")]


def test_one_trace_keeps_its_full_summary() -> None:
    done = vtrace("summary", str(TRACES / "qemu-ide"), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == json.loads(json.dumps(summary(TRACES / "qemu-ide")))


@pytest.mark.parametrize("bad", ["missing", "empty", "file"])
def test_a_path_that_is_not_a_trace_is_one_line_before_any_output(tmp_path: Path, bad: str) -> None:
    path = tmp_path / bad
    if bad == "empty":
        path.mkdir()
    elif bad == "file":
        path.write_text("x")
    for args in (("--json",), ()):
        done = vtrace("summary", str(TRACES / "qemu-ide"), str(path), *args)
        assert done.returncode == 2
        assert done.stdout == ""
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"vtrace: error: {path}"), lines


def test_a_damaged_trace_in_the_fleet_names_its_part(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(TRACES / "lab-virtio-b8", bad)
    part = bad / "part-000000.parquet"
    data = bytearray(part.read_bytes())
    # Noise over the first half: the pages, not the footer nor the magic bytes at the ends.
    data[8 : len(data) // 2] = random.Random(1).randbytes(len(data) // 2 - 8)
    part.write_bytes(bytes(data))
    done = vtrace("summary", str(TRACES / "qemu-ide"), str(bad), "--json")
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vtrace: error: {part}"), lines


def test_requests_option_is_for_one_trace() -> None:
    done = vtrace("summary", str(TRACES / "qemu-ide"), str(TRACES / "lab-virtio-b8"),
                  "--requests", "10")  # fmt: skip
    assert done.returncode == 2 and done.stdout == ""
    assert "--requests" in done.stderr and len(done.stderr.strip().splitlines()) == 1
