"""A back-end wake-up is latency, and only part of it CPU (``backend.wakeup_cpu_share``).

From the kick to the back end's first pop the thread waits to be scheduled (no CPU) and
then runs its way out of the sleep (CPU). On a host with fewer CPUs than threads only the
CPU part takes a CPU from a running vCPU. In a CPU-bound run (2 polling vCPUs that never
wait, one back-end thread per queue, 2 host CPUs) the throughput has a closed form: the
CPUs over the CPU time one request costs, ``2 / (prep + serve + wake-ups per request x
wakeup_ns x share)``.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from vtrace import open_trace
from vtrace.errors import VtraceError
from vtrace.sim import load_config, simulate
from vtrace.sim.calibrate import calibrate
from vtrace.store import write_trace

PREP_NS = 3000.0  # guest CPU per request
SERVE_NS = 1000.0  # back-end CPU per request
WAKE_NS = 4000.0  # kick to first pop

BUSY = {
    "vm.vcpus": 2, "virtqueue.queues": 2, "backend.threads": "per_queue", "vm.host_cpus": 2,
    "virtqueue.ring_size": 4096, "virtqueue.batch": 1, "virtqueue.whole_batches": False,
    "vcpu.request_prep_ns": PREP_NS, "vcpu.batch_prep_ns": 0.0, "vcpu.poll_ns": 0.0,
    "vcpu.reap_ns": 0.0, "kvm.kernel_exit_ns": 0.0, "backend.wakeup_ns": WAKE_NS,
    "backend.stall_probability": 0.0, "backend.per_request_ns": SERVE_NS,
    "backend.per_pass_ns": 0.0, "workload.requests": 20_000,
}  # fmt: skip


def run(**overrides: object) -> dict:
    cfg = load_config("lab-virtio").with_overrides({**BUSY, **overrides})
    return simulate(cfg).summary


def test_a_wake_up_of_pure_latency_takes_no_cpu() -> None:
    s = run(**{"backend.wakeup_cpu_share": 0.0})
    assert s["backend_wakeups_per_request"] > 0.1  # the threads do sleep and wake
    assert s["throughput_rps"] == pytest.approx(2 / (PREP_NS + SERVE_NS) * 1e9, rel=0.01)
    # the back end took a vCPU's CPU for its serving only
    assert s["vcpu_preempted_share"] == pytest.approx(SERVE_NS / (PREP_NS + SERVE_NS), rel=0.02)


@pytest.mark.parametrize("share", [1.0, 0.5])
def test_the_cpu_part_of_each_wake_up_is_charged(share: float) -> None:
    s = run(**{"backend.wakeup_cpu_share": share})
    wake_cpu = s["backend_wakeups_per_request"] * WAKE_NS * share
    assert s["throughput_rps"] == pytest.approx(2 / (PREP_NS + SERVE_NS + wake_cpu) * 1e9, rel=0.01)


def test_the_default_charges_the_whole_wake_up() -> None:
    assert load_config("lab-virtio")["backend.wakeup_cpu_share"] == 1.0
    a, b = run(), run(**{"backend.wakeup_cpu_share": 1.0})
    for key in ("throughput_rps", "backend_utilization", "vcpu_preempted_share", "latency_ns"):
        assert a[key] == b[key], key


def test_a_cpu_per_thread_sees_the_same_latency() -> None:
    # with a CPU for every thread the share decides nothing but the back end's busy time
    free = {"vm.host_cpus": 0}
    a = run(**free, **{"backend.wakeup_cpu_share": 1.0})
    b = run(**free, **{"backend.wakeup_cpu_share": 0.25})
    assert b["throughput_rps"] == pytest.approx(a["throughput_rps"], rel=1e-9)
    assert b["backend_utilization"] < a["backend_utilization"]


@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_a_share_out_of_range_is_one_line(bad: float) -> None:
    with pytest.raises(VtraceError, match=r"backend\.wakeup_cpu_share"):
        load_config("lab-virtio", {"backend.wakeup_cpu_share": bad})


TRACES = Path(__file__).resolve().parent.parent / "traces"


def with_threads(name: str, out: Path, cpu_ns: int, wakeups: int) -> Path:
    """``traces/name`` with the back-end thread's counters a lab run now puts in its meta."""
    t = open_trace(TRACES / name)
    events = t.events.collect()
    tid = events.filter(pl.col("event").cast(pl.String) == "lab_pop")["tid"][0]
    lab = {**t.meta["lab"], "threads": [
        {"role": "vcpu", "index": 0, "tid": 1, "cpu_ns": 1},
        {"role": "backend", "index": 0, "tid": int(tid), "cpu_ns": cpu_ns, "wakeups": wakeups},
    ]}  # fmt: skip
    write_trace(out / name, events, {**t.meta, "lab": lab})
    return out / name


def test_calibrate_takes_the_cpu_of_a_wake_up_from_the_threads(tmp_path: Path) -> None:
    names = ["lab-virtio-b1", "lab-virtio-b8"]
    counters = {"lab-virtio-b1": (20_000_000, 1900), "lab-virtio-b8": (5_000_000, 250)}
    traces = [with_threads(n, tmp_path, *counters[n]) for n in names]
    fit = calibrate(traces, "lab-virtio", tmp_path / "fit.toml")
    c = fit.config
    outside = 0.0
    for path, (cpu, _) in zip(traces, counters.values(), strict=True):
        counts = dict(
            open_trace(path)
            .events.group_by(pl.col("event").cast(pl.String))
            .len()
            .collect()
            .iter_rows()
        )
        outside += cpu - counts["lab_pop"] * c["backend.per_request_ns"]
        outside -= counts["lab_complete"] * c["backend.per_pass_ns"]
    per_wake = outside / sum(w for _, w in counters.values())
    drawn = c["backend.wakeup_ns"] + c["backend.stall_probability"] * c["backend.stall_ns"]
    assert c["backend.wakeup_cpu_share"] == pytest.approx(min(1.0, per_wake / drawn), abs=2e-6)
    assert "meta.json lab threads" in fit.notes["backend.wakeup_cpu_share"]
    assert "wakeup_cpu_share = " in (tmp_path / "fit.toml").read_text()


def test_a_trace_without_the_threads_keeps_the_base_models_share(tmp_path: Path) -> None:
    fit = calibrate(
        [TRACES / "lab-virtio-b1", TRACES / "lab-virtio-b8"], "lab-virtio", tmp_path / "f.toml"
    )
    assert "backend.wakeup_cpu_share" not in fit.fitted
    assert (
        fit.config["backend.wakeup_cpu_share"]
        == load_config("lab-virtio")["backend.wakeup_cpu_share"]
    )
    assert "wakeup_cpu_share = 1.0  # from lab-virtio.toml" in (tmp_path / "f.toml").read_text()
