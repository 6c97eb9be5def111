"""Calibrated on a 1-vCPU, 1-queue QEMU virtio-blk run, the model predicts 2 vCPUs x 2 queues,
a run it never saw: kicks and interrupts per request against the shipped 2 x 2 trace.

Both runs read 4096 blocks of 4 KiB in batches of 4 under one plug; the 2 x 2 guest runs one
such stream per vCPU, blk-mq maps vCPU v to queue v, and QEMU's main loop serves both queues.
The calibration takes the path's structure and the guest's dispatch splits from the 1 x 1
run; the prediction sets ``vm.vcpus``, ``virtqueue.queues`` and ``workload.jobs`` to 2.
Real runs differ a lot on a shared 2-core host (traces/README.md: 4 runs, load average 8 to
12), so a prediction is judged against the range of those runs; the printed lines give its
error against the shipped run and the median (the goal: within 10 %).

The model misses today, and the checks are strict expected failures (they turn into
failures, to remove the mark, once the model predicts within the range):

- kicks: the model serves the two queues as two independent 1 x 1 paths (0.457 per request,
  as for one queue), while the real 2 x 2 guest took about 30 % fewer kicks than the 1 x 1
  runs made in turn with it (medians 0.363 and 0.513). In the shipped traces 70 % of the
  2 x 2 lots went in one kick against 49 % of the 1 x 1 lots: QEMU's one main loop takes
  a queue's kick later while the other queue has I/O in flight (lots whose first kick came
  then: 81 % whole), so the guest has added the whole lot by then. The model's dispatch
  splits are a count per lot taken from the 1 x 1 run, whatever the back end is doing;
- interrupts: the model gives one interrupt per piece it serves, where QEMU often completes
  a piece before the guest's handler (slow under TCG) has re-armed used_event: the
  calibrated model gives 0.457 interrupts per request for its own 1 x 1 run, which had
  0.350, and 0.457 for 2 x 2 (0.32 to 0.37). See docs/model.md, "Split lots and shared
  interrupts".
"""

from __future__ import annotations

from pathlib import Path
from statistics import median

import polars as pl
import pytest
from real_runs import judge, qemu_per_request

from vtrace import open_trace
from vtrace.sim import simulate
from vtrace.sim.calibrate import calibrate

TRACES = Path(__file__).resolve().parent.parent / "traces"
ONE = TRACES / "qemu-virtio-blk-qd4"
TWO_BY_TWO = TRACES / "qemu-virtio-blk-qd4-2x2"
# real 2 x 2 runs of the same command (traces/README.md): (min, median, max) per request
RUNS = {"kicks": (0.339, 0.363, 0.407), "irqs": (0.319, 0.330, 0.368)}
SHAPE = {"vm.vcpus": 2, "virtqueue.queues": 2, "workload.jobs": 2}
KICKS_MISS = pytest.mark.xfail(
    strict=True,
    reason="the model takes the 1 x 1 run's dispatch splits per lot (0.457 per request); "
    "the real 2 x 2 guest kicks about 30 % less: 70 % of its lots go in one kick (1 x 1: 49 %)",
)
IRQS_MISS = pytest.mark.xfail(
    strict=True,
    reason="the model interrupts once per piece; QEMU often completes a piece before the "
    "guest's handler re-armed (the 1 x 1 calibration run: 0.350 per request, model 0.457)",
)


@pytest.fixture(scope="module")
def one_queue(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("mq") / "qd4.toml"
    return calibrate([ONE], "virtio-blk", out).config


@pytest.fixture(scope="module")
def predicted(one_queue) -> dict[str, float]:
    over = {**SHAPE, "workload.requests": 16_384, "workload.warmup_requests": 0}
    s = simulate(one_queue.with_overrides(over)).summary
    return {"kicks": s["kicks_per_request"], "irqs": s["irqs_per_request"]}


def test_one_queue_calibration_is_one_vcpu_one_queue(one_queue) -> None:
    assert (one_queue["vm.vcpus"], one_queue["virtqueue.queues"]) == (1, 1)
    assert one_queue["workload.submit"] == "batch"
    assert one_queue["backend.threads"] == "shared"  # QEMU's main loop


def test_two_by_two_trace_calibrates_to_its_shape(tmp_path: Path) -> None:
    """A multi-queue trace sets vCPUs, queues and jobs, and one back-end thread for all."""
    cal = calibrate([TWO_BY_TWO], "virtio-blk", tmp_path / "2x2.toml")
    cfg = cal.config
    assert {k: cfg[k] for k in SHAPE} == SHAPE
    assert cfg["backend.threads"] == "shared"
    assert cfg["workload.queue_depth"] == 4 and cfg["workload.submit"] == "batch"
    # 1524 kicks for 1024 lots of 4 (512 per stream)
    assert cfg["workload.dispatch_splits"] == pytest.approx(1524 / 1024 - 1, abs=1e-3)
    text = (tmp_path / "2x2.toml").read_text()
    assert "vcpus = 2  # fitted: qemu-virtio-blk-qd4-2x2: meta.json config vcpus" in text


@pytest.mark.parametrize(
    "name", [pytest.param("kicks", marks=KICKS_MISS), pytest.param("irqs", marks=IRQS_MISS)]
)
def test_two_vcpus_two_queues_predicted(predicted: dict[str, float], name: str) -> None:
    shipped = qemu_per_request(TWO_BY_TWO)[name]
    judge(f"2 vCPUs x 2 queues {name}/request", predicted[name], shipped, RUNS[name])


# --- from timing: the host scheduler's series ------------------------------------------------
# Each round of traces/qemu-virtio-blk-sched (1 x 1, depths 1 and 4, quiet host) calibrates a
# model with the timings the scheduler's events give (docs/model.md, "Timed calibration"),
# including the wake-up when no host CPU is free (the main loop taking the vCPU's CPU). It
# predicts 2 x 2 on this host's 2 CPUs (vm.host_cpus = 2: the two vCPU threads leave none
# idle); the median of the 8 predictions is judged against the median of the 6 runs of
# traces/qemu-virtio-blk-2x2-sched, within 10 %. What carries it: under TCG a vCPU needs
# QEMU's big lock for its kicks and to take its interrupts, which the main loop holds while
# it pops and while it completes each request (backend.holds_kicks, backend.complete_ns),
# and the wake-up that takes a running vCPU's CPU.
SERIES = TRACES / "qemu-virtio-blk-sched"
TWO_BY_TWO_SERIES = TRACES / "qemu-virtio-blk-2x2-sched"


@pytest.fixture(scope="module")
def timed_predictions() -> list[dict]:
    over = {**SHAPE, "vm.host_cpus": 2, "workload.queue_depth": 4,
            "workload.requests": 16_384, "workload.warmup_requests": 0}  # fmt: skip
    out = []
    for r in range(1, 9):
        cfg = calibrate([SERIES / f"qd1-r{r}", SERIES / f"qd4-r{r}"], "virtio-blk", None).config
        out.append(simulate(cfg.with_overrides(over)).summary)
    return out


@pytest.mark.parametrize("name", ["kicks", "irqs"])
def test_two_by_two_from_one_queue_timing(timed_predictions: list[dict], name: str) -> None:
    real = [qemu_per_request(p)[name] for p in sorted(TWO_BY_TWO_SERIES.iterdir())]
    model = median(s[f"{name}_per_request"] for s in timed_predictions)
    med = median(real)
    print(f"\n2 x 2 {name}/request from 1 x 1 timing: median of 8 predictions {model:.4f}, "
          f"of {len(real)} runs {med:.4f} ({model / med - 1:+.1%})")  # fmt: skip
    assert abs(model / med - 1) <= 0.10


# --- virtio-net: a ping stream per queue pair -------------------------------------------------
# The 1 x 1 run (traces/qemu-virtio-net: QEMU's user network) calibrates; the 2 x 2 run
# (traces/qemu-virtio-net-2x2: a multi-queue tap interface, one `ping -A` stream per queue
# pair, stream i on vCPU i) is predicted. The model is the transmit side: kicks and
# interrupts per transmitted packet, on the kicked (transmit) queues.
NET_ONE = TRACES / "qemu-virtio-net"
NET_TWO = TRACES / "qemu-virtio-net-2x2"


def transmit_per_request(path: Path) -> dict[str, float]:
    """Kicks and interrupts per packet on the queues the guest kicked (transmit)."""
    ev = open_trace(path).events.with_columns(pl.col("event").cast(pl.String)).collect()
    kicked = ev.filter(pl.col("event") == "virtio_queue_notify")["queue"].unique().to_list()
    tx = ev.filter(pl.col("queue").is_in(kicked))
    counts = dict(tx.group_by("event").len().iter_rows())
    pops = counts["virtqueue_pop"]
    return {"kicks": counts["virtio_queue_notify"] / pops, "irqs": counts["virtio_notify"] / pops}


def test_multi_queue_virtio_net_trace_calibrates_to_its_shape() -> None:
    cfg = calibrate([NET_TWO], "virtio-net", None).config
    assert {k: cfg[k] for k in SHAPE} == SHAPE  # two transmit queues kicked, a stream each
    assert cfg["backend.threads"] == "shared"  # QEMU's main loop pops both


def test_virtio_net_two_queue_pairs_predicted() -> None:
    one = calibrate([NET_ONE], "virtio-net", None).config
    assert (one["vm.vcpus"], one["virtqueue.queues"]) == (1, 1)
    over = {**SHAPE, "workload.requests": 8192, "workload.warmup_requests": 0}
    s = simulate(one.with_overrides(over)).summary
    real = transmit_per_request(NET_TWO)
    for name in ("kicks", "irqs"):
        model = s[f"{name}_per_request"]
        print(f"\nvirtio-net 2 x 2 {name}/packet: model {model:.4f}, run {real[name]:.4f} "
              f"({model / real[name] - 1:+.1%})")  # fmt: skip
        assert abs(model / real[name] - 1) <= 0.10
