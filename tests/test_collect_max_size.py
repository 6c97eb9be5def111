"""Recordings bounded in size: `vtrace record --max-size SIZE [--on-full ring|stop]`.

Ring mode drops the oldest parts once the parts on disk pass SIZE and keeps recording; what
was dropped is counted in meta and readers take the rest as a whole (not damaged) trace.
Stop mode ends the recording like --duration does. The writer is checked on its own with
incompressible parts of known size; the recorder on real recordings of a KVM guest; the
QEMU log of `--qmp` rotated on a real lab guest.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from test_collect_capture import GuestProcess, _wait_for
from test_collect_disk_full import _events  # random values: parts that do not compress

from vtrace import open_trace
from vtrace.analyze import summary
from vtrace.errors import VtraceError
from vtrace.store import TraceWriter, check_whole

VTRACE = [sys.executable, "-m", "vtrace.cli"]
ROOT = Path(__file__).resolve().parent.parent


def _part_bytes(trace_dir: Path) -> int:
    """Bytes of the parts on disk, those being written (temporary names) included."""
    total = 0
    for p in list(trace_dir.glob("part-*.parquet")) + list(trace_dir.glob(".part-*.tmp")):
        with contextlib.suppress(FileNotFoundError):  # dropped or renamed meanwhile
            total += p.stat().st_size
    return total


def _one_line_error(r: subprocess.CompletedProcess[str], *words: str) -> None:
    assert r.returncode == 2, (r.stdout, r.stderr)
    assert r.stderr.startswith("vtrace: error: ") and r.stderr.count("\n") == 1, r.stderr
    for w in words:
        assert w in r.stderr, r.stderr


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--max-size", "12X"], ["--max-size", "12X", "500M"]),
        (["--max-size", "0"], ["--max-size", "0"]),
        (["--max-size", "-5M"], ["--max-size", "-5M"]),
        (["--max-size", "2G", "--on-full", "wrap"], ["--on-full", "wrap", "ring", "stop"]),
        (["--on-full", "stop"], ["--on-full", "--max-size"]),
    ],
)
def test_bad_max_size_is_one_line(tmp_path: Path, args: list[str], words: list[str]) -> None:
    r = subprocess.run([*VTRACE, "record", "-o", str(tmp_path / "t"), *args],
                       capture_output=True, text=True, cwd=ROOT)  # fmt: skip
    _one_line_error(r, *words)
    assert not (tmp_path / "t").exists()


def test_parse_size() -> None:
    from vtrace.collect.recording import parse_size

    assert parse_size("500M") == 500 << 20
    assert parse_size("2G") == 2 << 30
    assert parse_size("1.5g") == 3 << 29
    assert parse_size("64KiB") == 64 << 10
    assert parse_size("4096") == 4096
    with pytest.raises(VtraceError, match="--max-size 2Q"):
        parse_size("2Q")


def test_writer_ring_drops_the_oldest_parts_and_readers_take_the_rest(tmp_path: Path) -> None:
    out = tmp_path / "t"
    budget = 500_000  # about 3 parts of 10,000 incompressible rows (~160 KB each)
    w = TraceWriter(out, {"source": "test"}, max_bytes=budget)
    sizes = []
    for i in range(10):
        w.append(_events(10_000, i))
        w.flush()
        on_disk = _part_bytes(out)
        sizes.append(on_disk)
        assert on_disk <= budget or len(list(out.glob("part-*.parquet"))) == 1
        # meta is written before a dropped part is removed: it always matches the disk
        assert open_trace(out).problem() is None
    w.close()
    trace = open_trace(out, strict=True)  # ring-trimmed is complete, not damaged
    check_whole(trace, "test")  # calibrate and replay take the kept window
    kept = [int(p.name[5:11]) for p in trace.parts]
    dropped = trace.meta["dropped"]
    assert kept == list(range(dropped["parts"], 10)) and dropped["parts"] >= 5
    assert trace.missing_parts == [] and trace.problem(trace.events_on_disk()) is None
    rows = trace.events.collect()
    assert rows.height == trace.meta["events"] == 10_000 * len(kept)
    assert dropped["events"] == 10_000 * dropped["parts"]
    assert dropped["events"] + trace.meta["events"] == 100_000
    assert dropped["first_kept_ts_ns"] == rows["ts_ns"].min() == kept[0] * 10_000
    assert dropped["bytes"] > 0 and max(sizes) <= budget
    assert trace.meta["max_size"] == {"bytes": budget, "on_full": "ring"}
    assert trace.meta["parts"] == 10  # parts written; the numbering goes on

    # A part meta counts as dropped but still there (a recorder killed between rewriting
    # meta and removing it) is not read.
    shutil.copy(trace.parts[0], out / "part-000000.parquet")
    again = open_trace(out, strict=True)
    assert again.parts == trace.parts and again.events.collect().height == rows.height
    # A kept part gone is damage, as in any trace.
    trace.parts[1].unlink()
    with pytest.raises(VtraceError, match=f"part-{kept[1]:06d}.parquet missing"):
        open_trace(out, strict=True)

    data = summary(out)
    assert data["dropped"] == dropped and data["integrity"] is not None


def test_summary_says_what_the_ring_dropped(tmp_path: Path) -> None:
    out = tmp_path / "t"
    w = TraceWriter(out, {"source": "test"}, max_bytes=400_000)
    for i in range(6):
        w.append(_events(10_000, i))
        w.flush()
    w.close()
    r = subprocess.run([*VTRACE, "summary", str(out), "--strict"], capture_output=True,
                       text=True, cwd=ROOT)  # fmt: skip
    assert r.returncode == 0, r.stderr
    dropped = open_trace(out).meta["dropped"]
    line = next(x for x in r.stdout.splitlines() if "dropped" in x)
    assert f"{dropped['parts']} oldest parts" in line and f"{dropped['events']:,} events" in line
    assert "--max-size" in line
    data = json.loads(subprocess.run([*VTRACE, "summary", str(out), "--json"],
                                     capture_output=True, text=True, cwd=ROOT).stdout)  # fmt: skip
    assert data["dropped"] == dropped and data["integrity"] is None


def _record(out: Path, pid: int, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [*VTRACE, "record", "-o", str(out), "--pid", str(pid), "--part-seconds", "0.1", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip


class DiskWatch(threading.Thread):
    """The most bytes the parts took on disk at once, sampled every few milliseconds."""

    def __init__(self, trace_dir: Path) -> None:
        super().__init__(daemon=True)
        self.trace_dir, self.peak, self.biggest_part = trace_dir, 0, 0
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.wait(0.003):
            self.peak = max(self.peak, _part_bytes(self.trace_dir))
            for p in self.trace_dir.glob("part-*.parquet"):
                with contextlib.suppress(FileNotFoundError):
                    self.biggest_part = max(self.biggest_part, p.stat().st_size)


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_record_ring_keeps_the_newest_parts_under_max_size(tmp_path: Path) -> None:
    exits, budget = 300_000, 150_000
    out = tmp_path / "t"
    guest = GuestProcess(exits)
    rec = _record(out, guest.pid, "--max-size", str(budget))
    watch = DiskWatch(out)
    try:
        _wait_for(out / "meta.json", rec)
        watch.start()
        guest.go()
        want = 2 * exits + 1  # kvm_pio + kvm_userspace_exit per exit, the final hlt
        deadline = time.monotonic() + 30
        while True:
            meta = json.loads((out / "meta.json").read_text())
            if meta["events"] + meta.get("dropped", {}).get("events", 0) >= want:
                break
            assert time.monotonic() < deadline and rec.poll() is None, meta
            time.sleep(0.05)
        rec.send_signal(signal.SIGINT)
        stdout, stderr = rec.communicate(timeout=30)
    finally:
        rec.kill()
        watch.done.set()
    watch.join()
    assert rec.returncode == 0, stderr
    trace = open_trace(out, strict=True)
    meta, dropped = trace.meta, trace.meta["dropped"]
    assert meta["max_size"] == {"bytes": budget, "on_full": "ring"}
    # Never more than SIZE plus the part being written.
    assert watch.peak <= budget + watch.biggest_part, (watch.peak, watch.biggest_part)
    assert _part_bytes(out) <= budget or len(trace.parts) == 1
    assert dropped["parts"] >= 1
    assert trace.parts[0].name == f"part-{dropped['parts']:06d}.parquet"
    kept = trace.events.collect()
    assert kept.height == meta["events"]
    # Every event the recorder saw is kept or counted as dropped; none lost here.
    assert meta["lost"] == 0
    assert kept.height + dropped["events"] == sum(meta["by_event"].values()) == 2 * exits + 1
    assert dropped["first_kept_ts_ns"] == kept["ts_ns"].min()
    # The newest events are the ones kept: the guest's final hlt is there.
    assert (kept["reason_name"].cast(pl.String) == "KVM_EXIT_HLT").sum() == 1
    assert "dropped" in stdout and f"{dropped['parts']} oldest parts" in stdout

    r = subprocess.run([*VTRACE, "summary", str(out), "--strict"], capture_output=True,
                       text=True)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"{dropped['events']:,} events" in r.stdout and "lost events: 0" in r.stdout


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_record_stop_mode_stops_at_max_size(tmp_path: Path) -> None:
    exits, budget = 300_000, 150_000
    out = tmp_path / "t"
    guest = GuestProcess(exits)
    rec = _record(out, guest.pid, "--max-size", str(budget), "--on-full", "stop")
    try:
        _wait_for(out / "meta.json", rec)
        guest.go()
        stdout, stderr = rec.communicate(timeout=30)  # it stops by itself
    finally:
        rec.kill()
    assert rec.returncode == 0, stderr
    assert "--max-size" in stderr and "stopped" in stderr, stderr
    trace = open_trace(out, strict=True)
    meta = trace.meta
    assert meta["stopped_by"] == "max-size" and "dropped" not in meta
    reached = meta["max_size"].pop("reached_monotonic_ns")
    assert meta["max_size"] == {"bytes": budget, "on_full": "stop"}
    assert meta["start"]["monotonic_ns"] < reached <= meta["end"]["monotonic_ns"]
    # Everything delivered before the stop is written; the guest went on without us.
    assert meta["lost"] == 0 and meta["events"] == sum(meta["by_event"].values())
    assert meta["events"] < 2 * exits + 1
    # It stopped at the first part that reached SIZE: after it only what the ring buffer
    # held when the probes went (one or two flushes).
    reached = np.cumsum([p.stat().st_size for p in trace.parts]) >= budget
    assert reached.any() and len(reached) - 1 - int(reached.argmax()) <= 2
    assert "stopped" in stdout and "max-size" in stdout


@pytest.mark.qemu
def test_qemu_log_is_rotated_and_read_whole(tmp_path: Path) -> None:
    """The log QEMU writes for `--qmp` moves to a new file once it holds ``rotate_bytes``:
    the old one is read to its end and removed, and no event is lost on the way."""
    from vtrace.collect.qemu_attach import QemuAttach

    qmp = tmp_path / "vm.qmp"
    vtrace_bin = [str(Path(sys.executable).parent / "vtrace")]
    subprocess.run([*vtrace_bin, "qemu-lab", "start", "--device", "virtio-blk", "--qmp",
                    str(qmp)], check=True, capture_output=True, text=True, timeout=120)  # fmt: skip
    try:
        frames: list[pl.DataFrame] = []
        vm = QemuAttach(qmp, log_rotate_bytes=32_000)
        vm.start(frames.append)
        log_dir = vm.log_path.parent
        peak_files, peak_bytes = 0, 0
        until = time.monotonic() + 4
        while time.monotonic() < until:
            logs = list(log_dir.glob("qemu-*.log"))
            peak_files = max(peak_files, len(logs))
            peak_bytes = max(peak_bytes, sum(p.stat().st_size for p in logs if p.exists()))
            time.sleep(0.02)
        meta = vm.stop()
    finally:
        subprocess.run([*vtrace_bin, "qemu-lab", "stop", "--qmp", str(qmp)], check=False,
                       capture_output=True, timeout=60)  # fmt: skip
    assert meta.get("error") is None
    assert meta["log_rotations"] >= 2
    assert peak_files <= 2  # the new log, and the old one until it is read
    events = pl.concat(frames)
    assert events.height == meta["events_recorded"] > 0
    # Every line read is an event or counted: the counts cover what the frames hold.
    assert sum(c["count"] for c in meta["counts"]) == events.height
    # Rotation drops nothing: each pop has its kick (queue depth 1), whichever file it was in.
    by = dict(events.group_by(pl.col("event").cast(pl.String)).len().iter_rows())
    assert abs(by["virtqueue_pop"] - by["virtio_queue_notify"]) <= 2, by
    assert meta["lines_unparsed"] == 0
    # Never more than the rotation size plus what QEMU writes in a read interval: a small
    # share of what went through the log.
    assert meta["log_bytes"] > 8 * 32_000 and peak_bytes < meta["log_bytes"] / 3
