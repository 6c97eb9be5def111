"""Requests through a virtqueue: from the back end taking a request (pop) to completing it.

Two sources describe requests:

* `qemu`: `virtqueue_pop` (one request taken from the avail ring) and `virtqueue_flush`
  (`count` requests published in the used ring), per device and queue;
* `lab`: the lab VMM's `lab_pop` and `lab_complete` (`count` requests completed; 1 when
  null).

Completion is matched to pops in order per queue (`source`, `pid`, `device`, `queue`): the
k-th popped request completes at the first completion event that brings the queue's
completed total to k or more. A back end that completes out of order within one flush
keeps its latencies exact; across flushes the order is an approximation. A trace that
starts while requests are in flight shifts the matching for that queue, so traces should
start before the workload.

Each request also gets the kick that announced it: the latest kick of the same queue
(`lab_kick`, `virtio_queue_notify`) at or before its pop, unless the queue completed
requests in between (then the back end found it on its own and it has no kick).
"""

from __future__ import annotations

import polars as pl

from vtrace.analyze.kicks import KICK_COLUMNS
from vtrace.analyze.requires import requires_events
from vtrace.schema import (
    LAB_COMPLETE,
    LAB_KICK,
    LAB_POP,
    SOURCE_LAB,
    SOURCE_QEMU,
    VIRTIO_NOTIFY,
    VIRTIO_NOTIFY_IRQFD,
    VIRTIO_QUEUE_NOTIFY,
    VIRTQUEUE_FLUSH,
    VIRTQUEUE_POP,
)

# source -> (pop events, completion events, kick events, interrupt events). The lab's
# interrupts go through an irqfd (kvm_set_irq, which names no queue): none here.
REQUEST_EVENTS: dict[str, tuple[tuple[str, ...], ...]] = {
    SOURCE_QEMU: (
        (VIRTQUEUE_POP,),
        (VIRTQUEUE_FLUSH,),
        (VIRTIO_QUEUE_NOTIFY,),
        (VIRTIO_NOTIFY, VIRTIO_NOTIFY_IRQFD),
    ),
    SOURCE_LAB: ((LAB_POP,), (LAB_COMPLETE,), (LAB_KICK,), ()),
}
POPS, COMPLETIONS, KICKS, INTERRUPTS = range(4)
QUEUE_KEYS = ("source", "pid", "device", "queue")
# a queue's events carry the columns of a kick
QUEUE_EVENT_COLUMNS = KICK_COLUMNS


def queue_events(events: pl.LazyFrame) -> pl.LazyFrame:
    """Only the events :func:`requests` and :func:`batching` read (pops, completions, kicks
    of every source), with only the columns they read: collect it once and pass it to both."""
    cond = pl.lit(False)
    for source, kinds in REQUEST_EVENTS.items():
        names = [n for kind in kinds for n in kind]
        cond = cond | ((pl.col("source") == source) & pl.col("event").is_in(names))
    return events.lazy().filter(cond).select(QUEUE_EVENT_COLUMNS)


REQUEST_SCHEMA = pl.Schema(
    {
        "source": pl.String,
        "pid": pl.Int32,
        "device": pl.String,
        "queue": pl.Int32,
        "seq": pl.Int64,
        "tid": pl.Int32,
        "pop_ts_ns": pl.Int64,
        "complete_ts_ns": pl.Int64,
        "latency_ns": pl.Int64,
        "kick_ts_ns": pl.Int64,
        "kick_to_pop_ns": pl.Int64,
        "irq_ts_ns": pl.Int64,
        "complete_to_irq_ns": pl.Int64,
    }
)


def _queue_events(events: pl.LazyFrame, kind: int) -> pl.LazyFrame:
    """Pops, completions, kicks or interrupts (``kind``) of every source, with keys that
    `join_asof`'s `by` can match, sorted by queue then time."""
    cond = pl.lit(False)
    for source, kinds in REQUEST_EVENTS.items():
        if kinds[kind]:
            cond = cond | ((pl.col("source") == source) & pl.col("event").is_in(kinds[kind]))
    return (
        events.filter(cond)
        .select(
            pl.col("source").cast(pl.String),
            pl.col("pid").fill_null(-1),
            # join_asof's `by` never matches nulls: give unnamed devices and queues a value.
            pl.col("device").cast(pl.String).fill_null(""),
            pl.col("queue").fill_null(-1),
            "tid",
            "ts_ns",
            "count",
        )
        .sort([*QUEUE_KEYS, "ts_ns"], maintain_order=True)
    )


def _queue_kinds(events: pl.LazyFrame) -> pl.LazyFrame:
    """:func:`_queue_events` of every kind at once, with `_kind` (:data:`POPS` ...), in the
    order of ``events``."""
    kind = pl.lit(None, pl.Int8)
    for source, kinds in REQUEST_EVENTS.items():
        for k, names in enumerate(kinds):
            if names:
                is_kind = (pl.col("source") == source) & pl.col("event").is_in(names)
                kind = pl.when(is_kind).then(pl.lit(k, pl.Int8)).otherwise(kind)
    return (
        events.with_columns(kind.alias("_kind"))
        .filter(pl.col("_kind").is_not_null())
        .select(
            # Categorical keys compare, sort and join as integers; strings only in the result.
            "source",
            pl.col("pid").fill_null(-1),
            pl.col("device").fill_null(""),
            pl.col("queue").fill_null(-1),
            "tid",
            "ts_ns",
            "count",
            "_kind",
        )
    )


@requires_events(VIRTQUEUE_POP, LAB_POP)
def requests_plan(events: pl.LazyFrame) -> pl.LazyFrame:
    """The lazy plan of :func:`requests`."""
    events = events.lazy()
    keys = list(QUEUE_KEYS)
    pops = _queue_events(events, POPS).with_columns(
        pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over(keys).alias("seq")
    )
    done = (
        _queue_events(events, COMPLETIONS)
        .with_columns(
            pl.col("count").fill_null(1).cast(pl.Int64).cum_sum().over(keys).alias("done"),
            # An interrupt after a completion belongs to it only until the queue's next one.
            pl.col("ts_ns").shift(-1).over(keys).alias("next_complete_ts_ns"),
        )
        .select(*keys, "done", pl.col("ts_ns").alias("complete_ts_ns"), "next_complete_ts_ns")
    )
    kicks = _queue_events(events, KICKS).select(*keys, pl.col("ts_ns").alias("kick_ts_ns"))
    irqs = _queue_events(events, INTERRUPTS).select(*keys, pl.col("ts_ns").alias("irq_ts_ns"))
    matched = pops.join_asof(
        done, left_on="seq", right_on="done", by=keys, strategy="forward", check_sortedness=False
    )
    # join_asof needs its `on` key sorted within each group: seq is, ts_ns is.
    with_kick = matched.sort([*keys, "ts_ns"]).join_asof(
        kicks,
        left_on="ts_ns",
        right_on="kick_ts_ns",
        by=keys,
        strategy="backward",
        check_sortedness=False,
    )
    # A kick announces only the requests of the pass it started: a pop after a completion
    # that came after the kick was found by the back end on its own (the guest's kick was
    # suppressed), so it has no kick rather than an old one.
    previous_done = done.select(*keys, pl.col("complete_ts_ns").alias("_prev_done_ts"))
    with_kick = with_kick.join_asof(
        previous_done,
        left_on="ts_ns",
        right_on="_prev_done_ts",
        by=keys,
        strategy="backward",
        allow_exact_matches=False,
        check_sortedness=False,
    ).with_columns(
        pl.when(
            pl.col("_prev_done_ts").is_null() | (pl.col("kick_ts_ns") > pl.col("_prev_done_ts"))
        )
        .then(pl.col("kick_ts_ns"))
        .alias("kick_ts_ns")
    )
    with_irq = (
        with_kick.with_columns(pl.col("complete_ts_ns").fill_null(-1).alias("_done_ts"))
        .sort([*keys, "_done_ts"])
        .join_asof(
            irqs,
            left_on="_done_ts",
            right_on="irq_ts_ns",
            by=keys,
            strategy="forward",
            check_sortedness=False,
        )
        .with_columns(
            pl.when(
                pl.col("complete_ts_ns").is_not_null()
                & (
                    pl.col("next_complete_ts_ns").is_null()
                    | (pl.col("irq_ts_ns") < pl.col("next_complete_ts_ns"))
                )
            )
            .then(pl.col("irq_ts_ns"))
            .alias("irq_ts_ns")
        )
        .sort([*keys, "seq"])
    )
    return _request_rows(with_irq)


def _request_rows(matched: pl.LazyFrame) -> pl.LazyFrame:
    """The rows of :func:`requests` from pops with their completion, kick and interrupt
    (`ts_ns` is the pop's), the placeholder keys back to nulls."""
    return matched.select(
        "source",
        pl.when(pl.col("pid") >= 0).then(pl.col("pid")).alias("pid"),
        pl.when(pl.col("device") != "").then(pl.col("device")).alias("device"),
        pl.when(pl.col("queue") >= 0).then(pl.col("queue")).alias("queue"),
        "seq",
        "tid",
        pl.col("ts_ns").alias("pop_ts_ns"),
        "complete_ts_ns",
        (pl.col("complete_ts_ns") - pl.col("ts_ns")).alias("latency_ns"),
        "kick_ts_ns",
        (pl.col("ts_ns") - pl.col("kick_ts_ns")).alias("kick_to_pop_ns"),
        "irq_ts_ns",
        (pl.col("irq_ts_ns") - pl.col("complete_ts_ns")).alias("complete_to_irq_ns"),
    ).cast(dict(REQUEST_SCHEMA))


def requests(events: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """One row per request taken from a virtqueue.

    Columns: `source`, `pid`, `device`, `queue`, `seq` (1-based order of the pop in its
    queue), `tid` (the thread that popped it), `pop_ts_ns`, `complete_ts_ns` and
    `latency_ns` (null when no completion covers it), `kick_ts_ns` (the latest kick of the
    queue at or before the pop and after the queue's previous completion: null when the back
    end found the request without a kick), `kick_to_pop_ns`, `irq_ts_ns` (the first
    interrupt of the queue at or after the completion and before the queue's next
    completion: null when the completion was not notified) and `complete_to_irq_ns`.
    Sorted by queue, then `seq`.
    """
    return requests_plan(events.lazy()).collect()


# What RequestChunks carries, per queue (`_q`, its number in the order first seen): totals
# so far, the pops not final, and the completions a pop can still match.
_TOTALS = pl.Schema(
    {"_q": pl.Int64, "_pops": pl.Int64, "_done": pl.Int64, "_kick_ts": pl.Int64,
     "_complete_ts": pl.Int64}
)  # fmt: skip
_PENDING = pl.Schema(
    {"_q": pl.Int64, "seq": pl.Int64, "tid": pl.Int32, "ts_ns": pl.Int64, "kick_ts_ns": pl.Int64}
)
_COMPLETIONS = pl.Schema(
    {"_q": pl.Int64, "done": pl.Int64, "complete_ts_ns": pl.Int64, "irq_ts_ns": pl.Int64}
)


class RequestChunks:
    """:func:`requests` of a trace read a chunk at a time, in memory that does not grow with
    the trace: the same rows, each given once it is final.

    A request is final once its completion and the queue's next completion are seen (its
    interrupt comes before that one, or it has none). What crosses a chunk boundary is
    carried per queue: the pops and completions so far (the matching is by count), the last
    kick and completion (a later pop's kick), the pops not final with their kick, and the
    completions a pop still to come can match (normally the last one). Chunks must come in
    time order, each later than every event before it
    (:func:`vtrace.analyze.chunks.plan_chunks`).
    """

    def __init__(self) -> None:
        self._queues: pl.DataFrame | None = None  # the queue keys and their `_q`
        self._totals = pl.DataFrame(schema=_TOTALS)
        self._pending = pl.DataFrame(schema=_PENDING)
        self._completions = pl.DataFrame(schema=_COMPLETIONS)

    def _numbered(self, queued: pl.DataFrame) -> pl.DataFrame:
        """``queued`` with its queue's number `_q` in place of the keys, sorted by queue then
        time (one integer to sort and join on, not four columns, two of them strings)."""
        keys = list(QUEUE_KEYS)
        seen = queued.select(keys).unique(maintain_order=True)
        if self._queues is not None:
            seen = seen.join(self._queues, on=keys, how="anti", nulls_equal=True)
            first = self._queues.height
        else:
            first = 0
        seen = seen.with_columns(pl.int_range(first, first + pl.len(), dtype=pl.Int64).alias("_q"))
        self._queues = seen if self._queues is None else pl.concat([self._queues, seen])
        return (
            # Keep the trace's order of events at the same time (the sort below is stable).
            queued.join(self._queues, on=keys, how="left", nulls_equal=True, maintain_order="left")
            .drop(keys)
            .sort("_q", "ts_ns", maintain_order=True)
        )

    def step(self, events: pl.DataFrame, final: bool) -> pl.DataFrame:
        """The requests that are final after ``events`` (a chunk's :func:`queue_events`,
        collected), in the schema of :func:`requests`; ``final``: no chunk follows."""
        q = ["_q"]
        queued = self._numbered(_queue_kinds(events.lazy()).collect()).lazy()
        pops, comps, kicks, irqs = (queued.filter(pl.col("_kind") == k) for k in range(4))
        totals = self._totals.lazy()

        def after(frame: pl.LazyFrame, col: str, total: str) -> pl.LazyFrame:
            # The chunk's running count goes on from the queue's total so far.
            return frame.join(
                totals.select("_q", total), on=q, how="left", maintain_order="left"
            ).with_columns((pl.col(col) + pl.col(total).fill_null(0)).alias(col))

        new_pops = after(
            pops.with_columns(pl.int_range(1, pl.len() + 1, dtype=pl.Int64).over(q).alias("seq")),
            "seq",
            "_pops",
        )
        new_done = after(
            comps.with_columns(
                pl.col("count").fill_null(1).cast(pl.Int64).cum_sum().over(q).alias("done")
            ),
            "done",
            "_done",
        ).select("_q", "done", pl.col("ts_ns").alias("complete_ts_ns"))
        # A new pop's kick: the latest kick at or before it, unless a completion came between.
        kick_at = pl.concat(
            [
                totals.filter(pl.col("_kick_ts").is_not_null()).select(
                    "_q", pl.col("_kick_ts").alias("kick_ts_ns")
                ),
                kicks.select("_q", pl.col("ts_ns").alias("kick_ts_ns")),
            ]
        ).sort("_q", "kick_ts_ns")
        done_at = pl.concat(
            [
                totals.filter(pl.col("_complete_ts").is_not_null()).select(
                    "_q", pl.col("_complete_ts").alias("_prev_done_ts")
                ),
                new_done.select("_q", pl.col("complete_ts_ns").alias("_prev_done_ts")),
            ]
        ).sort("_q", "_prev_done_ts")
        new_pops = (
            new_pops.join_asof(
                kick_at,
                left_on="ts_ns",
                right_on="kick_ts_ns",
                by=q,
                strategy="backward",
                check_sortedness=False,
            )
            .join_asof(
                done_at,
                left_on="ts_ns",
                right_on="_prev_done_ts",
                by=q,
                strategy="backward",
                allow_exact_matches=False,
                check_sortedness=False,
            )
            .with_columns(
                pl.when(
                    pl.col("_prev_done_ts").is_null()
                    | (pl.col("kick_ts_ns") > pl.col("_prev_done_ts"))
                )
                .then(pl.col("kick_ts_ns"))
                .alias("kick_ts_ns")
            )
            .select(_PENDING.names())
        )
        # Completions in queue order (carried ones are earlier), each with the queue's next
        # one and its first interrupt at or after it (found earlier, or in this chunk).
        completions = (
            pl.concat(
                [
                    self._completions.lazy(),
                    new_done.with_columns(pl.lit(None, pl.Int64).alias("irq_ts_ns")),
                ]
            )
            .sort("_q", maintain_order=True)
            .with_columns(pl.col("complete_ts_ns").shift(-1).over(q).alias("next_complete_ts_ns"))
            .join_asof(
                irqs.select("_q", pl.col("ts_ns").alias("_irq")),
                left_on="complete_ts_ns",
                right_on="_irq",
                by=q,
                strategy="forward",
                check_sortedness=False,
            )
            .with_columns(pl.coalesce("irq_ts_ns", "_irq").alias("irq_ts_ns"))
            .drop("_irq")
        )
        matched, completions = pl.collect_all(
            [
                pl.concat([self._pending.lazy(), new_pops])
                .sort("_q", "seq")
                .join_asof(
                    completions,
                    left_on="seq",
                    right_on="done",
                    by=q,
                    strategy="forward",
                    check_sortedness=False,
                ),
                completions,
            ]
        )
        return self._advance(queued, matched, completions, final)

    def _advance(
        self, queued: pl.LazyFrame, matched: pl.DataFrame, completions: pl.DataFrame, final: bool
    ) -> pl.DataFrame:
        complete, following = pl.col("complete_ts_ns"), pl.col("next_complete_ts_ns")
        settled = pl.lit(True) if final else complete.is_not_null() & following.is_not_null()
        assert self._queues is not None
        rows = _request_rows(
            matched.lazy()
            .filter(settled)
            .join(self._queues.lazy(), on="_q", how="left", maintain_order="left")
            .with_columns(
                pl.when(
                    complete.is_not_null()
                    & (following.is_null() | (pl.col("irq_ts_ns") < following))
                )
                .then(pl.col("irq_ts_ns"))
                .alias("irq_ts_ns")
            )
        ).collect()
        if final:
            return rows
        self._pending = matched.filter(~settled).select(_PENDING.names())
        kind, ts = pl.col("_kind"), pl.col("ts_ns")
        self._totals = (
            pl.concat(
                [
                    self._totals.lazy(),
                    queued.group_by("_q").agg(
                        (kind == POPS).sum().cast(pl.Int64).alias("_pops"),
                        pl.col("count")
                        .fill_null(1)
                        .cast(pl.Int64)
                        .filter(kind == COMPLETIONS)
                        .sum()
                        .alias("_done"),
                        ts.filter(kind == KICKS).max().alias("_kick_ts"),
                        ts.filter(kind == COMPLETIONS).max().alias("_complete_ts"),
                    ),
                ],
                how="vertical_relaxed",
            )
            .group_by("_q")
            .agg(pl.col("_pops", "_done").sum(), pl.col("_kick_ts", "_complete_ts").max())
            .select(_TOTALS.names())
            .cast(dict(_TOTALS))
            .collect()
        )
        # Completions a pop can still match: from the one the first pop not final (or the
        # next pop) needs; always the queue's last, which the next completion follows.
        first_open = (
            pl.concat(
                [
                    self._pending.lazy().group_by("_q").agg(pl.col("seq").min().alias("_from")),
                    self._totals.lazy().select("_q", (pl.col("_pops") + 1).alias("_from")),
                ]
            )
            .group_by("_q")
            .agg(pl.col("_from").min())
        )
        self._completions = (
            completions.lazy()
            .join(first_open, on="_q", how="left", maintain_order="left")
            .filter((pl.col("done") >= pl.col("_from")) | pl.col("next_complete_ts_ns").is_null())
            .select(_COMPLETIONS.names())
            .collect()
        )
        return rows


@requires_events(VIRTQUEUE_POP, LAB_POP)
def batching_plan(events: pl.LazyFrame) -> pl.LazyFrame:
    """The lazy plan of :func:`batching`."""
    return batching_from_counts(*batching_counts(events))


def batching_counts(events: pl.LazyFrame | pl.DataFrame) -> tuple[pl.LazyFrame, ...]:
    """Per queue: pops, completions, kicks and interrupts counted, what :func:`batching` is
    made of; the counts of several chunks of a trace, stacked, merge in
    :func:`batching_from_counts`."""
    events = events.lazy()
    keys = list(QUEUE_KEYS)
    pops = _queue_events(events, POPS).group_by(keys).agg(pl.len().cast(pl.Int64).alias("requests"))
    done = (
        _queue_events(events, COMPLETIONS)
        .group_by(keys)
        .agg(
            pl.col("count").fill_null(1).cast(pl.Int64).sum().alias("completed"),
            pl.len().cast(pl.Int64).alias("completions"),
            pl.col("count").fill_null(1).max().cast(pl.Int64).alias("max_per_completion"),
        )
    )
    kicks = (
        _queue_events(events, KICKS)
        .group_by(keys)
        .agg(
            # lab_kick's count is the kicks merged into one wake-up of the back end.
            pl.col("count").fill_null(1).cast(pl.Int64).sum().alias("kicks"),
            pl.len().cast(pl.Int64).alias("kick_events"),
        )
    )
    irqs = (
        _queue_events(events, INTERRUPTS)
        .group_by(keys)
        .agg(pl.len().cast(pl.Int64).alias("interrupts"))
    )
    return pops, done, kicks, irqs


def batching_from_counts(
    pops: pl.LazyFrame | pl.DataFrame,
    done: pl.LazyFrame | pl.DataFrame,
    kicks: pl.LazyFrame | pl.DataFrame,
    irqs: pl.LazyFrame | pl.DataFrame,
) -> pl.LazyFrame:
    """:func:`batching` from :func:`batching_counts` (each may be several stacked)."""
    keys = list(QUEUE_KEYS)
    pops = pops.lazy().group_by(keys).agg(pl.col("requests").sum())
    done = (
        done.lazy()
        .group_by(keys)
        .agg(pl.col("completed", "completions").sum(), pl.col("max_per_completion").max())
    )
    kicks = kicks.lazy().group_by(keys).agg(pl.col("kicks", "kick_events").sum())
    irqs = irqs.lazy().group_by(keys).agg(pl.col("interrupts").sum())
    return (
        pops.join(done, on=keys, how="left", nulls_equal=True)
        .join(kicks, on=keys, how="left", nulls_equal=True)
        .join(irqs, on=keys, how="left", nulls_equal=True)
        .with_columns(
            pl.col("completed", "completions", "kicks", "kick_events", "interrupts").fill_null(0)
        )
        .with_columns(
            pl.when(pl.col("kicks") > 0)
            .then(pl.col("requests") / pl.col("kicks"))
            .alias("requests_per_kick"),
            pl.when(pl.col("interrupts") > 0)
            .then(pl.col("requests") / pl.col("interrupts"))
            .alias("requests_per_interrupt"),
            pl.when(pl.col("completions") > 0)
            .then(pl.col("completed") / pl.col("completions"))
            .alias("requests_per_completion"),
            pl.when(pl.col("pid") >= 0).then(pl.col("pid")).alias("pid"),
            pl.when(pl.col("device") != "").then(pl.col("device")).alias("device"),
            pl.when(pl.col("queue") >= 0).then(pl.col("queue")).alias("queue"),
        )
        .sort(keys, nulls_last=True)
    )


def batching(events: pl.LazyFrame | pl.DataFrame) -> pl.DataFrame:
    """Batching per queue: how much work each kick and each completion carried.

    Columns: `source`, `pid`, `device`, `queue`, `requests` (pops), `completed` (requests
    completed), `completions` (flush / complete events), `max_per_completion`, `kicks`
    (notify writes; for the lab the sum of `lab_kick.count`), `kick_events` (kick rows:
    the back end's wake-ups for the lab), `interrupts` (QEMU's virtio_notify /
    virtio_notify_irqfd of the queue; 0 for the lab, whose interrupts go through an irqfd
    that names no queue: see :func:`~vtrace.analyze.interrupts.interrupts`),
    `requests_per_kick` (null without kicks), `requests_per_interrupt`,
    `requests_per_completion`.
    """
    return batching_plan(events.lazy()).collect()
