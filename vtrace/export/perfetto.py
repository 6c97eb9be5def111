"""A trace as a Perfetto timeline: `vtrace export perfetto DIR -o FILE.pftrace`.

The file is Perfetto's protobuf trace format (a `Trace` of `TracePacket`s carrying
`TrackDescriptor`s and `TrackEvent`s, as perfetto.dev's "Writing TrackEvent protos
synthetically" describes), which the Perfetto UI and trace processor open directly:

* a process per VM (VMM process id), a thread track per vCPU thread and per back-end thread;
* on a vCPU thread, a slice per VM exit (from `kvm_exit` to its `kvm_entry`, named by the
  exit reason) and, nested in it, the user-space handling (from `kvm_userspace_exit` to the
  thread's next KVM event, named by its KVM_EXIT_* reason); where `kvm_exit` never fires
  (software KVM) the user-space slices stand alone;
* on a back-end thread, a slice per pass: from the kick the back end saw (or its first pop)
  to the last request it popped before it completed anything or turned to another queue; a
  thread that is both (one VMM thread, QEMU under TCG) gets its passes on a track of its own
  under the thread so that slices never cross;
* instants for kicks, pops, completions (flushes), interrupts and the other register
  accesses, on the thread that logged them;
* per queue, an async track with each request as a slice from its kick (or, without one,
  its pop) to the completion that returned it, spread over as many same-named tracks as
  requests overlap (the UI draws them as one);
* flows from a guest's kick to the pass it woke, and from a completion to the interrupt
  that announced it;
* counters per queue: ring occupancy (requests popped and not yet returned) and kicks per
  second.

Every part comes from the analyses in :mod:`vtrace.analyze`; what a trace lacks (no exits
under software KVM, no requests in a trace of KVM events alone) is simply absent. Rows are
built with polars for all events at once, sorted by time, and written as packets in
batches by :mod:`vtrace.export.protowire`.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np
import polars as pl

from vtrace.analyze.accesses import ACCESS_COLUMNS, kvm_accesses_from_timeline, qemu_accesses
from vtrace.analyze.exits import exits_from_timeline, user_exits_from_timeline
from vtrace.analyze.interrupts import interrupts_plan
from vtrace.analyze.kicks import kicks_from_accesses
from vtrace.analyze.requests import REQUEST_EVENTS, queue_events, requests_plan
from vtrace.analyze.timeline import sort_by_thread, thread_order, with_neighbours
from vtrace.export import protowire as w
from vtrace.schema import (
    IRQ_EVENTS,
    KVM_SET_IRQ,
    SOURCE_KVM,
    SOURCE_LAB,
    SOURCE_QEMU,
    VIRTIO_NOTIFY,
    VIRTIO_NOTIFY_IRQFD,
)
from vtrace.store import open_trace

# TrackEvent.Type
SLICE_BEGIN, SLICE_END, INSTANT, COUNTER = 1, 2, 3, 4
# Every packet is on one sequence, whose interned names the first packet defines.
SEQUENCE_ID = 1
SEQ_INCREMENTAL_STATE_CLEARED, SEQ_NEEDS_INCREMENTAL_STATE = 1, 2
# Packets encoded and written per batch: bounds the encoder's memory (about 100 bytes of
# intermediate arrays per packet) without paying numpy's per-call cost too often.
BATCH_ROWS = 1 << 18
# Kicks per second are counted in bins of about this many per trace span (rounded to
# 1, 2 or 5 times a power of ten nanoseconds, at least 1 us).
KICK_RATE_BINS = 200
MIN_BIN_NS = 1_000

# Categories (the slice table's `category` column; the UI can filter on them).
CATEGORIES = (
    "exit", "user-space", "pass", "request", "kick", "pop", "completion", "interrupt", "access",
)  # fmt: skip
CATEGORY_IID = {name: i + 1 for i, name in enumerate(CATEGORIES)}
CATEGORY = pl.Enum(CATEGORIES)  # a small Enum: grouping and interning on it are integer work
# Debug annotation names (the args of a slice in the UI's details pane).
ARGS = ("seq", "count", "queue", "addr", "gsi", "vector", "level", "pops", "reason", "value")
ARG_IID = {name: i + 1 for i, name in enumerate(ARGS)}

# Tie-breaks for events at the same timestamp on one track, so that slices nest: slices
# that end there close first (deepest first), then instants, then slices of no duration
# (each begun and ended before the next begins), then slices that begin (outermost first).
RANK_END, RANK_INSTANT, RANK_EMPTY_BEGIN, RANK_EMPTY_END, RANK_BEGIN = 10, 20, 24, 25, 30

# The columns of the rows every builder returns (one row per TrackEvent).
ROW_SCHEMA = pl.Schema(
    {
        "pid": pl.Int32,
        "tid": pl.Int32,
        "layer": pl.Int8,  # 0: the thread's own track; 1: its passes track; -1: `track` is set
        "track": pl.UInt64,
        "ts": pl.Int64,
        "rank": pl.Int16,
        "type": pl.UInt8,
        "cat": CATEGORY,
        "name": pl.String,
        "value": pl.Int64,
        "flow_out": pl.UInt64,
        "flow_in": pl.UInt64,
        "a1": pl.UInt8,
        "v1": pl.Int64,
        "a2": pl.UInt8,
        "v2": pl.Int64,
    }
)
THREAD, PASSES, OWN_TRACK = 0, 1, -1


@dataclass
class Track:
    """One TrackDescriptor: a process, a thread, or a named (async or counter) track."""

    uuid: int
    name: str
    parent: int | None = None
    pid: int | None = None
    tid: int | None = None
    counter: bool = False
    description: str = ""

    def descriptor(self) -> bytes:
        fields: list[tuple[int, Any]] = [(1, self.uuid)]
        if self.parent is not None:
            fields.append((5, self.parent))
        if self.tid is not None and self.pid is not None:
            fields.append((4, w.string_message([(1, self.pid), (2, self.tid), (5, self.name)])))
        elif self.pid is not None and self.parent is None:
            fields.append((3, w.string_message([(1, self.pid), (6, self.name)])))
        else:
            fields.append((2, self.name))
        if self.counter:
            fields.append((8, b""))
        if self.description:
            fields.append((14, self.description))
        return w.string_message(fields)


@dataclass
class Timeline:
    """The tracks and the TrackEvent rows (sorted by time) of one trace."""

    tracks: list[Track]
    rows: pl.DataFrame
    names: list[str]  # interned event names: iid = index + 1
    counts: dict[str, int] = field(default_factory=dict)


@dataclass
class ExportResult:
    """What `export_perfetto` wrote."""

    path: Path
    events: int
    packets: int
    bytes: int
    seconds: float
    counts: dict[str, int]

    @property
    def events_per_s(self) -> float:
        return self.events / self.seconds if self.seconds > 0 else math.inf


# --- rows ---------------------------------------------------------------------------------


def _rows(frame: pl.DataFrame, **cols: pl.Expr | Any) -> pl.DataFrame:
    """``frame`` as TrackEvent rows: the given columns, the others null."""
    exprs = []
    for name, dtype in ROW_SCHEMA.items():
        value = cols.get(name)
        if value is None:
            expr = pl.lit(None, dtype)
        elif isinstance(value, pl.Expr):
            expr = value.cast(dtype)
        else:
            expr = pl.lit(value, dtype)
        exprs.append(expr.alias(name))
    return frame.select(exprs)


def _slices(
    frame: pl.DataFrame,
    *,
    start: pl.Expr,
    end: pl.Expr,
    depth: int,
    cat: str,
    name: pl.Expr | str,
    **extra: pl.Expr | Any,
) -> pl.DataFrame:
    """A BEGIN and an END row per row of ``frame`` (``start`` <= ``end``)."""
    where = {k: extra.pop(k) for k in ("pid", "tid", "layer", "track") if k in extra}
    begins = _rows(
        frame,
        **where,
        ts=start,
        rank=pl.when(end > start).then(RANK_BEGIN + depth).otherwise(RANK_EMPTY_BEGIN),
        type=SLICE_BEGIN,
        cat=cat,
        name=name,
        **extra,
    )
    ends = _rows(
        frame,
        **where,
        ts=end,
        rank=pl.when(end > start).then(RANK_END - depth).otherwise(RANK_EMPTY_END),
        type=SLICE_END,
    )
    return pl.concat([begins, ends])


def _instants(frame: pl.DataFrame, *, cat: str, name: pl.Expr | str, **cols: Any) -> pl.DataFrame:
    return _rows(frame, rank=RANK_INSTANT, type=INSTANT, cat=cat, name=name, **cols)


def _fmt(template: str, *exprs: pl.Expr) -> pl.Expr:
    return pl.format(template, *exprs)


@dataclass
class _Analyses:
    exits: pl.DataFrame
    user: pl.DataFrame
    accesses: pl.DataFrame
    kicks: pl.DataFrame
    queue: pl.DataFrame
    requests: pl.DataFrame
    interrupts: pl.DataFrame


def _analyses(events: pl.LazyFrame) -> _Analyses:
    """Every analysis the timeline draws, in two rounds of `pl.collect_all` (the KVM events
    ordered by thread once, shared by exits, user-space exits and accesses)."""
    ordered, queue, qemu_access, irqs = pl.collect_all(
        [
            thread_order(events, sort=False),
            queue_events(events),
            qemu_accesses(events).select(ACCESS_COLUMNS),
            interrupts_plan(events),
        ]
    )
    timeline = with_neighbours(sort_by_thread(ordered).lazy())
    exits, user, kvm_access, reqs = pl.collect_all(
        [
            exits_from_timeline(timeline),
            user_exits_from_timeline(timeline),
            kvm_accesses_from_timeline(timeline).select(ACCESS_COLUMNS),
            requests_plan(queue.lazy()),
        ]
    )
    access = pl.concat([kvm_access, qemu_access])
    kicks = kicks_from_accesses(access.lazy(), queue.lazy()).collect()
    return _Analyses(exits, user, access, kicks, queue, reqs, irqs)


def _exit_rows(a: _Analyses) -> list[pl.DataFrame]:
    """Exits (slices, or instants when the entry was lost) and user-space handling."""
    out = []
    reason = pl.coalesce(pl.col("reason_name").cast(pl.String), _fmt("exit {}", pl.col("reason")))
    ex = a.exits
    if ex.height:
        paired = ex.filter(pl.col("entry_ts_ns").is_not_null())
        out.append(
            _slices(
                paired,
                pid=pl.col("pid"),
                tid=pl.col("tid"),
                layer=THREAD,
                start=pl.col("ts_ns"),
                end=pl.col("entry_ts_ns"),
                depth=0,
                cat="exit",
                name=reason,
                a1=ARG_IID["reason"],
                v1=pl.col("reason"),
            )
        )
        lost = ex.filter(pl.col("entry_ts_ns").is_null())
        out.append(
            _instants(
                lost,
                pid=pl.col("pid"),
                tid=pl.col("tid"),
                layer=THREAD,
                ts=pl.col("ts_ns"),
                cat="exit",
                name=_fmt("{} (entry not recorded)", reason),
                a1=ARG_IID["reason"],
                v1=pl.col("reason"),
            )
        )
    user = a.user
    if user.height:
        # The exit each return to user space happened in (the thread's latest exit at or
        # before it): its handling ends at the latest when the exit does, so it nests.
        inside = user.sort("tid", "ts_ns").join_asof(
            ex.select(
                "tid",
                pl.col("ts_ns").alias("exit_ts"),
                pl.col("entry_ts_ns").alias("exit_end"),
            ).sort("tid", "exit_ts"),
            left_on="ts_ns",
            right_on="exit_ts",
            by="tid",
            strategy="backward",
            check_sortedness=False,
        )
        nested = pl.col("exit_end").is_not_null() & (pl.col("ts_ns") <= pl.col("exit_end"))
        inside = inside.with_columns(
            nested.fill_null(False).alias("nested"),
            pl.when(nested)
            .then(pl.min_horizontal("next_ts_ns", "exit_end"))
            .otherwise(pl.col("next_ts_ns"))
            .alias("end"),
        )
        name = _fmt("user space: {}", pl.col("reason_name").cast(pl.String).fill_null("?"))
        for depth in (0, 1):
            part = inside.filter((pl.col("nested") == bool(depth)) & pl.col("end").is_not_null())
            out.append(
                _slices(
                    part,
                    pid=pl.col("pid"),
                    tid=pl.col("tid"),
                    layer=THREAD,
                    start=pl.col("ts_ns"),
                    end=pl.col("end"),
                    depth=depth,
                    cat="user-space",
                    name=name,
                    a1=ARG_IID["reason"],
                    v1=pl.col("reason"),
                )
            )
        # The thread's last return to user space has no end in the trace.
        out.append(
            _instants(
                inside.filter(pl.col("end").is_null()),
                pid=pl.col("pid"),
                tid=pl.col("tid"),
                layer=THREAD,
                ts=pl.col("ts_ns"),
                cat="user-space",
                name=name,
                a1=ARG_IID["reason"],
                v1=pl.col("reason"),
            )
        )
    return out


def _access_rows(a: _Analyses) -> pl.DataFrame | None:
    """Register accesses that are not kicks (those are drawn as kicks)."""
    if not a.accesses.height:
        return None
    kick_keys = a.kicks.filter(pl.col("source") == SOURCE_KVM).select(
        "ts_ns", "tid", pl.col("event").cast(pl.String)
    )
    rest = a.accesses.with_columns(pl.col("event").cast(pl.String)).join(
        kick_keys, on=["ts_ns", "tid", "event"], how="anti", nulls_equal=True
    )
    rw = pl.when(pl.col("write")).then(pl.lit("write")).otherwise(pl.lit("read"))
    where = pl.coalesce(pl.col("device").cast(pl.String), pl.col("event"))
    return _instants(
        rest,
        pid=pl.col("pid"),
        tid=pl.col("tid"),
        layer=THREAD,
        ts=pl.col("ts_ns"),
        cat="access",
        name=_fmt("{} {} ({})", where, rw, pl.col("handled").cast(pl.String).fill_null("?")),
        a1=ARG_IID["addr"],
        v1=pl.col("addr").cast(pl.Int64, wrap_numerical=True),
        a2=ARG_IID["value"],
        v2=pl.col("value").cast(pl.Int64, wrap_numerical=True),
    )


def _event_sets() -> tuple[list[str], list[str], list[str]]:
    pops, done, kicks = [], [], []
    for kinds in REQUEST_EVENTS.values():
        pops += kinds[0]
        done += kinds[1]
        kicks += kinds[2]
    return pops, done, kicks


def _queue_key() -> list[pl.Expr]:
    return [
        pl.col("device").cast(pl.String).fill_null("").alias("qdev"),
        pl.col("queue").fill_null(-1).alias("qnum"),
    ]


def _passes(a: _Analyses) -> pl.DataFrame:
    """One row per back-end pass: a run of pops on one thread and queue, started by the
    kick the back end saw (when one comes right before) and ended by its last pop; a
    completion, a kick or another queue's event ends a run."""
    pops, done, kicks = _event_sets()
    ev = pl.col("event").cast(pl.String)
    q = (
        a.queue.with_columns(
            *_queue_key(),
            pl.when(ev.is_in(pops))
            .then(pl.lit("pop"))
            .when(ev.is_in(done))
            .then(pl.lit("done"))
            .when(ev.is_in(kicks))
            .then(pl.lit("kick"))
            .alias("kind"),
            pl.col("source").cast(pl.String),
        )
        .filter(pl.col("kind").is_not_null())  # queue_events also has QEMU's interrupts
        .with_row_index("order")
        .sort("tid", "ts_ns", "order")
    )
    same = pl.col("tid").shift(1).eq_missing(pl.col("tid"))
    new_run = (
        ~same
        | (pl.col("kind") != "pop")
        | (pl.col("kind").shift(1) == "done")
        | (pl.col("qdev") != pl.col("qdev").shift(1))
        | (pl.col("qnum") != pl.col("qnum").shift(1))
        | (pl.col("source") != pl.col("source").shift(1))
    )
    is_pop = pl.col("kind") == "pop"
    return (
        q.with_columns(new_run.fill_null(True).cum_sum().alias("run"))
        .group_by("run")
        .agg(
            pl.col("pid").first(),
            pl.col("tid").first(),
            pl.col("source").first(),
            pl.col("qdev").first(),
            pl.col("qnum").first(),
            pl.col("ts_ns").min().alias("start"),
            pl.col("ts_ns").filter(is_pop).max().alias("end"),
            is_pop.sum().cast(pl.Int64).alias("pops"),
        )
        .filter(pl.col("pops") > 0)
        .sort("start", "run")
    )


def _kick_links(passes: pl.DataFrame, kicks: pl.DataFrame) -> pl.DataFrame:
    """For each pass, the kick that woke it (``kick_row``: a row of ``kicks``; null when
    none): the guest's latest notify write KVM saw in that VM before the pass, else the
    latest kick the VMM logged for the queue; a kick wakes one pass at most, and only one
    that comes after the back end's previous pass on that thread."""
    k = kicks.with_row_index("kick_row").with_columns(
        *_queue_key(), pl.col("source").cast(pl.String)
    )
    p = passes.with_columns(
        pl.col("end").shift(1).over("tid", order_by="start").alias("prev_end")
    ).sort("start")
    kvm = (
        k.filter(pl.col("source") == SOURCE_KVM)
        .select("pid", pl.col("ts_ns").alias("kvm_ts"), pl.col("kick_row").alias("kvm_row"))
        .sort("kvm_ts")
    )
    vmm = (
        k.filter(pl.col("source") != SOURCE_KVM)
        .select(
            "pid",
            "qdev",
            "qnum",
            pl.col("ts_ns").alias("vmm_ts"),
            pl.col("kick_row").alias("vmm_row"),
        )
        .sort("vmm_ts")
    )
    # Each side is sorted by its time, so it is within every `by` group too.
    asof = {"strategy": "backward", "check_sortedness": False}
    p = p.join_asof(kvm, left_on="start", right_on="kvm_ts", by="pid", **asof).join_asof(
        vmm, left_on="start", right_on="vmm_ts", by=["pid", "qdev", "qnum"], **asof
    )
    fresh = pl.col("prev_end").is_null()
    kvm_ok = pl.col("kvm_row").is_not_null() & (fresh | (pl.col("kvm_ts") > pl.col("prev_end")))
    vmm_ok = pl.col("vmm_row").is_not_null() & (fresh | (pl.col("vmm_ts") >= pl.col("prev_end")))
    p = p.with_columns(
        pl.when(kvm_ok)
        .then(pl.col("kvm_row"))
        .when(vmm_ok)
        .then(pl.col("vmm_row"))
        .alias("kick_row")
    )
    # One flow per kick: the first pass after it.
    first = pl.col("start").rank("ordinal").over("kick_row") == 1
    return p.with_columns(
        pl.when(pl.col("kick_row").is_null() | first).then(pl.col("kick_row")).alias("kick_row")
    )


def _irq_links(a: _Analyses) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Completions, each with ``irq_row`` (a row of the interrupts; null when none): the
    first interrupt of its queue after it and before the queue's next completion (QEMU's
    virtio_notify); for queues whose interrupts name no queue (the lab's irqfd), the first
    interrupt KVM raised in that window. An interrupt announces one completion at most."""
    _, done, _ = _event_sets()
    comp = (
        a.queue.filter(pl.col("event").cast(pl.String).is_in(done))
        .with_columns(*_queue_key(), pl.col("source").cast(pl.String))
        .with_row_index("done_row")
        .sort("ts_ns")
        .with_columns(
            pl.col("ts_ns").shift(-1).over("source", "pid", "qdev", "qnum").alias("next_done")
        )
    )
    irq = a.interrupts.with_row_index("irq_row").with_columns(
        *_queue_key(), pl.col("event").cast(pl.String), pl.col("source").cast(pl.String)
    )
    named = (
        irq.filter(pl.col("event").is_in([VIRTIO_NOTIFY, VIRTIO_NOTIFY_IRQFD]))
        .select(
            "pid",
            "qdev",
            "qnum",
            pl.col("ts_ns").alias("q_irq_ts"),
            pl.col("irq_row").alias("q_irq"),
        )
        .sort("q_irq_ts")
    )
    raised = (
        irq.filter(
            (pl.col("source") == SOURCE_KVM)
            & pl.col("event").is_in(IRQ_EVENTS)
            # kvm_set_irq traces both edges of a line: the interrupt is the raise.
            & ((pl.col("event") != KVM_SET_IRQ) | pl.col("level").fill_null(1).ne(0))
        )
        .select(pl.col("ts_ns").alias("k_irq_ts"), pl.col("irq_row").alias("k_irq"))
        .sort("k_irq_ts")
    )
    comp = comp.join_asof(
        named,
        left_on="ts_ns",
        right_on="q_irq_ts",
        by=["pid", "qdev", "qnum"],
        strategy="forward",
        check_sortedness=False,  # sorted by time, so within every `by` group too
    ).join_asof(raised, left_on="ts_ns", right_on="k_irq_ts", strategy="forward")
    before_next = pl.col("next_done").is_null()
    q_ok = pl.col("q_irq").is_not_null() & (
        before_next | (pl.col("q_irq_ts") < pl.col("next_done"))
    )
    k_ok = (
        pl.col("k_irq").is_not_null()
        & (before_next | (pl.col("k_irq_ts") < pl.col("next_done")))
        # Only queues whose interrupts name no queue: QEMU's own are matched above.
        & (pl.col("source") == SOURCE_LAB)
    )
    comp = comp.with_columns(
        pl.when(q_ok).then(pl.col("q_irq")).when(k_ok).then(pl.col("k_irq")).alias("irq_row")
    )
    first = pl.col("ts_ns").rank("ordinal").over("irq_row") == 1
    comp = comp.with_columns(
        pl.when(pl.col("irq_row").is_null() | first).then(pl.col("irq_row")).alias("irq_row")
    )
    return comp, irq


def _queue_rows(a: _Analyses) -> list[pl.DataFrame]:
    """Kicks, pops, completions, interrupts (instants), passes (slices) and their flows."""
    out: list[pl.DataFrame] = []
    passes = _passes(a)
    linked = _kick_links(passes, a.kicks).with_row_index("pass_row")
    # Flow ids: kick -> pass are 1.., completion -> interrupt follow.
    linked = linked.with_columns(
        pl.when(pl.col("kick_row").is_not_null())
        .then(pl.col("pass_row").cast(pl.UInt64) + 1)
        .alias("flow")
    )
    n_pass_flows = linked.height
    kick_flow = linked.filter(pl.col("flow").is_not_null()).select("kick_row", "flow")
    kicks = (
        a.kicks.with_row_index("kick_row")
        .join(kick_flow, on="kick_row", how="left")
        .sort("kick_row")
    )
    detail = pl.when(pl.col("source") == SOURCE_KVM).then(pl.lit("notify write"))
    out.append(
        _instants(
            kicks,
            pid=pl.col("pid"),
            tid=pl.col("tid"),
            layer=THREAD,
            ts=pl.col("ts_ns"),
            cat="kick",
            name=_fmt("kick: {}", pl.coalesce(detail, pl.col("event").cast(pl.String))),
            flow_out=pl.col("flow"),
            a1=ARG_IID["queue"],
            v1=pl.col("queue"),
            a2=ARG_IID["addr"],
            v2=pl.col("addr").cast(pl.Int64, wrap_numerical=True),
        )
    )
    pname = _fmt("pass: {} queue {}", pl.col("qdev"), pl.col("qnum"))
    out.append(
        _slices(
            linked,
            pid=pl.col("pid"),
            tid=pl.col("tid"),
            layer=PASSES,
            start=pl.col("start"),
            end=pl.col("end"),
            depth=0,
            cat="pass",
            name=pname,
            flow_in=pl.col("flow"),
            a1=ARG_IID["pops"],
            v1=pl.col("pops"),
        )
    )
    reqs = a.requests
    out.append(
        _instants(
            reqs.filter(pl.col("pop_ts_ns").is_not_null()),
            pid=pl.col("pid"),
            tid=pl.col("tid"),
            layer=THREAD,
            ts=pl.col("pop_ts_ns"),
            cat="pop",
            name="pop",
            a1=ARG_IID["seq"],
            v1=pl.col("seq"),
        )
    )
    comp, irq = _irq_links(a)
    comp = comp.with_columns(
        pl.when(pl.col("irq_row").is_not_null())
        .then(pl.col("done_row").cast(pl.UInt64) + 1 + n_pass_flows)
        .alias("flow")
    )
    out.append(
        _instants(
            comp,
            pid=pl.col("pid"),
            tid=pl.col("tid"),
            layer=THREAD,
            ts=pl.col("ts_ns"),
            cat="completion",
            name=pl.col("event").cast(pl.String),
            flow_out=pl.col("flow"),
            a1=ARG_IID["count"],
            v1=pl.col("count"),
            a2=ARG_IID["queue"],
            v2=pl.col("queue"),
        )
    )
    irq_flow = comp.filter(pl.col("flow").is_not_null()).select("irq_row", "flow")
    irq = irq.join(irq_flow, on="irq_row", how="left")
    out.append(
        _instants(
            irq,
            pid=pl.col("pid"),
            tid=pl.col("tid"),
            layer=THREAD,
            ts=pl.col("ts_ns"),
            cat="interrupt",
            name=pl.col("event"),
            flow_in=pl.col("flow"),
            a1=pl.when(pl.col("vector").is_not_null())
            .then(ARG_IID["vector"])
            .when(pl.col("gsi").is_not_null())
            .then(ARG_IID["gsi"]),
            v1=pl.coalesce("vector", "gsi"),
            a2=pl.when(pl.col("level").is_not_null()).then(ARG_IID["level"]),
            v2=pl.col("level"),
        )
    )
    return out


def _nice_ns(target: float) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is >= ``target`` (>= MIN_BIN_NS)."""
    target = max(target, MIN_BIN_NS)
    exp = 10 ** math.floor(math.log10(target))
    for m in (1, 2, 5, 10):
        if m * exp >= target:
            return int(m * exp)
    return int(10 * exp)


# --- tracks -------------------------------------------------------------------------------


class _Uuids:
    def __init__(self) -> None:
        self.next = 1

    def take(self, n: int = 1) -> int:
        first, self.next = self.next, self.next + n
        return first


def _queue_label(source: str, device: str | None, queue: int | None) -> str:
    dev = device or source
    return f"{dev} queue {queue}" if queue is not None else dev


def _request_lanes(reqs: pl.DataFrame) -> pl.DataFrame:
    """Each request with its slice (start, end) and a lane: requests of one lane never
    overlap, so each lane can be one track. Requests complete in order of their pops, so
    lane = position mod K with K the most requests in flight at once nearly always works;
    K doubles until it does."""
    r = reqs.with_columns(
        pl.coalesce("kick_ts_ns", "pop_ts_ns").alias("start"),
        pl.coalesce("complete_ts_ns", "pop_ts_ns").alias("end"),
        pl.col("source").fill_null(""),
        pl.col("device").fill_null(""),
        pl.col("queue").fill_null(-1),
        pl.col("pid").fill_null(-1),
    ).sort("source", "pid", "device", "queue", "start", "seq")
    keys = ["source", "pid", "device", "queue"]
    r = r.with_columns(pl.int_range(pl.len()).over(keys).alias("pos"))
    lanes = []
    for _, part in r.group_by(keys, maintain_order=True):
        start = part.get_column("start").to_numpy()
        end = part.get_column("end").to_numpy()
        k = max(1, _in_flight(start, end))
        pos = np.arange(len(start))
        while True:
            lane = pos % k
            order = np.lexsort((start, lane))
            same_lane = lane[order][1:] == lane[order][:-1]
            clash = same_lane & (start[order][1:] < end[order][:-1])
            if not clash.any() or k >= len(start):
                break
            k = min(2 * k, len(start))
        lanes.append(part.with_columns(pl.Series("lane", lane, dtype=pl.Int64)))
    return pl.concat(lanes) if lanes else r.with_columns(pl.lit(0, pl.Int64).alias("lane"))


def _in_flight(start: np.ndarray, end: np.ndarray) -> int:
    """The most intervals open at once (an interval ending where another starts is not)."""
    ts = np.concatenate([start, end])
    step = np.concatenate([np.ones(len(start), np.int64), -np.ones(len(end), np.int64)])
    order = np.lexsort((step, ts))  # ends (-1) before starts at the same time
    return int(np.cumsum(step[order]).max()) if len(ts) else 0


def build_timeline(events: pl.LazyFrame | pl.DataFrame) -> Timeline:
    """The tracks and sorted TrackEvent rows of an events table (see the module doc)."""
    a = _analyses(events.lazy())
    uuids = _Uuids()
    thread_rows = _exit_rows(a)
    access = _access_rows(a)
    if access is not None:
        thread_rows.append(access)
    queue_rows = _queue_rows(a)
    thread_rows += queue_rows
    thread_rows = [f for f in thread_rows if f.height]
    bound = pl.concat(thread_rows) if thread_rows else pl.DataFrame(schema=ROW_SCHEMA)

    # Processes and threads: every (pid, tid) with rows, named by what happens on it.
    roles = (
        bound.filter(pl.col("type") != SLICE_END)
        .select("pid", "tid", "cat")
        .unique()
        .group_by("pid", "tid")
        .agg(pl.col("cat").cast(pl.String))
        .sort("pid", "tid", nulls_last=True)
    )
    vcpus = (
        pl.concat([a.exits.select("tid", "vcpu"), a.user.select("tid", "vcpu")])
        .drop_nulls()
        .unique("tid")
    )
    vcpu_of = dict(zip(vcpus.get_column("tid"), vcpus.get_column("vcpu"), strict=True))
    proc_kind = _process_kinds(a)
    tracks: list[Track] = []
    proc_uuid: dict[int | None, int] = {}
    thread_uuid: dict[tuple[int | None, int | None], int] = {}
    pass_uuid: dict[tuple[int | None, int | None], int] = {}
    for pid, tid, cats in roles.iter_rows():  # one row per thread: tracks, not events
        cats = set(cats)
        if pid not in proc_uuid:
            proc_uuid[pid] = uuids.take()
            name = proc_kind.get(pid, "process") if pid is not None else "no process id"
            tracks.append(Track(proc_uuid[pid], name, pid=pid))
        vcpu_side = bool(cats & {"exit", "user-space", "access"})
        backend = bool(cats & {"pass", "pop", "completion"})
        if tid in vcpu_of:
            tname = f"vCPU {vcpu_of[tid]}"
        elif vcpu_side and backend:
            tname = "vCPU + back end"
        elif vcpu_side:
            tname = "vCPU"
        elif backend:
            tname = "back end"
        elif cats <= {"interrupt"}:
            tname = "interrupts"
        else:
            tname = "thread"
        if tid is None:
            # Rows without a thread go on the process's own track.
            thread_uuid[(pid, tid)] = proc_uuid[pid]
        else:
            thread_uuid[(pid, tid)] = uuids.take()
            tracks.append(
                Track(thread_uuid[(pid, tid)], tname, parent=proc_uuid[pid], pid=pid, tid=tid)
            )
        if "pass" in cats:
            if cats & {"exit", "user-space"}:
                pass_uuid[(pid, tid)] = uuids.take()
                tracks.append(
                    Track(
                        pass_uuid[(pid, tid)],
                        "back-end passes",
                        parent=thread_uuid[(pid, tid)],
                        description="The back end's passes over its queues on this thread "
                        "(a track of their own: they need not nest in the thread's exits).",
                    )
                )
            else:
                pass_uuid[(pid, tid)] = thread_uuid[(pid, tid)]
    keymap = pl.DataFrame(
        {
            "pid": [k[0] for k in thread_uuid] + [k[0] for k in pass_uuid],
            "tid": [k[1] for k in thread_uuid] + [k[1] for k in pass_uuid],
            "layer": [THREAD] * len(thread_uuid) + [PASSES] * len(pass_uuid),
            "uuid": list(thread_uuid.values()) + list(pass_uuid.values()),
        },
        schema={"pid": pl.Int32, "tid": pl.Int32, "layer": pl.Int8, "uuid": pl.UInt64},
    )
    bound = (
        bound.join(keymap, on=["pid", "tid", "layer"], how="left", nulls_equal=True)
        .with_columns(pl.col("uuid").alias("track"))
        .drop("uuid")
    )

    def process_track(pid: int | None) -> int:
        if pid not in proc_uuid:
            proc_uuid[pid] = uuids.take()
            name = proc_kind.get(pid, "process") if pid is not None else "no process id"
            tracks.append(Track(proc_uuid[pid], name, pid=pid))
        return proc_uuid[pid]

    own: list[pl.DataFrame] = []
    counts: dict[str, int] = {}
    # Requests: one async track per queue, as many lanes (same name) as overlap.
    if a.requests.height:
        lanes = _request_lanes(a.requests)
        lane_keys = lanes.select("source", "pid", "device", "queue", "lane").unique(
            maintain_order=True
        )
        uuid_col = []
        # one row per queue lane: track descriptors, not events
        for source, pid, device, queue, _lane in lane_keys.iter_rows():
            real_pid = pid if pid >= 0 else None
            label = _queue_label(source, device or None, queue if queue >= 0 else None)
            uuid = uuids.take()
            uuid_col.append(uuid)
            tracks.append(
                Track(
                    uuid,
                    f"requests: {label}",
                    parent=process_track(real_pid),
                    description="Each request from the kick that announced it (or its pop, "
                    "without one) to the completion that returned it to the guest.",
                )
            )
        lane_keys = lane_keys.with_columns(pl.Series("track", uuid_col, dtype=pl.UInt64))
        lanes = lanes.join(lane_keys, on=["source", "pid", "device", "queue", "lane"])
        done = pl.col("complete_ts_ns").is_not_null()
        own.append(
            _slices(
                lanes,
                layer=OWN_TRACK,
                track=pl.col("track"),
                start=pl.col("start"),
                end=pl.col("end"),
                depth=0,
                cat="request",
                name=pl.when(done)
                .then(pl.lit("request"))
                .otherwise(pl.lit("request (not completed)")),
                a1=ARG_IID["seq"],
                v1=pl.col("seq"),
            )
        )
        own.append(_occupancy(lanes, tracks, uuids, process_track))
    span = _span(bound, own)
    if a.kicks.height and span is not None:
        own.append(_kick_rates(a.kicks, span, tracks, uuids, process_track))
    own = [f for f in own if f.height]
    rows = pl.concat([bound, *own]) if own else bound
    rows = rows.sort("ts", "rank", maintain_order=True)

    names = rows.get_column("name").drop_nulls().unique().sort().to_list()
    rows = rows.with_columns(
        (pl.col("name").cast(pl.Enum(names)).to_physical().cast(pl.UInt64) + 1).alias("name_iid"),
        # CATEGORY_IID follows the Enum's order: iid = physical code + 1.
        (pl.col("cat").to_physical().cast(pl.UInt64) + 1).alias("cat_iid"),
    )
    begin_or_instant = rows.filter(pl.col("type").is_in([SLICE_BEGIN, INSTANT]))
    by_cat = begin_or_instant.group_by("cat", "type").len()
    found = {  # one row per category and type: a dozen at most
        (cat, typ): n
        for cat, typ, n in by_cat.with_columns(pl.col("cat").cast(pl.String)).iter_rows()
    }
    for cat in CATEGORIES:  # a fixed order: the command prints them
        for typ, kind in ((SLICE_BEGIN, "slices"), (INSTANT, "instants")):
            if (cat, typ) in found:
                counts[f"{cat} {kind}"] = found[(cat, typ)]
    counts["counter values"] = int((rows.get_column("type") == COUNTER).sum())
    counts["flows"] = int(rows.get_column("flow_out").is_not_null().sum())
    return Timeline(tracks, rows, names, counts)


def _process_kinds(a: _Analyses) -> dict[int | None, str]:
    """What each process is, by the events that name it."""
    kinds: dict[int | None, str] = {}
    for frame in (a.exits, a.user, a.accesses):
        for pid in frame.get_column("pid").unique().to_list():
            kinds[pid] = "VMM"
    q = a.queue.select("pid", pl.col("source").cast(pl.String)).unique()
    for pid, source in q.iter_rows():  # one row per VM and source
        kinds[pid] = {SOURCE_QEMU: "QEMU", SOURCE_LAB: "lab VMM"}.get(source, "VMM")
    acc = a.accesses.filter(pl.col("source").cast(pl.String) == SOURCE_QEMU)
    for pid in acc.get_column("pid").unique().to_list():
        kinds[pid] = "QEMU"
    for pid in a.interrupts.get_column("pid").unique().to_list():
        kinds.setdefault(pid, "interrupt injection")
    return kinds


def _span(bound: pl.DataFrame, own: list[pl.DataFrame]) -> tuple[int, int] | None:
    lo, hi = [], []
    for f in (bound, *own):
        if f.height:
            lo.append(f.get_column("ts").min())
            hi.append(f.get_column("ts").max())
    if not lo:
        return None
    return int(min(lo)), int(max(hi))  # type: ignore[arg-type]


def _occupancy(
    lanes: pl.DataFrame, tracks: list[Track], uuids: _Uuids, process_track
) -> pl.DataFrame:
    """Ring occupancy per queue: requests popped and not yet returned, after every change."""
    keys = ["source", "pid", "device", "queue"]
    steps = pl.concat(
        [
            lanes.select(*keys, pl.col("pop_ts_ns").alias("ts"), pl.lit(1, pl.Int64).alias("d")),
            lanes.filter(pl.col("complete_ts_ns").is_not_null()).select(
                *keys, pl.col("complete_ts_ns").alias("ts"), pl.lit(-1, pl.Int64).alias("d")
            ),
        ]
    )
    per_ts = (
        steps.group_by(*keys, "ts")
        .agg(pl.col("d").sum())
        .sort(*keys, "ts")
        .with_columns(pl.col("d").cum_sum().over(keys).alias("value"))
    )
    qkeys = per_ts.select(keys).unique(maintain_order=True)
    uuid_col = []
    for source, pid, device, queue in qkeys.iter_rows():
        uuid = uuids.take()
        uuid_col.append(uuid)
        label = _queue_label(source, device or None, queue if queue >= 0 else None)
        tracks.append(
            Track(
                uuid,
                f"ring occupancy: {label}",
                parent=process_track(pid if pid >= 0 else None),
                counter=True,
                description="Requests the back end has popped from the avail ring and not "
                "yet returned in the used ring.",
            )
        )
    qkeys = qkeys.with_columns(pl.Series("track", uuid_col, dtype=pl.UInt64))
    per_ts = per_ts.join(qkeys, on=keys)
    return _rows(
        per_ts, layer=OWN_TRACK, track=pl.col("track"), ts=pl.col("ts"), rank=RANK_INSTANT,
        type=COUNTER, value=pl.col("value"),
    )  # fmt: skip


def _kick_rates(
    kicks: pl.DataFrame, span: tuple[int, int], tracks: list[Track], uuids: _Uuids, process_track
) -> pl.DataFrame:
    """Kicks per second per kick source (a queue, or the notify address KVM saw), in bins
    of a round width, zero where there were none, back to zero after the last bin."""
    width = _nice_ns((span[1] - span[0]) / KICK_RATE_BINS)
    keys = ["pid", "source", "event", "device", "queue", "addr"]
    k = kicks.select(
        pl.col("pid").fill_null(-1),
        pl.col("source").cast(pl.String),
        pl.col("event").cast(pl.String),
        pl.col("device").cast(pl.String),
        "queue",
        # KVM's kicks name no queue: tell them apart by the address written.
        pl.when(pl.col("source") == SOURCE_KVM).then(pl.col("addr")).alias("addr"),
        ((pl.col("ts_ns") - span[0]) // width).alias("bin"),
        pl.col("count").fill_null(1).cast(pl.Int64).alias("n"),
    )
    per_bin = k.group_by(*keys, "bin").agg(pl.col("n").sum())
    ranges = (
        per_bin.group_by(keys)
        .agg(pl.int_ranges(pl.col("bin").min(), pl.col("bin").max() + 2).first().alias("bin"))
        .explode("bin")
    )
    full = (
        ranges.join(per_bin, on=[*keys, "bin"], how="left", nulls_equal=True)
        .with_columns(pl.col("n").fill_null(0))
        .sort(*keys, "bin", nulls_last=True)
    )
    series = full.select(keys).unique(maintain_order=True)
    uuid_col = []
    for pid, source, event, device, queue, addr in series.iter_rows():
        uuid = uuids.take()
        uuid_col.append(uuid)
        if source == SOURCE_KVM:
            label = f"notify writes to {hex(addr)}" if addr is not None else "notify writes"
        else:
            label = f"{event} {_queue_label(source, device, queue)}"
        tracks.append(
            Track(
                uuid,
                f"kicks/s: {label}",
                parent=process_track(pid if pid >= 0 else None),
                counter=True,
                description=f"Kicks per second, counted in bins of {width / 1000:g} us.",
            )
        )
    series = series.with_columns(pl.Series("track", uuid_col, dtype=pl.UInt64))
    full = full.join(series, on=keys, nulls_equal=True)
    return _rows(
        full,
        layer=OWN_TRACK,
        track=pl.col("track"),
        ts=span[0] + pl.col("bin") * width,
        rank=RANK_INSTANT,
        type=COUNTER,
        value=(pl.col("n") * 1_000_000_000 // width),
    )


# --- encoding -----------------------------------------------------------------------------


def _u64(frame: pl.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray]:
    s = frame.get_column(col)
    present = s.is_not_null().to_numpy()
    values = s.fill_null(0).cast(pl.UInt64, wrap_numerical=True).to_numpy()
    return values.astype(np.uint64, copy=False), present


def _i64(frame: pl.DataFrame, col: str) -> tuple[np.ndarray, np.ndarray]:
    s = frame.get_column(col)
    return s.fill_null(0).cast(pl.Int64).to_numpy(), s.is_not_null().to_numpy()


def _annotation(frame: pl.DataFrame, name_col: str, value_col: str) -> w.Message:
    names, has_name = _u64(frame, name_col)
    values, has_value = _i64(frame, value_col)
    present = has_name & has_value
    return w.Message(
        4, (w.varint_field(1, names, present), w.varint_field(4, values, present)), present
    )


def encode_rows(rows: pl.DataFrame) -> bytes:
    """TracePackets (each as a `Trace.packet` field) for TrackEvent rows, in row order."""
    n = rows.height
    if n == 0:
        return b""
    ts, _ = _i64(rows, "ts")
    typ, _ = _u64(rows, "type")
    track, _ = _u64(rows, "track")
    cat, has_cat = _u64(rows, "cat_iid")
    name, has_name = _u64(rows, "name_iid")
    value, has_value = _i64(rows, "value")
    fout, has_fout = _u64(rows, "flow_out")
    fin, has_fin = _u64(rows, "flow_in")
    event = w.Message(
        11,
        (
            w.varint_field(9, typ),
            w.varint_field(11, track),
            w.varint_field(3, cat, has_cat),
            w.varint_field(10, name, has_name),
            w.varint_field(30, value, has_value),
            w.fixed64_field(47, fout, has_fout),
            w.fixed64_field(48, fin, has_fin),
            _annotation(rows, "a1", "v1"),
            _annotation(rows, "a2", "v2"),
        ),
    )
    packet = w.Message(
        1,
        (
            w.varint_field(8, ts),
            event,
            w.constant_field(10, SEQUENCE_ID, n),
            w.constant_field(13, SEQ_NEEDS_INCREMENTAL_STATE, n),
        ),
    )
    return w.encode(packet)


def _packet(fields: list[tuple[int, Any]]) -> bytes:
    body = w.string_message(fields)
    return w.string_message([(1, body)])


def header(timeline: Timeline, first_ts: int) -> bytes:
    """The packets before the events: every track's descriptor, then the interned names."""
    out = bytearray()
    for t in timeline.tracks:
        out += _packet([(60, t.descriptor())])
    interned: list[tuple[int, Any]] = []
    for name, iid in CATEGORY_IID.items():
        interned.append((1, w.string_message([(1, iid), (2, name)])))
    for i, name in enumerate(timeline.names):
        interned.append((2, w.string_message([(1, i + 1), (2, name)])))
    for name, iid in ARG_IID.items():
        interned.append((3, w.string_message([(1, iid), (2, name)])))
    out += _packet(
        [
            (8, first_ts),
            (10, SEQUENCE_ID),
            (12, w.string_message(interned)),
            (13, SEQ_INCREMENTAL_STATE_CLEARED | SEQ_NEEDS_INCREMENTAL_STATE),
            (87, True),
        ]
    )
    return bytes(out)


def packets(timeline: Timeline, batch_rows: int = BATCH_ROWS) -> Iterator[bytes]:
    """The whole file, in batches of bytes."""
    rows = timeline.rows
    first = int(rows.get_column("ts").min()) if rows.height else 0  # type: ignore[arg-type]
    yield header(timeline, first)
    for start in range(0, rows.height, batch_rows):
        yield encode_rows(rows.slice(start, batch_rows))


def export_perfetto(
    trace_dir: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    force: bool = False,
) -> ExportResult:
    """Write the Perfetto timeline of the trace in ``trace_dir`` to the file ``out``.

    ``out`` is checked before any work and written whole or not at all (an existing file is
    replaced only with ``force``)."""
    from vtrace.output import check_new_file, write_file

    started = time.perf_counter()
    check_new_file(out, force=force)
    trace = open_trace(trace_dir)
    events = trace.events_on_disk()
    timeline = build_timeline(trace.events)
    written = 0

    def write(f: BinaryIO) -> None:
        nonlocal written
        for chunk in packets(timeline):
            f.write(chunk)
            written += len(chunk)

    write_file(out, write, force=force)
    n_packets = len(timeline.tracks) + 1 + timeline.rows.height
    return ExportResult(
        Path(out), events, n_packets, written, time.perf_counter() - started, timeline.counts
    )
