"""Calibration from what a production host records: the kernel's events alone.

The shipped lab traces with their back end's own events (``lab_*``) removed, as a host
without the lab's instrumentation would record them, and the request count given as
``--requests``: the fitted model must predict what the full-trace calibration predicts.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from vtrace import open_trace
from vtrace.errors import VtraceError
from vtrace.sim import simulate
from vtrace.sim.calibrate import calibrate
from vtrace.store import TraceWriter, write_trace

TRACES = Path(__file__).resolve().parent.parent / "traces"


def kernel_only(name: str, out: Path) -> Path:
    """``traces/name`` without the lab back end's events and without the lab's meta."""
    t = open_trace(TRACES / name)
    events = t.events.filter(~pl.col("event").cast(pl.String).str.starts_with("lab_")).collect()
    meta = {k: v for k, v in t.meta.items() if k != "lab"}
    write_trace(out / name, events, meta)
    return out / name


def predict(cfg, **overrides: object) -> dict:
    return simulate(cfg.with_overrides({"workload.requests": 2000, **overrides})).summary


@pytest.mark.parametrize(
    ("names", "model", "target"),
    [
        (["lab-virtio-b1", "lab-virtio-b8"], "lab-virtio", {"virtqueue.batch": 32}),
        (["lab-emulated"], "lab-emulated", {}),
    ],
)
def test_kernel_events_calibrate_like_the_full_trace(
    tmp_path: Path, names: list[str], model: str, target: dict
) -> None:
    full = calibrate([TRACES / n for n in names], model).config
    kernel = calibrate([kernel_only(n, tmp_path) for n in names], model, requests=2000).config
    a, b = predict(full, **target), predict(kernel, **target)
    for key in ("throughput_rps", "kicks_per_request", "exits_per_request"):
        assert b[key] == pytest.approx(a[key], rel=0.10), key
    # what the kernel cannot show keeps the base model's value, and says so
    if model == "lab-virtio":
        assert kernel["vcpu.request_prep_ns"] == pytest.approx(full["vcpu.request_prep_ns"])
        assert kernel["virtqueue.batch"] == full["virtqueue.batch"]


def test_a_back_end_bound_prediction_needs_the_back_ends_events(tmp_path: Path) -> None:
    """On a ring of 16 at batch 1 the back end's wake-ups decide throughput; the kernel's
    events do not show them, so the kernel-only model keeps the base model's wake-up
    stalls and predicts more than the full calibration does (printed, not hidden)."""
    names = ["lab-virtio-b1", "lab-virtio-b8"]
    full = calibrate([TRACES / n for n in names], "lab-virtio").config
    kernel = calibrate([kernel_only(n, tmp_path) for n in names], "lab-virtio", requests=2000)
    over = {"virtqueue.batch": 1, "virtqueue.ring_size": 16}
    a, b = predict(full, **over), predict(kernel.config, **over)
    print(
        f"\nring 16, batch 1: full {a['throughput_rps']:.0f}/s, kernel-only "
        f"{b['throughput_rps']:.0f}/s ({b['throughput_rps'] / a['throughput_rps'] - 1:+.0%})"
    )
    assert "backend.wakeup_ns" not in kernel.fitted
    assert "backend.wakeup_cpu_share" not in kernel.fitted  # nor the CPU part of a wake-up
    assert b["throughput_rps"] > a["throughput_rps"]


def test_kernel_events_without_a_request_count_is_one_line(tmp_path: Path) -> None:
    trace = kernel_only("lab-virtio-b8", tmp_path)
    with pytest.raises(VtraceError, match="give --requests N"):
        calibrate([trace], "lab-virtio")
    out = tmp_path / "fit.toml"
    r = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "calibrate", str(trace), "--model", "lab-virtio",
         "-o", str(out), "--requests", "2000"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    # what the kernel's events gave besides the fitted numbers: the run's shape
    assert "vm.vcpus = 1" in r.stdout and "virtqueue.queues = 1" in r.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "calibrate", str(trace), "--model", "lab-virtio",
         "-o", str(tmp_path / "bad.toml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "give --requests N" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad.toml").exists()
    text = out.read_text()
    assert "request_prep_ns" in text and "wakeup_ns = " in text
    assert json.loads(json.dumps(open_trace(trace).meta))  # the stripped trace still reads


def test_a_trace_with_a_part_missing_is_refused_by_calibrate_and_replay(tmp_path: Path) -> None:
    t = open_trace(TRACES / "lab-virtio-b8")
    events = t.events.sort("ts_ns").collect()
    thirds = [events.slice(i * events.height // 3, events.height // 3 + 1) for i in range(3)]
    path = tmp_path / "three-parts"
    with TraceWriter(path, dict(t.meta)) as writer:
        for third in thirds:
            writer.append(third)
            writer.flush()  # a part each
        writer.close()
    parts = sorted(path.glob("part-*.parquet"))
    assert len(parts) == 3
    parts[1].unlink()
    with pytest.raises(VtraceError, match=r"incomplete trace: part-000001\.parquet missing"):
        calibrate([path], "lab-virtio")
    r = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "replay", str(path), "--model", "lab-virtio"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert r.returncode == 2 and "incomplete trace" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_the_fit_says_which_batch_each_trace_was_taken_to_run(tmp_path: Path) -> None:
    """From the kernel's events alone the guest's batch is requests per kick, which the
    back end's suppressed kicks inflate: the written source says so, trace by trace."""
    names = ["lab-virtio-b1", "lab-virtio-b8"]
    full = calibrate([TRACES / n for n in names], "lab-virtio")
    assert (
        "lab-virtio-b1 batch 1 (lab meta); lab-virtio-b8 batch 8 (lab meta)"
        in (full.notes["vcpu.request_prep_ns"])
    )
    kernel = calibrate([kernel_only(n, tmp_path) for n in names], "lab-virtio", requests=2000)
    source = kernel.notes["vcpu.request_prep_ns"]
    assert "lab-virtio-b1 batch 1 (1.00 requests per kick, rounded)" in source
    assert "lab-virtio-b8 batch 8 (8.00 requests per kick, rounded)" in source
    assert "more than the guest's batch" in source
    assert source == kernel.notes["vcpu.batch_prep_ns"]


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_a_multi_queue_guest_is_read_off_the_kernel_events(tmp_path: Path) -> None:
    """2 vCPUs kicking 2 queues: the kernel's events name the vCPU threads that wrote the
    kicks and the notify addresses they wrote, so the kernel-only model has the run's shape
    and each vCPU's share of the requests, as the full calibration has from the lab's meta;
    the written source gives each queue's kicks and interrupts per second."""
    from vtrace.lab import run_lab

    run = run_lab("virtio", requests=4000, batch=8, vcpus=2, queues=2, record=tmp_path / "mq")
    full = calibrate([tmp_path / "mq"], "lab-virtio")
    out = tmp_path / "kernel"
    out.mkdir()
    t = open_trace(tmp_path / "mq")
    events = t.events.filter(~pl.col("event").cast(pl.String).str.starts_with("lab_")).collect()
    write_trace(out / "mq", events, {k: v for k, v in t.meta.items() if k != "lab"})
    kernel = calibrate([out / "mq"], "lab-virtio", requests=4000)
    assert (kernel.config["vm.vcpus"], kernel.config["virtqueue.queues"]) == (2, 2)
    f, k = full.facts[0], kernel.facts[0]
    seen = [(x.batch, x.vcpu_requests, x.kicks, x.duration_ns) for x in (f, k)]
    assert kernel.config["vcpu.request_prep_ns"] == pytest.approx(
        full.config["vcpu.request_prep_ns"], rel=0.02
    ), seen
    # at batch 32, as above: the back end's wake-ups, which only the full trace shows, hardly
    # matter there
    a, b = (
        predict(full.config, **{"virtqueue.batch": 32}),
        predict(kernel.config, **{"virtqueue.batch": 32}),
    )
    assert b["throughput_rps"] == pytest.approx(a["throughput_rps"], rel=0.10)
    source = kernel.notes["virtqueue.queues"]
    for q in run.per_queue:
        assert f"port {q['notify_port']:#x}: {q['guest_kicks']} kicks" in source
    assert "interrupts: none recorded" in source
    assert "kernel events: 2 vCPU threads wrote kicks" in kernel.notes["vm.vcpus"]


def test_the_busiest_vcpu_thread_is_chosen_the_same_way_every_time() -> None:
    """Two vCPU threads with as many accesses each (a 2 x 2 run's, where each kicks its
    queue once a batch): whichever order the rows come in, the same thread's accesses are
    read, so a full and a kernel-only calibration of one run time the same vCPU."""
    from vtrace.sim.calibrate import _vcpu_accesses

    rows = [(tid, ts) for tid in (7, 3) for ts in range(tid, tid + 1000, 10)]
    frame = pl.DataFrame(rows, schema=["tid", "ts_ns"], orient="row")
    picked = {
        _vcpu_accesses(frame.sample(fraction=1.0, shuffle=True, seed=seed))["tid"][0]
        for seed in range(20)
    }
    picked.add(_vcpu_accesses(frame)["tid"][0])
    picked.add(_vcpu_accesses(frame.reverse())["tid"][0])
    assert picked == {3}


def test_writes_to_the_devices_kvm_emulates_are_not_kicks(tmp_path: Path) -> None:
    """The interrupt-driven lab guest acknowledges its interrupts at the 8259 PIC (ports 0x20
    and 0x21), which KVM emulates in the kernel: in-kernel writes that are not kicks, as in
    vtrace.analyze.kicks, nor a queue."""
    trace = kernel_only("lab-virtio-b8-irq", tmp_path)
    fit = calibrate([trace], "lab-virtio", requests=2000)
    notify = 0x200  # the lab's queue 0 notify port (vtrace/lab/guest/layout.inc)
    facts = fit.facts[0]
    assert facts.kicks == open_trace(TRACES / "lab-virtio-b8-irq").meta["lab"]["guest_kicks"]
    assert fit.config["virtqueue.queues"] == 1
    assert f"port {notify:#x}:" in fit.notes["virtqueue.queues"]
    assert "port 0x20:" not in fit.notes["virtqueue.queues"]
