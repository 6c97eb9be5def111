"""Emulated vs virtio side by side: what each request costs, on traces and in the model.

One row per trace (from :func:`vtrace.analyze.summary`) or per model run (from
:func:`vtrace.sim.engine.simulate`), with the same per-request columns, so the two can be
read and plotted together:

* `exits_per_request`: VM exits per request. On a host with VMX/SVM that is `kvm_exit`;
  without it (software KVM, QEMU under TCG) the traces show only exits to user space and
  trapping accesses, and this column is null;
* `userspace_exits_per_request`: returns from `KVM_RUN` to the VMM;
* `trapping_accesses_per_request`: register accesses the VMM emulated (a user-space exit
  each under KVM; QEMU's `memory_region_ops_*` under TCG);
* `kicks_per_request`, `irqs_per_request`, `requests_per_kick`;
* `latency_mean_ns`, `latency_p99_ns`, `throughput_rps`.

A trace's request count is the `requests` its maker recorded in meta (the lab's requests,
the QEMU lab's reads or pings: a ping is one request but two pops, tx and rx); a trace
without one counts the back end's pops.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from vtrace.store import Trace, open_trace

# Interrupt events that set a line's level (raised, then lowered) rather than send one message.
LINE_EVENTS = frozenset({"kvm_set_irq", "ioapic_set_irq", "kvm_ioapic_set_irq", "kvm_pic_set_irq"})
PER_REQUEST = (
    "exits_per_request",
    "userspace_exits_per_request",
    "trapping_accesses_per_request",
    "kicks_per_request",
    "irqs_per_request",
)
COLUMNS = (
    "name",
    "origin",
    "side",
    "device",
    "requests",
    *PER_REQUEST,
    "requests_per_kick",
    "latency_mean_ns",
    "latency_p99_ns",
    "throughput_rps",
)
SCHEMA = {
    "name": pl.String,
    "origin": pl.String,
    "side": pl.String,
    "device": pl.String,
    "requests": pl.Int64,
    **dict.fromkeys(COLUMNS[5:], pl.Float64),
}


def side_of(name: str) -> str:
    """Which side of the comparison a device or model name is on: emulated, virtio or other."""
    low = name.lower()
    if any(k in low for k in ("virtio", "vhost")):
        return "virtio"
    if any(k in low for k in ("emulated", "ide", "e1000")):
        return "emulated"
    return "other"


def meta_value(meta: Mapping[str, Any], key: str) -> Any:
    """``key`` from meta's top level, else from the first section (a dict) that has it."""
    if meta.get(key) is not None:
        return meta[key]
    for value in meta.values():
        if isinstance(value, Mapping) and value.get(key) is not None:
            return value[key]
    return None


def _sum(rows: Iterable[Mapping[str, Any]], key: str, **match: Any) -> int:
    return sum(int(r.get(key) or 0) for r in rows if all(r.get(k) == v for k, v in match.items()))


def _one_view(rows: list[Mapping[str, Any]], key: str) -> int:
    """Events seen by several sources (a kick seen by KVM and by QEMU) counted once: the
    largest per-source total."""
    by_source: dict[str, int] = {}
    for r in rows:
        by_source[str(r.get("source"))] = by_source.get(str(r.get("source")), 0) + int(
            r.get(key) or 0
        )
    return max(by_source.values(), default=0)


def trace_costs(trace: Trace | str | os.PathLike[str]) -> dict[str, Any]:
    """The per-request costs of one trace, as one row (see the module doc for columns)."""
    from vtrace.analyze import summary

    t = trace if isinstance(trace, Trace) else open_trace(trace)
    s = summary(t)
    # The workload's own count when its maker recorded one (a ping is one request but two
    # pops, tx and rx), else the back end's pops.
    requests = int(meta_value(t.meta, "requests") or 0) or _sum(s["batching"], "requests")
    exits = _sum(s["exits"], "count")
    user_exits = _sum(s["user_exits"], "count")
    trapping = _sum(s["accesses_handled"], "count", handled="user")
    kicks = _one_view(s["kicks"], "kicks")
    # A line (GSI) is raised and lowered per interrupt: `raised` counts interrupts there;
    # MSI and virtio notifications are one event each.
    irq_rows = [
        {**r, "n": r.get("raised") if r.get("event") in LINE_EVENTS else r.get("count")}
        for r in s["interrupts"]
    ]
    irqs = _one_view(irq_rows, "n")
    lat = [r for r in s["requests"] if r.get("requests")]
    lat_total = sum(r["requests"] for r in lat)
    duration_ns = s["trace"].get("duration_ns") or 0
    device = str(meta_value(t.meta, "device") or t.name)

    def per(n: int) -> float | None:
        return n / requests if requests else None

    return {
        "name": t.name,
        "origin": "trace",
        "side": side_of(f"{device} {t.name}"),
        "device": device,
        "requests": requests,
        "exits_per_request": per(exits) if exits else None,
        "userspace_exits_per_request": per(user_exits),
        "trapping_accesses_per_request": per(trapping),
        "kicks_per_request": per(kicks),
        "irqs_per_request": per(irqs),
        "requests_per_kick": requests / kicks if kicks else None,
        "latency_mean_ns": (
            sum((r.get("mean_ns") or 0) * r["requests"] for r in lat) / lat_total
            if lat_total
            else None
        ),
        "latency_p99_ns": max((r.get("p99_ns") or 0 for r in lat), default=None) or None,
        "throughput_rps": requests / duration_ns * 1e9 if requests and duration_ns else None,
    }


def traces_costs(traces: Iterable[Trace | str | os.PathLike[str]]) -> pl.DataFrame:
    """:func:`trace_costs` of several traces as one frame (one row each)."""
    return pl.DataFrame([trace_costs(t) for t in traces], schema=SCHEMA)


def model_costs(
    models: Sequence[str | Path],
    *,
    requests: int | None = None,
    overrides: Mapping[str, Any] | None = None,
    trace: str | os.PathLike[str] | None = None,
) -> pl.DataFrame:
    """Run each model once and return its per-request costs, one row per model.

    ``requests`` shortens the runs (the demo); ``overrides`` are `--set` style dotted keys
    applied to every model; with ``trace`` the trace's request arrivals drive each model
    (:func:`vtrace.sim.replay`).
    """
    from vtrace.sim import replay

    rows = []
    for model in models:
        result = replay(model, trace, overrides=dict(overrides or {}) or None, requests=requests)
        cfg, s = result.config, result.summary
        lat = s.get("latency_ns") or {}
        kicks = s.get("kicks_per_request") or 0.0
        # The model's emulated device: every register access is an exit to the VMM.
        trapping = s.get("userspace_exits_per_request") if cfg.kind == "emulated" else 0.0
        rows.append(
            {
                "name": cfg.name,
                "origin": "model",
                "side": side_of(cfg.name),
                "device": cfg.name,
                "requests": s.get("requests"),
                "exits_per_request": s.get("exits_per_request"),
                "userspace_exits_per_request": s.get("userspace_exits_per_request"),
                "trapping_accesses_per_request": trapping,
                "kicks_per_request": kicks,
                "irqs_per_request": s.get("irqs_per_request"),
                "requests_per_kick": 1 / kicks if kicks else None,
                "latency_mean_ns": lat.get("mean"),
                "latency_p99_ns": lat.get("p99"),
                "throughput_rps": s.get("throughput_rps"),
            }
        )
    return pl.DataFrame(rows, schema=SCHEMA)
