"""The run's summary: throughput, latency percentiles and costs per request.

Rates are per request counted over the measured requests (after ``warmup_requests``);
shares are over the whole simulated time. Keys are those of ``vtrace replay --json``.
Past the monitor's exact window (:data:`~vtrace.sim.monitors.EXACT_REQUESTS`), counts come
from its streaming totals and percentiles from its 1 % log histogram.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import polars as pl

from vtrace.sim.config import Config

if TYPE_CHECKING:
    from vtrace.sim.engine import Machine


def summarize(m: Machine, frame: pl.DataFrame, cfg: Config) -> dict[str, Any]:
    """Summary of one run, from the exact per-request frame and the monitor's totals."""
    mon = m.monitor
    tail = mon.tail
    warmup = mon.warmup
    measured = frame.slice(warmup)
    done = measured.filter(pl.col("complete_ns").is_not_null())
    end_ns = max(float(frame["complete_ns"].max() or 0.0), mon.end_ns)
    first_ns = float(measured["submit_ns"].min() or 0.0) if measured.height else 0.0
    last_ns = max(float(done["complete_ns"].max() or 0.0), tail.last_complete_ns)
    span_ns = last_ns - first_ns
    issued = measured.height + tail.requests
    completed_measured = done.height + tail.completed
    lat = done["latency_ns"]
    per = 1.0 / issued if issued else 0.0
    totals = measured.select(
        pl.col("exits", "userspace_exits", "kicks", "interrupts").sum().cast(pl.Float64)
    ).row(0, named=True)
    if mon.histogram is None:
        latency = {
            "mean": float(lat.mean() or 0.0),
            "p50": float(lat.quantile(0.50, "linear") or 0.0),
            "p90": float(lat.quantile(0.90, "linear") or 0.0),
            "p99": float(lat.quantile(0.99, "linear") or 0.0),
        }
    else:  # fold the exact window into the histogram: percentiles to within 1 %
        hist = mon.histogram
        hist.add_many(lat.to_numpy())
        total_ns = float(lat.sum() or 0.0) + tail.latency_sum_ns
        latency = {
            "mean": total_ns / completed_measured if completed_measured else 0.0,
            "p50": hist.quantile(0.50),
            "p90": hist.quantile(0.90),
            "p99": hist.quantile(0.99),
        }
    p = m.params
    busy_ns = mon.backend_busy_ns
    # the mean over the back-end threads: 1.0 is every thread busy all the time
    utilization = busy_ns / (end_ns * len(m.threads)) if end_ns > 0 else 0.0
    if p.backend.mode == "poll":  # a polling thread spends its whole core
        utilization = 1.0
    vcpu_exit_ns = sum(t.exit_ns for t in m.timelines)
    preempted_ns = m.host.preempted_ns if m.host is not None else 0.0
    summary: dict[str, Any] = {
        "model": cfg.name,
        "kind": cfg.kind,
        "requests": m.n,
        "completed": mon.completed,
        "measured_requests": issued,
        "throughput_rps": (completed_measured / span_ns * 1e9) if span_ns > 0 else 0.0,
        "latency_ns": latency,
        "exits_per_request": (totals["exits"] + tail.exits) * per,
        "userspace_exits_per_request": (totals["userspace_exits"] + tail.userspace_exits) * per,
        "kicks_per_request": (totals["kicks"] + tail.kicks) * per,
        "kicks_suppressed_per_request": mon.kicks_suppressed / m.n,
        "irqs_per_request": (totals["interrupts"] + tail.interrupts) * per,
        "backend_wakeups_per_request": mon.backend_wakeups / m.n,
        "vcpu_exit_time_share": vcpu_exit_ns / (end_ns * len(m.timelines)) if end_ns > 0 else 0.0,
        # vCPU time the back end's work took on a host with fewer CPUs than threads
        "vcpu_preempted_share": preempted_ns / (end_ns * len(m.timelines)) if end_ns > 0 else 0.0,
        "ring_full_stalls": mon.ring_full_stalls,
        "empty_polls": mon.empty_polls,
        "backend_utilization": utilization,
        "simulated_ns": end_ns,
    }
    w = p.workload
    offered: dict[str, Any] = {"arrivals": w.arrivals}
    if w.arrivals == "closed":
        offered.update(
            jobs=w.jobs, queue_depth=w.queue_depth, submit=w.submit,
            requests_in_flight=w.jobs * w.queue_depth,
        )  # fmt: skip
    elif w.arrivals in ("poisson", "deterministic"):
        offered["rate_per_s"] = m.workload.gap_ns and 1e9 / m.workload.gap_ns
    summary["offered"] = offered
    if p.ring.virtio:  # how many requests the ring holds at once
        summary["ring_room_requests"] = p.ring.ring_size // p.ring.descs_per_request
    if w.arrivals == "backlog":
        # every request is ready at 0: "latency" is its completion time since the start
        summary["latency_is"] = "time since the start (backlog: every request ready at 0)"
        summary["makespan_ns"] = last_ns - first_ns
    if p.vm.vcpus > 1 or p.vm.queues > 1 or m.device is not None:
        summary["vcpus"] = p.vm.vcpus
        summary["queues"] = p.vm.queues
        summary["per_queue"] = [
            {"queue": q.index, "requests": q.requests, "kicks": q.kicks,
             "interrupts": q.interrupts}
            for q in m.paths
        ]  # fmt: skip
    if p.vm.host_cpus:
        summary["host_cpus"] = p.vm.host_cpus
    if m.device is not None:
        summary["device_most_in_service"] = m.device.most_in_service
    if p.guest.drop_when_full:
        dropped = float(measured["dropped"].sum()) + tail.dropped
        summary["blocking_probability"] = dropped / issued if issued else 0.0
    if cfg.overrides:
        summary["overrides"] = dict(cfg.overrides)
    return summary
