"""The summary of a trace: every core analysis, aggregated, as one JSON-able dict.

`vtrace summary DIR` renders it as tables; `--json` prints it. The trace is read a chunk of
parts at a time (:func:`~vtrace.analyze.chunks.plan_chunks`), so memory stays bounded
whatever its length: each chunk's tables are reduced to counts, sums and value counts
that merge exactly (:mod:`vtrace.analyze.partials`), and what crosses a chunk boundary (an
exit whose entry is in the next part, a request not yet completed) is carried over. Within
a chunk, every table is planned lazily and collected in two rounds of `pl.collect_all`
(see :func:`summary_tables`).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl

from vtrace.analyze.accesses import (
    ACCESS_KEYS,
    access_counts,
    accesses_by_target_from_counts,
    kvm_accesses_from_timeline,
    qemu_accesses,
)
from vtrace.analyze.chunks import CHUNK_ROWS, Chunk, plan_chunks
from vtrace.analyze.exits import (
    DEFAULT_TOLERANCE_NS,
    by_reason_from_stats,
    exits_from_timeline,
    user_exits_from_timeline,
)
from vtrace.analyze.interrupts import (
    LINE_KEYS,
    interrupt_counts,
    interrupts_by_line_from_counts,
    interrupts_plan,
)
from vtrace.analyze.kicks import (
    KICK_COLUMNS,
    KICK_KEYS,
    kick_counts,
    kicks_by_queue_from_counts,
    kvm_kicks,
    vmm_kicks,
)
from vtrace.analyze.partials import EXACT_LIMIT, MERGE_EVERY, DurationStats
from vtrace.analyze.requests import (
    QUEUE_KEYS,
    RequestChunks,
    batching_counts,
    batching_from_counts,
    queue_events,
)
from vtrace.analyze.requires import missing_events
from vtrace.analyze.timeline import ThreadCarry, thread_order
from vtrace.errors import VtraceError
from vtrace.store import META_NAME, Trace, dropped_parts, open_trace

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


def _rows(frame: pl.DataFrame) -> list[dict[str, Any]]:
    # Aggregates only (tens of rows): plain dicts for JSON. NaN is not JSON.
    return [
        {k: (None if isinstance(v, float) and v != v else v) for k, v in row.items()}
        for row in frame.to_dicts()
    ]


# The events-table columns the summary's KVM tables read (the rest stay null, unread).
# `count`: a `rep outs` to a notify port is that many kicks, as in kicks_by_queue.
SUMMARY_TIMELINE_COLUMNS = ("reason_name", "addr", "write", "count", "device", "queue")
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


def _stack(frames: list[pl.DataFrame]) -> pl.LazyFrame:
    """Partial results of the chunks, one on another (same columns)."""
    return pl.concat(frames, how="vertical_relaxed").lazy()


def _kicks_by_thread(kicks: pl.LazyFrame) -> pl.LazyFrame:
    """Kicks per (source, pid, tid): what the per-VM table counts."""
    return kicks.group_by(pl.col("source").cast(pl.String), "pid", "tid").agg(
        pl.col("count").fill_null(1).cast(pl.Int64).sum().alias("kicks")
    )


def _handled_counts(access: pl.LazyFrame) -> pl.LazyFrame:
    return access.group_by(pl.col("source", "handled").cast(pl.String)).agg(
        pl.len().cast(pl.Int64).alias("count")
    )


def _sums(keys: Sequence[str], sums: Sequence[str] = (), **others: pl.Expr) -> Any:
    """A merge of stacked partial results: ``sums`` summed per ``keys``, then ``others``."""
    return lambda f: f.group_by(keys).agg(pl.col(sums).sum(), **others)


# How each kind of partial result of the chunks merges (same columns, same order).
_MERGES: dict[str, Any] = {
    "events": _sums(
        ("pid", "source", "event"),
        ("count",),
        first_ts_ns=pl.col("first_ts_ns").min(),
        last_ts_ns=pl.col("last_ts_ns").max(),
    ),
    "threads": lambda f: f.group_by("tid").agg(pl.col("pid").first()),
    "interrupts": _sums(LINE_KEYS, ("count", "raised")),
    "accesses": _sums(ACCESS_KEYS, ("count", "reads", "writes", "user", "kernel")),
    "handled": _sums(("source", "handled"), ("count",)),
    "kicks": _sums(
        KICK_KEYS,
        ("kicks", "events"),
        first_ts_ns=pl.col("first_ts_ns").min(),
        last_ts_ns=pl.col("last_ts_ns").max(),
    ),
    "kick_threads": _sums(("source", "pid", "tid"), ("kicks",)),
    "request_means": lambda f: f.group_by(QUEUE_KEYS).agg(pl.all().sum()),
    "batching_pops": _sums(QUEUE_KEYS, ("requests",)),
    "batching_done": _sums(
        QUEUE_KEYS,
        ("completed", "completions"),
        max_per_completion=pl.col("max_per_completion").max(),
    ),
    "batching_kick_counts": _sums(QUEUE_KEYS, ("kicks", "kick_events")),
    "batching_irqs": _sums(QUEUE_KEYS, ("interrupts",)),
}


class _Summary:
    """The partial results of the chunks read so far, merged into the tables at the end."""

    def __init__(self, trace: Trace, exact_limit: int) -> None:
        self.trace = trace
        self.parts: dict[str, list[pl.DataFrame]] = {}
        keys = list(QUEUE_KEYS)
        self.exits = DurationStats(
            ["reason_name", "handled"], "duration_ns", exact_limit=exact_limit
        )
        self.user = DurationStats(["reason_name"], "until_next_ns", exact_limit=exact_limit)
        self.latency = DurationStats(keys, "latency_ns", exact_limit=exact_limit)
        self.threads = ThreadCarry(DEFAULT_TOLERANCE_NS)
        self.requests = RequestChunks()

    def _keep(self, **frames: pl.DataFrame) -> None:
        """Hold each chunk's partial results; every MERGE_EVERY, merge them into one (a
        trace of thousands of chunks holds no more than a few)."""
        for name, frame in frames.items():
            held = self.parts.setdefault(name, [])
            held.append(frame)
            if len(held) > MERGE_EVERY:
                self.parts[name] = [_MERGES[name](_stack(held)).collect()]

    @staticmethod
    def scan(chunk: Chunk) -> list[pl.DataFrame]:
        """The scans of one chunk, each reading only its rows and columns (no state: the
        next chunk's run while this one's are added)."""
        events = chunk.events
        qemu = qemu_accesses(events).select(ACCESS_COLUMNS)
        return pl.collect_all(
            [
                thread_order(events, SUMMARY_TIMELINE_COLUMNS, sort=False),
                queue_events(events),
                event_counts(events),
                thread_pids(events),
                interrupt_counts(interrupts_plan(events)),
                access_counts(qemu),
                _handled_counts(qemu),
            ]
        )

    def add(self, chunk: Chunk, scanned: list[pl.DataFrame]) -> None:
        """Add one chunk's :meth:`scan`: its counts, then what follows threads and queues."""
        ordered, queue_ev, names, threads, irqs, qemu_counts, qemu_handled = scanned
        timeline = self.threads.timeline(ordered, chunk.last_ts_ns, chunk.final).lazy()
        emit = pl.col("_emit")
        derived = [
            exits_from_timeline(timeline, keep=["_emit"]).filter(emit).select(EXIT_COLUMNS),
            user_exits_from_timeline(timeline, keep=["_emit"])
            .filter(emit)
            .select(USER_EXIT_COLUMNS),
            kvm_accesses_from_timeline(timeline, keep=["_emit"])
            .filter(emit)
            .select(ACCESS_COLUMNS),
        ]
        if not chunk.final:
            derived.append(self.threads.carry_plan(timeline))
        derived = pl.collect_all(derived)
        if not chunk.final:
            self.threads.keep(derived.pop())
        exit_rows, user_rows, access_rows = derived
        access, queue = access_rows.lazy(), queue_ev.lazy()
        kicks = pl.concat([kvm_kicks(access), vmm_kicks(queue)])
        kvm_counts, kvm_handled, kick_rows, kick_threads, *batching = pl.collect_all(
            [
                access_counts(access),
                _handled_counts(access),
                kick_counts(kicks),
                _kicks_by_thread(kicks),
                *batching_counts(queue),
            ]
        )
        self.exits.add(exit_rows)
        self.user.add(user_rows)
        reqs = self.requests.step(queue_ev, chunk.final)
        self.latency.add(reqs.select(*QUEUE_KEYS, "latency_ns"))
        self._keep(
            events=names,
            interrupts=irqs,
            accesses=qemu_counts,
            handled=qemu_handled,
            threads=threads,
            kicks=kick_rows,
            kick_threads=kick_threads,
            request_means=reqs.group_by(QUEUE_KEYS).agg(
                pl.col("kick_to_pop_ns", "complete_to_irq_ns").sum().name.prefix("_sum_"),
                pl.col("kick_to_pop_ns", "complete_to_irq_ns").count().name.prefix("_n_"),
            ),
        )
        self._keep(accesses=kvm_counts, handled=kvm_handled)
        for name, frame in zip(("pops", "done", "kick_counts", "irqs"), batching, strict=True):
            self._keep(**{f"batching_{name}": frame})

    def tables(self, top: int) -> dict[str, pl.DataFrame]:
        """Every table, from the partial results of all chunks."""
        p = {name: _stack(frames) for name, frames in self.parts.items()}
        keys = list(QUEUE_KEYS)
        plans = {
            "_per_pid": pid_counts(p["events"]),
            "_threads": p["threads"].group_by("tid").agg(pl.col("pid").first()),
            "events": p["events"]
            .group_by("source", "event")
            .agg(pl.col("count").sum(), pl.col("first_ts_ns").min(), pl.col("last_ts_ns").max())
            .sort(["count", "source", "event"], descending=[True, False, False]),
            "interrupts": interrupts_by_line_from_counts(p["interrupts"]).head(top),
            "accesses": accesses_by_target_from_counts(
                p["accesses"].select(*ACCESS_KEYS, "count", "reads", "writes", "user", "kernel")
            ).head(top),
            "accesses_handled": p["handled"]
            .group_by("source", "handled")
            .agg(pl.col("count").sum())
            .sort("source", "handled"),
            "kicks": kicks_by_queue_from_counts(p["kicks"]).head(top),
            "batching": batching_from_counts(
                p["batching_pops"],
                p["batching_done"],
                p["batching_kick_counts"],
                p["batching_irqs"],
            ),
            "_means": p["request_means"]
            .group_by(keys)
            .agg(pl.all().sum())
            .select(
                *keys,
                *(
                    pl.when(pl.col(f"_n_{c}") > 0)
                    .then(pl.col(f"_sum_{c}") / pl.col(f"_n_{c}"))
                    .cast(pl.Float64)
                    .alias(f"mean_{c}")
                    for c in ("kick_to_pop_ns", "complete_to_irq_ns")
                ),
            ),
        }
        tables = dict(zip(plans, pl.collect_all(list(plans.values())), strict=True))
        means = tables.pop("_means")
        tables["exits"] = _by_reason(self.exits)
        tables["exits_handled"] = _by_handled(self.exits)
        tables["exits_histogram"] = self.exits.histogram()
        tables["user_exits"] = _by_reason(self.user)
        tables["user_exits_histogram"] = self.user.histogram()
        latency = self.latency.table(keys)
        tables["requests"] = (
            latency.drop("count")
            .rename({"rows": "requests"})
            .join(means, on=keys, how="left", nulls_equal=True)
            .sort(keys, nulls_last=True)
            if latency.width
            else latency
        )
        tables["requests_histogram"] = self.latency.histogram()
        tables["_kick_threads"] = (
            p["kick_threads"].group_by("source", "pid", "tid").agg(pl.col("kicks").sum()).collect()
        )
        return tables


def _by_reason(stats: DurationStats) -> pl.DataFrame:
    table = stats.table(["reason_name"])
    return by_reason_from_stats(table).collect() if table.width else table


def _by_handled(stats: DurationStats) -> pl.DataFrame:
    table = stats.table(["handled"])
    if not table.width:
        return table
    return table.drop("rows").with_columns(pl.col("handled").cast(pl.String)).sort("handled")


def summary_tables(
    trace: Trace,
    top: int = 10,
    *,
    chunk_rows: int = CHUNK_ROWS,
    exact_limit: int = EXACT_LIMIT,
) -> dict[str, pl.DataFrame]:
    """Every table of the summary, by name, as polars frames.

    The trace is read in chunks of about ``chunk_rows`` events. Per chunk, two rounds of
    `pl.collect_all`: (1) the scans, each reading only its rows and columns: KVM events in
    trace order, the virtqueue events, events per name, interrupts, QEMU's accesses, events
    per process; (2) the derived tables (exits, user-space exits, accesses, kicks) once the
    KVM events are grouped by thread, reduced to their counts; requests follow, queue by
    queue. Percentiles are exact up to ``exact_limit`` distinct values
    (:mod:`vtrace.analyze.partials`). A part that cannot be read is a :class:`VtraceError`
    naming it.
    """
    state = _Summary(trace, exact_limit)
    chunks = plan_chunks(trace, chunk_rows)
    # The next chunk's scans run in a second thread while this one's tables are derived
    # (polars releases the GIL): two cores busy where one would wait.
    with ThreadPoolExecutor(max_workers=1) as ahead:
        scanning = ahead.submit(state.scan, chunks[0])
        for i, chunk in enumerate(chunks):
            try:
                scanned = scanning.result()
                if i + 1 < len(chunks):
                    scanning = ahead.submit(state.scan, chunks[i + 1])
                state.add(chunk, scanned)
            except (pl.exceptions.PolarsError, OSError) as e:
                # A damaged part (truncated, overwritten) is bad input, not a bug: name it.
                where = Trace(trace.path, trace.meta, chunk.parts)
                raise VtraceError(_unreadable(where, e)) from None
    return state.tables(top)


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


def event_counts(events: pl.LazyFrame) -> pl.LazyFrame:
    """Events, first and last timestamp per (pid, source, event): the events table and the
    per-VM counts are read off it; the counts of several chunks stack and merge. Grouped on
    the categoricals, the few result rows cast to strings (not every event)."""
    return (
        events.group_by("pid", "source", "event")
        .agg(
            pl.len().cast(pl.Int64).alias("count"),
            pl.col("ts_ns").min().alias("first_ts_ns"),
            pl.col("ts_ns").max().alias("last_ts_ns"),
        )
        .with_columns(pl.col("source", "event").cast(pl.String))
    )


def thread_pids(events: pl.LazyFrame) -> pl.LazyFrame:
    """Each thread's pid: the first it is seen with (stacked chunks in trace order merge the
    same way)."""
    return events.filter(pl.col("pid").is_not_null()).group_by("tid").agg(pl.col("pid").first())


def pid_counts(counts: pl.LazyFrame) -> pl.LazyFrame:
    """Per pid, from :func:`event_counts`: events, user-space exits, VM-only events and
    interrupts of each kind (see :func:`vms_table`)."""
    ev, src, n = pl.col("event"), pl.col("source"), pl.col("count")
    return (
        counts.filter(pl.col("pid").is_not_null())
        .group_by("pid")
        .agg(
            events=n.sum(),
            userspace_exits=n.filter(ev == "kvm_userspace_exit").sum(),
            vcpu_events=n.filter(ev.is_in(_VCPU_EVENTS)).sum(),
            vmm_events=n.filter(src.is_in(["qemu", "lab"])).sum(),
            inj=n.filter(ev == "kvm_inj_virq").sum(),
            notify=n.filter(
                (src == "qemu") & ev.is_in(["virtio_notify", "virtio_notify_irqfd"])
            ).sum(),
            set_irq=n.filter(ev.is_in(["kvm_set_irq", "kvm_msi_set_irq"])).sum(),
        )
    )


def vms_table(
    per_pid: pl.DataFrame, threads: pl.DataFrame, kicks: pl.DataFrame, meta: dict[str, Any]
) -> dict[str, Any]:
    """One row per VM (pid): its name, events, user-space exits, kicks and interrupts, and
    the interrupts no VM can be named for (see :data:`VMS_NOTE`). From :func:`pid_counts`,
    :func:`thread_pids` and the kicks per (source, pid, tid)."""
    known = {int(p): v for p, v in (meta.get("vms") or {}).items() if str(p).isdigit()}
    is_vm = (
        (pl.col("vcpu_events") > 0) | (pl.col("vmm_events") > 0) | pl.col("pid").is_in(list(known))
    )
    vms = per_pid.filter(is_vm)
    unattributed = int(per_pid.filter(~is_vm).get_column("set_irq").sum() or 0)
    kick_counts = (
        kicks.lazy()
        .join(threads.lazy().rename({"pid": "_pid"}), on="tid", how="left")
        .with_columns(pid=pl.coalesce("pid", "_pid"))
        .group_by("pid", pl.col("source").cast(pl.String))
        .agg(pl.col("kicks").sum())
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


def _bad_part(t: Trace) -> str:
    """The part of ``t`` (a chunk's parts) that cannot be read: the one whose footer is
    broken, else the one whose pages are; the directory when none fails alone."""
    for part in t.parts:
        try:
            pl.read_parquet_schema(part)
        except Exception:  # a footer or schema that is broken
            return str(part)
    if len(t.parts) == 1:
        return str(t.parts[0])
    for part in t.parts:
        try:
            Trace(t.path, t.meta, [part]).events.collect()
        except Exception:  # pages that are broken
            return str(part)
    return str(t.path)


def _unreadable(t: Trace, error: Exception) -> str:
    """One line naming the part of ``t`` that cannot be read (error path only)."""
    where = _bad_part(t)
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    text = "".join(c if c.isascii() and c.isprintable() else "?" for c in text)
    return f"{where}: cannot read events: {text}"


def _total(rows: list[dict[str, Any]], key: str) -> int | None:
    return sum(int(r.get(key) or 0) for r in rows) if rows else None


def request_count(
    data: dict[str, Any], meta: dict[str, Any], requests: int | None = None
) -> tuple[int, str] | None:
    """The requests a trace covers and where the count comes from: ``requests`` if given,
    else the requests the trace shows (QEMU's or the lab's pops), else the count the
    capture wrote in meta, unless a size-bounded recording dropped its oldest parts (that
    count is the whole run's); None when none is known."""
    if requests:
        return requests, "--requests"
    shown = _total(data["requests"], "requests")
    if shown:
        return shown, "request events"
    if dropped_parts(meta):
        return None
    lab = meta.get("qemu_lab") or meta.get("lab") or {}
    counted = int(lab.get("requests") or 0)
    return (counted, "meta.json") if counted else None


def cost_totals(data: dict[str, Any]) -> dict[str, int | None]:
    """A summary's totals of what requests cost: exits, user-space exits, trapping accesses
    (those handled in user space), kicks, interrupts and time in ns; None for those whose
    events the trace lacks."""
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
    return {
        "exits": _total(data["exits"], "count"),
        "userspace_exits": _total(data["user_exits"], "count"),
        "trapping_accesses": _total(accesses, "count") if data["accesses_handled"] else None,
        "kicks": _total(kick_rows, "kicks"),
        "interrupts": irqs,
        "time_ns": data["trace"].get("duration_ns"),
    }


def per_request(
    data: dict[str, Any], meta: dict[str, Any], requests: int | None = None
) -> dict[str, Any] | None:
    """What one request cost: :func:`cost_totals` each divided by :func:`request_count`.
    None when no count is known; a cost whose events the trace lacks is None."""
    counted = request_count(data, meta, requests)
    if counted is None:
        return None
    n, source = counted
    return {
        "requests": n,
        "requests_from": source,
        **{k: (v / n if v is not None else None) for k, v in cost_totals(data).items()},
    }


def summary(
    trace: Trace | str | os.PathLike[str],
    top: int = 10,
    *,
    strict: bool = False,
    requests: int | None = None,
    chunk_rows: int = CHUNK_ROWS,
    exact_limit: int = EXACT_LIMIT,
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
    tables = summary_tables(t, top, chunk_rows=chunk_rows, exact_limit=exact_limit)
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
    per_vm = vms_table(tables["_per_pid"], tables["_threads"], tables["_kick_threads"], meta)
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


# --- fleet: one row per trace -------------------------------------------------------------


def _traces_in(path: Path) -> list[Path]:
    """The trace directories (with a meta.json) in ``path``, by name; none when ``path`` is
    a trace itself or not a directory."""
    if not path.is_dir() or (path / META_NAME).exists():
        return []
    try:
        return sorted(c for c in path.iterdir() if c.is_dir() and (c / META_NAME).exists())
    except OSError:
        return []  # open_trace names the directory it cannot read


def holds_traces(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a directory of trace directories (not a trace itself)."""
    return bool(_traces_in(Path(path)))


def trace_dirs(paths: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The trace directories named by ``paths``: each is a trace directory, or a directory
    of them (its subdirectories with a meta.json, by name). A path that is neither stays as
    it is, for :func:`~vtrace.store.open_trace` to name."""
    found: list[Path] = []
    for path in paths:
        found += _traces_in(Path(path)) or [Path(path)]
    return found


def fleet(paths: Sequence[str | os.PathLike[str]], *, strict: bool = False) -> list[dict[str, Any]]:
    """One row per trace of ``paths`` (:func:`trace_dirs`): `name`, `path`, `events`,
    `duration_ns`, `lost_events`, the totals of :func:`cost_totals` (`exits`,
    `userspace_exits`, `trapping_accesses`, `kicks`, `interrupts`), `requests` and
    `requests_from` (:func:`request_count`), `per_request` (:func:`per_request`, None when
    no count is known) and `integrity`. Every trace is opened before any is summarised: a
    bad path is an error before any work. Names are the directories' names, or their paths
    where two share a name."""
    dirs = trace_dirs(paths)
    traces = [open_trace(d, strict=strict) for d in dirs]
    names = [d.name for d in dirs]
    if len(set(names)) < len(names):
        names = [str(d) for d in dirs]
    rows = []
    for name, t in zip(names, traces, strict=True):
        data = summary(t, strict=strict)
        counted = request_count(data, t.meta)
        totals = cost_totals(data)
        rows.append(
            {
                "name": name,
                "path": str(t.path),
                "events": data["trace"]["events"],
                "duration_ns": totals.pop("time_ns"),
                "lost_events": data["lost_events"],
                **totals,
                "requests": counted[0] if counted else None,
                "requests_from": counted[1] if counted else None,
                "per_request": data["per_request"],
                "integrity": data["integrity"],
            }
        )
    return rows
