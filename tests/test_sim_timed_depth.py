"""Calibrated on QEMU virtio-blk runs at depths 1 and 4 *with the host scheduler's events*,
the model predicts depths 16 and 32 from timing: the guest's time per add, QEMU's pace and
wake-up, its merged I/O, its work per completion, the big lock a TCG vCPU needs for its
kicks (and the interrupts injected when the main loop lets go of it), the halted vCPU's
wake-up, the guest's handler work per completion, its way to the next lot and into the
halt (vtrace.sim.qemu_timing). No split count
is carried over: whether a lot goes in one kick or several comes out of the race between
the guest's adds and QEMU's passes; QEMU turns kicks off while a pass pops, so only an add
after a pass has found the ring empty kicks.

The runs: traces/qemu-virtio-blk-sched, 8 rounds of depths 1, 4, 16 and 32 taken in turn
on a quiet host (traces/README.md), and traces/qemu-virtio-blk-sched-2, 8 more rounds taken
the same way later, judged on their own: a second batch none of the model's design saw. The host's state differs from run to run (where
QEMU's main loop lands, how fast the TCG guest goes), and the race is a knife edge (the
guest adds about one request per 4.7 us, QEMU pops one per 4 us; in its slow stretches the
guest takes about 1.7 times as long, so QEMU catches up with it after almost every add),
so one run's figures vary a lot. So each round's runs at depths 1 and 4 calibrate a model of their own; the
median of the 8 models' predictions at depths 16 and 32 is judged against the median of
the 8 runs there, computed here from the shipped traces. Where the model is within 10 %
it is held there; where not, a strict expected failure says by how much (docs/model.md,
"Timed calibration").
"""

from __future__ import annotations

from pathlib import Path
from statistics import median

import numpy as np
import polars as pl
import pytest
from real_runs import depth_cases, qemu_per_request

from vtrace import open_trace
from vtrace.sim import simulate
from vtrace.sim.calibrate import calibrate

TRACES = Path(__file__).resolve().parent.parent / "traces"
SERIES = TRACES / "qemu-virtio-blk-sched"
SECOND = TRACES / "qemu-virtio-blk-sched-2"  # the second batch
ROUNDS = range(1, 9)
SLOW_PACE = (
    "a slower guest splits more lots: the pace calibrated from depths 1 and 4 (4.3 to 5.3 us "
    "an add) is slower than this batch's deep lots' own (3.9 to 4.6 us from depth 4 to 16); "
    "with that put in, +1.6 % kicks and +4.5 % interrupts (benchmarks/depth_pace.py)"
)
MISSES = {
    SERIES.name: {},
    SECOND.name: {
        (16, "kicks"): f"+10 % on the runs' median: {SLOW_PACE}",
        (16, "irqs"): f"+10 % on the runs' median: {SLOW_PACE}",
        (32, "irqs"): "+12 % on the runs' median: the model's depth-32 lots take an interrupt "
        "for every 1.28 kicks, the runs' for every 1.46; their piece sizes and timing are not "
        "those of the runs yet (docs/model.md)",
    },
}


def runs(series: Path, depth: int) -> list[dict[str, float]]:
    return [qemu_per_request(series / f"qd{depth}-r{r}") for r in ROUNDS]


@pytest.fixture(scope="module")
def timed():
    traces = [SERIES / f"qd{d}-r{r}" for r in ROUNDS for d in (1, 4)]
    return calibrate(traces, "virtio-blk", None)


def test_the_timings_come_from_the_scheduler_events(timed) -> None:
    cfg, notes = timed.config, timed.notes
    for key in ("backend.wakeup_quantiles_ns", "vcpu.request_prep_ns",
                "backend.per_request_quantiles_ns", "device.service_ns",
                "interrupt.halted_wake_ns", "backend.avail_event", "backend.submit",
                "vcpu.stall_per_s", "vcpu.stall_ns", "backend.complete_ns", "backend.idle_ns",
                "backend.lock_wake_ns", "backend.preempt_share", "vcpu.slow_share",
                "vcpu.slow_factor", "vcpu.slow_stretch_ns", "interrupt.per_completion_ns",
                "workload.think_ns", "vcpu.idle_entry_ns"):  # fmt: skip
        assert key in notes, key
    assert cfg["backend.avail_event"] == "idle" and cfg["backend.submit"] == "pass"
    assert cfg["backend.publish"] == "per_request" and cfg["backend.holds_kicks"]
    # QEMU's work per completion and its way back to sleep, from its own events
    assert 2_000 <= cfg["backend.complete_ns"] <= 15_000
    assert 5_000 <= cfg["backend.idle_ns"] <= 40_000
    assert 0 < cfg["backend.preempt_share"] < 0.5
    assert cfg["virtqueue.batch"] == 1 and cfg["workload.dispatch_splits"] == 0.0
    assert "sched_waking" in notes["backend.wakeup_quantiles_ns"]
    # the guest's time per add lies between the TCG guest's few us and QEMU's pop pace x 2
    assert 2_000 <= cfg["vcpu.request_prep_ns"] <= 10_000
    # the guest's slow stretches: whole lots of four halt about 41 or about 70 us after
    # their first kick, in stretches of a millisecond or more
    assert 0.05 <= cfg["vcpu.slow_share"] <= 0.7
    assert 1.3 <= cfg["vcpu.slow_factor"] <= 2.2
    assert 200_000 <= cfg["vcpu.slow_stretch_ns"] <= 20_000_000
    q = cfg["backend.wakeup_quantiles_ns"]
    assert len(q) == 21 and q == sorted(q)


def test_wakeup_median_matches_an_asof_join() -> None:
    """The wake-up law's median, from a join the calibration does not use: each kick QEMU
    took at an idle moment, joined backwards to the vCPU's last signal to the main loop."""
    trace = SERIES / "qd4-r1"
    ev = open_trace(trace).events.with_columns(pl.col("event").cast(pl.String)).collect()
    main = ev.filter(pl.col("event") == "virtqueue_pop")["tid"].mode()[0]
    wakes = ev.filter((pl.col("event") == "sched_waking") & (pl.col("value") == main))
    vcpu = wakes.filter(pl.col("tid") != 0)["tid"].mode()[0]
    writes = wakes.filter(pl.col("tid") == vcpu).select(write="ts_ns").sort("write")
    qemu = ev.filter(pl.col("source").cast(pl.String) == "qemu").sort("ts_ns")
    flow = qemu.with_columns(
        in_flight=((pl.col("event") == "virtqueue_pop").cast(pl.Int32)
                   - (pl.col("event") == "virtqueue_fill").cast(pl.Int32)).cum_sum()
    )  # fmt: skip
    firsts = flow.filter(
        (pl.col("event") == "virtio_queue_notify") & (pl.col("in_flight") == 0)
    ).select("ts_ns")
    joined = firsts.join_asof(writes, left_on="ts_ns", right_on="write", strategy="backward")
    lag = (joined["ts_ns"] - joined["write"]).drop_nulls().to_numpy()
    lag = lag[lag < 2_000_000]
    cfg = calibrate([trace], "virtio-blk", None).config
    assert cfg["backend.wakeup_ns"] == pytest.approx(float(np.median(lag)), abs=1.0)


def _predict(cfg, depth: int) -> dict:
    over = {"workload.queue_depth": depth, "workload.requests": 16_384,
            "workload.warmup_requests": 0}  # fmt: skip
    return simulate(cfg.with_overrides(over)).summary


@pytest.fixture(scope="module")
def per_round():
    """Per series: each round's depth-1 and depth-4 runs calibrate a model, which predicts
    depths 4, 16 and 32 (once per series for the module)."""
    done: dict[str, list[dict[int, dict]]] = {}

    def predictions(series: Path) -> list[dict[int, dict]]:
        if series.name not in done:
            done[series.name] = [
                {depth: _predict(cfg, depth) for depth in (4, 16, 32)}
                for cfg in (
                    calibrate(
                        [series / f"qd1-r{r}", series / f"qd4-r{r}"], "virtio-blk", None
                    ).config
                    for r in ROUNDS
                )
            ]
        return done[series.name]

    return predictions


@pytest.mark.parametrize("series", [SERIES, SECOND], ids=lambda p: p.name)
def test_the_calibration_depth_is_reproduced(per_round, series: Path) -> None:
    for name in ("kicks", "irqs"):
        med = median(r[name] for r in runs(series, 4))
        model = median(p[4][f"{name}_per_request"] for p in per_round(series))
        print(f"\n{series.name} depth 4 {name}/request: model {model:.4f}, median {med:.4f} "
              f"({model / med - 1:+.1%})")  # fmt: skip
        assert abs(model / med - 1) <= 0.10


def _cases() -> list:
    """(series, depth, name): each series' depths 16 and 32, its misses expected to fail."""
    return [
        pytest.param(
            series, *case.values, marks=case.marks, id="{}-{}-{}".format(series.name, *case.values)
        )
        for series in (SERIES, SECOND)
        for case in depth_cases(MISSES[series.name])
    ]


@pytest.mark.parametrize(("series", "depth", "name"), _cases())
def test_deeper_queues_from_timing(per_round, series: Path, depth: int, name: str) -> None:
    real = [r[name] for r in runs(series, depth)]
    predictions = [p[depth][f"{name}_per_request"] for p in per_round(series)]
    med, model = median(real), median(predictions)
    print(f"\n{series.name} depth {depth} {name}/request: median of 8 predictions "
          f"{model:.4f} ({min(predictions):.4f}-{max(predictions):.4f}), of 8 runs {med:.4f} "
          f"({min(real):.4f}-{max(real):.4f}): {model / med - 1:+.1%}")  # fmt: skip
    assert abs(model / med - 1) <= 0.10, (series.name, depth, name, model, med)
