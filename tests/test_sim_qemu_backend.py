"""Model keys for a QEMU back end under a slow guest: a pass submitted as one merged I/O
(``backend.submit``), a measured wake-up law (``backend.wakeup_quantiles_ns``) and the
extra delivery of an interrupt to a halted vCPU (``interrupt.halted_wake_ns``)."""

from __future__ import annotations

import numpy as np
import pytest

from vtrace.errors import VtraceError
from vtrace.sim import load_config, simulate
from vtrace.sim.draws import from_quantiles

SERVICE_NS = 50_000.0
PER_BYTE_NS = 0.5  # 2,048 ns per 4 KiB request


def backlog(submit: str, **extra: object) -> dict:
    """Eight requests ready at once; the back end wakes 100 us after the first kick, when
    the guest (1 us per request) has added all eight."""
    return {
        "workload.arrivals": "backlog",
        "workload.requests": 8,
        "workload.warmup_requests": 0,
        "vcpu.request_prep_ns": 1000.0,
        "vcpu.batch_prep_ns": 0.0,
        "virtqueue.batch": 1,
        "virtqueue.batch_policy": "count",
        "backend.wakeup_ns": 100_000.0,
        "backend.per_request_ns": 1000.0,
        "backend.submit": submit,
        "device.max_outstanding": 64,
        "device.service_distribution": "deterministic",
        "device.service_ns": SERVICE_NS,
        "device.per_byte_ns": PER_BYTE_NS,
        "interrupt.injection_ns": 0.0,
        "interrupt.delivery_ns": 0.0,
        "interrupt.guest_handler_ns": 0.0,
        "interrupt.accesses": [],  # completion = the I/O's end, nothing after it
        **extra,
    }


def test_a_pass_goes_to_the_device_as_one_merged_io() -> None:
    r = simulate(load_config("virtio-blk", backlog("pass")))
    frame = r.requests
    # one I/O: every request starts and completes together, under one interrupt
    assert frame["start_ns"].n_unique() == 1
    assert frame["complete_ns"].n_unique() == 1
    assert r.summary["irqs_per_request"] == pytest.approx(1 / 8)
    # the I/O: one service draw (the first request's bytes in it) plus 7 more requests' bytes
    io_ns = SERVICE_NS + 8 * 4096 * PER_BYTE_NS
    each = simulate(load_config("virtio-blk", backlog("each", **{"device.max_outstanding": 1})))
    assert each.requests["start_ns"].n_unique() == 8  # one at a time, each its own I/O
    first_done = frame["complete_ns"][0] - frame["start_ns"][0]
    # the completion wakes the sleeping back end (100 us) before the guest takes it back
    assert first_done == pytest.approx(io_ns + 100_000.0)


def test_halted_vcpu_takes_its_interrupt_later() -> None:
    # depth 1, one request at a time: the guest halts while each is served
    base = {
        "workload.arrivals": "closed",
        "workload.queue_depth": 1,
        "workload.requests": 200,
        "workload.warmup_requests": 0,
        "backend.wakeup_ns": 0.0,
        "device.service_distribution": "deterministic",
    }
    fast = simulate(load_config("virtio-blk", base)).requests
    slow = simulate(load_config("virtio-blk", {**base, "interrupt.halted_wake_ns": 20_000.0}))
    gap = slow.requests["latency_ns"].mean() - fast["latency_ns"].mean()
    assert gap == pytest.approx(20_000.0)


def test_wakeups_drawn_from_measured_quantiles() -> None:
    q = (10_000.0, 30_000.0, 30_000.0, 40_000.0, 200_000.0)
    draws = from_quantiles(q, np.random.default_rng(7))
    x = np.array([draws.next() for _ in range(200_000)])
    assert x.min() >= 10_000.0 and x.max() <= 200_000.0
    # piecewise linear between the quantiles: a quarter of the mass in each segment
    assert np.mean(x <= 30_000.0) == pytest.approx(0.5, abs=0.01)
    assert np.mean(x) == pytest.approx((20_000 + 30_000 + 35_000 + 120_000) / 4, rel=0.01)


def test_the_law_replaces_wakeup_ns() -> None:
    law = [40_000.0, 40_000.0]  # every wake-up 40 us
    over = {"backend.wakeup_ns": 1_000.0, "backend.wakeup_quantiles_ns": law}
    cfg = load_config("virtio-blk", backlog("pass", **over))
    first_start = simulate(cfg).requests["start_ns"][0]
    assert first_start == pytest.approx(1_000.0 + 40_000.0 + 8 * 1_000.0, abs=1_500.0)


def test_per_request_law_replaces_per_request_ns() -> None:
    # every pop takes 5 us from the law, not the 1 us of per_request_ns: the merged I/O of
    # the eight starts when the eighth pop's work is done
    law = {"backend.per_request_quantiles_ns": [5_000.0, 5_000.0]}
    starts = simulate(load_config("virtio-blk", backlog("pass", **law))).requests["start_ns"]
    plain = simulate(load_config("virtio-blk", backlog("pass"))).requests["start_ns"]
    assert starts[0] - plain[0] == pytest.approx(8 * (5_000.0 - 1_000.0))


@pytest.mark.parametrize(
    ("law", "message"),
    [
        ([5.0], "give 2 to 101 quantiles"),
        ([5.0, 4.0], "quantiles must ascend"),
        ([-1.0, 4.0], "must be 0 to"),
        (["a", 4.0], "expected a number of ns"),
    ],
)
def test_bad_quantiles_are_one_line_errors(law: list, message: str) -> None:
    with pytest.raises(VtraceError, match=message):
        load_config("virtio-blk", {"backend.wakeup_quantiles_ns": law})


def test_with_no_host_cpu_free_the_wake_up_is_the_preempting_law() -> None:
    # one host CPU for the vCPU and the back end: the first kick comes while the vCPU still
    # adds (it holds the CPU), so the back end's wake-up is drawn from the pre-empting law
    laws = {
        "backend.wakeup_quantiles_ns": [1_000.0, 1_000.0],
        "backend.preempt_wakeup_quantiles_ns": [50_000.0, 50_000.0],
    }

    def first_pop(host_cpus: int) -> float:
        cfg = load_config("virtio-blk", backlog("pass", **laws, **{"vm.host_cpus": host_cpus}))
        return simulate(cfg).requests["start_ns"].min()

    # a CPU each: the ordinary law, 1 us after the first kick; one CPU: 50 us after it
    assert first_pop(1) - first_pop(0) == pytest.approx(49_000.0, abs=100.0)
