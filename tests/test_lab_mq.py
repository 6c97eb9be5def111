"""The lab with several vCPUs and virtqueues: vCPU v submits to queue v mod queues, each queue
has its own ring, notify port (an ioeventfd) and completions, and the back end serves them
from one thread or one thread per queue.

Runs use the real /dev/kvm (marker `kvm`); every count asserted is exact, per queue: what the
guest's vCPUs wrote in their own parameter blocks, what the back end consumed and recorded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from vtrace import schema
from vtrace.errors import VtraceError
from vtrace.lab import layout as L
from vtrace.lab import run_lab, validate_options
from vtrace.lab.backend import notify_port, split_requests


@pytest.mark.parametrize(
    ("shape", "option"),
    [
        ((0, 1, "shared"), "--vcpus"),
        ((L.MAX_VCPUS + 1, 1, "shared"), "--vcpus"),
        ((2, 3, "shared"), "--queues"),
        ((2, 0, "shared"), "--queues"),
        ((2, 2, "per_queue"), "--backend-threads"),
    ],
)
def test_bad_shapes_name_the_option(shape: tuple, option: str) -> None:
    with pytest.raises(VtraceError, match=f"^{option}:"):
        validate_options("virtio", 10, 1, 8, 64, "poll", *shape)


def test_irq_and_emulated_need_one_vcpu() -> None:
    with pytest.raises(VtraceError, match=r"^--wait: irq needs --vcpus 1"):
        validate_options("virtio", 10, 1, 8, 64, "irq", 2, 2)
    with pytest.raises(VtraceError, match=r"^--vcpus: the emulated device"):
        validate_options("emulated", 10, 1, 1, 64, "poll", 2, 1)
    with pytest.raises(VtraceError, match=r"^--ring-size x --request-bytes x --queues:"):
        validate_options("virtio", 10, 1, 32768, 8192, "poll", 2, 2)


def test_requests_split_like_the_models_backlog() -> None:
    # the model gives request i to vCPU i mod vcpus
    assert (
        split_requests(10, 3)
        == [4, 3, 3]
        == [sum(1 for i in range(10) if i % 3 == v) for v in range(3)]
    )
    assert split_requests(1, 2) == [1, 0]
    assert [notify_port(q) for q in range(3)] == [0x200, 0x202, 0x204]


def _check(r, n: int, batch: int, ring_size: int, vcpus: int, queues: int) -> None:
    assert (r.vcpus, r.queues) == (vcpus, queues)
    # one user-space exit per vCPU (its done write): every kick stays in the kernel
    assert r.userspace_exits == vcpus and r.exit_reasons == {"KVM_EXIT_IO": vcpus}
    assert r.completed == n and r.kicks == r.guest_kicks and r.used_idx == n & 0xFFFF
    schema.validate(r.events)
    shares = split_requests(n, vcpus)
    assert [q["queue"] for q in r.per_queue] == list(range(queues))
    for q in r.per_queue:
        mine = [v for v in range(vcpus) if v % queues == q["queue"]]
        assert q["vcpus"] == mine and q["requests"] == sum(shares[v] for v in mine)
        assert q["completed"] == q["requests"] and q["used_idx"] == q["requests"] & 0xFFFF
        assert q["kicks"] == q["guest_kicks"]
        # each vCPU decides once per batch of its own whether to kick
        batches = sum(-(-shares[v] // batch) for v in mine)
        assert q["guest_kicks"] + q["kicks_suppressed"] == batches
        ev = r.events.filter(pl.col("queue") == q["queue"])
        pops = ev.filter(pl.col("event") == schema.LAB_POP)
        assert pops["value"].to_list() == list(range(q["requests"]))
        assert np.array_equal(pops["addr"].to_numpy(), np.arange(q["requests"]) % ring_size)
        completes = ev.filter(pl.col("event") == schema.LAB_COMPLETE)
        assert completes.height == q["passes"] and completes["count"].sum() == q["requests"]
        assert ev.filter(pl.col("event") == schema.LAB_KICK)["count"].sum() == q["kicks"]
        assert set(ev["tid"]) == {q["backend_tid"]}
    assert r.events["ts_ns"].is_sorted()
    assert sum(q["kicks"] for q in r.per_queue) == r.kicks


@pytest.mark.kvm
@pytest.mark.parametrize(
    ("vcpus", "queues", "threads", "batch"),
    [(2, 2, "shared", 1), (2, 2, "per-queue", 4), (3, 2, "shared", 2), (4, 1, "per-queue", 1)],
)
def test_vcpus_submit_to_their_queues(vcpus: int, queues: int, threads: str, batch: int) -> None:
    n, ring = 601, 16  # not a multiple of the vCPUs; rings that wrap
    r = run_lab(
        "virtio", requests=n, batch=batch, ring_size=ring, request_bytes=128,
        vcpus=vcpus, queues=queues, backend_threads=threads,
    )  # fmt: skip
    _check(r, n, batch, ring, vcpus, queues)
    tids = {q["backend_tid"] for q in r.per_queue}
    assert len(tids) == (queues if threads == "per-queue" else 1)
    assert r.pid not in tids


@pytest.mark.kvm
def test_cli_json_adds_vcpus_queues_and_per_queue() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "lab", "run", "--requests", "40", "--batch", "2",
         "--vcpus", "2", "--queues", "2", "--backend-threads", "per-queue", "--json"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    out = json.loads(proc.stdout)
    for key in ("pid", "device", "requests", "batch", "ring_size", "duration_s",
                "requests_per_s", "userspace_exits", "kicks", "latency_ns"):  # fmt: skip
        assert key in out
    assert (out["vcpus"], out["queues"], out["backend_threads"]) == (2, 2, "per-queue")
    assert [q["requests"] for q in out["per_queue"]] == [20, 20]
    assert out["userspace_exits"] == 2 and out["completed"] == 40


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_recorded_two_by_two_run_has_its_kicks_per_queue(tmp_path: Path) -> None:
    from vtrace.store import open_trace

    out = tmp_path / "trace"
    r = run_lab("virtio", requests=300, batch=2, ring_size=16, vcpus=2, queues=2, record=out)
    trace = open_trace(out)
    ev = trace.events.filter(pl.col("pid") == r.pid).collect()
    pio = ev.filter(pl.col("event") == schema.KVM_PIO)
    for q in r.per_queue:
        # every kick is a kvm_pio write to the queue's own notify port
        assert pio.filter(pl.col("addr") == notify_port(q["queue"])).height == q["kicks"]
        lab = ev.filter((pl.col("source") == schema.SOURCE_LAB) & (pl.col("queue") == q["queue"]))
        assert lab.filter(pl.col("event") == schema.LAB_POP).height == q["requests"]
    assert ev.filter(pl.col("event") == schema.KVM_USERSPACE_EXIT).height == 2
    meta = trace.meta["lab"]
    assert (meta["vcpus"], meta["queues"], meta["backend_threads"]) == (2, 2, "shared")
    assert [q["kicks"] for q in meta["per_queue"]] == [q["kicks"] for q in r.per_queue]


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_two_by_two_trace_calibrates_to_its_shape(tmp_path: Path) -> None:
    """A recorded 2 x 2 run calibrates to 2 vCPUs x 2 queues, its guest time per batch from
    one vCPU over that vCPU's share of the requests, its back end from that vCPU's queue."""
    from vtrace.sim.calibrate import calibrate

    out = tmp_path / "trace"
    run_lab("virtio", requests=400, batch=4, vcpus=2, queues=2, backend_threads="per-queue",
            record=out)  # fmt: skip
    fit = calibrate([out], "lab-virtio", tmp_path / "fit.toml")
    cfg = fit.config
    assert (cfg["vm.vcpus"], cfg["virtqueue.queues"]) == (2, 2)
    assert cfg["backend.threads"] == "per_queue"
    facts = fit.facts[0]
    assert facts.vcpu_requests == 200 and facts.requests == 400
    # one queue's passes: every publish follows a pop of the same queue
    assert facts.publish_ns is not None and (facts.publish_ns >= 0).all()
    assert "vcpus = 2  # fitted: trace: meta.json lab vcpus" in (tmp_path / "fit.toml").read_text()
