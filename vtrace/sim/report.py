"""Render a run's summary for people (the CLI's table) and flatten it for frames (sweeps)."""

from __future__ import annotations

from typing import Any

from rich.table import Table

# Summary keys in the order the table shows them, with their units.
_ROWS = (
    ("requests", "requests", ""),
    ("completed", "completed", ""),
    ("throughput_rps", "throughput", "req/s"),
    ("latency_ns.mean", "latency mean", "ns"),
    ("latency_ns.p50", "latency p50", "ns"),
    ("latency_ns.p90", "latency p90", "ns"),
    ("latency_ns.p99", "latency p99", "ns"),
    ("exits_per_request", "exits / request", ""),
    ("userspace_exits_per_request", "user-space exits / request", ""),
    ("kicks_per_request", "kicks / request", ""),
    ("irqs_per_request", "interrupts / request", ""),
    ("vcpu_exit_time_share", "vCPU time in exits", "share"),
    ("ring_full_stalls", "ring-full stalls", ""),
    ("backend_utilization", "back-end utilisation", "share"),
    ("blocking_probability", "blocking probability", ""),
)


def flatten(summary: dict[str, Any]) -> dict[str, Any]:
    """``latency_ns: {mean: ...}`` becomes ``latency_ns.mean``; other keys stay."""
    out: dict[str, Any] = {}
    for key, value in summary.items():
        if isinstance(value, dict):
            for sub, v in value.items():
                out[f"{key}.{sub}"] = v
        else:
            out[key] = value
    return out


def offered_load(summary: dict[str, Any]) -> str:
    """What the guest was asked to do, in words: the open loop's rate or the closed loop's
    requests in flight."""
    o = summary.get("offered") or {}
    arrivals = o.get("arrivals", "")
    if arrivals == "closed":
        jobs = f"{o['jobs']} jobs x " if o.get("jobs", 1) > 1 else ""
        how = "together" if o.get("submit") == "batch" else "refilled as each completes"
        return f"closed loop: {jobs}{o['queue_depth']} in flight ({how})"
    if "rate_per_s" in o:
        return f"{arrivals} arrivals at {o['rate_per_s']:,.0f} requests/s"
    if arrivals == "backlog":
        return "backlog: every request ready at the start"
    return f"{arrivals} arrivals"


def summary_table(summary: dict[str, Any]) -> Table:
    """The summary as a two-column rich table, units beside the numbers."""
    flat = flatten(summary)
    table = Table(title=f"model {summary.get('model', '')} ({summary.get('kind', '')})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("unit")
    table.add_row("offered load", offered_load(summary), "")
    if "ring_room_requests" in summary:
        table.add_row("ring room", f"{summary['ring_room_requests']:,}", "requests")
    since_start = "latency_is" in summary  # a backlog: no request's own latency
    for key, label, unit in _ROWS:
        if key not in flat:
            continue
        if since_start and key.startswith("latency_ns."):
            label = label.replace("latency", "completion since start")
        v = flat[key]
        text = f"{v:,.3f}" if isinstance(v, float) and abs(v) < 100 else f"{v:,.0f}"
        table.add_row(label, text, unit)
    if "makespan_ns" in summary:
        table.add_row("makespan", f"{summary['makespan_ns']:,.0f}", "ns")
    return table
