"""Attaching to running QEMU guests: `vtrace qemu-lab start/stop`, `vtrace record --qmp`,
`vtrace doctor --qmp`, and per-VM attribution.

The guests are the lab's own, booted in the background under QEMU (TCG here, ~6 s each).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest

from vtrace.lab.qemu import console_counts

VTRACE = [str(Path(sys.executable).parent / "vtrace")]


def vtrace(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*VTRACE, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"vtrace {' '.join(args)}: {done.returncode}\n{done.stderr}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def lab_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """A background lab guest: virtio-blk, queue depth 1 (its QMP socket, its pid)."""
    qmp = tmp_path_factory.mktemp("vm") / "vm1.qmp"
    done = vtrace("qemu-lab", "start", "--device", "virtio-blk", "--qmp", str(qmp))
    pid = int(done.stdout.strip())
    try:
        yield qmp, pid
    finally:
        vtrace("qemu-lab", "stop", "--qmp", str(qmp), check=False)


@pytest.mark.qemu
def test_lab_start_runs_until_stop(tmp_path: Path) -> None:
    qmp = tmp_path / "vm.qmp"
    pid = int(vtrace("qemu-lab", "start", "--qmp", str(qmp)).stdout)
    try:
        assert _alive(pid) and qmp.is_socket()
        console = Path(f"{qmp}.console")
        first = console_counts(console)
        time.sleep(1.0)
        later = console_counts(console)
        # The workload keeps going: more rounds, each adding requests the guest completed.
        assert len(later) > len(first) >= 0 and later[-1][0] > (first[-1][0] if first else 0)
        again = vtrace("qemu-lab", "start", "--qmp", str(qmp), check=False)
        assert again.returncode == 2 and "already listens" in again.stderr
    finally:
        stopped = vtrace("qemu-lab", "stop", "--qmp", str(qmp))
    assert int(stopped.stdout) == pid and not _alive(pid)
    assert not qmp.exists()
    gone = vtrace("qemu-lab", "stop", "--qmp", str(qmp), check=False)
    assert gone.returncode == 2 and "no QMP socket" in gone.stderr


class ConsoleWatch:
    """The guest's count lines with the host's CLOCK_MONOTONIC when each was first seen.

    A line seen at poll time t was written after the poll before (``written_after``) and
    by t (``written_by``)."""

    def __init__(self, console: Path, poll_s: float = 0.005) -> None:
        self.console, self.poll_s = console, poll_s
        self.rows: list[tuple[int, int, int, int]] = []  # after_ns, by_ns, requests, irqs
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        seen, last = 0, time.clock_gettime_ns(time.CLOCK_MONOTONIC)
        while not self._stop.is_set():
            now = time.clock_gettime_ns(time.CLOCK_MONOTONIC)
            counts = console_counts(self.console)
            for requests, irqs in counts[seen:]:
                self.rows.append((last, now, requests, irqs))
            seen, last = len(counts), now
            time.sleep(self.poll_s)

    def __enter__(self) -> ConsoleWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def written_before(self, t_ns: int) -> tuple[int, int]:
        """Counts of the last line surely written before t."""
        return max(((r, i) for a, b, r, i in self.rows if b <= t_ns), default=(0, 0))

    def written_after(self, t_ns: int) -> tuple[int, int]:
        """Counts of the first line surely written after t."""
        return min((r, i) for a, b, r, i in self.rows if a >= t_ns)


@pytest.mark.qemu
@pytest.mark.root
@pytest.mark.bcc
def test_record_qmp_counts_match_the_guest(lab_vm: tuple[Path, int], tmp_path: Path) -> None:
    from vtrace.qmp import Qmp, trace_states

    qmp, pid = lab_vm
    out = tmp_path / "t"
    with ConsoleWatch(Path(f"{qmp}.console")) as watch:
        vtrace("record", "-o", str(out), "--qmp", str(qmp), "--duration", "2")
        time.sleep(0.3)  # the rounds that bracket the stop
    meta = json.loads((out / "meta.json").read_text())
    vm = meta["qemu"]["vms"][0]
    assert vm["pid"] == pid and vm["name"] == "vtrace-lab-virtio-blk" and vm["timestamps"]
    assert meta["vms"] == {str(pid): {"name": "vtrace-lab-virtio-blk"}}
    events = pl.read_parquet(out / "*.parquet").filter(pl.col("source") == "qemu")
    by = dict(events.group_by(pl.col("event").cast(pl.String)).len().iter_rows())
    pops, kicks, irqs = by["virtqueue_pop"], by["virtio_queue_notify"], by["virtio_notify_irqfd"]
    assert pops > 200
    # Every QEMU event lies in the window in which all of them were on, once its
    # wall-clock time is aligned to the kernel's clock.
    first, last = vm["window_monotonic_ns"]
    assert vm["start"]["events_on_monotonic_ns"][1] == first
    assert vm["stop"]["events_off_monotonic_ns"][0] == last
    assert first <= events["ts_ns"].min() and events["ts_ns"].max() <= last
    assert (events["pid"] == pid).all()
    # The guest's own completed requests bracket the recorded ones (queue depth 1: one
    # request in flight at either edge).
    inside = watch.written_before(last)[0] - watch.written_after(first)[0]
    around = watch.written_after(last)[0] - watch.written_before(first)[0]
    assert inside - 1 <= pops <= around + 1, (inside, pops, around)
    # QEMU's own count (query-blockstats, read before the first event went on and after
    # the last went off) is the guest's over that wider window.
    bs_first = vm["start"]["blockstats_monotonic_ns"]
    bs_last = vm["stop"]["blockstats_monotonic_ns"]
    bs_inside = watch.written_before(bs_last[0])[0] - watch.written_after(bs_first[1])[0]
    bs_around = watch.written_after(bs_last[1])[0] - watch.written_before(bs_first[0])[0]
    assert bs_inside - 1 <= vm["requests_blockstats"] <= bs_around + 1
    assert vm["requests_blockstats"] >= pops - 1
    # At queue depth 1 each request is one kick and one interrupt; the guest counted its
    # interrupts itself.
    assert kicks / pops == pytest.approx(1.0, abs=0.02)
    g_before, g_after = watch.written_before(first), watch.written_after(last)
    guest_irq_per_req = (g_after[1] - g_before[1]) / (g_after[0] - g_before[0])
    assert irqs / pops == pytest.approx(guest_irq_per_req, abs=0.05)
    # After the stop QMP reports every event off again.
    with Qmp(qmp) as q:
        states = trace_states(q)
    assert not any(states[e] for e in vm["events"])


def _recording(out: Path, qmp: Path) -> subprocess.Popen:
    """`vtrace record --qmp` in the background, once QEMU's events are on."""
    from vtrace.collect.qemu_attach import state_file
    from vtrace.qmp import Qmp

    with Qmp(qmp) as q:
        state = state_file(q.peer_pid())
    proc = subprocess.Popen(
        [*VTRACE, "record", "-o", str(out), "--qmp", str(qmp)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    until = time.monotonic() + 60
    while not state.exists():  # written just before the events go on
        assert proc.poll() is None and time.monotonic() < until, proc.communicate()
        time.sleep(0.1)
    time.sleep(1.0)
    return proc


def _events_on(qmp: Path) -> list[str]:
    from vtrace.collect.qemu_attach import ATTACH_EVENTS
    from vtrace.qmp import Qmp, trace_states

    with Qmp(qmp) as q:
        states = trace_states(q)
    return [e for e in ATTACH_EVENTS if states.get(e)]


@pytest.mark.qemu
@pytest.mark.root
@pytest.mark.bcc
def test_sigterm_restores_events(lab_vm: tuple[Path, int], tmp_path: Path) -> None:
    qmp, _pid = lab_vm
    proc = _recording(tmp_path / "t", qmp)
    try:
        assert _events_on(qmp)
    finally:
        proc.send_signal(signal.SIGTERM)
    assert proc.wait(60) == 0, proc.communicate()
    assert _events_on(qmp) == []
    meta = json.loads((tmp_path / "t" / "meta.json").read_text())
    assert meta["stopped_by"] == "SIGTERM" and meta["qemu"]["vms"][0]["events_recorded"] > 0


@pytest.mark.qemu
@pytest.mark.root
@pytest.mark.bcc
def test_doctor_turns_off_what_a_killed_recording_left_on(
    lab_vm: tuple[Path, int], tmp_path: Path
) -> None:
    qmp, _pid = lab_vm
    proc = _recording(tmp_path / "t", qmp)
    proc.kill()
    proc.wait(30)
    left = _events_on(qmp)
    assert "virtqueue_pop" in left
    report = vtrace("doctor", "--qmp", str(qmp), "--json", check=False)
    assert report.returncode == 1
    (check,) = json.loads(report.stdout)
    assert check["status"] == "warn" and "virtqueue_pop" in check["verdict"]
    # A new recording refuses to start over what the killed one left.
    again = vtrace("record", "-o", str(tmp_path / "u"), "--qmp", str(qmp), check=False)
    assert again.returncode == 2 and "doctor --qmp" in again.stderr
    assert not (tmp_path / "u").exists()
    fixed = vtrace("doctor", "--qmp", str(qmp), "--fix", "--json")
    (check,) = json.loads(fixed.stdout)
    assert check["status"] == "ok" and check["fixed"].startswith(f"turned {len(left)} events off")
    assert _events_on(qmp) == []
    assert vtrace("doctor", "--qmp", str(qmp)).returncode == 0


@pytest.mark.qemu
@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_three_vms_each_get_their_own_counts(lab_vm: tuple[Path, int], tmp_path: Path) -> None:
    """Two /dev/kvm lab VMs and a QEMU guest under one host-wide recording: each VM's
    user-space exits and kicks are what its own VMM counted."""
    qmp, qemu_pid = lab_vm
    out = tmp_path / "t"
    proc = _recording(out, qmp)
    try:
        labs = [
            subprocess.Popen(
                [*VTRACE, "lab", "run", "--device", device, "--requests", "2000", "--json"],
                stdout=subprocess.PIPE,
                text=True,
            )
            for device in ("virtio", "emulated")
        ]
        results = [json.loads(p.communicate(timeout=120)[0]) for p in labs]
    finally:
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    data = json.loads(vtrace("summary", str(out), "--json").stdout)
    vms = {vm["pid"]: vm for vm in data["vms"]}
    for r in results:
        vm = vms[r["pid"]]
        assert vm["userspace_exits"] == r["userspace_exits"], (vm, r)
        assert vm["kicks"] == r["guest_kicks"], (vm, r)  # ioeventfd writes, seen by KVM
    qemu = vms[qemu_pid]
    assert qemu["name"] == "vtrace-lab-virtio-blk"
    notifies = sum(e["count"] for e in data["events"] if e["event"] == "virtio_queue_notify")
    assert qemu["kicks"] == notifies > 0 and qemu["kicks_from"] == "qemu"
    assert sum(vm["events"] for vm in data["vms"]) <= data["trace"]["events"]
