"""The interrupt path's timing: an interrupt on its way to the guest takes the vCPU only
from when its handler starts.

Between the back end's injection and the handler (``interrupt.delivery_ns``) the vCPU goes
on with guest code: it builds and adds requests and kicks. Completions the back end puts on
the used ring in that time raise no interrupt of their own (EVENT_IDX: ``used_event`` moves
only when the handler has taken the used buffers back), so how many completions share an
interrupt comes out of the delivery and handler times.
"""

from __future__ import annotations

import polars as pl

from vtrace.sim import load_config, simulate

GAP_NS = 100_000.0  # a request every 100 us
DELIVERY_NS = 150_000.0  # longer than the gap: the next request arrives while one is pending


def run(delivery_ns: float) -> tuple[pl.DataFrame, dict]:
    cfg = load_config(
        "virtio-blk",
        {
            "workload.arrivals": "deterministic",
            "workload.arrival_rate_per_s": 1e9 / GAP_NS,
            "workload.requests": 200,
            "workload.warmup_requests": 0,
            "vcpu.request_prep_ns": 1000.0,
            "vcpu.batch_prep_ns": 0.0,
            "virtqueue.batch": 1,
            "virtqueue.batch_policy": "count",
            "backend.wakeup_ns": 0.0,
            "backend.per_request_ns": 1000.0,
            "device.service_distribution": "deterministic",
            "device.service_ns": 10_000.0,
            "interrupt.injection_ns": 0.0,
            "interrupt.delivery_ns": delivery_ns,
            "interrupt.guest_handler_ns": 1000.0,
        },
    )
    r = simulate(cfg)
    return r.requests, r.summary


def test_vcpu_keeps_submitting_while_an_interrupt_is_on_its_way() -> None:
    frame, _ = run(DELIVERY_NS)
    # arrival to the back end's pop: the guest's 1 us of work, the kick's exit, the pop;
    # never the 150 us the interrupt takes to arrive
    wait = frame.select((pl.col("start_ns") - pl.col("submit_ns")).max()).item()
    assert wait < 5_000.0, wait


def test_completions_before_the_handler_share_its_interrupt() -> None:
    _, fast = run(500.0)
    _, slow = run(DELIVERY_NS)
    assert fast["irqs_per_request"] == 1.0  # each completion finds the handler re-armed
    # every second request completes while the previous one's interrupt is on its way
    assert 0.45 <= slow["irqs_per_request"] <= 0.55, slow["irqs_per_request"]
    assert slow["completed"] == 200
