"""Sweeps refuse bad options and a bad output before running any point."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from vtrace.errors import VtraceError
from vtrace.sim.sweep import MAX_POINTS, parse_grid, run_sweep

ROOT = Path(__file__).resolve().parent.parent
# Small and quick: an M/M/1 queue of 500 requests per point.
BASE = ["requests=500", "warmup_requests=0"]
GRID = ["--grid", "queue.arrival_rate_per_s=1000,2000", "--set", BASE[0], "--set", BASE[1]]


def _sweep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "sweep", "--model", "mm1", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
    )  # fmt: skip


def _one_line(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2 and r.stdout == "", (r.stdout, r.stderr)
    assert r.stderr.startswith("vtrace: error: ") and r.stderr.count("\n") == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


@pytest.mark.parametrize("workers", ["-1", "0", "100000"])
def test_bad_worker_count_is_one_line_and_writes_nothing(tmp_path: Path, workers: str) -> None:
    out = tmp_path / "s.parquet"
    _one_line(_sweep(*GRID, "-o", str(out), "-j", workers), "--workers", workers)
    assert list(tmp_path.iterdir()) == []


def test_a_bad_output_fails_before_any_point_runs(tmp_path: Path) -> None:
    points = parse_grid("mm1", ["queue.arrival_rate_per_s=1000,2000,3000"], BASE)
    ran: list[int] = []
    for bad in (tmp_path / "missing" / "s.parquet", Path("/proc/s.parquet"), tmp_path):
        with pytest.raises(VtraceError, match=str(bad)):
            run_sweep("mm1", points, BASE, bad, workers=1, on_point=lambda: ran.append(1))
    assert ran == []  # before: every point ran, then the write failed


def test_an_existing_output_is_replaced_only_with_force(tmp_path: Path) -> None:
    out = tmp_path / "s.parquet"
    out.write_bytes(b"mine")
    _one_line(_sweep(*GRID, "-o", str(out), "-j", "1"), str(out), "--force")
    assert out.read_bytes() == b"mine"
    r = _sweep(*GRID, "-o", str(out), "-j", "1", "--force")
    assert r.returncode == 0, r.stderr
    assert pl.read_parquet(out).height == 2


def test_a_grid_with_too_many_points_is_refused_before_building_it() -> None:
    axis = ",".join(str(1000 + i) for i in range(1000))
    grid = [f"queue.arrival_rate_per_s={axis}", f"queue.service_mean_ns={axis}"]
    with pytest.raises(VtraceError, match=f"--grid: 1000000 points; at most {MAX_POINTS}"):
        parse_grid("mm1", grid)


def _children(pid: int) -> set[int]:
    try:
        text = Path(f"/proc/{pid}/task/{pid}/children").read_text()
    except OSError:
        return set()
    return {int(c) for c in text.split()}


def test_an_interrupted_sweep_stops_its_workers_at_once(tmp_path: Path) -> None:
    # Points long enough (seconds each) that waiting for them would show.
    out = tmp_path / "s.parquet"
    args = ["--grid", "batch=1,2,4,8", "--set", "requests=300000", "-o", str(out), "-j", "2"]
    p = subprocess.Popen(
        [sys.executable, "-m", "vtrace.cli", "sweep", "--model", "virtio-blk", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while len(_children(p.pid)) < 3 and time.monotonic() < deadline:  # 2 workers + tracker
        time.sleep(0.2)
    time.sleep(2)  # the workers are inside their first points
    workers = _children(p.pid)
    # To the parent only: a signal any of its threads may take (as a terminal's may).
    start = time.monotonic()
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=120)
    # Before: it waited for the running points to finish (tens of seconds here).
    assert time.monotonic() - start < 5, err
    assert p.returncode == 130 and "Traceback" not in err, err
    assert list(tmp_path.iterdir()) == []
    deadline = time.monotonic() + 5
    while (left := [w for w in workers if Path(f"/proc/{w}").exists()]) and (
        time.monotonic() < deadline
    ):
        time.sleep(0.1)
    assert not left, [Path(f"/proc/{w}/cmdline").read_bytes() for w in left]
