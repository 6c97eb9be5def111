"""Full disks and processes that go away, on real small tmpfs mounts (made by the tests, as
root) and real recordings: the first failed write stops with one line, every part closed before
it stays readable, meta matches what is on disk and counts what was not written as lost."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_collect_capture import GuestProcess, _wait_for

from vtrace import open_trace
from vtrace.errors import VtraceError
from vtrace.store import TraceWriter

VTRACE = [sys.executable, "-m", "vtrace.cli"]
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Callable[[str], Path]]:
    """Mount a tmpfs of the given size (e.g. ``"2m"``); unmounted after the test."""
    mounts: list[Path] = []

    def mount(size: str) -> Path:
        at = tmp_path / f"fs{len(mounts)}"
        at.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(at)],
                       check=True)  # fmt: skip
        mounts.append(at)
        return at

    yield mount
    for at in mounts:
        subprocess.run(["umount", "-l", str(at)], check=False)


def fill(fs: Path) -> None:
    """Fill the filesystem to the last byte."""
    fd = os.open(fs / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        chunk = 1 << 20
        while chunk:
            try:
                os.write(fd, bytes(chunk))
            except OSError:
                chunk //= 2
    finally:
        os.close(fd)


def _events(n: int, seed: int) -> pl.DataFrame:
    # Random addresses and values: parts that do not compress, so the disk fills predictably.
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "ts_ns": np.arange(n, dtype=np.int64) + seed * n,
            "source": ["kvm"] * n,
            "event": ["kvm_pio"] * n,
            "addr": rng.integers(0, 1 << 62, n, dtype=np.int64),
            "value": rng.integers(0, 1 << 62, n, dtype=np.int64),
        }
    )


def _one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("vtrace: error: ") and r.stderr.count("\n") == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


def _on_disk(trace_dir: Path) -> tuple[int, int]:
    trace = open_trace(trace_dir)
    return len(trace.parts), trace.events.collect().height


@pytest.mark.root
def test_writer_stops_at_the_first_failed_write_and_meta_matches_the_disk(small_fs) -> None:
    fs = small_fs("1m")
    w = TraceWriter(fs / "t", {"source": "test"}, keep_on_error=True)
    with pytest.raises(VtraceError, match=r"part-\d+\.parquet: No space left on device"):
        for i in range(100):  # 10,000 rows of 16 random bytes: about 160 KB a part
            w.append(_events(10_000, i))
            w.flush()
    kept = w.parts
    assert kept >= 3
    w.append(_events(5, 1000))  # after the failure: dropped, and counted
    with pytest.raises(VtraceError, match="No space left on device"):
        w.close()
    meta = open_trace(fs / "t").meta
    assert _on_disk(fs / "t") == (kept, kept * 10_000) == (meta["parts"], meta["events"])
    assert meta["events_not_written"] == 10_005 and "No space left" in meta["error"]
    assert sorted(p.name for p in (fs / "t").iterdir() if p.name.startswith(".")) == []


@pytest.mark.root
def test_import_onto_a_full_disk_is_one_line_and_leaves_nothing(small_fs) -> None:
    fs = small_fs("256k")
    fill(fs)
    r = subprocess.run(
        [*VTRACE, "import", "ftrace", "tests/data/kvm_tracefs.txt", "-o", str(fs / "t")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    _one_line_error(r, "No space left on device")
    assert sorted(p.name for p in fs.iterdir()) == ["filler"]


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_record_onto_a_full_disk_is_one_line_and_leaves_nothing(small_fs) -> None:
    fs = small_fs("1m")
    fill(fs)
    r = subprocess.run([*VTRACE, "record", "-o", str(fs / "t"), "--duration", "5"],
                       capture_output=True, text=True, timeout=60)  # fmt: skip
    _one_line_error(r, str(fs / "t"), "No space left on device")
    assert sorted(p.name for p in fs.iterdir()) == ["filler"]


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_disk_full_while_recording_stops_it_and_counts_what_was_not_written(small_fs) -> None:
    fs = small_fs("4m")
    out = fs / "t"
    rec = subprocess.Popen([*VTRACE, "record", "-o", str(out)], stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        _wait_for(out / "meta.json", rec)
        GuestProcess(2000).go()
        _wait_for(out / "part-*.parquet", rec)
        fill(fs)
        GuestProcess(3000).go()  # 3,000 kvm_pio + 3,001 kvm_userspace_exit with no room
        stdout, stderr = rec.communicate(timeout=30)  # it stops by itself
    finally:
        rec.kill()
    r = subprocess.CompletedProcess(rec.args, rec.returncode, stdout, stderr)
    _one_line_error(r, "No space left on device", "recording stopped", "not written")

    trace = open_trace(out)
    meta = trace.meta
    parts, rows = _on_disk(out)
    assert (meta["parts"], meta["events"]) == (parts, rows) and parts >= 1
    assert meta["events_not_written"] >= 6001
    assert meta["lost"] == sum(meta["lost_per_cpu"]) + meta["events_not_written"]
    # Everything delivered is on disk or counted as not written.
    assert sum(meta["by_event"].values()) == rows + meta["events_not_written"]
    assert meta["stopped_by"] == "error" and "No space left on device" in meta["error"]
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]

    summary = subprocess.run([*VTRACE, "summary", str(out), "--json"], capture_output=True,
                             text=True)  # fmt: skip
    assert summary.returncode == 0, summary.stderr
    data = json.loads(summary.stdout)
    assert data["lost_events"] == meta["lost"] >= 6001
    assert data["events_not_written"] == meta["events_not_written"]
    assert "No space left on device" in data["error"]
    text = subprocess.run([*VTRACE, "summary", str(out)], capture_output=True, text=True)
    assert f"{meta['events_not_written']:,} not written" in text.stdout, text.stdout
    assert "()" not in text.stdout


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_record_stops_when_every_pid_has_exited(tmp_path: Path) -> None:
    guests = [GuestProcess(100), GuestProcess(200)]
    rec = subprocess.Popen(
        [*VTRACE, "record", "-o", str(tmp_path / "t"), *[f"--pid={g.pid}" for g in guests]],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        _wait_for(tmp_path / "t" / "meta.json", rec)  # written once the probes are attached
        for g in guests:
            g.go()
        stdout, stderr = rec.communicate(timeout=20)
    finally:
        rec.kill()
    assert rec.returncode == 0, stderr
    assert "every --pid process exited" in stdout
    assert all(f"pid {g.pid} exited" in stderr for g in guests), stderr
    meta = open_trace(tmp_path / "t").meta
    assert meta["stopped_by"] == "every --pid process exited" and meta["complete"]
    assert meta["by_event"] == {"kvm_pio": 300, "kvm_userspace_exit": 302}
