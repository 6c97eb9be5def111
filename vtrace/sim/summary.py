"""The run's summary: throughput, latency percentiles and costs per request.

Rates are per request counted over the measured requests (after ``warmup_requests``);
shares are over the whole simulated time. Keys are those of ``vtrace replay --json``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import polars as pl

from vtrace.sim.config import Config

if TYPE_CHECKING:
    from vtrace.sim.engine import Machine


def summarize(m: Machine, frame: pl.DataFrame, cfg: Config) -> dict[str, Any]:
    """Summary of one run, from the per-request frame and the run's counters."""
    warmup = cfg.values["workload"]["warmup_requests"] if m.n > 1 else 0
    warmup = min(warmup, m.n - 1)
    measured = frame.slice(warmup)
    done = measured.filter(pl.col("complete_ns").is_not_null())
    end_ns = float(frame["complete_ns"].max() or 0.0)
    first_ns = float(measured["submit_ns"].min() or 0.0)
    last_ns = float(done["complete_ns"].max() or 0.0)
    span_ns = last_ns - first_ns
    issued = measured.height
    lat = done["latency_ns"]
    per = 1.0 / issued if issued else 0.0
    totals = measured.select(
        pl.col("exits", "userspace_exits", "kicks", "interrupts").sum().cast(pl.Float64)
    ).row(0, named=True)
    summary: dict[str, Any] = {
        "model": cfg.name,
        "kind": cfg.kind,
        "requests": m.n,
        "completed": int(frame["complete_ns"].is_not_null().sum()),
        "measured_requests": issued,
        "throughput_rps": (done.height / span_ns * 1e9) if span_ns > 0 else 0.0,
        "latency_ns": {
            "mean": float(lat.mean() or 0.0),
            "p50": float(lat.quantile(0.50, "linear") or 0.0),
            "p90": float(lat.quantile(0.90, "linear") or 0.0),
            "p99": float(lat.quantile(0.99, "linear") or 0.0),
        },
        "exits_per_request": totals["exits"] * per,
        "userspace_exits_per_request": totals["userspace_exits"] * per,
        "kicks_per_request": totals["kicks"] * per,
        "kicks_suppressed_per_request": m.kicks_suppressed / m.n,
        "irqs_per_request": totals["interrupts"] * per,
        "backend_wakeups_per_request": m.backend_wakeups / m.n,
        "vcpu_exit_time_share": m.vcpu_exit_ns / end_ns if end_ns > 0 else 0.0,
        "ring_full_stalls": m.ring_full_stalls,
        "empty_polls": m.empty_polls,
        "backend_utilization": m.backend_busy_ns / end_ns if end_ns > 0 else 0.0,
        "simulated_ns": end_ns,
    }
    if m.drop_when_full:
        summary["blocking_probability"] = float(measured["dropped"].mean() or 0.0)
    if cfg.overrides:
        summary["overrides"] = dict(cfg.overrides)
    return summary
