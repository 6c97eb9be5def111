"""The model with several vCPUs, queues, back-end threads and requests in flight at the device,
batching that comes out of timing, and its bounded monitors."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtrace.sim import load_config, simulate
from vtrace.sim import monitors as monitors_module

BLK = {"workload.requests": 8000, "workload.warmup_requests": 500}


def run(**overrides: object) -> dict:
    return simulate(load_config("virtio-blk", {**BLK, **overrides})).summary


def test_each_vcpu_submits_to_its_own_queue_and_every_request_completes() -> None:
    s = run(**{"vm.vcpus": 4, "virtqueue.queues": 2, "workload.jobs": 4})
    assert s["completed"] == 8000 and s["vcpus"] == 4 and s["queues"] == 2
    per_queue = {q["queue"]: q["requests"] for q in s["per_queue"]}
    # jobs 0 and 2 run on vCPUs 0 and 2, which share queue 0; jobs 1 and 3 queue 1
    assert sum(per_queue.values()) == 8000
    assert abs(per_queue[0] - per_queue[1]) < 0.1 * 8000


def test_a_thread_per_queue_beats_one_shared_thread_when_the_back_end_is_the_bottleneck() -> None:
    over = {"vm.vcpus": 4, "virtqueue.queues": 4, "workload.jobs": 4, "device.service_ns": 0.0,
            "backend.per_request_ns": 4000.0}  # fmt: skip
    shared = run(**over, **{"backend.threads": "shared"})
    per_queue = run(**over, **{"backend.threads": "per_queue"})
    # four threads serve four queues at once: close to four times the requests per second
    assert per_queue["throughput_rps"] > 3 * shared["throughput_rps"]
    # the shared thread's time per request: its work plus the irqfd writes it makes
    per_request_ns = 4000.0 + 1000.0 * shared["irqs_per_request"]
    assert shared["throughput_rps"] == pytest.approx(1e9 / per_request_ns, rel=0.05)


def test_the_device_serves_max_outstanding_at_once_and_completes_out_of_order() -> None:
    one = simulate(load_config("virtio-blk", BLK))
    many = simulate(load_config("virtio-blk", {**BLK, "device.max_outstanding": 32}))
    assert many.summary["device_most_in_service"] <= 32
    assert many.summary["throughput_rps"] > 1.5 * one.summary["throughput_rps"]
    f = many.requests.drop_nulls("start_ns")
    order_started = np.argsort(f["start_ns"].to_numpy(), kind="stable")
    order_done = np.argsort(f["complete_ns"].to_numpy(), kind="stable")
    assert not np.array_equal(order_started, order_done)  # exponential service: overtaking


def test_a_polling_back_end_takes_no_kicks_and_spends_its_core() -> None:
    s = run(**{"backend.mode": "poll", "backend.poll_ns": 200.0})
    assert s["kicks_per_request"] == 0 and s["backend_wakeups_per_request"] == 0
    assert s["backend_utilization"] == 1.0
    assert s["completed"] == 8000


def test_max_per_pass_shares_one_thread_between_queues() -> None:
    over = {"vm.vcpus": 2, "virtqueue.queues": 2, "workload.jobs": 2, "workload.queue_depth": 32,
            "backend.publish": "per_pass"}  # fmt: skip
    unlimited = run(**over)
    weighted = run(**over, **{"backend.max_per_pass": 1})
    # a pass of one request each: more passes, so more interrupt decisions per request
    assert weighted["irqs_per_request"] > unlimited["irqs_per_request"]
    assert weighted["completed"] == unlimited["completed"] == 8000


def test_kicks_are_suppressed_while_the_back_end_still_pops() -> None:
    """The guest publishes avail.idx per add: a back end still popping takes what arrives
    without a kick, so kicks per request fall as the guest adds faster than the back end
    serves (batching from timing, with no batch parameter: every add may kick)."""
    base = {"virtqueue.batch": 1, "virtqueue.batch_policy": "count", "workload.queue_depth": 16,
            "device.service_ns": 0.0, "vcpu.request_prep_ns": 500.0}  # fmt: skip
    slow_back_end = run(**base, **{"backend.per_request_ns": 5000.0})
    fast_back_end = run(**base, **{"backend.per_request_ns": 50.0, "backend.wakeup_ns": 0.0})
    assert slow_back_end["kicks_per_request"] < 0.2
    assert fast_back_end["kicks_per_request"] > 2 * slow_back_end["kicks_per_request"]


def test_batch_submission_kicks_once_per_dispatch() -> None:
    over = {"workload.submit": "batch", "workload.queue_depth": 8, "virtqueue.batch": 64,
            "virtqueue.batch_policy": "drain"}  # fmt: skip
    whole = run(**over)
    split = run(**over, **{"workload.dispatch_splits": 1.0})
    assert whole["kicks_per_request"] == pytest.approx(1 / 8, rel=0.02)
    # a Poisson(1) number of early ends per submission of 8, each one more dispatch; its kick
    # is needed unless the back end is still serving the first part when the rest comes
    assert 1.2 / 8 < split["kicks_per_request"] < 2.05 / 8


def test_bounded_monitors_agree_with_the_exact_run(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = load_config("virtio-net", {"workload.requests": 30_000, "workload.warmup_requests": 1000})
    exact = simulate(cfg).summary
    monkeypatch.setattr(monitors_module, "EXACT_REQUESTS", 2000)
    bounded = simulate(cfg)
    s = bounded.summary
    assert bounded.requests.height == 2000
    for key in ("completed", "measured_requests", "throughput_rps", "kicks_per_request",
                "irqs_per_request", "exits_per_request"):  # fmt: skip
        assert s[key] == pytest.approx(exact[key], rel=1e-9), key
    assert s["latency_ns"]["mean"] == pytest.approx(exact["latency_ns"]["mean"], rel=1e-9)
    for q in ("p50", "p90", "p99"):  # a 1 % log histogram
        assert s["latency_ns"][q] == pytest.approx(exact["latency_ns"][q], rel=0.02), q


def test_replay_says_what_load_it_offered_and_what_its_latency_means() -> None:
    closed = run(**{"workload.jobs": 2, "vm.vcpus": 2})
    assert closed["offered"] == {"arrivals": "closed", "jobs": 2, "queue_depth": 32,
                                 "submit": "each", "requests_in_flight": 64}  # fmt: skip
    assert closed["ring_room_requests"] == 256 // 3  # 3 descriptors a request
    assert "latency_is" not in closed and "makespan_ns" not in closed
    poisson = run(**{"workload.arrivals": "poisson", "workload.arrival_rate_per_s": 20_000.0})
    assert poisson["offered"]["rate_per_s"] == pytest.approx(20_000.0)
    backlog = simulate(load_config("lab-virtio", {"workload.requests": 2000})).summary
    assert backlog["latency_is"].startswith("time since the start")
    assert backlog["makespan_ns"] == pytest.approx(backlog["latency_ns"]["p99"], rel=0.05)
    from vtrace.sim.report import summary_table

    table = summary_table(backlog)
    labels = table.columns[0]._cells
    assert "completion since start p99" in labels and "latency p99" not in labels
    assert "makespan" in labels and "ring room" in labels and "offered load" in labels


@pytest.mark.parametrize("completion", ["interrupt", "poll"])
def test_split_dispatches_complete_with_either_completion(completion: str) -> None:
    # Before: a polling guest whose dispatch was split waited for an interrupt forever.
    over = {"workload.submit": "batch", "workload.queue_depth": 8, "virtqueue.batch": 64,
            "virtqueue.batch_policy": "drain", "workload.dispatch_splits": 2.0,
            "interrupt.completion": completion}  # fmt: skip
    assert run(**over)["completed"] == 8000


@settings(max_examples=25, deadline=None)
@given(
    vcpus=st.integers(min_value=1, max_value=4),
    queues=st.integers(min_value=1, max_value=4),
    jobs=st.integers(min_value=1, max_value=4),
    threads=st.sampled_from(["shared", "per_queue"]),
    mode=st.sampled_from(["notify", "poll"]),
    outstanding=st.sampled_from([1, 4]),
    max_per_pass=st.sampled_from([0, 1, 3]),
    submit=st.sampled_from(["each", "batch"]),
    splits=st.sampled_from([0.0, 1.5]),
    completion=st.sampled_from(["interrupt", "poll"]),
    publish=st.sampled_from(["per_request", "per_pass"]),
    arrivals=st.sampled_from(["closed", "poisson", "backlog"]),
)
def test_every_request_completes_in_any_shape(
    vcpus: int, queues: int, jobs: int, threads: str, mode: str, outstanding: int,
    max_per_pass: int, submit: str, splits: float, completion: str, publish: str, arrivals: str,
) -> None:  # fmt: skip
    over = {
        "workload.requests": 400, "workload.warmup_requests": 0, "workload.queue_depth": 4,
        "vm.vcpus": vcpus, "virtqueue.queues": queues, "workload.jobs": jobs,
        "backend.threads": threads, "backend.mode": mode, "device.max_outstanding": outstanding,
        "backend.max_per_pass": max_per_pass, "workload.submit": submit,
        "workload.dispatch_splits": splits, "interrupt.completion": completion,
        "backend.publish": publish, "workload.arrivals": arrivals,
        "virtqueue.batch_policy": "drain",
    }  # fmt: skip
    r = simulate(load_config("virtio-blk", over))
    assert r.summary["completed"] == 400
    f = r.requests
    assert (f["start_ns"] >= f["submit_ns"]).all() and (f["complete_ns"] >= f["start_ns"]).all()
    assert sum(q["requests"] for q in r.summary.get("per_queue", [{"requests": 400}])) == 400
