"""`vtrace summary DIR [--json]` end to end, through the real entry point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vtrace.ingest import import_file

DATA = Path(__file__).resolve().parent / "data"


def vtrace(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vtrace.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "160", "PATH": "/usr/bin:/bin"},
    )


@pytest.fixture(scope="module")
def trace_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cli") / "kvm"
    import_file("ftrace", DATA / "kvm_tracefs.txt", out)
    return out


def test_summary_json(trace_dir: Path) -> None:
    done = vtrace("summary", str(trace_dir), "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["trace"]["events"] == 314
    assert {r["reason_name"]: r["count"] for r in data["user_exits"]} == {
        "KVM_EXIT_IO": 31,
        "KVM_EXIT_MMIO": 10,
    }


def test_summary_tables_carry_units(trace_dir: Path) -> None:
    done = vtrace("summary", str(trace_dir))
    assert done.returncode == 0, done.stderr
    out = done.stdout
    for text in ("Events by source and name", "User-space exits by reason", "p99 (us)",
                 "total (ms)", "Top device accesses", "0x504", "lost events: 0",
                 "no kvm_exit/kvm_entry events"):  # fmt: skip
        assert text in out, text


def test_summary_of_a_missing_directory_is_one_line(tmp_path: Path) -> None:
    done = vtrace("summary", str(tmp_path / "nope"))
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.strip().splitlines() == [
        f"vtrace: error: {tmp_path / 'nope'}: no such trace directory"
    ]


def test_summary_of_a_damaged_part_names_it(trace_dir: Path, tmp_path: Path) -> None:
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(trace_dir, bad)
    part = bad / "part-000000.parquet"
    second = bad / "part-000001.parquet"
    second.write_bytes(part.read_bytes()[: part.stat().st_size // 2])  # a cut-off copy
    done = vtrace("summary", str(bad))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1
    assert lines[0].startswith(f"vtrace: error: {second}: not a whole Parquet part")
