"""What a lab run measured: :class:`LabResult`, and the lab's events as an events frame."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from vtrace import schema

DEVICE_NAMES = {"emulated": "lab-emulated", "virtio": "lab-virtio"}


@dataclass
class LabResult:
    """What one lab run measured. ``to_json()`` is the `vtrace lab run --json` object."""

    pid: int  # the VMM's process (filter recordings on it)
    device: str  # emulated or virtio
    requests: int
    batch: int  # requests added per kick (1 for emulated)
    ring_size: int  # virtqueue descriptors (1 for emulated)
    request_bytes: int
    wait: str  # how the virtio guest waits for completions: poll or irq
    duration_s: float  # first KVM_RUN to the guest's final write, CLOCK_MONOTONIC
    requests_per_s: float
    cpu_s: float  # CPU time of the VMM process (vCPU and back-end threads) over duration_s
    userspace_exits: int  # KVM_RUN returns this VMM handled (counted by the VMM)
    kicks: int  # eventfd counts the back end consumed (virtio)
    guest_kicks: int  # notify writes the guest made (its own count, in its memory)
    kicks_suppressed: int  # kicks the guest skipped: VRING_USED_F_NO_NOTIFY was set
    interrupts: int  # interrupts the guest's handler took (wait=irq)
    completed: int  # requests the guest saw completed (used elements / status reads)
    latency_ns: dict[str, float]  # mean, p50, p99; see docs/lab.md for what is timed
    exit_reasons: dict[str, int]  # userspace_exits by KVM_EXIT_* name
    # The lab's first events (source=lab), at most records.KEEP_EVENTS rows: memory stays
    # bounded at any run length; a recording (record=) gets every one.
    events: pl.DataFrame = field(repr=False)
    events_total: int = 0  # lab events the run made, kept or not
    interrupts_sent: int = 0  # irqfd signals the back end sent
    polls: int = 0  # guest reads of used.idx that found nothing new
    used_idx: int = 0  # used.idx at the end (virtio; modulo 2^16)
    trace: str | None = None  # the trace directory with --record
    recording: dict[str, Any] | None = None  # the collector's summary with --record
    vcpus: int = 1  # guest vCPUs, one thread each
    queues: int = 1  # virtqueues; vCPU v submits to queue v mod queues
    backend_threads: str = "shared"  # shared: one thread serves every queue; per-queue
    # one dict per queue: its vCPUs, requests, kicks, completions, latency (docs/lab.md)
    per_queue: list[dict[str, Any]] = field(default_factory=list)
    # one dict per vCPU thread, then per back-end thread: its CPU time, run-queue wait and,
    # for a back end, its wake-ups and their CPU (vtrace/lab/threadclock.py, docs/lab.md)
    threads: list[dict[str, Any]] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """The result without the events frame (``events``: how many the run made), as
        plain JSON types."""
        out = {k: v for k, v in self.__dict__.items() if k not in ("events", "events_total")}
        out["events"] = self.events_total
        return out


def events_frame(
    *,
    event: str,
    ts_ns: np.ndarray,
    pid: int,
    tid: int,
    device: str,
    queue: int = 0,
    addr: np.ndarray | None = None,
    size: np.ndarray | None = None,
    count: np.ndarray | None = None,
    value: np.ndarray | None = None,
) -> pl.DataFrame:
    """One lab event type as an events frame (source=lab), columns from arrays."""
    cols: dict[str, Any] = {"ts_ns": np.asarray(ts_ns, dtype=np.int64)}
    for name, arr, dtype in (
        ("addr", addr, np.uint64),
        ("size", size, np.int32),
        ("count", count, np.int32),
        ("value", value, np.uint64),
    ):
        if arr is not None:
            cols[name] = np.asarray(arr, dtype=dtype)
    # The same value on every row: literals, not a Python list per column (this runs on
    # every fold of a run, in the thread that serves the guest).
    constants = {
        "source": schema.SOURCE_LAB,
        "event": event,
        "pid": pid,
        "tid": tid,
        "queue": queue,
        "device": device,
    }
    frame = pl.DataFrame(cols).with_columns(pl.lit(v).alias(k) for k, v in constants.items())
    return schema.conform(frame)  # type: ignore[return-value]


def reason_names(reasons: dict[int, int]) -> dict[str, int]:
    """Exit counts keyed by KVM_EXIT_* name (the kernel's own table); -1 is EINTR."""
    names = {**schema.load_reason_tables().userspace, -1: "EINTR"}
    return {names.get(code, str(code)): n for code, n in sorted(reasons.items())}
