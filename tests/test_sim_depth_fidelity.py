"""Calibrated on QEMU virtio-blk runs at queue depths 1 and 4, the model predicts depths 16 and
32, runs it never saw: kicks and interrupts per request against the shipped traces.

The guest submits each lot of ``queue_depth`` requests under one plug; how often its block
layer dispatches a lot in pieces (each piece one more kick, and its completions one more
interrupt) is the one number the calibration takes from the shallow runs; whether a piece's
kick is needed, and how many completions share an interrupt, come out of the model's timing.
Real runs of the same command differ a lot on a shared 2-core host (traces/README.md: eight
or nine runs per depth, with the host's load), so a prediction is judged against the range
of those runs, and the printed table gives its error against the shipped run and the median.
Where the model is within 10 % of the runs' median it is held there; where it is not, the
check is a strict expected failure (docs/model.md, "Split lots and shared interrupts"):

- depth 32 kicks: the model keeps the depth-4 count of dispatch splits per lot (0.85),
  where the depth-32 run split its lots into more single requests before the rest
  (1.27 extra kicks per lot: (1, 1, 30), (1, 1, 1, 29), ...);
- depth 16 interrupts: one interrupt per piece (0.115 per request, +10 % on the median
  0.104), where QEMU completes some pieces before the guest's handler has re-armed.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from real_runs import depth_cases, judge, qemu_per_request

from vtrace.sim import simulate
from vtrace.sim.calibrate import calibrate

TRACES = Path(__file__).resolve().parent.parent / "traces"
# real runs of the same command (traces/README.md): (min, median, max) per request
RUNS = {
    16: {"kicks": (0.069, 0.117, 0.350), "irqs": (0.067, 0.104, 0.244)},
    32: {"kicks": (0.046, 0.071, 0.095), "irqs": (0.043, 0.059, 0.075)},
}
MEDIAN_MISSES = {
    (32, "kicks"): "the depth-4 dispatch splits per lot (0.85) at depth 32, which split more "
    "(1.27): -20 % on the median",
    (16, "irqs"): "one interrupt per piece; QEMU completes some pieces before the guest's "
    "handler re-armed: +10.3 % on the median",
}


def measured(depth: int) -> tuple[float, float]:
    """Kicks and interrupts per request of the shipped trace at ``depth``."""
    counts = qemu_per_request(TRACES / f"qemu-virtio-blk-qd{depth}")
    return counts["kicks"], counts["irqs"]


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


def predict(shallow, depth: int) -> dict:
    over = {"workload.queue_depth": depth, "workload.requests": 16_384,
            "workload.warmup_requests": 0}  # fmt: skip
    return simulate(shallow.with_overrides(over)).summary


@pytest.fixture(scope="module")
def predicted(shallow) -> dict[int, dict]:
    return {depth: predict(shallow, depth) for depth in (16, 32)}


@pytest.mark.parametrize(("depth", "name"), depth_cases(MEDIAN_MISSES))
def test_deeper_queues_within_10_percent_of_the_median(predicted, depth: int, name: str) -> None:
    model = predicted[depth][f"{name}_per_request"]
    median = RUNS[depth][name][1]
    assert abs(model / median - 1) <= 0.10, (depth, name, model, median)


@pytest.mark.parametrize("depth", [16, 32])
def test_deeper_queues_predicted(predicted, depth: int) -> None:
    s = predicted[depth]
    kicks, irqs = measured(depth)
    judge(f"depth {depth} kicks/request", s["kicks_per_request"], kicks, RUNS[depth]["kicks"])
    judge(f"depth {depth} irqs/request", s["irqs_per_request"], irqs, RUNS[depth]["irqs"])
    # at least one kick per lot, and never the 0.000 of a model without batch submission
    assert s["kicks_per_request"] >= 1 / depth
