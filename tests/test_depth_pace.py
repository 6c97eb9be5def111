"""benchmarks/depth_pace.py on the shipped series: it runs, reads what the traces hold, and
refuses a series it cannot use in one line.

The figures it prints are the diagnosis in docs/model.md ("How much the deep predictions
owe to the guest's pace"); here the measures are checked against the traces themselves:
the calibrated pace is what `vtrace calibrate` fits, the deep lots add faster than depths
1 and 4 say in most rounds, and the kick's cost shows where the main loop pre-empted the
vCPU (round 1: 154 lots, median 10 us).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "depth_pace.py"
SERIES = ROOT / "traces" / "qemu-virtio-blk-sched"


def run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(SCRIPT), *args], capture_output=True, text=True, cwd=ROOT, timeout=300
    )


def test_depth_pace_reads_the_shipped_series() -> None:
    done = run("--requests", "2000", "--kick-exit-us", "9.5", "--json")
    assert done.returncode == 0, done.stderr
    figures = json.loads(done.stdout[done.stdout.index("{") :])
    paces = figures["paces"]
    assert [p["round"] for p in paces] == list(range(1, 9))
    for p in paces:
        # QEMU's pops take about 3 us each; a TCG guest's add a few us more, never less
        assert 2.5 < p["pace_4_16"] < 10 and 2.5 < p["pace_4_32"] < 10, p
        assert 2.5 < p["pace_1_4"] < 10, p
    faster = sum(p["pace_4_32"] < p["pace_1_4"] for p in paces)
    assert faster >= 5, paces  # the deep lots add faster than depths 1 and 4 say
    tail = np.array(paces[0]["kick_tail_us"])
    assert tail.size >= 100 and 5 < np.median(tail) < 20, tail
    for key in ("d16_kicks", "d16_irqs", "d32_kicks", "d32_irqs"):
        row = figures["predictions"][key]
        assert set(row) == {"runs", "calibrated", "deep_pace", "deep_pace_kick"}
        assert all(0 < v < 1 for v in row.values()), row


def test_the_second_batch_shows_the_same_paces() -> None:
    """On the second batch (a replication) the deep lots add faster too, and the kick's
    cost shows in round 1 where the main loop pre-empted the vCPU (67 lots, median 10 us)."""
    second = ROOT / "traces" / "qemu-virtio-blk-sched-2"
    done = run("--series", str(second), "--requests", "2000", "--json")
    assert done.returncode == 0, done.stderr
    paces = json.loads(done.stdout[done.stdout.index("{") :])["paces"]
    assert [p["round"] for p in paces] == list(range(1, 9))
    assert sum(p["pace_4_32"] < p["pace_1_4"] for p in paces) >= 5, paces
    tail = np.array(paces[0]["kick_tail_us"])
    assert tail.size >= 30 and 5 < np.median(tail) < 20, tail


def test_depth_pace_refuses_an_incomplete_series(tmp_path: Path) -> None:
    (tmp_path / "qd1-r1").symlink_to(SERIES / "qd1-r1")
    done = run("--series", str(tmp_path))
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        f"depth_pace: {tmp_path}: missing qd4-r1, qd16-r1, qd32-r1"
    ]
    done = run("--kick-exit-us", "-1")
    assert done.returncode != 0 and "Traceback" not in done.stderr
    assert "--kick-exit-us" in done.stderr
