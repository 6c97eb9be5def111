"""The split virtqueue's index arithmetic and the engine's invariants under random settings."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vtrace.sim import load_config, simulate
from vtrace.sim.virtqueue import Virtqueue, vring_need_event

u16 = st.integers(min_value=0, max_value=0xFFFF)


@given(u16, u16, st.integers(min_value=0, max_value=0x7FFF))
def test_vring_need_event_is_event_in_old_new_window(event: int, old: int, advance: int) -> None:
    new = (old + advance) & 0xFFFF
    in_window = (event - old) & 0xFFFF < advance
    assert vring_need_event(event, new, old) == in_window


def test_event_idx_kicks_once_until_the_device_rearms() -> None:
    vq = Virtqueue(ring_size=8, descs_per_request=1, event_idx=True)
    vq.enable_notification()  # device idle: kick me at the next entry
    vq.add(0)
    assert vq.kick_prepare()
    vq.add(1)
    assert not vq.kick_prepare()  # avail_event was passed already: the device is awake
    vq.pop(), vq.pop()
    vq.enable_notification()
    vq.add(2)
    assert vq.kick_prepare()


def test_used_event_suppresses_interrupts_until_the_driver_rearms() -> None:
    vq = Virtqueue(ring_size=8, descs_per_request=2, event_idx=True)
    for r in range(3):
        vq.add(r)
    assert vq.num_free == 2 and vq.has_room()
    for r in range(3):
        vq.push_used(vq.pop())
        assert vq.should_notify() == (r == 0)
    assert vq.get_used() == [0, 1, 2] and vq.num_free == 8
    vq.enable_cb()
    vq.add(3)
    vq.push_used(vq.pop())
    assert vq.should_notify()


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    model=st.sampled_from(["virtio-blk", "virtio-net", "vhost-net", "lab-virtio"]),
    ring_exp=st.integers(min_value=2, max_value=9),
    batch=st.integers(min_value=1, max_value=40),
    policy=st.sampled_from(["count", "drain", "timer"]),
    event_idx=st.booleans(),
    arrivals=st.sampled_from(["poisson", "closed", "backlog"]),
    completion=st.sampled_from(["interrupt", "poll"]),
    publish=st.sampled_from(["per_request", "per_pass"]),
    coalesce=st.sampled_from([1, 4]),
)
def test_every_request_completes_under_any_settings(
    model: str, ring_exp: int, batch: int, policy: str, event_idx: bool, arrivals: str,
    completion: str, publish: str, coalesce: int,
) -> None:  # fmt: skip
    ring = 1 << ring_exp
    cfg = load_config(model)
    descs = cfg["virtqueue.descs_per_request"]
    if descs > ring or (cfg["virtqueue.whole_batches"] and batch * descs > ring):
        return
    over = {
        "workload.requests": 300, "workload.warmup_requests": 0, "workload.arrivals": arrivals,
        "virtqueue.ring_size": ring, "virtqueue.batch": batch, "virtqueue.batch_policy": policy,
        "virtqueue.batch_timer_ns": 20_000.0, "virtqueue.event_idx": event_idx,
        "interrupt.completion": completion, "backend.publish": publish,
        "interrupt.coalesce_requests": coalesce,
    }  # fmt: skip
    s = simulate(load_config(model, over))
    f = s.requests
    assert s.summary["completed"] == 300 == f["complete_ns"].is_not_null().sum()
    assert (f["start_ns"] >= f["submit_ns"]).all() and (f["complete_ns"] >= f["start_ns"]).all()
    assert s.summary["kicks_per_request"] <= 1.0
    if completion == "poll":
        assert s.summary["irqs_per_request"] == 0


@settings(max_examples=30, deadline=None)
@given(
    model=st.sampled_from(["ide-emulated", "e1000-emulated", "lab-emulated"]),
    outstanding=st.integers(min_value=1, max_value=64),
    arrivals=st.sampled_from(["poisson", "closed", "backlog"]),
    completion=st.sampled_from(["interrupt", "poll"]),
    coalesce_ns=st.sampled_from([0.0, 30_000.0]),
)
def test_every_emulated_request_completes_under_any_settings(
    model: str, outstanding: int, arrivals: str, completion: str, coalesce_ns: float
) -> None:
    over = {
        "workload.requests": 200, "workload.warmup_requests": 0, "workload.arrivals": arrivals,
        "device.max_outstanding": outstanding, "interrupt.completion": completion,
        "interrupt.coalesce_ns": coalesce_ns,
    }  # fmt: skip
    r = simulate(load_config(model, over))
    assert r.summary["completed"] == 200
    per_request = sum(a["count"] for a in load_config(model)["device.accesses"])
    assert r.requests["exits"].min() >= per_request
