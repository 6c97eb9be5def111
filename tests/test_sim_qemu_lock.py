"""QEMU's big lock under TCG, as the model holds it (``backend.holds_kicks``): the main
loop holds it while it pops, while it completes each request (``backend.complete_ns``)
and on its way back to its poll (``backend.idle_ns``). A vCPU needs it to write a kick;
when the main loop lets go, the scheduler runs the waiting vCPU thread
``backend.lock_wake_ns`` later. An interrupt raised meanwhile is injected when the main
loop lets go (it reads the queue's guest notifier in its poll): a running vCPU takes it
then, a halted one ``lock_wake_ns`` later.

The scene: requests ready at once, 10 us of guest work each, one kick decision per
request; the back end wakes at once, pops in 1 us, hands the pass to the device as one
I/O of 2 us, and completes each request in 5 us. Handlers and injection cost nothing.
"""

from __future__ import annotations

from vtrace.sim import load_config, simulate


def scene(requests: int, holds: bool, **extra: object) -> dict:
    return {
        "workload.arrivals": "backlog",
        "workload.requests": requests,
        "workload.warmup_requests": 0,
        "vcpu.request_prep_ns": 10_000.0,
        "vcpu.batch_prep_ns": 0.0,
        "kvm.kernel_exit_ns": 0.0,
        "virtqueue.batch": 1,
        "virtqueue.batch_policy": "count",
        "backend.wakeup_ns": 0.0,
        "backend.per_request_ns": 1_000.0,
        "backend.submit": "pass",
        "backend.publish": "per_request",
        "backend.holds_kicks": holds,
        "backend.complete_ns": 5_000.0,
        "device.max_outstanding": 8,
        "device.service_distribution": "deterministic",
        "device.service_ns": 2_000.0,
        "interrupt.injection_ns": 0.0,
        "interrupt.delivery_ns": 0.0,
        "interrupt.guest_handler_ns": 0.0,
        "interrupt.accesses": [],
        **extra,
    }


def done(cfg: dict) -> tuple[list[float], list[float], float]:
    """Each request's pop end and completion (ns), and interrupts per request."""
    r = simulate(load_config("virtio-blk", cfg))
    frame = r.requests.sort("request")
    return (
        frame["start_ns"].to_list(),
        frame["complete_ns"].to_list(),
        r.summary["irqs_per_request"],
    )


def test_an_interrupt_raised_under_the_lock_is_taken_when_it_is_free() -> None:
    # request 1: added at 10, popped 10-11, its I/O done at 13, completed 13-18: the
    # interrupt is raised at 18 and, free, taken at once
    _, free, free_irqs = done(scene(1, holds=False))
    assert free == [18_000.0] and free_irqs == 1.0
    # held: the main loop holds the lock at 18; it lets go at once (idle_ns 0) and the
    # vCPU thread runs 4 us later
    _, held, _ = done(scene(1, holds=True, **{"backend.lock_wake_ns": 4_000.0}))
    assert held == [22_000.0]
    # with 6 us on its way back to its poll after each piece of work: after the pass
    # (11-17; the I/O that ended at 13 waits for it), then after the completion (22-28)
    _, later, _ = done(
        scene(1, holds=True, **{"backend.lock_wake_ns": 4_000.0, "backend.idle_ns": 6_000.0})
    )
    assert later == [32_000.0]


def test_a_running_vcpu_goes_on_while_its_interrupt_waits_for_the_lock() -> None:
    # request 2's guest work runs 10-20; free, it is added at 20 and popped 20-21
    free_pop, free_done, _ = done(scene(2, holds=False))
    assert free_pop == [11_000.0, 21_000.0] and free_done == [18_000.0, 28_000.0]
    # held: request 1's interrupt is raised at 18 under the lock. Without KVM's irqfd the
    # main loop injects it when it is back in its poll, which it is at once (idle_ns 0):
    # the running vCPU takes it then, without waiting for the scheduler, and its work on
    # request 2 goes on undisturbed (added at 20, popped 20-21, I/O to 23, completed 23-28).
    # Request 2's interrupt finds the vCPU halted: its thread runs 4 us later
    held_pop, held_done, _ = done(scene(2, holds=True, **{"backend.lock_wake_ns": 4_000.0}))
    assert held_pop == [11_000.0, 21_000.0] and held_done == [18_000.0, 32_000.0]


def test_completions_under_the_lock_share_one_interrupt() -> None:
    # 0.5 us of guest work: one pass takes both (popped 0.5-1.5 and 1.5-2.5), one I/O to
    # 4.5, completions 4.5-9.5 and 9.5-14.5
    fast = {"vcpu.request_prep_ns": 500.0, "backend.lock_wake_ns": 4_000.0}
    _, free, free_irqs = done(scene(2, holds=False, **fast))
    # free: the guest takes request 1 at once and asks for the next interrupt: two
    assert free == [9_500.0, 14_500.0] and free_irqs == 1.0
    # held: the guest takes neither until the lock is free (14.5 + 4): one interrupt
    _, held, held_irqs = done(scene(2, holds=True, **fast))
    assert held == [18_500.0, 18_500.0] and held_irqs == 0.5


def test_a_held_kick_is_written_and_returns_once_the_vcpu_has_the_lock() -> None:
    # 10 us I/O, a kick's exit 3 us. Request 1: added at 10, its kick's exit 10-13, popped
    # 10-11, I/O to 21, completed 21-26 under the lock. Request 2 is added at 23 and its
    # kick waits for the lock (free at 26, the vCPU runs at 30); only then does the write
    # go through and the exit return: 30-33, the back end pops it 30-31. Request 3's work
    # then runs 33-43; its kick finds request 2 completing (41-46) and waits until 50.
    free = {"backend.lock_wake_ns": 4_000.0, "device.service_ns": 10_000.0}
    pops, _, _ = done(scene(3, holds=True, **free, **{"kvm.kernel_exit_ns": 3_000.0}))
    assert pops == [11_000.0, 31_000.0, 51_000.0]
    # an exit taken while the vCPU waited (before the write) would let request 3's work
    # start at 30: added at 40, popped 40-41
