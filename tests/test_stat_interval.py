"""`vtrace stat --interval`: a value it cannot wait is one line, before anything attaches."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from vtrace.collect.stat import check_interval
from vtrace.errors import VtraceError

ROOT = Path(__file__).resolve().parent.parent
BAD = [float("inf"), float("-inf"), float("nan"), 0.0, -1.0, 0.05, 1e300, 86401.0]


@pytest.mark.parametrize("value", BAD)
def test_an_interval_it_cannot_wait_is_refused(value: float) -> None:
    with pytest.raises(VtraceError, match=r"^--interval: .* is not between 0\.1 and 86400"):
        check_interval(value)


@pytest.mark.parametrize("value", [0.1, 1.0, 86400.0])
def test_an_interval_in_range_is_accepted(value: float) -> None:
    check_interval(value)


@pytest.mark.parametrize("value", ["inf", "0"])
def test_cli_bad_interval_is_one_line_exit_2(value: str) -> None:
    # Before: inf was an OverflowError traceback, 0 typer's boxed usage error.
    r = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "stat", "--once", "--interval", value],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.startswith("vtrace: error: --interval: "), r.stderr
    assert r.stderr.count("\n") == 1, r.stderr


def _free_pid() -> int:
    """A pid no process has now (one just reaped)."""
    p = subprocess.Popen(["true"])
    p.wait()
    return p.pid


def test_stat_pid_of_no_process_is_one_line() -> None:
    # Before: an empty table, exit 0, as if the VM made no exits.
    pid = _free_pid()
    r = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "stat", "--once", "--pid", str(pid)],
        capture_output=True, text=True, cwd=ROOT, timeout=60,
    )  # fmt: skip
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert f"--pid {pid}: no such process" in r.stderr and r.stderr.count("\n") == 1, r.stderr
