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


def summary_table(summary: dict[str, Any]) -> Table:
    """The summary as a two-column rich table, units beside the numbers."""
    flat = flatten(summary)
    table = Table(title=f"model {summary.get('model', '')} ({summary.get('kind', '')})")
    table.add_column("measure")
    table.add_column("value", justify="right")
    table.add_column("unit")
    for key, label, unit in _ROWS:
        if key not in flat:
            continue
        v = flat[key]
        text = f"{v:,.3f}" if isinstance(v, float) and abs(v) < 100 else f"{v:,.0f}"
        table.add_row(label, text, unit)
    return table
