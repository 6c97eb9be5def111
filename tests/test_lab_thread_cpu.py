"""What each lab thread cost the host: CPU time, run-queue wait and the back end's wake-ups
(``threads`` in the JSON and in a recording's meta), and the calibration that reads them.

Runs use the real /dev/kvm and the kernel's own counters (``/proc/self/task/TID/schedstat``).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from vtrace import open_trace
from vtrace.lab import run_lab
from vtrace.lab.threadclock import ThreadClock, schedstat
from vtrace.sim.calibrate import calibrate


def test_a_thread_reads_its_own_counters() -> None:
    clock = ThreadClock("backend", 3)
    clock.start()
    sum(range(200_000))  # some CPU
    clock.stop()
    out = clock.to_json()
    assert out["role"] == "backend" and out["index"] == 3 and out["tid"] > 0
    assert out["cpu_ns"] > 0 and out["wakeups"] == 0
    if schedstat(out["tid"]) is not None:  # the kernel keeps schedstat (CONFIG_SCHED_INFO)
        # slices counts switches in: so short a run need not have been switched out
        assert out["run_ns"] > 0 and out["wait_ns"] >= 0 and out["slices"] >= 0


def test_schedstat_of_a_missing_thread_is_none() -> None:
    assert schedstat(1 << 30) is None


@pytest.mark.kvm
@pytest.mark.parametrize("threads", ["shared", "per-queue"])
def test_every_vcpu_and_back_end_thread_reports_its_cpu(threads: str) -> None:
    r = run_lab("virtio", requests=400, batch=1, vcpus=2, queues=2, backend_threads=threads)
    roles = [(t["role"], t["index"]) for t in r.threads]
    backends = 2 if threads == "per-queue" else 1
    assert roles == [("vcpu", 0), ("vcpu", 1)] + [("backend", i) for i in range(backends)]
    back = [t for t in r.threads if t["role"] == "backend"]
    assert {t["tid"] for t in back} == {q["backend_tid"] for q in r.per_queue}
    for t in r.threads:
        assert t["cpu_ns"] > 0
        assert t["cpu_ns"] <= r.duration_s * 1e9 * 1.5 + 50e6  # one CPU at most, start-up aside
    # polling guests spin: each vCPU thread ran most of the run
    for t in r.threads[:2]:
        assert t["cpu_ns"] > 0.2 * r.duration_s * 1e9
    # a wake-up takes at least one kick, and the back end woke at least once
    assert 1 <= sum(t["wakeups"] for t in back) <= r.kicks


@pytest.mark.kvm
def test_cli_json_has_the_threads() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "lab", "run", "--device", "virtio",
         "--requests", "200", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    threads = json.loads(out.stdout)["threads"]
    assert [t["role"] for t in threads] == ["vcpu", "backend"]
    assert threads[1]["wakeups"] >= 1


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_a_recording_calibrates_the_cpu_share_of_a_wake_up(tmp_path: Path) -> None:
    traces = []
    for batch in (1, 8):
        r = run_lab("virtio", requests=2000, batch=batch, record=tmp_path / f"b{batch}")
        meta = open_trace(r.trace).meta["lab"]
        assert meta["threads"] == r.threads  # the JSON's threads, in the trace's meta
        traces.append(r.trace)
    fit = calibrate(traces, "lab-virtio", tmp_path / "fit.toml")
    share, source = fit.fitted["backend.wakeup_cpu_share"]
    assert 0.0 < share <= 1.0
    assert "meta.json lab threads" in source
    # what the share stands for: the back end's CPU outside its passes, per wake-up
    pops = requests = passes = wakeups = 0
    cpu = 0.0
    for t in traces:
        trace = open_trace(t)
        back = next(x for x in trace.meta["lab"]["threads"] if x["role"] == "backend")
        counts = dict(
            trace.events.group_by(pl.col("event").cast(pl.String)).len().collect().iter_rows()
        )
        cpu += back["cpu_ns"]
        wakeups += back["wakeups"]
        requests += counts["lab_pop"]
        passes += counts["lab_complete"]
        pops += counts["lab_pop"]
    c = fit.config
    per_wake = (
        cpu - requests * c["backend.per_request_ns"] - passes * c["backend.per_pass_ns"]
    ) / wakeups
    drawn = c["backend.wakeup_ns"] + c["backend.stall_probability"] * c["backend.stall_ns"]
    assert share == pytest.approx(min(1.0, per_wake / drawn), rel=0.02, abs=1e-3)
    text = (tmp_path / "fit.toml").read_text()
    assert "wakeup_cpu_share = " in text and "meta.json lab threads" in text
    assert not math.isnan(share)
