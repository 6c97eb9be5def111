"""The summary of a trace: every core analysis, aggregated, as one JSON-able dict.

`vtrace summary DIR` renders it as tables; `--json` prints it. All tables are planned
lazily over the trace's Parquet parts and collected in three rounds of `pl.collect_all`
(see :func:`summary_tables`): each scan reads only the rows and columns its table needs,
and shared work (the KVM events grouped by thread) is done once.
"""

from __future__ import annotations

import os
from typing import Any

import polars as pl

from vtrace.analyze.accesses import (
    accesses_by_target_plan,
    kvm_accesses_from_timeline,
    qemu_accesses,
)
from vtrace.analyze.distributions import log2_bucket, percentile_exprs
from vtrace.analyze.exits import by_reason_plan, exits_from_timeline, user_exits_from_timeline
from vtrace.analyze.interrupts import interrupts_by_line_plan, interrupts_plan
from vtrace.analyze.kicks import KICK_COLUMNS, kicks_by_queue_plan, kicks_from_accesses
from vtrace.analyze.requests import (
    QUEUE_KEYS,
    batching_plan,
    queue_events,
    requests_plan,
)
from vtrace.analyze.requires import missing_events
from vtrace.analyze.timeline import (
    sort_by_thread,
    thread_order,
    with_neighbours,
)
from vtrace.errors import VtraceError
from vtrace.store import Trace, open_trace

# Why an analysis can be empty, shown next to it.
NOT_RECORDED = {
    "exits": "no kvm_exit/kvm_entry events: not recorded, or a host without hardware "
    "virtualisation (software KVM never fires them); see user_exits",
    "user_exits": "no kvm_userspace_exit events recorded",
    "accesses": "no kvm_pio/kvm_mmio/kvm_fast_mmio or QEMU memory_region_ops events",
    "kicks": "no in-kernel notify writes, lab_kick or virtio_queue_notify events",
    "requests": "no virtqueue_pop/virtqueue_flush (QEMU) or lab_pop/lab_complete events",
    "interrupts": "no kvm_set_irq/kvm_msi_set_irq/kvm_inj_virq/virtio_notify events",
}


def lost_per_cpu(meta: dict[str, Any]) -> dict[str, int] | None:
    """Lost events per CPU, when meta has them: `lost_events` as a mapping (importers) or
    `lost_per_cpu` as a list indexed by CPU (the collector)."""
    for key in ("lost_events", "lost_per_cpu"):
        value = meta.get(key)
        if isinstance(value, dict):
            return {str(k): int(v or 0) for k, v in value.items()}
        if isinstance(value, list):
            return {str(cpu): int(v or 0) for cpu, v in enumerate(value)}
    return None


def lost_events(meta: dict[str, Any]) -> int:
    """Total lost events from meta: `lost_events` (a total or per CPU), else the collector's
    `lost` / `lost_per_cpu`; 0 when none of them is there."""
    per_cpu = lost_per_cpu(meta)
    for key in ("lost_events", "lost"):
        value = meta.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return int(value)
    return sum(per_cpu.values()) if per_cpu else 0


def _histogram_plan(frame: pl.LazyFrame, col: str) -> pl.LazyFrame:
    """Log2 histogram (bucket, lo/hi bounds, count) of ``col``; share is added after collect."""
    return (
        frame.filter(pl.col(col) >= 0)
        .group_by(log2_bucket(col))
        .agg(pl.len().cast(pl.Int64).alias("count"))
        .sort("bucket")
    )


def _rows(frame: pl.DataFrame) -> list[dict[str, Any]]:
    # Aggregates only (tens of rows): plain dicts for JSON. NaN is not JSON.
    return [
        {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
        for row in frame.to_dicts()
    ]


# The events-table columns the summary's KVM tables read (the rest stay null, unread).
SUMMARY_TIMELINE_COLUMNS = ("reason_name", "addr", "write", "device", "queue")
# The columns of the derived tables that the summary's aggregates read.
EXIT_COLUMNS = ("reason_name", "duration_ns", "handled")
USER_EXIT_COLUMNS = ("reason_name", "until_next_ns")
ACCESS_COLUMNS = (*KICK_COLUMNS, "write", "handled")


def _histogram_rows(h: pl.DataFrame) -> list[dict[str, Any]]:
    total = h.get_column("count").sum()
    return _rows(
        h.with_columns(
            pl.when(pl.col("bucket") == 0).then(0).otherwise(2 ** pl.col("bucket")).alias("lo_ns"),
            (2 ** (pl.col("bucket") + 1)).alias("hi_ns"),
            (pl.col("count") / total).alias("share") if total else pl.lit(0.0).alias("share"),
        )
    )


def summary_tables(events: pl.LazyFrame, top: int = 10) -> dict[str, pl.DataFrame]:
    """Every table of the summary, by name, as polars frames.

    Three rounds of `pl.collect_all`: (1) the scans of the trace, each reading only its
    rows and columns: events per name, KVM events in trace order, the virtqueue events,
    QEMU's accesses, interrupts; (2) the derived tables (exits, user-space exits, accesses,
    requests) from those, once the KVM events are grouped by thread; (3) their aggregates.
    (One scan feeding all tables measured slower here: it reads more columns for every
    row.)
    """
    keys = list(QUEUE_KEYS)
    ordered, queue_ev, qemu_access, by_name, irqs = pl.collect_all(
        [
            thread_order(events, SUMMARY_TIMELINE_COLUMNS, sort=False),
            queue_events(events),
            qemu_accesses(events).select(ACCESS_COLUMNS),
            # Group on the categoricals and cast the few result rows, not 10M rows.
            events.group_by("source", "event")
            .agg(
                pl.len().cast(pl.Int64).alias("count"),
                pl.col("ts_ns").min().alias("first_ts_ns"),
                pl.col("ts_ns").max().alias("last_ts_ns"),
            )
            .with_columns(pl.col("source", "event").cast(pl.String)),
            interrupts_by_line_plan(interrupts_plan(events)).head(top),
        ]
    )
    timeline = with_neighbours(sort_by_thread(ordered).lazy())
    exits, user, kvm_access, reqs = pl.collect_all(
        [
            exits_from_timeline(timeline).select(EXIT_COLUMNS),
            user_exits_from_timeline(timeline).select(USER_EXIT_COLUMNS),
            kvm_accesses_from_timeline(timeline).select(ACCESS_COLUMNS),
            requests_plan(queue_ev.lazy()),
        ]
    )
    access = pl.concat([kvm_access, qemu_access]).lazy()
    plans = {
        "exits": by_reason_plan(exits, "duration_ns"),
        "exits_handled": exits.lazy()
        .group_by("handled")
        .agg(percentile_exprs("duration_ns"))
        .with_columns(pl.col("handled").cast(pl.String))
        .sort("handled"),
        "exits_histogram": _histogram_plan(exits.lazy(), "duration_ns"),
        "user_exits": by_reason_plan(user, "until_next_ns"),
        "user_exits_histogram": _histogram_plan(user.lazy(), "until_next_ns"),
        "accesses": accesses_by_target_plan(access).head(top),
        "accesses_handled": access.group_by("source", "handled")
        .agg(pl.len().cast(pl.Int64).alias("count"))
        .with_columns(pl.col("source", "handled").cast(pl.String))
        .sort("source", "handled"),
        "kicks": kicks_by_queue_plan(kicks_from_accesses(access, queue_ev.lazy())).head(top),
        "requests": reqs.lazy()
        .group_by(keys)
        .agg(
            pl.len().cast(pl.Int64).alias("requests"),
            *percentile_exprs("latency_ns")[1:],
            pl.col("kick_to_pop_ns").mean().alias("mean_kick_to_pop_ns"),
            pl.col("complete_to_irq_ns").mean().alias("mean_complete_to_irq_ns"),
        )
        .sort(keys, nulls_last=True),
        "requests_histogram": _histogram_plan(reqs.lazy(), "latency_ns"),
        "batching": batching_plan(queue_ev.lazy()),
    }
    tables = dict(zip(plans, pl.collect_all(list(plans.values())), strict=True))
    tables["events"] = by_name.sort(["count", "source", "event"], descending=[True, False, False])
    tables["interrupts"] = irqs
    # Every kick with its thread, for the per-VM table (collected there).
    tables["_kicks"] = kicks_from_accesses(access, queue_ev.lazy()).select("source", "pid", "tid")
    return tables


# Events only a VM's own threads raise (its vCPUs, or its VMM's trace events): a pid with
# one of them is a VM. Interrupt events from other pids come from kernel workers.
_VCPU_EVENTS = ("kvm_exit", "kvm_entry", "kvm_pio", "kvm_mmio", "kvm_fast_mmio",
                "kvm_userspace_exit", "kvm_inj_virq")  # fmt: skip
VMS_NOTE = (
    "events are attributed to a VM by the pid of the thread that raised them; kicks are "
    "the kernel's notify writes (an ioeventfd, raised by the vCPU thread) where the trace has "
    "them, else QEMU's or the lab's; interrupts are kvm_inj_virq (raised by the vCPU thread "
    "that injects) where the trace has them, else QEMU's virtio_notify, else kvm_set_irq/"
    "kvm_msi_set_irq of the VM's threads. kvm_set_irq and kvm_msi_set_irq raised by kernel "
    "workers (an irqfd's injection) carry no VM identity: they are counted as unattributed"
)


def vms_table(events: pl.LazyFrame, kicks: pl.LazyFrame, meta: dict[str, Any]) -> dict[str, Any]:
    """One row per VM (pid): its name, events, user-space exits, kicks and interrupts, and
    the interrupts no VM can be named for (see :data:`VMS_NOTE`)."""
    ev, src = pl.col("event").cast(pl.String), pl.col("source").cast(pl.String)
    known = {int(p): v for p, v in (meta.get("vms") or {}).items() if str(p).isdigit()}
    per_pid, threads = pl.collect_all(
        [
            events.filter(pl.col("pid").is_not_null())
            .group_by("pid")
            .agg(
                events=pl.len().cast(pl.Int64),
                userspace_exits=(ev == "kvm_userspace_exit").sum().cast(pl.Int64),
                vcpu_events=ev.is_in(_VCPU_EVENTS).sum(),
                vmm_events=src.is_in(["qemu", "lab"]).sum(),
                inj=(ev == "kvm_inj_virq").sum().cast(pl.Int64),
                notify=((src == "qemu") & ev.is_in(["virtio_notify", "virtio_notify_irqfd"]))
                .sum()
                .cast(pl.Int64),
                set_irq=ev.is_in(["kvm_set_irq", "kvm_msi_set_irq"]).sum().cast(pl.Int64),
            ),
            events.filter(pl.col("pid").is_not_null()).group_by("tid").agg(pl.col("pid").first()),
        ]
    )
    is_vm = (
        (pl.col("vcpu_events") > 0) | (pl.col("vmm_events") > 0) | pl.col("pid").is_in(list(known))
    )
    vms = per_pid.filter(is_vm)
    unattributed = int(per_pid.filter(~is_vm).get_column("set_irq").sum() or 0)
    kick_counts = (
        kicks.join(threads.lazy().rename({"pid": "_pid"}), on="tid", how="left")
        .with_columns(pid=pl.coalesce("pid", "_pid"))
        .group_by("pid", pl.col("source").cast(pl.String))
        .agg(pl.len().cast(pl.Int64).alias("kicks"))
        .collect()
    )
    by_pid: dict[int, dict[str, int]] = {}
    for pid, source, n in kick_counts.iter_rows():  # a row per VM and source
        if pid is not None:
            by_pid.setdefault(int(pid), {})[source] = int(n)
    rows = []
    for r in vms.sort("pid").iter_rows(named=True):  # a row per VM
        pid = int(r["pid"])
        k = by_pid.get(pid, {})
        kicks_n = k.get("kvm", k.get("qemu", k.get("lab", 0)))
        if r["inj"]:
            irqs, irq_from = r["inj"], "kvm_inj_virq"
        elif r["notify"]:
            irqs, irq_from = r["notify"], "virtio_notify"
        else:
            irqs, irq_from = r["set_irq"], "kvm_set_irq" if r["set_irq"] else None
        name = (known.get(pid) or {}).get("name")
        rows.append(
            {
                "pid": pid,
                "name": name or f"pid {pid}",
                "events": r["events"],
                "userspace_exits": r["userspace_exits"],
                "kicks": kicks_n,
                "kicks_from": next((s for s in ("kvm", "qemu", "lab") if s in k), None),
                "interrupts": irqs,
                "interrupts_from": irq_from,
            }
        )
    return {"vms": rows, "unattributed_interrupts": unattributed, "note": VMS_NOTE}


def _unreadable(t: Trace, error: Exception) -> str:
    """One line naming the part of ``t`` that cannot be read (error path only)."""
    where = str(t.path)
    for part in t.parts:
        try:
            pl.read_parquet_schema(part)
        except Exception:  # the part whose footer or schema is broken
            where = str(part)
            break
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = "".join(c if c.isascii() and c.isprintable() else "?" for c in text)
    return f"{where}: cannot read events: {text}"


def _total(rows: list[dict[str, Any]], key: str) -> int | None:
    return sum(int(r.get(key) or 0) for r in rows) if rows else None


def per_request(
    data: dict[str, Any], meta: dict[str, Any], requests: int | None = None
) -> dict[str, Any] | None:
    """What one request cost, from a summary's totals: exits, user-space exits, trapping
    accesses (those handled in user space), kicks, interrupts and time, each divided by the
    request count: ``requests`` if given, else the requests the trace shows (QEMU's or the
    lab's pops), else the count the capture wrote in meta. None when no count is known; a
    cost whose events the trace lacks is None."""
    source = "--requests"
    if not requests:
        requests, source = _total(data["requests"], "requests"), "request events"
    if not requests:
        lab = meta.get("qemu_lab") or meta.get("lab") or {}
        requests, source = int(lab.get("requests") or 0), "meta.json"
    if not requests:
        return None
    accesses = [r for r in data["accesses_handled"] if r.get("handled") == "user"]
    # the kernel's notify writes when it saw them (the lab's own lab_kick counts wake-ups)
    kick_rows = [r for r in data["kicks"] if r.get("source") == "kvm"] or [
        r for r in data["kicks"] if r.get("source") != "lab"
    ]
    # an interrupt line's rising edges (raised) where it has them, else the injections
    irq_rows = data["interrupts"]
    irqs = (
        sum(int(r.get("raised") or 0) or int(r.get("count") or 0) for r in irq_rows)
        if irq_rows
        else None
    )
    duration = data["trace"].get("duration_ns")
    totals = {
        "exits": _total(data["exits"], "count"),
        "userspace_exits": _total(data["user_exits"], "count"),
        "trapping_accesses": _total(accesses, "count") if data["accesses_handled"] else None,
        "kicks": _total(kick_rows, "kicks"),
        "interrupts": irqs,
        "time_ns": duration,
    }
    return {
        "requests": requests,
        "requests_from": source,
        **{k: (v / requests if v is not None else None) for k, v in totals.items()},
    }


def summary(
    trace: Trace | str | os.PathLike[str],
    top: int = 10,
    *,
    strict: bool = False,
    requests: int | None = None,
) -> dict[str, Any]:
    """Summarise a trace (a :class:`~vtrace.store.Trace` or its directory) as plain data.

    Keys: `trace` (path, event count, parts, host, kernel, first/last timestamps,
    `duration_ns`), `lost_events`, `lost_events_per_cpu`, `unparsed`, `incomplete_parts`,
    `events` (count, first and last timestamp per source and event), `exits` and
    `user_exits` (per reason: count, share, timed, total/mean/p50/p90/p99/p999/max in ns),
    `exits_handled`, `accesses` (top ``top`` targets), `accesses_handled`, `kicks` (top
    ``top`` queues), `requests` (per queue: count and latency in ns), `batching`,
    `interrupts`, `histograms` (log2 buckets of exit durations, user-space exit times and
    request latencies), and `missing` (analysis -> why it is empty). Times are integers in
    nanoseconds; shares are fractions.

    `per_request` divides the costs by the request count (:func:`per_request`; ``requests``
    overrides the count the trace shows), or is None when no count is known.

    `missing_parts` and `integrity` say what the trace lacks against its meta (parts absent
    from the numbering or the count, fewer events than meta counts): the part names, and
    one line (None when nothing is missing). With ``strict`` a trace that is not complete
    is a :class:`VtraceError` instead (:func:`~vtrace.store.open_trace`).
    """
    if strict:
        t = open_trace(trace.path if isinstance(trace, Trace) else trace, strict=True)
    else:
        t = trace if isinstance(trace, Trace) else open_trace(trace)
    try:
        tables = summary_tables(t.events, top)
    except (pl.exceptions.PolarsError, OSError) as e:
        # A damaged part (truncated, overwritten) is bad input, not a bug: name it.
        raise VtraceError(_unreadable(t, e)) from None
    by_name = tables["events"]
    present = set(by_name.get_column("event").to_list())

    from vtrace.analyze import ANALYSES

    missing = {
        name: NOT_RECORDED[name]
        for name, fn in ANALYSES.items()
        if len(missing_events(fn, present)) == len(fn.required_events)
    }
    first = by_name.get_column("first_ts_ns").min()
    last = by_name.get_column("last_ts_ns").max()
    meta = t.meta
    events = int(by_name.get_column("count").sum())
    data = {
        "trace": {
            "path": str(t.path),
            "events": events,
            "parts": len(t.parts),
            "meta_events": meta.get("events"),
            "meta_parts": meta.get("parts"),
            "host": meta.get("host"),
            "kernel": meta.get("kernel"),
            "importer": meta.get("importer"),
            "sources": meta.get("source_files", meta.get("source")),
            "complete": meta.get("complete"),
            "first_ts_ns": first,
            "last_ts_ns": last,
            "duration_ns": (last - first) if first is not None else None,
        },
        "lost_events": lost_events(meta),
        "lost_events_per_cpu": lost_per_cpu(meta),
        # events the collector took from the kernel but could not write (a full disk)
        "events_not_written": int(meta.get("events_not_written", 0) or 0),
        # the oldest parts a recording with --max-size dropped (ring): counted, not lost
        "dropped": meta.get("dropped"),
        "error": meta.get("error"),
        "unparsed": int(meta.get("unparsed", 0) or 0),
        "incomplete_parts": meta.get("incomplete_parts", []),
        "missing_parts": t.missing_parts,
        "integrity": t.problem(events),
        **{
            name: _rows(tables[name])
            for name in (
                "events",
                "exits",
                "exits_handled",
                "user_exits",
                "accesses",
                "accesses_handled",
                "kicks",
                "requests",
                "batching",
                "interrupts",
            )
        },
        "histograms": {
            "exits_duration_ns": _histogram_rows(tables["exits_histogram"]),
            "user_exits_until_next_ns": _histogram_rows(tables["user_exits_histogram"]),
            "requests_latency_ns": _histogram_rows(tables["requests_histogram"]),
        },
        "missing": missing,
    }
    data["per_request"] = per_request(data, meta, requests)
    try:
        per_vm = vms_table(t.events, tables["_kicks"], meta)
    except (pl.exceptions.PolarsError, OSError) as e:
        raise VtraceError(_unreadable(t, e)) from None
    data["vms"] = per_vm["vms"]
    data["vms_unattributed_interrupts"] = per_vm["unattributed_interrupts"]
    data["vms_note"] = per_vm["note"]
    qemu = meta.get("qemu") or {}
    counted = [vm for vm in qemu.get("vms", []) if not vm.get("timestamps", True)]
    if counted:
        # QEMU's events of VMs without -msg timestamp=on are counts in meta, not events.
        data["qemu_counts"] = [
            {"pid": vm.get("pid"), "name": vm.get("name"), "note": vm.get("note"),
             "counts": vm.get("counts", [])}
            for vm in counted
        ]  # fmt: skip
    return data
