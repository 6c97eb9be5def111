"""The /dev/kvm lab: guest programs, option validation, and real runs of both devices.

Runs use the real /dev/kvm (marker `kvm`); every count asserted here is exact: what the VMM
counted, what the guest wrote in its own memory, and what the back end recorded.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st

from vtrace import schema
from vtrace.errors import VtraceError
from vtrace.lab import expected_userspace_exits, measure_exit_cost, run_lab, validate_options
from vtrace.lab import layout as L
from vtrace.lab.virtqueue import ring_layout

GUEST_SOURCES = sorted(L.GUEST_DIR.glob("*.asm"))


# --- guest programs -------------------------------------------------------------------------


def test_every_guest_source_has_its_bytes() -> None:
    assert {p.stem for p in GUEST_SOURCES} >= {"emulated", "virtio", "pio_loop", "spin_loop"}
    for src in GUEST_SOURCES:
        assert src.with_suffix(".bin").is_file(), f"{src.name} has no assembled .bin"


@pytest.mark.skipif(shutil.which("nasm") is None, reason="no nasm: apt-get install nasm")
@pytest.mark.parametrize("src", GUEST_SOURCES, ids=lambda p: p.stem)
def test_guest_bytes_match_their_source(src: Path, tmp_path: Path) -> None:
    out = tmp_path / f"{src.stem}.bin"
    subprocess.run(
        ["nasm", "-f", "bin", "-I", f"{L.GUEST_DIR}/", "-o", str(out), str(src)], check=True
    )
    assert out.read_bytes() == src.with_suffix(".bin").read_bytes(), (
        f"{src.with_suffix('.bin').name} is stale: run "
        f"`nasm -f bin -I {L.GUEST_DIR}/ -o {src.with_suffix('.bin')} {src}`"
    )


def test_layout_is_read_from_the_include_file() -> None:
    values = L.read_layout()
    assert values["PORT_NOTIFY"] == L.PORT_NOTIFY == 0x200
    assert values["VRING_USED_F_NO_NOTIFY"] == 1 and values["VRING_DESC_F_WRITE"] == 2
    # Parameter block, results and scratch fit between PARAM_BASE and the stack's floor.
    offsets = [v for k, v in values.items() if k[:2] in ("P_", "R_", "S_")]
    assert len(offsets) == len(set(offsets)) and max(offsets) < 0x100


@pytest.mark.parametrize("ring_size", [1, 8, 256, 32768])
def test_ring_layout_follows_the_split_ring_sizes(ring_size: int) -> None:
    r = ring_layout(ring_size, 512)
    assert r.avail >= r.desc + 16 * ring_size and r.avail % 4096 == 0
    assert r.used >= r.avail + 6 + 2 * ring_size and r.used % 4096 == 0
    assert r.data >= r.used + 6 + 8 * ring_size
    assert r.end == r.data + ring_size * 512


# --- validation -----------------------------------------------------------------------------


@given(st.integers(min_value=-5, max_value=70000))
def test_ring_size_must_be_a_power_of_two_up_to_32768(ring_size: int) -> None:
    valid = 1 <= ring_size <= 32768 and ring_size & (ring_size - 1) == 0
    try:
        validate_options("virtio", 10, 1, ring_size, 64, "poll")
    except VtraceError as e:
        assert not valid
        assert str(e).startswith("--ring-size:") and "\n" not in str(e)
    else:
        assert valid


@pytest.mark.parametrize(
    ("args", "option"),
    [
        (("disk", 10, 1, 8, 64, "poll"), "--device"),
        (("virtio", 0, 1, 8, 64, "poll"), "--requests"),
        (("virtio", 10, 0, 8, 64, "poll"), "--batch"),
        (("virtio", 10, 9, 8, 64, "poll"), "--batch"),
        (("virtio", 10, 1, 8, 0, "poll"), "--request-bytes"),
        (("virtio", 10, 1, 8, 2 << 20, "poll"), "--request-bytes"),
        (("virtio", 10, 1, 32768, 1 << 20, "poll"), "--ring-size x --request-bytes"),
        (("virtio", 10, 1, 8, 64, "spin"), "--wait"),
        (("emulated", 10, 1, 8, 64, "irq"), "--wait"),
        (("emulated", 10, 4, 8, 64, "poll"), "--batch"),
    ],
)
def test_bad_options_name_the_option(args: tuple, option: str) -> None:
    with pytest.raises(VtraceError, match=f"^{option}:"):
        validate_options(*args)


def test_cli_reports_a_bad_option_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "lab", "run", "--ring-size", "100"],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "vtrace: error: --ring-size: 100 is not a power of two between 1 and 32768"
    ]
    assert proc.stdout == ""


# --- real runs ------------------------------------------------------------------------------


def _lab_events(result, event: str) -> pl.DataFrame:
    return result.events.filter(pl.col("event") == event)


@pytest.mark.kvm
def test_emulated_device_makes_one_exit_per_register_access() -> None:
    n = 300
    r = run_lab("emulated", requests=n, request_bytes=512)
    # 3 register writes + 1 status read per request, and the final write to PORT_DONE.
    assert r.userspace_exits == expected_userspace_exits("emulated", n) == 4 * n + 1
    assert r.exit_reasons == {"KVM_EXIT_IO": 4 * n + 1}
    assert r.completed == n and r.kicks == 0 and r.interrupts == 0
    schema.validate(r.events)
    pops, completes = _lab_events(r, schema.LAB_POP), _lab_events(r, schema.LAB_COMPLETE)
    assert pops.height == completes.height == n
    assert pops["value"].to_list() == list(range(n))
    assert (pops["size"] == 512).all() and (pops["addr"] == L.RING_BASE).all()
    assert (completes["ts_ns"] > pops["ts_ns"]).all()
    assert set(r.events["source"].cast(pl.String)) == {"lab"}
    assert set(r.events["device"].cast(pl.String)) == {"lab-emulated"}
    assert 0 < r.latency_ns["p50"] <= r.latency_ns["p99"]


def _check_virtio(r, n: int, batch: int, ring_size: int) -> None:
    # No user-space exit but the final one: kicks go through the ioeventfd.
    assert r.userspace_exits == 1 and r.exit_reasons == {"KVM_EXIT_IO": 1}
    # The back end consumed exactly the kicks the guest says it made.
    assert r.kicks == r.guest_kicks
    batches = -(-n // batch)
    assert r.guest_kicks + r.kicks_suppressed == batches
    # Every request completed exactly once, in order, and the guest saw each one.
    assert r.completed == n and r.used_idx == n & 0xFFFF
    schema.validate(r.events)
    pops = _lab_events(r, schema.LAB_POP)
    assert pops["value"].to_list() == list(range(n))
    assert np.array_equal(pops["addr"].to_numpy(), np.arange(n) % ring_size)
    completes = _lab_events(r, schema.LAB_COMPLETE)
    assert completes["count"].sum() == n and completes["value"][-1] == n
    assert _lab_events(r, schema.LAB_KICK)["count"].sum() == r.kicks
    assert set(r.events["tid"]) != {r.pid}  # the back end is its own thread


@pytest.mark.kvm
@pytest.mark.parametrize(("n", "batch", "ring_size"), [(1, 1, 1), (500, 1, 16), (999, 8, 64)])
def test_virtio_polling_guest(n: int, batch: int, ring_size: int) -> None:
    r = run_lab("virtio", requests=n, batch=batch, ring_size=ring_size, request_bytes=256)
    _check_virtio(r, n, batch, ring_size)
    assert r.interrupts == r.interrupts_sent == 0  # the guest set VRING_AVAIL_F_NO_INTERRUPT


@pytest.mark.kvm
@pytest.mark.slow
def test_virtio_indices_wrap_at_16_bits() -> None:
    n = 66_000
    r = run_lab("virtio", requests=n, batch=32, ring_size=64, request_bytes=64)
    _check_virtio(r, n, 32, 64)
    assert r.used_idx == n - 65536


@pytest.mark.kvm
def test_virtio_guest_woken_by_irqfd_interrupts() -> None:
    # The guest fills the ring, kicks, then has nothing to do but wait. The back end's
    # wake-up plus writing 8 x 128 KiB takes far longer than the guest's dozen emulated
    # instructions before its first look at used.idx, so the guest has to sleep.
    n = 64
    r = run_lab("virtio", requests=n, batch=8, ring_size=8, request_bytes=128 << 10, wait="irq")
    _check_virtio(r, n, 8, 8)
    assert r.interrupts >= 1
    # Each wait that found nothing ended in hlt, and only an interrupt ends that hlt.
    assert r.interrupts == r.polls
    # One irqfd signal per published pass; several may merge while the guest runs with
    # interrupts off, so it takes at most as many as were sent.
    assert r.interrupts_sent == _lab_events(r, schema.LAB_COMPLETE).height
    assert r.interrupts <= r.interrupts_sent


@pytest.mark.kvm
def test_cli_json_has_the_documented_fields() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "lab", "run", "--device", "virtio",
         "--requests", "40", "--batch", "4", "--ring-size", "8", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    out = json.loads(proc.stdout)
    for key in ("pid", "device", "requests", "batch", "ring_size", "duration_s",
                "requests_per_s", "userspace_exits", "kicks"):  # fmt: skip
        assert key in out
    assert set(out["latency_ns"]) == {"mean", "p50", "p99"}
    assert out["device"] == "virtio" and out["requests"] == 40 and out["ring_size"] == 8
    assert out["userspace_exits"] == 1 and out["kicks"] == out["guest_kicks"]
    # CPU time over the run's window only (not the process's start-up, which alone takes
    # far longer than 40 requests): at most every CPU busy for the whole window.
    assert 0 < out["cpu_s"] <= out["duration_s"] * os.cpu_count() + 0.005


@pytest.mark.kvm
def test_cli_exit_cost_json() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "lab", "exit-cost", "--writes", "500", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    out = json.loads(proc.stdout)
    assert out["userspace"]["userspace_exits"] == 501
    assert out["ioeventfd"]["eventfd_count"] == 500 and out["ioeventfd"]["userspace_exits"] == 1
    assert out["none"]["userspace_exits"] == 1


@pytest.mark.kvm
def test_exit_cost_counts_each_write_where_it_is_handled() -> None:
    user = measure_exit_cost(2000, "userspace")
    assert user.userspace_exits == 2001 and user.eventfd_count == 0
    kernel = measure_exit_cost(2000, "ioeventfd")
    assert kernel.userspace_exits == 1 and kernel.eventfd_count == 2000
    assert user.per_write_ns > kernel.per_write_ns > 0


# --- with the collector ---------------------------------------------------------------------


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
@pytest.mark.parametrize("device", ["emulated", "virtio"])
def test_recorded_run_matches_the_vmm_counts(device: str, tmp_path: Path) -> None:
    from vtrace.store import open_trace

    out = tmp_path / "trace"
    batch = 1 if device == "emulated" else 4
    r = run_lab(device, requests=200, batch=batch, ring_size=16, request_bytes=256, record=out)
    trace = open_trace(out)
    ev = trace.events.filter(pl.col("pid") == r.pid).collect()
    by_event = ev.group_by(pl.col("event").cast(pl.String)).len()
    counts = dict(zip(by_event["event"], by_event["len"], strict=True))
    assert counts["kvm_userspace_exit"] == r.userspace_exits
    pio = ev.filter(pl.col("event") == schema.KVM_PIO)
    if device == "emulated":
        assert pio.height == r.userspace_exits
        # The device model runs in the vCPU thread: the thread KVM reports the exits for.
        exit_tids = ev.filter(pl.col("event") == schema.KVM_USERSPACE_EXIT)["tid"].unique()
        assert exit_tids.to_list() == r.events["tid"].unique().to_list()
    else:
        notify = pio.filter(pl.col("addr") == L.PORT_NOTIFY)
        assert notify.height == r.kicks == r.guest_kicks
    assert counts[schema.LAB_POP] == 200
    assert trace.meta["lost"] == 0
    lab = trace.meta["lab"]
    assert lab["userspace_exits"] == r.userspace_exits and lab["kicks"] == r.kicks
    assert lab["requests"] == 200 and lab["device"] == device
