"""Workloads: when the guest wants to issue each request.

Open loop (arrival times fixed in advance): Poisson, deterministic, or replayed from a
trace. Closed loop: ``queue_depth`` requests in flight, each completion issuing the next
after ``think_ns`` (like fio's iodepth); its arrival times are produced during the run.
"""

from __future__ import annotations

import numpy as np
import polars as pl

from vtrace.errors import VtraceError
from vtrace.schema import LAB_KICK, LAB_POP, VIRTQUEUE_POP
from vtrace.sim.config import Config
from vtrace.sim.qemu_guest import E1000_TDT_WRITE, IDE_EXEC_CMD, request_queues, tdt_writes

# Events that stand for one request arriving, in order of preference: the lab back end's
# pops; QEMU's virtqueue_pop on the queues the guest kicks (virtio-net's receive queue pops
# the guest's empty buffers, not requests); an emulated device's per-request command (an
# IDE command, an e1000 transmit doorbell); then kicks.
ARRIVAL_EVENTS = (
    LAB_POP, VIRTQUEUE_POP, IDE_EXEC_CMD, E1000_TDT_WRITE, LAB_KICK, "virtio_queue_notify",
    "kvm_fast_mmio",
)  # fmt: skip


def open_loop_arrivals_ns(cfg: Config, rng: np.random.Generator, n: int) -> list[float]:
    """Arrival times of ``n`` requests for a Poisson or deterministic open loop."""
    w = cfg.values["workload"]
    if cfg.kind == "queue":
        rate = cfg.values["queue"]["arrival_rate_per_s"]
        arrivals = "poisson"
    else:
        rate, arrivals = w["arrival_rate_per_s"], w["arrivals"]
    gap_ns = 1e9 / rate
    if arrivals == "poisson":
        return np.cumsum(rng.exponential(gap_ns, n)).tolist()
    return (np.arange(1, n + 1, dtype=np.float64) * gap_ns).tolist()


def arrival_events(events: pl.LazyFrame, event: str) -> pl.LazyFrame:
    """The rows that stand for request arrivals under the name ``event``."""
    if event == E1000_TDT_WRITE:
        return tdt_writes(events)
    rows = events.filter(pl.col("event").cast(pl.String) == event)
    if event == VIRTQUEUE_POP:
        queues = request_queues(events)
        if queues:
            rows = rows.filter(pl.col("queue").is_in(queues) | pl.col("queue").is_null())
    return rows


def trace_arrivals_ns(events: pl.LazyFrame, event: str | None = None) -> tuple[np.ndarray, str]:
    """Request arrival times from a trace, relative to the first, and the event used.

    Uses the first of :data:`ARRIVAL_EVENTS` present (lab back-end pops, QEMU
    ``virtqueue_pop`` on the kicked queues, ``ide_exec_cmd``, e1000 TDT writes, then kicks),
    else the kicks :func:`vtrace.analyze.kicks` finds (one request per kick), unless
    ``event`` names one.
    """
    candidates = (event,) if event else ARRIVAL_EVENTS
    counts = (
        events.filter(pl.col("event").cast(pl.String).is_in(list(candidates)))
        .group_by(pl.col("event").cast(pl.String))
        .len()
        .collect()
    )
    present = dict(zip(counts["event"].to_list(), counts["len"].to_list(), strict=True))
    if E1000_TDT_WRITE in candidates:
        present[E1000_TDT_WRITE] = tdt_writes(events).select(pl.len()).collect().item()
    chosen = next((e for e in candidates if present.get(e)), None)
    if chosen is None and event is None:
        # kicks as vtrace.analyze finds them (notify writes by port or address): one each
        from vtrace.analyze import kicks

        ts = kicks(events)["ts_ns"].sort().to_numpy()
        if ts.size:
            return (ts - ts[0]).astype(np.float64), "kick"
    if chosen is None:
        raise VtraceError(
            f"trace has none of the request events {', '.join(candidates)}: "
            "record the lab back end, QEMU's virtqueue_pop or the device's command events"
        )
    ts = arrival_events(events, chosen).select(pl.col("ts_ns").sort()).collect()["ts_ns"]
    ts = ts.to_numpy()
    return (ts - ts[0]).astype(np.float64), chosen
