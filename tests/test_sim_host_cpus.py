"""A host with fewer CPUs than the VM has threads (``vm.host_cpus``): the back end's work
takes a CPU from a running vCPU, as the scheduler's wake-up pre-emption does.

When every thread is busy all the time the run is CPU-bound and its throughput has a closed
form: the host's CPUs divided by the CPU time one request costs, guest and back end
together. With a CPU per thread, the slowest thread sets it instead.
"""

from __future__ import annotations

import pytest

from vtrace.errors import VtraceError
from vtrace.sim import load_config, simulate

PREP_NS = 3000.0  # guest CPU per request
SERVE_NS = 1000.0  # back-end CPU per request

# two polling vCPUs that never wait (a ring far larger than what is in flight), one back-end
# thread, and nothing else that costs time: kicks, wake-ups and reaps are free
BUSY = {
    "vm.vcpus": 2, "virtqueue.queues": 2, "backend.threads": "shared",
    "virtqueue.ring_size": 4096, "virtqueue.batch": 1, "virtqueue.whole_batches": False,
    "vcpu.request_prep_ns": PREP_NS, "vcpu.batch_prep_ns": 0.0, "vcpu.poll_ns": 0.0,
    "vcpu.reap_ns": 0.0, "kvm.kernel_exit_ns": 0.0, "backend.wakeup_ns": 0.0,
    "backend.stall_probability": 0.0, "backend.per_request_ns": SERVE_NS,
    "backend.per_pass_ns": 0.0, "workload.requests": 20_000,
}  # fmt: skip


def run(**overrides: object) -> dict:
    cfg = load_config("lab-virtio").with_overrides({**BUSY, **overrides})
    return simulate(cfg).summary


def test_a_cpu_per_thread_is_the_default() -> None:
    s = run()
    # the two vCPUs are the bottleneck: 2 / 3 us
    assert s["throughput_rps"] == pytest.approx(2 / PREP_NS * 1e9, rel=0.01)
    assert s["vcpu_preempted_share"] == 0.0


def test_two_cpus_for_three_busy_threads_share_the_work() -> None:
    s = run(**{"vm.host_cpus": 2})
    # CPU-bound: 2 CPUs / (3 us guest + 1 us back end) per request
    assert s["throughput_rps"] == pytest.approx(2 / (PREP_NS + SERVE_NS) * 1e9, rel=0.01)
    # the back end ran on the vCPUs' CPUs: a quarter of their time
    assert s["vcpu_preempted_share"] == pytest.approx(SERVE_NS / (PREP_NS + SERVE_NS), rel=0.02)
    assert s["host_cpus"] == 2


def test_enough_cpus_change_nothing() -> None:
    free = run()
    three = run(**{"vm.host_cpus": 3})
    assert three["throughput_rps"] == pytest.approx(free["throughput_rps"], rel=1e-9)
    assert three["vcpu_preempted_share"] == 0.0


def test_per_queue_back_ends_take_a_cpu_each() -> None:
    # 2 vCPUs and 2 back-end threads on 2 CPUs: still CPU-bound on the same total work
    s = run(**{"vm.host_cpus": 2, "backend.threads": "per_queue"})
    assert s["throughput_rps"] == pytest.approx(2 / (PREP_NS + SERVE_NS) * 1e9, rel=0.01)


def test_a_waiting_guest_leaves_its_cpu_to_the_back_end() -> None:
    # one job at depth 1 on an interrupt-driven guest: the vCPU halts while the request is
    # served, so one host CPU is enough and nothing is pre-empted
    over = {
        "workload.arrivals": "closed", "workload.queue_depth": 1, "workload.requests": 2000,
        "workload.warmup_requests": 0,
    }  # fmt: skip
    free = simulate(load_config("virtio-blk").with_overrides(over)).summary
    one = simulate(load_config("virtio-blk").with_overrides({**over, "vm.host_cpus": 1})).summary
    assert one["vcpu_preempted_share"] == 0.0
    assert one["throughput_rps"] == pytest.approx(free["throughput_rps"], rel=1e-9)


def test_fewer_cpus_than_vcpus_is_one_line() -> None:
    with pytest.raises(VtraceError, match=r"vm\.host_cpus.*fewer host CPUs than vCPUs"):
        run(**{"vm.host_cpus": 1})
