"""Analyses of real lab runs: the lab VMM on /dev/kvm, recorded with the bcc collector.

The VMM counts what it saw (user-space exits, kicks, interrupts, completed requests); the
analyses, reading only the recorded trace, must find exactly the same numbers.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from vtrace import open_trace
from vtrace.analyze import (
    accesses,
    batching,
    interrupts,
    kicks,
    requests,
    summary,
    user_exits,
)

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.bcc]


def test_emulated_device_run(tmp_path: Path) -> None:
    from vtrace.lab import layout
    from vtrace.lab.emulated import ACCESSES_PER_REQUEST
    from vtrace.lab.run import expected_userspace_exits, run_lab

    n = 40
    result = run_lab("emulated", requests=n, record=tmp_path / "t")
    ev = open_trace(tmp_path / "t").events
    exits = user_exits(ev).filter(pl.col("pid") == result.pid)
    assert exits.height == result.userspace_exits == expected_userspace_exits("emulated", n)
    acc = accesses(ev).filter(pl.col("pid") == result.pid)
    # Every register access of the emulated device went to user space; plus the final
    # write to PORT_DONE.
    assert acc.height == ACCESSES_PER_REQUEST * n + 1
    assert (acc.get_column("handled") == "user").all()
    status = acc.filter(pl.col("addr") == layout.PORT_DEV_STATUS)
    assert status.height == n and not status.get_column("write").any()  # `in`: completions
    assert kicks(ev).height == 0
    reqs = requests(ev)
    assert reqs.height == n and reqs.get_column("latency_ns").null_count() == 0


def test_virtio_run_with_ioeventfd_kicks_and_irqfd(tmp_path: Path) -> None:
    from vtrace.lab import layout
    from vtrace.lab.run import run_lab

    n, batch = 64, 4
    result = run_lab("virtio", requests=n, batch=batch, wait="irq", record=tmp_path / "t")
    trace = open_trace(tmp_path / "t")
    ev = trace.events
    k = kicks(ev)
    kvm_kicks = k.filter(pl.col("source") == "kvm")
    # Each guest kick is a write to the notify port that the ioeventfd took in the kernel
    # (the guest skips kicks while the back end is running: at most one per batch).
    assert kvm_kicks.height == result.guest_kicks
    assert 1 <= result.guest_kicks <= n // batch
    assert kvm_kicks.get_column("addr").unique().to_list() == [layout.PORT_NOTIFY]
    assert user_exits(ev).filter(pl.col("pid") == result.pid).height == result.userspace_exits
    b = batching(ev).row(0, named=True)
    assert (b["requests"], b["completed"]) == (n, result.completed)
    assert b["kicks"] == result.kicks  # eventfd counts the back end consumed
    raised = interrupts(ev).filter(
        (pl.col("event") == "kvm_set_irq")
        & (pl.col("gsi") == layout.LAB_IRQ)
        & (pl.col("level") == 1)
    )
    # An irqfd signalled again before its injection work ran injects once: raised GSIs are
    # at most the signals the back end sent (measured: 10 for 11, or equal).
    assert 1 <= raised.height <= result.interrupts_sent
    data = summary(trace)
    assert data["lost_events"] == 0
    assert "exits" in data["missing"]  # software KVM: no kvm_exit here
