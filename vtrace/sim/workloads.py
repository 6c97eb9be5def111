"""Workloads: when the guest wants to issue each request.

Open loop (arrival times fixed in advance): Poisson, deterministic, or replayed from a
trace. Closed loop: ``queue_depth`` requests in flight, each completion issuing the next
after ``think_ns`` (like fio's iodepth); its arrival times are produced during the run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from vtrace.errors import VtraceError
from vtrace.schema import LAB_KICK, LAB_POP, VIRTQUEUE_POP
from vtrace.sim.config import Config
from vtrace.sim.params import WorkloadParams
from vtrace.sim.qemu_guest import E1000_TDT_WRITE, IDE_EXEC_CMD, request_queues, tdt_writes

if TYPE_CHECKING:
    from vtrace.sim.vcpu import Vcpu

CHUNK = 16_384  # open-loop arrivals made at a time

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


class Workload:
    """Which request each vCPU issues, and when: the run's source of requests.

    Open loop: request i arrives at its time (Poisson, deterministic, a trace's, or all at
    once for a backlog) on vCPU i mod N, made ``CHUNK`` at a time so memory stays flat.
    Closed loop: ``jobs`` jobs (fio numjobs), job j on vCPU j mod N, each keeping
    ``queue_depth`` requests in flight; ``submit = "each"`` issues the next request when one
    completes (fio iodepth), ``"batch"`` issues ``queue_depth`` together when the last of
    the previous lot completes (dd with a large block the guest splits into requests).
    """

    def __init__(
        self,
        p: WorkloadParams,
        rng: np.random.Generator,
        rate_per_s: float,
        law: str,
        replayed: np.ndarray | None = None,
    ) -> None:
        self.p = p
        self.n = p.requests if replayed is None else min(p.requests, len(replayed))
        self.rng = rng
        self.gap_ns = 1e9 / rate_per_s if rate_per_s > 0 else 0.0
        self.law = law
        self.replayed = replayed
        self.issued = 0  # requests handed to a vCPU so far
        self.submitted = 0  # requests the vCPUs have added to a queue
        self.last_ns = 0.0
        self.vcpus: list[Vcpu] = []
        self.closed = p.arrivals == "closed"
        self.job_of: dict[int, int] = {}  # closed loop: in-flight request -> its job
        self.outstanding: list[int] = []  # closed loop, batch submission: per job
        self.stops: set[int] = set()  # requests after which a dispatch ends early

    def attach(self, vcpus: list[Vcpu]) -> None:
        self.vcpus = vcpus
        if self.closed:
            jobs = self.p.jobs
            self.outstanding = [0] * jobs
            for job in range(jobs):
                self._issue(job, self.p.queue_depth, 0.0)

    def _issue(self, job: int, count: int, at_ns: float) -> None:
        count = min(count, self.n - self.issued)
        if count <= 0:
            return
        v = self.vcpus[job % len(self.vcpus)]
        for _ in range(count):
            request = self.issued
            self.issued += 1
            self.job_of[request] = job
            v.pending.append((request, at_ns))
        self.outstanding[job] += count
        splits = self.p.dispatch_splits
        if splits > 0 and self.p.submit == "batch" and count > 1:
            cuts = min(int(self.rng.poisson(splits)), count - 1)
            if cuts:
                first = self.issued - count
                places = self.rng.choice(count - 1, cuts, replace=False)
                self.stops.update((first + places).tolist())
        v.wake()
        if self.issued >= self.n:  # the last request: vCPUs waiting for more can finish
            for other in self.vcpus:
                other.wake()

    def refill(self, vcpu: Vcpu) -> bool:
        """Open loop: make the next arrivals; True when ``vcpu`` got some."""
        if self.closed:
            return False
        while not vcpu.pending and self.issued < self.n:
            k = min(CHUNK, self.n - self.issued)
            start = self.issued
            if self.replayed is not None:
                times = self.replayed[start : start + k]
            elif self.p.arrivals == "backlog":
                times = np.zeros(k)
            elif self.law == "poisson":
                times = self.last_ns + np.cumsum(self.rng.exponential(self.gap_ns, k))
            else:
                times = self.last_ns + np.arange(1, k + 1, dtype=np.float64) * self.gap_ns
            if len(times):
                self.last_ns = float(times[-1])
            self.issued += k
            vcpus = self.vcpus
            nv = len(vcpus)
            for i, t in enumerate(times.tolist()):
                vcpus[(start + i) % nv].pending.append((start + i, t))
        return bool(vcpu.pending)

    def exhausted(self, vcpu: Vcpu) -> bool:
        """No request will ever come to ``vcpu`` again: all are issued, or (closed loop) no
        job runs on it (fewer jobs than vCPUs)."""
        if vcpu.pending:
            return False
        return self.issued >= self.n or (self.closed and vcpu.index >= self.p.jobs)

    def completed(self, request: int, now: float) -> None:
        """Closed loop: a completion lets its job issue more."""
        if not self.closed:
            return
        job = self.job_of.pop(request)
        self.outstanding[job] -= 1
        if self.p.submit == "batch":
            if self.outstanding[job] == 0:
                self._issue(job, self.p.queue_depth, now + self.p.think_ns)
        else:
            self._issue(job, 1, now + self.p.think_ns)


def open_loop_law(cfg: Config) -> tuple[float, str]:
    """The open loop's rate and law (a reference queue has its own rate)."""
    if cfg.kind == "queue":
        return cfg.values["queue"]["arrival_rate_per_s"], "poisson"
    w = cfg.values["workload"]
    return w["arrival_rate_per_s"], w["arrivals"]
