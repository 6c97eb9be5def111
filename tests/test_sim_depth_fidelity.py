"""Calibrated on QEMU virtio-blk runs at queue depths 1 and 4, the model predicts depths 16 and
32, runs it never saw: kicks and interrupts per request against the shipped traces.

The guest submits each lot of ``queue_depth`` requests under one plug; how often its block
layer dispatches a lot in pieces (each piece one more kick, and its completions one more
interrupt) is the one number the calibration takes from the shallow runs; whether a piece's
kick is needed, and how many completions share an interrupt, come out of the model's timing.
Real runs of the same command differ a lot here (traces/README.md gives the spread), so the
bound is loose; the printed table gives the errors.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from vtrace import open_trace
from vtrace.sim import simulate
from vtrace.sim.calibrate import calibrate

TRACES = Path(__file__).resolve().parent.parent / "traces"
BOUND = 0.6  # relative error allowed against one real run (the goal is 0.1: not met yet)


def measured(depth: int) -> tuple[float, float]:
    """Kicks and interrupts per request of the shipped trace at ``depth``."""
    counts = dict(
        open_trace(TRACES / f"qemu-virtio-blk-qd{depth}")
        .events.group_by(pl.col("event").cast(pl.String))
        .len()
        .collect()
        .iter_rows()
    )
    pops = counts["virtqueue_pop"]
    return counts["virtio_queue_notify"] / pops, counts["virtio_notify_irqfd"] / pops


@pytest.fixture(scope="module")
def shallow(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("depth") / "qd1-qd4.toml"
    traces = [TRACES / "qemu-virtio-blk-qd1", TRACES / "qemu-virtio-blk-qd4"]
    return calibrate(traces, "virtio-blk", out).config


def test_calibration_pools_the_shallow_runs(shallow) -> None:
    assert shallow["workload.submit"] == "batch"
    kicks4, _ = measured(4)
    # kicks beyond one per lot of 4, per lot: the guest's dispatch splits
    assert shallow["workload.dispatch_splits"] == pytest.approx(kicks4 * 4 - 1, abs=1e-3)


@pytest.mark.parametrize("depth", [16, 32])
def test_deeper_queues_predicted(shallow, depth: int) -> None:
    over = {"workload.queue_depth": depth, "workload.requests": 16_384,
            "workload.warmup_requests": 0}  # fmt: skip
    s = simulate(shallow.with_overrides(over)).summary
    kicks, irqs = measured(depth)
    err_k = s["kicks_per_request"] / kicks - 1
    err_i = s["irqs_per_request"] / irqs - 1
    print(
        f"\ndepth {depth}: kicks/request model {s['kicks_per_request']:.4f} real {kicks:.4f} "
        f"({err_k:+.0%}); interrupts/request model {s['irqs_per_request']:.4f} real {irqs:.4f} "
        f"({err_i:+.0%})"
    )
    # at least one kick per lot, and never the 0.000 of a model without batch submission
    assert s["kicks_per_request"] >= 1 / depth
    assert abs(err_k) < BOUND and abs(err_i) < BOUND
