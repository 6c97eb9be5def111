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
QUEUE_EVENT_COLUMNS = (
    "ts_ns", "source", "event", "pid", "tid", "vcpu", "device", "queue", "addr", "value", "count",
)  # fmt: skip


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
    return with_irq.select(
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


@requires_events(VIRTQUEUE_POP, LAB_POP)
def batching_plan(events: pl.LazyFrame) -> pl.LazyFrame:
    """The lazy plan of :func:`batching`."""
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
