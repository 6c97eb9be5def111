"""When the back end moves ``avail_event`` (EVENT_IDX): only when it goes idle, as Linux's
vhost and QEMU virtio-blk do, or after every pop as well, as a back end that pops with
kicks on does (QEMU's ``virtqueue_split_pop`` writes it then; virtio-blk turns kicks off
for its pass).

With ``backend.avail_event = "pop"`` an add that finds the back end caught up (everything
published so far popped) kicks, even while the back end is still busy with its pass; with
``"idle"`` the adds made during a pass never kick. Four requests ready at once, 10 us of
guest work each; the back end pops each in 2 us and then spends 30 us on the pass
(QEMU submits a pass's reads at its end), so requests 2 to 4 are added during the pass.
"""

from __future__ import annotations

import pytest

from vtrace.errors import VtraceError
from vtrace.sim import load_config, simulate


def four_requests(avail_event: str, **extra: object) -> dict:
    """The scene above: four requests ready at once, each pop 2 us, each pass 30 us more."""
    return {
        "workload.arrivals": "backlog",
        "workload.requests": 4,
        "workload.warmup_requests": 0,
        "vcpu.request_prep_ns": 10_000.0,
        "vcpu.batch_prep_ns": 0.0,
        "virtqueue.batch": 1,
        "virtqueue.batch_policy": "count",
        "backend.wakeup_ns": 0.0,
        "backend.per_request_ns": 2_000.0,
        "backend.per_pass_ns": 30_000.0,
        "backend.avail_event": avail_event,
        "device.max_outstanding": 8,
        "device.service_distribution": "deterministic",
        "device.service_ns": 1_000_000.0,
        **extra,
    }


def run(avail_event: str) -> dict:
    return simulate(load_config("virtio-blk", four_requests(avail_event))).summary


def test_idle_back_end_moves_avail_event_only_when_it_sleeps() -> None:
    # request 1 kicks; 2, 3 and 4 are added during the pass it started, which takes them
    s = run("idle")
    assert s["kicks_per_request"] == pytest.approx(1 / 4)


def test_pop_back_end_is_kicked_by_the_add_that_finds_it_caught_up() -> None:
    # request 1 kicks; the pass pops it (avail_event 1) and works 30 us; request 2, added
    # 10 us later, is the entry avail_event names: it kicks although the pass still runs;
    # 3 and 4 find the back end behind and do not
    s = run("pop")
    assert s["kicks_per_request"] == pytest.approx(2 / 4)
    assert s["completed"] == 4


def test_avail_event_takes_idle_or_pop() -> None:
    with pytest.raises(VtraceError, match=r"backend\.avail_event"):
        load_config("virtio-blk", {"backend.avail_event": "never"})


def test_a_kick_the_back_end_holds_waits_with_its_vcpu() -> None:
    # backend.holds_kicks (QEMU's big lock under TCG): request 2's kick is written during
    # the pass request 1 started; it waits, and the vCPU with it, until the back end is back
    # in its poll, after that pass and the one that takes request 2 (32 us each)
    def pops(holds: bool) -> tuple[list[float], int]:
        over = {"backend.holds_kicks": holds, "kvm.kernel_exit_ns": 0.0}
        r = simulate(load_config("virtio-blk", four_requests("pop", **over)))
        assert r.summary["completed"] == 4
        return r.requests.sort("request")["start_ns"].to_list(), int(r.requests["kicks"].sum())

    (free, free_kicks), (held, held_kicks) = pops(False), pops(True)
    # free: requests 3 and 4, added at 30 and 40 us, go in the pass request 2 started
    assert free == [12_000.0, 44_000.0, 46_000.0, 48_000.0] and free_kicks == 2
    # held: request 3 is added only when the pass that took request 2 has ended (76 us),
    # 10 us later; each add then finds the back end asleep and kicks
    assert held[:2] == free[:2]
    assert held[2] == 86_000.0 and held_kicks == 4
