"""A command whose standard output cannot be written (a full disk) says so in one line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize(
    "args",
    [
        ["replay", "--model", "mm1", "--requests", "2000", "--set", "warmup_requests=0", "--json"],
        ["replay", "--model", "mm1", "--requests", "2000", "--set", "warmup_requests=0"],
    ],
)
def test_stdout_on_a_full_disk_is_one_line_exit_2(args: list[str]) -> None:
    # /dev/full: every write fails with ENOSPC, as a file on a full filesystem does.
    with open("/dev/full", "w") as full:
        r = subprocess.run(
            [sys.executable, "-m", "vtrace.cli", *args],
            stdout=full, stderr=subprocess.PIPE, text=True, cwd=ROOT, timeout=120,
        )  # fmt: skip
    # Before: an OSError traceback from print().
    assert r.returncode == 2, r.stderr
    assert r.stderr == "vtrace: error: standard output: cannot write: No space left on device\n"
