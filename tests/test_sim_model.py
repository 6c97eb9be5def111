"""The model's behaviour: the seed's qualitative claims, determinism, replay, CLI and sweeps."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from vtrace.schema import LAB_POP, SOURCE_LAB, empty_events
from vtrace.sim import load_config, replay, simulate
from vtrace.sim.sweep import parse_grid, run_sweep
from vtrace.store import write_trace

ROOT = Path(__file__).resolve().parent.parent
JSON_KEYS = {
    "requests", "completed", "throughput_rps", "latency_ns", "exits_per_request",
    "userspace_exits_per_request", "kicks_per_request", "irqs_per_request",
    "vcpu_exit_time_share", "ring_full_stalls", "backend_utilization",
}  # fmt: skip


def run(model: str, **overrides: object) -> dict:
    return simulate(load_config(model, overrides)).summary


def test_same_seed_same_result_other_seed_other_result() -> None:
    a = simulate(load_config("virtio-blk", {"workload.requests": 3000}))
    b = simulate(load_config("virtio-blk", {"workload.requests": 3000}))
    c = simulate(load_config("virtio-blk", {"workload.requests": 3000, "workload.seed": 2}))
    assert a.requests.equals(b.requests) and a.summary == b.summary
    assert not a.requests.equals(c.requests)


def test_per_request_frame_columns_and_counts() -> None:
    r = simulate(load_config("virtio-net", {"workload.requests": 2000}))
    f = r.requests
    assert f.columns == [
        "request", "submit_ns", "start_ns", "complete_ns", "exits", "userspace_exits",
        "kicks", "interrupts", "dropped", "latency_ns",
    ]  # fmt: skip
    assert f.height == 2000 and f["complete_ns"].null_count() == 0
    assert (f["submit_ns"] <= f["start_ns"]).all() and (f["start_ns"] <= f["complete_ns"]).all()
    assert r.summary["completed"] == 2000


@pytest.mark.parametrize(("model", "per_request", "per_irq"), [
    ("lab-emulated", 4, 0), ("ide-emulated", 18, 8), ("e1000-emulated", 1, 5),
])  # fmt: skip
def test_emulated_path_costs_several_exits_per_request(
    model: str, per_request: int, per_irq: int
) -> None:
    s = run(model, **{"workload.requests": 2000, "workload.warmup_requests": 0})
    assert s["exits_per_request"] == pytest.approx(per_request + per_irq * s["irqs_per_request"])
    assert s["userspace_exits_per_request"] == s["exits_per_request"]
    assert s["kicks_per_request"] == 0
    assert s["exits_per_request"] >= 4


def test_ide_makes_26_exits_per_request_as_measured() -> None:
    # traces/qemu-ide: 26.0 trapping register accesses per 4 KiB read
    assert run("ide-emulated", **{"workload.requests": 1000})["exits_per_request"] == 26


@pytest.mark.parametrize("batch", [1, 4, 16])
def test_virtio_kicks_about_once_per_batch(batch: int) -> None:
    """Light load, count policy: the back end is idle at every batch, so every batch kicks."""
    s = run(
        "virtio-net",
        **{
            "workload.arrival_rate_per_s": 2000.0,
            "workload.requests": 1600,
            "workload.warmup_requests": 0,
            "virtqueue.batch": batch,
            "virtqueue.batch_policy": "count",
        },
    )
    assert s["kicks_per_request"] == pytest.approx(1 / batch, rel=0.1)
    assert s["userspace_exits_per_request"] == 0  # the kick stays in KVM (ioeventfd)


def test_batching_cuts_kicks_and_interrupts_as_the_ring_allows() -> None:
    """A guest that always has work and a back end faster than it: the back end idles between
    batches, so each batch costs one kick and about one interrupt, until the ring is too small."""
    common = {
        "workload.arrivals": "backlog", "workload.requests": 4000, "workload.warmup_requests": 0,
        "virtqueue.batch_policy": "count", "device.service_ns": 300.0,
        "device.service_distribution": "deterministic", "backend.per_request_ns": 200.0,
    }  # fmt: skip
    rows = {
        (ring, batch): run(
            "virtio-blk", **common, **{"virtqueue.ring_size": ring, "virtqueue.batch": batch}
        )
        for ring in (16, 256)
        for batch in (1, 4, 16)
    }
    for ring in (16, 256):
        kicks = [rows[ring, b]["kicks_per_request"] for b in (1, 4, 16)]
        irqs = [rows[ring, b]["irqs_per_request"] for b in (1, 4, 16)]
        assert kicks[0] > kicks[1] >= kicks[2], (ring, kicks)
        assert irqs[0] > irqs[1] >= irqs[2], (ring, irqs)
    # on the large ring each batch size has its own kick; on the 16-descriptor ring the
    # guest, which goes on adding while an interrupt is on its way, fills the ring's 5
    # requests at batch 4 too, and kicks once per ring's worth like batch 16
    assert rows[256, 4]["kicks_per_request"] > rows[256, 16]["kicks_per_request"]
    # a 16-descriptor ring holds 5 requests of 3 descriptors: a batch of 16 cannot fit, so the
    # guest kicks when the ring fills (once per 5 requests) and stalls
    small, large = rows[16, 16], rows[256, 16]
    assert small["kicks_per_request"] == pytest.approx(1 / 5, abs=0.01)
    assert large["kicks_per_request"] == pytest.approx(1 / 16, abs=0.01)
    assert small["ring_full_stalls"] > 0 and large["ring_full_stalls"] == 0
    assert large["throughput_rps"] > small["throughput_rps"]


def test_event_idx_and_no_notify_flag_both_suppress_kicks_while_busy() -> None:
    for event_idx in (True, False):
        s = run("virtio-blk", **{"workload.requests": 3000, "virtqueue.event_idx": event_idx})
        assert s["kicks_per_request"] < 0.05  # the back end never sleeps at this depth


def test_interrupt_coalescing_cuts_interrupts() -> None:
    base = {"workload.requests": 4000, "workload.arrival_rate_per_s": 60000.0}
    plain = run("vhost-net", **base)
    held = run("vhost-net", **base, **{"interrupt.coalesce_ns": 50_000.0})
    assert held["irqs_per_request"] < plain["irqs_per_request"] / 2
    assert held["latency_ns"]["mean"] > plain["latency_ns"]["mean"]


def test_timer_batch_policy_kicks_once_per_timer_at_low_load() -> None:
    s = run("virtio-net", **{
        "workload.arrival_rate_per_s": 100_000.0, "workload.requests": 4000,
        "virtqueue.batch_policy": "timer", "virtqueue.batch_timer_ns": 50_000.0, "virtqueue.batch": 64,
    })  # fmt: skip
    # ~5 requests arrive per 50 us timer window
    assert 0.1 < s["kicks_per_request"] < 0.3


def test_full_ring_stalls_the_guest() -> None:
    s = run("virtio-blk", **{"workload.requests": 2000, "virtqueue.ring_size": 8})
    assert s["ring_full_stalls"] > 0


def test_vhost_beats_userspace_virtio_net_on_latency() -> None:
    user = run("virtio-net", **{"workload.requests": 4000})
    vhost = run("vhost-net", **{"workload.requests": 4000})
    assert vhost["latency_ns"]["mean"] < user["latency_ns"]["mean"]


def test_virtio_beats_emulated_block_throughput() -> None:
    assert (
        run("virtio-blk", **{"workload.requests": 3000})["throughput_rps"]
        > 5 * run("ide-emulated", **{"workload.requests": 1000})["throughput_rps"]
    )


def lab_pop_trace(path: Path, ts_ns: np.ndarray) -> Path:
    n = len(ts_ns)
    frame = pl.concat(
        [
            empty_events(),
            pl.DataFrame(
                {
                    "ts_ns": ts_ns.astype(np.int64),
                    "source": [SOURCE_LAB] * n,
                    "event": [LAB_POP] * n,
                    "pid": np.full(n, 7, np.int32),
                    "tid": np.full(n, 7, np.int32),
                }
            ),
        ],
        how="diagonal_relaxed",
    )
    write_trace(path, frame, {"source": "test"})
    return path


def test_replay_of_trace_arrivals(tmp_path: Path) -> None:
    ts = 1_000_000_000 + np.arange(500, dtype=np.int64) * 100_000  # one pop every 100 us
    trace = lab_pop_trace(tmp_path / "t", ts)
    r = replay("virtio-net", trace)
    assert r.summary["requests"] == 500 and r.summary["arrival_event"] == LAB_POP
    submits = r.requests["submit_ns"].to_numpy()
    assert np.array_equal(submits, (ts - ts[0]).astype(float))
    assert r.summary["throughput_rps"] == pytest.approx(10_000, rel=0.01)
    assert replay("virtio-net", trace, requests=100).summary["requests"] == 100


def test_cli_replay_json_has_the_documented_keys() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "replay", "--model", "mm1k", "--requests", "5000",
         "--seed", "3", "--set", "capacity=4", "--json"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    ).stdout  # fmt: skip
    s = json.loads(out)
    assert JSON_KEYS | {"blocking_probability"} <= set(s)
    assert set(s["latency_ns"]) == {"mean", "p50", "p90", "p99"}
    assert s["requests"] == 5000 and s["overrides"]["queue.capacity"] == 4
    assert 0 < s["blocking_probability"] < 1


def test_sweep_runs_the_grid_in_processes(tmp_path: Path) -> None:
    points = parse_grid(
        "virtio-blk", ["ring_size=16,256", "virtqueue.batch=1,8"], ["requests=1500"]
    )
    assert len(points) == 4
    out = tmp_path / "sweep.parquet"
    frame = run_sweep("virtio-blk", points, ["requests=1500"], out, workers=2)
    back = pl.read_parquet(out)
    assert back.height == 4 and back.equals(frame)
    assert back["virtqueue.ring_size"].to_list() == [16, 16, 256, 256]
    assert back["requests"].to_list() == [1500] * 4
    assert back.filter(pl.col("virtqueue.ring_size") == 16)["ring_full_stalls"].min() > 0
    # each override once: the point's column, not again as overrides.<key>
    assert not [c for c in back.columns if c.startswith("overrides")]


def test_cli_sweep_bad_grid_value_is_one_line(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "sweep", "--model", "virtio-blk",
         "--grid", "ring_size=8,12", "-o", str(tmp_path / "s.parquet")],
        capture_output=True, text=True, cwd=ROOT,
    )  # fmt: skip
    assert r.returncode == 2 and "must be a power of two" in r.stderr
    assert not (tmp_path / "s.parquet").exists()


def test_replay_from_kicks_when_a_trace_has_no_pops(tmp_path: Path) -> None:
    """Only the kvm rows of the real lab batch-8 trace: each of its 250 kicks is an arrival."""
    from vtrace import open_trace

    kvm_only = (
        open_trace(ROOT / "traces" / "lab-virtio-b8")
        .events.filter(pl.col("source").cast(pl.String) == "kvm")
        .collect()
    )
    write_trace(tmp_path / "k", kvm_only, {"source": "test"})
    r = replay("lab-virtio", tmp_path / "k")
    assert r.summary["arrival_event"] == "kick" and r.summary["requests"] == 250


def test_host_preemption_of_the_vcpu_costs_throughput() -> None:
    base = {"workload.requests": 3000, "workload.warmup_requests": 0}
    quiet = run("lab-virtio", **base)
    busy = run("lab-virtio", **base, **{"vcpu.stall_per_s": 500.0, "vcpu.stall_ns": 1e6})
    # 500 preemptions of 1 ms per second of work: about a third of the time lost
    assert busy["throughput_rps"] == pytest.approx(quiet["throughput_rps"] / 1.5, rel=0.12)
