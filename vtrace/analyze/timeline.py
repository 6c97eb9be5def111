"""The order of KVM events on each thread: what came before and after each event.

Exits, user-space exits and accesses are all read off the same per-thread sequence of
`kvm_exit`, `kvm_entry`, `kvm_pio`, `kvm_mmio`, `kvm_fast_mmio` and `kvm_userspace_exit`:
a vCPU thread does one thing at a time, so the event after an access on its thread says
where the access was handled. Only `source == "kvm"` events are in it; events that the
VMM itself logs on the same thread (lab, QEMU) happen in user space and do not end a
user-space exit.
"""

from __future__ import annotations

import polars as pl

from vtrace.schema import (
    EVENTS_SCHEMA,
    KVM_ENTRY,
    KVM_EXIT,
    KVM_FAST_MMIO,
    KVM_MMIO,
    KVM_PIO,
    KVM_USERSPACE_EXIT,
    SOURCE_KVM,
)

TIMELINE_EVENTS = (KVM_EXIT, KVM_ENTRY, KVM_PIO, KVM_MMIO, KVM_FAST_MMIO, KVM_USERSPACE_EXIT)
# The events table columns the derived tables carry along.
TIMELINE_COLUMNS = (
    "ts_ns", "event", "pid", "tid", "cpu", "vcpu", "reason", "reason_name", "isa", "flags",
    "addr", "size", "write", "value", "count", "queue", "device", "rip",
)  # fmt: skip
# A small Enum instead of the global Categorical: comparisons on it are integer compares.
TIMELINE_EVENT = pl.Enum(TIMELINE_EVENTS)


def thread_order(
    events: pl.LazyFrame, columns: tuple[str, ...] = TIMELINE_COLUMNS, *, sort: bool = True
) -> pl.LazyFrame:
    """The KVM events of :data:`TIMELINE_EVENTS`, sorted by (tid, ts_ns).

    Reads `ts_ns`, `event`, `tid`, `reason` and those of ``columns``; `event` becomes an
    Enum of :data:`TIMELINE_EVENTS`. With ``sort=False`` the rows stay in trace order, for
    :func:`sort_by_thread` on the collected frame.
    """
    wanted = ["ts_ns", "event", "tid", "reason"]
    wanted += [c for c in TIMELINE_COLUMNS if c in columns and c not in wanted]
    ordered = (
        events.filter((pl.col("source") == SOURCE_KVM) & pl.col("event").is_in(TIMELINE_EVENTS))
        .select(wanted)
        .with_columns(pl.col("event").cast(TIMELINE_EVENT))
    )
    return ordered.sort("tid", "ts_ns", maintain_order=True) if sort else ordered


def sort_by_thread(frame: pl.DataFrame) -> pl.DataFrame:
    """Group a collected frame's rows by thread, each thread's rows in `ts_ns` order.

    What the analyses need is each thread's events contiguous and in time order, not the
    threads in tid order. Trace parts are written in time order, so the rows usually are
    already sorted by `ts_ns`; then splitting by `tid` (threads in order of first
    appearance) keeps time order at a fraction of a sort's cost (measured here on 8M rows:
    0.3 s against 0.5-0.7 s for a stable sort on `tid`, 0.8 s for a sort on both).
    """
    if frame.height and frame.get_column("ts_ns").is_sorted():
        return pl.concat(frame.partition_by("tid", maintain_order=True))
    return frame.sort("tid", "ts_ns", maintain_order=True)


def with_neighbours(ordered: pl.LazyFrame) -> pl.LazyFrame:
    """Add each event's previous and next event of the same thread to :func:`thread_order`.

    Adds `prev_event`, `prev_ts_ns`, `prev_reason`, `next_event`, `next_ts_ns`,
    `next_reason` (null at a thread's first or last event), and the columns of
    :data:`TIMELINE_COLUMNS` that were not read, as nulls.
    """
    # Rows of one tid are contiguous, so shifting the whole column and checking the
    # neighbour's tid gives the per-thread neighbour without a window.
    same_prev = pl.col("tid").shift(1) == pl.col("tid")
    same_next = pl.col("tid").shift(-1) == pl.col("tid")
    have = ordered.collect_schema().names()
    return ordered.with_columns(
        pl.when(same_prev).then(pl.col("event").shift(1)).alias("prev_event"),
        pl.when(same_prev).then(pl.col("ts_ns").shift(1)).alias("prev_ts_ns"),
        pl.when(same_prev).then(pl.col("reason").shift(1)).alias("prev_reason"),
        pl.when(same_next).then(pl.col("event").shift(-1)).alias("next_event"),
        pl.when(same_next).then(pl.col("ts_ns").shift(-1)).alias("next_ts_ns"),
        pl.when(same_next).then(pl.col("reason").shift(-1)).alias("next_reason"),
        *(pl.lit(None, EVENTS_SCHEMA[c]).alias(c) for c in TIMELINE_COLUMNS if c not in have),
    )


def kvm_timeline(events: pl.LazyFrame, columns: tuple[str, ...] = TIMELINE_COLUMNS) -> pl.LazyFrame:
    """KVM events sorted by (tid, ts_ns) with the previous and next event of the same thread.

    :func:`thread_order` then :func:`with_neighbours`. Columns of :data:`TIMELINE_COLUMNS`
    not in ``columns`` are not read and stay null (the summary reads only what it shows).
    """
    return with_neighbours(thread_order(events, columns))


class ThreadCarry:
    """Each thread's KVM events read a chunk of the trace at a time, in bounded memory.

    :meth:`timeline` gives :func:`with_neighbours` of a chunk's events after those carried
    from earlier chunks, with `_emit`: the rows whose derived values are final now and were
    not given before. A row is final once its thread has two more events (the accesses look
    two events either way) and, for a `kvm_exit`, once its thread exits again (the pairing
    never goes past the next exit) or the chunk ends more than ``tolerance_ns`` after it (no
    later event can pair with it). What is not final is carried to the next chunk with the
    two events before it, so every thread carries a few events plus, at most, an exit still
    open and what followed it. Chunks must come in time order, each later than every event
    before it (:func:`vtrace.analyze.chunks.plan_chunks`).
    """

    def __init__(self, tolerance_ns: int) -> None:
        self.tolerance_ns = tolerance_ns
        self._carry: pl.DataFrame | None = None

    def timeline(self, rows: pl.DataFrame, last_ts_ns: int | None, final: bool) -> pl.DataFrame:
        """The timeline of ``rows`` (:func:`thread_order` of one chunk, collected) after the
        carried events. ``last_ts_ns``: the chunk's latest timestamp; ``final``: no chunk
        follows. Call :meth:`keep` with what :meth:`carry_plan` collects before the next."""
        frame = rows.with_columns(pl.lit(False).alias("_seen"))
        if self._carry is not None and self._carry.height:
            frame = pl.concat([self._carry, frame], how="vertical_relaxed")
        self._columns = frame.columns
        timeline = with_neighbours(sort_by_thread(frame).lazy())
        if final:
            done = pl.lit(True)
        else:
            tid, is_exit = pl.col("tid"), pl.col("event") == KVM_EXIT
            # Exits so far on each row, and on the last row of its thread (rows of a thread
            # are contiguous): a later exit of the thread exists when the two differ.
            upto = is_exit.cast(pl.Int64).cum_sum()
            at_end = pl.when((tid.shift(-1) != tid).fill_null(True)).then(upto).backward_fill()
            settled = ~is_exit | (at_end > upto)
            if last_ts_ns is not None:
                settled = settled | (pl.col("ts_ns") + self.tolerance_ns < last_ts_ns)
            # An event without a thread has no neighbours (as in the whole trace): final.
            done = ((tid.shift(-2) == tid).fill_null(False) & settled) | tid.is_null()
        # Collected once: the exits, user-space exits, accesses and the carry all read it.
        return (
            timeline.with_columns(done.alias("_done"))
            .with_columns((pl.col("_done") & ~pl.col("_seen")).alias("_emit"))
            .collect()
        )

    def carry_plan(self, timeline: pl.LazyFrame | pl.DataFrame) -> pl.LazyFrame:
        """The events of :meth:`timeline` the next chunk needs: from two events before each
        thread's first row that is not final, in time order."""
        # A row is carried when a row of its thread at most two after it is not final: the
        # count of such rows up to two rows on (or the thread's end), less the count before
        # the thread starts, is positive. Rows of a thread are contiguous: running counts
        # over the whole frame, no window per thread.
        tid = pl.col("tid")
        open_upto = (~pl.col("_done")).cast(pl.Int64).cum_sum()
        starts = (tid.shift(1) != tid).fill_null(True)
        ends = (tid.shift(-1) != tid).fill_null(True)
        before = pl.when(starts).then(open_upto.shift(1).fill_null(0)).forward_fill()
        at_end = pl.when(ends).then(open_upto).backward_fill()
        ahead = pl.when(tid.shift(-2) == tid).then(open_upto.shift(-2)).otherwise(at_end)
        return (
            timeline.lazy()
            .filter(ahead - before > 0)
            .with_columns(pl.col("_seen") | pl.col("_done"))
            .select(self._columns)
            .sort("ts_ns", maintain_order=True)
        )

    def keep(self, carry: pl.DataFrame) -> None:
        """Hold what :meth:`carry_plan` collected for the next chunk."""
        self._carry = carry
