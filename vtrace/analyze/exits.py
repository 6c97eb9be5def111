"""VM exits: each `kvm_exit` paired with the next `kvm_entry` of its thread, and user-space exits.

An exit is *handled in user space* when a `kvm_userspace_exit` of the same thread falls
between the exit and its entry: KVM returned from `KVM_RUN` and the VMM emulated the
access. Otherwise KVM handled it in the kernel.

Where `kvm_exit`/`kvm_entry` never fire (software KVM, or not recorded), :func:`user_exits`
still measures every return to user space: its reason (`KVM_EXIT_IO`, `KVM_EXIT_MMIO`, ...)
and the time until the thread's next KVM event.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from vtrace.analyze.distributions import percentile_exprs
from vtrace.analyze.requires import requires_events
from vtrace.analyze.timeline import kvm_timeline
from vtrace.schema import KVM_ENTRY, KVM_EXIT, KVM_USERSPACE_EXIT

# Longest exit accepted as one exit: a lost `kvm_entry` must not pair an exit with an
# entry seconds later. An idle vCPU can sit in a HLT exit for long stretches, so this is
# generous; a following `kvm_exit` of the same thread ends the pairing anyway.
DEFAULT_TOLERANCE_NS = 1_000_000_000

HANDLED = pl.Enum(["kernel", "user"])


@requires_events(KVM_EXIT, KVM_ENTRY)
def exits_plan(events: pl.LazyFrame, tolerance_ns: int = DEFAULT_TOLERANCE_NS) -> pl.LazyFrame:
    """The lazy plan of :func:`exits` (collect several plans together with `pl.collect_all`)."""
    return exits_from_timeline(kvm_timeline(events.lazy()), tolerance_ns)


def exits_from_timeline(
    timeline: pl.LazyFrame, tolerance_ns: int = DEFAULT_TOLERANCE_NS, keep: Sequence[str] = ()
) -> pl.LazyFrame:
    """:func:`exits` from a :func:`~vtrace.analyze.timeline.kvm_timeline` (shared by several
    analyses of one trace), plus the timeline's columns named in ``keep``."""
    # The thread's order pairs an exit with its entry, not the timestamps: text traces print
    # microseconds, and a guest that ran under one between two exits leaves the entry and
    # the next exit with the same timestamp. Rows are in (tid, ts_ns) order, ties in trace
    # order (kvm_timeline), so the row number is each thread's sequence.
    timeline = timeline.with_columns(_seq=pl.int_range(pl.len(), dtype=pl.Int64))
    same_next = pl.col("tid").shift(-1) == pl.col("tid")
    exits = timeline.filter(pl.col("event") == KVM_EXIT).select(
        *keep,
        "tid",
        "pid",
        "vcpu",
        "cpu",
        "ts_ns",
        "reason",
        "reason_name",
        "isa",
        "flags",
        "rip",
        "_seq",
        # The thread's next exit bounds the pairing: an entry after it belongs to that one.
        pl.when(same_next).then(pl.col("_seq").shift(-1)).alias("_next_exit_seq"),
    )
    entries = timeline.filter(pl.col("event") == KVM_ENTRY).select(
        "tid", pl.col("_seq").alias("_entry_seq"), pl.col("ts_ns").alias("entry_ts_ns")
    )
    user = timeline.filter(pl.col("event") == KVM_USERSPACE_EXIT).select(
        "tid",
        pl.col("_seq").alias("_user_seq"),
        pl.col("ts_ns").alias("user_ts_ns"),
        pl.col("reason_name").alias("user_reason_name"),
    )
    paired = exits.join_asof(
        entries,
        left_on="_seq",
        right_on="_entry_seq",
        by="tid",
        strategy="forward",
        check_sortedness=False,  # row numbers: increasing
    ).join_asof(
        user,
        left_on="_seq",
        right_on="_user_seq",
        by="tid",
        strategy="forward",
        check_sortedness=False,
    )
    next_exit = pl.col("_next_exit_seq")
    entry_ok = (
        pl.col("_entry_seq").is_not_null()
        & (pl.col("entry_ts_ns") - pl.col("ts_ns") <= tolerance_ns)
        & (next_exit.is_null() | (pl.col("_entry_seq") < next_exit))
    )
    entry = pl.when(entry_ok).then(pl.col("entry_ts_ns"))
    # Where the exit ends: its entry, or (entry lost) the thread's next exit.
    end = pl.coalesce(pl.when(entry_ok).then(pl.col("_entry_seq")), next_exit)
    went_user = (
        pl.col("_user_seq").is_not_null()
        & (pl.col("user_ts_ns") - pl.col("ts_ns") <= tolerance_ns)
        & (end.is_null() | (pl.col("_user_seq") < end))
    )
    return paired.select(
        "tid",
        "pid",
        "vcpu",
        "cpu",
        "ts_ns",
        entry.alias("entry_ts_ns"),
        (entry - pl.col("ts_ns")).alias("duration_ns"),
        "reason",
        "reason_name",
        "isa",
        "flags",
        "rip",
        pl.when(went_user)
        .then(pl.lit("user", HANDLED))
        .when(entry_ok)
        .then(pl.lit("kernel", HANDLED))
        .alias("handled"),
        pl.when(went_user).then(pl.col("user_reason_name")).alias("user_reason_name"),
        *keep,
    )


def exits(
    events: pl.LazyFrame | pl.DataFrame, tolerance_ns: int = DEFAULT_TOLERANCE_NS
) -> pl.DataFrame:
    """One row per `kvm_exit`, paired with the next `kvm_entry` of the same thread.

    Columns: `tid`, `pid`, `vcpu`, `cpu`, `ts_ns` (exit), `entry_ts_ns`, `duration_ns`
    (entry - exit), `reason`, `reason_name`, `isa`, `flags`, `rip`, `handled` ("kernel" or
    "user"), `user_reason_name` (the KVM_EXIT_* reason when handled in user space).

    An exit whose entry is lost (the thread's next exit comes first, or no entry within
    ``tolerance_ns``) keeps null `entry_ts_ns`/`duration_ns`; its `handled` is "user" when
    a user-space exit followed it, else null. Empty, with this schema, when the trace has
    no `kvm_exit`.
    """
    return exits_plan(events.lazy(), tolerance_ns).collect()


@requires_events(KVM_USERSPACE_EXIT)
def user_exits_plan(events: pl.LazyFrame) -> pl.LazyFrame:
    """The lazy plan of :func:`user_exits`."""
    return user_exits_from_timeline(kvm_timeline(events.lazy()))


def user_exits_from_timeline(timeline: pl.LazyFrame, keep: Sequence[str] = ()) -> pl.LazyFrame:
    """:func:`user_exits` from a :func:`~vtrace.analyze.timeline.kvm_timeline` (plus its
    columns named in ``keep``)."""
    return timeline.filter(pl.col("event") == KVM_USERSPACE_EXIT).select(
        "tid",
        "pid",
        "vcpu",
        "cpu",
        "ts_ns",
        "reason",
        "reason_name",
        pl.col("next_event").cast(pl.String).cast(pl.Categorical),
        "next_ts_ns",
        (pl.col("next_ts_ns") - pl.col("ts_ns")).alias("until_next_ns"),
        *keep,
    )


def user_exits(events: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """One row per `kvm_userspace_exit` (a return from `KVM_RUN` to the VMM).

    Columns: `tid`, `pid`, `vcpu`, `cpu`, `ts_ns`, `reason` (KVM_EXIT_* code),
    `reason_name`, `next_event` (the thread's next KVM event), `next_ts_ns`, and
    `until_next_ns`: the time from the return to user space to that next event, i.e. the
    VMM's handling, the way back into the guest and, without `kvm_entry` in the trace, the
    guest's run up to its next trapped access. Null at the thread's last event.
    """
    return user_exits_plan(events.lazy()).collect()


def by_reason_plan(frame: pl.DataFrame | pl.LazyFrame, col: str) -> pl.LazyFrame:
    """The lazy plan of :func:`by_reason`."""
    return by_reason_from_stats(
        frame.lazy()
        .group_by("reason_name")
        .agg(pl.len().cast(pl.Int64).alias("rows"), *percentile_exprs(col))
    )


def by_reason_from_stats(stats: pl.DataFrame | pl.LazyFrame) -> pl.LazyFrame:
    """:func:`by_reason` from per-reason `rows` and the columns of
    :func:`~vtrace.analyze.distributions.percentile_exprs` (`count` is the timed rows), as
    :meth:`~vtrace.analyze.partials.DurationStats.table` gives them too."""
    return (
        stats.lazy()
        .rename({"count": "timed", "rows": "count"})
        .with_columns(
            pl.col("reason_name").cast(pl.String),
            (pl.col("count") / pl.col("count").sum()).alias("share"),
        )
        .select("reason_name", "count", "share", pl.exclude("reason_name", "count", "share"))
        .sort(["count", "reason_name"], descending=[True, False], nulls_last=True)
    )


def by_reason(frame: pl.DataFrame | pl.LazyFrame, col: str) -> pl.DataFrame:
    """Count, share of count, total/mean/percentile times of ``col`` per `reason_name`.

    Works on :func:`exits` (``col="duration_ns"``) and :func:`user_exits`
    (``col="until_next_ns"``). Columns: `reason_name`, `count`, `share`, `timed` (rows
    with a time), then `total_ns`, `mean_ns`, `p50_ns`, `p90_ns`, `p99_ns`, `p999_ns`,
    `max_ns` over the timed rows. Sorted by `count` descending.
    """
    return by_reason_plan(frame, col).collect()
