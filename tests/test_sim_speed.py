"""A vCPU's slow stretches (``vcpu.slow_share``, ``slow_factor``, ``slow_stretch_ns``):
the state the model draws, what it slows, and the modes calibration finds."""

from __future__ import annotations

import numpy as np
import pytest
from test_sim_qemu_lock import done, scene

from vtrace.sim.qemu_timing import two_speeds
from vtrace.sim.speed import GuestSpeed, guest_speed


def test_the_slow_share_of_time_and_the_stretch_length() -> None:
    speed = GuestSpeed(0.25, 2.0, 1_000_000.0, np.random.default_rng(7))
    slow = np.array([speed.factor(t) == 2.0 for t in np.arange(0.0, 2e9, 5_000.0)])
    assert slow.mean() == pytest.approx(0.25, abs=0.03)
    edges = np.diff(slow.astype(np.int8))
    runs = (edges == -1).sum()
    assert slow.sum() * 5_000.0 / runs == pytest.approx(1_000_000.0, rel=0.15)


def test_one_speed_draws_nothing() -> None:
    rng = np.random.default_rng(1)
    assert guest_speed(0.0, 2.0, 1e6, rng) is None and guest_speed(0.5, 1.0, 1e6, rng) is None
    assert rng.random() == np.random.default_rng(1).random()  # the stream is untouched


def test_a_slow_stretch_slows_the_guests_own_work_not_its_exits() -> None:
    # 10 us of driver work per request and a 3 us kick exit; free of QEMU's lock, request
    # k is popped 1 us after it is added
    base = {"kvm.kernel_exit_ns": 3_000.0}
    pops, _, _ = done(scene(3, holds=False, **base))
    assert pops == [11_000.0, 24_000.0, 37_000.0]
    # always slow, twice as slow: 20 us of driver work, the exit still 3 us
    slow = {**base, "vcpu.slow_share": 1.0, "vcpu.slow_factor": 2.0}
    pops, _, _ = done(scene(3, holds=False, **slow))
    assert pops == [21_000.0, 44_000.0, 67_000.0]


def test_two_speeds_finds_a_fast_and_a_slow_mode() -> None:
    rng = np.random.default_rng(3)
    fast, slow = rng.normal(41_000, 1_000, 700), rng.normal(70_000, 2_000, 300)
    bound = two_speeds(np.concatenate([fast, slow]))
    assert bound is not None and 45_000 < bound < 65_000
    # one mode; and two too close to call two speeds (48 over 41 us: under 1.3 times)
    assert two_speeds(rng.normal(41_000, 2_000, 1000)) is None
    assert two_speeds(np.concatenate([fast, rng.normal(48_000, 1_000, 300)])) is None
    # too few slow lots to be a mode
    assert two_speeds(np.concatenate([fast, slow[:10]])) is None
