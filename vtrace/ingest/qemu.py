"""QEMU's ``log`` trace backend (``-trace EVENT ... -D FILE``), with or without timestamps.

Each line is ``EVENT ARGS`` as QEMU's trace-events format string writes it, e.g.::

    virtio_queue_notify vdev 0x55d0c8e0a1f0 n 0 vq 0x55d0c8e14b10
    memory_region_ops_write cpu 0 mr 0x55d0c7b7a0a0 addr 0x7 value 0x20 size 1 name 'ide'

With ``-msg timestamp=on`` QEMU puts ``TID@SECONDS.MICROS:`` in front (the thread id of
the writer and the wall-clock time from gettimeofday): ``ts_ns`` is that time in
nanoseconds and meta says ``"clock": "realtime"``. Without the prefix there is no time at
all: ``ts_ns`` is the line number, so order is kept, and meta says ``"clock": "line_order"``.

``virtqueue_pop``, ``virtqueue_fill`` and ``virtqueue_flush`` name their queue only by the
``VirtQueue`` pointer; ``virtio_queue_notify`` lines tie that pointer to the device and the
queue index, so those events get ``queue`` and ``device`` from them. Devices are named by
kind (``virtio-blk`` when the device's pointer appears in ``virtio_blk_*`` events, else
``virtio``), numbered in order of appearance when a log has several of one kind.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import polars as pl

from vtrace import schema as s
from vtrace.errors import VtraceError
from vtrace.ingest.textlines import (
    check_last_line,
    check_unparsed,
    first_line_numbers,
    read_text_lines,
)
from vtrace.ingest.tracepoint_text import MAX_SECONDS, NS_PER_S

SECTOR_BYTES = 512

HEADER = (
    r"^(?:(?P<tid>\d+)@(?P<sec>\d{1,10})\.(?P<usec>\d{1,6}):)?"
    r"(?P<event>[a-z][a-z0-9]*_[a-z0-9_]*)(?: (?P<payload>.*))?$"
)
PTR = r"0x[0-9a-fA-F]{1,16}|\(nil\)"
HEX = "[0-9a-fA-F]{1,16}"
# Every argument is matched whole (the patterns are anchored at both ends) and has at most
# the digits that convert without overflow; one too big for its column is caught by the
# cast. Sectors are multiplied by 512: 15 digits keep that inside 64 bits.
DEC = r"-?\d{1,18}"
UDEC = r"\d{1,18}"
SECTORS = r"\d{1,15}"

# Event -> regular expression of its arguments (QEMU 7.2's trace-events format strings).
PATTERNS: dict[str, str] = {
    s.VIRTIO_QUEUE_NOTIFY: rf"^vdev (?P<vdev>{PTR}) n (?P<n>{DEC}) vq (?P<vq>{PTR})$",
    s.VIRTQUEUE_POP: rf"^vq (?P<vq>{PTR}) elem (?P<elem>{PTR}) in_num (?P<in_num>{UDEC}) out_num (?P<out_num>{UDEC})$",
    s.VIRTQUEUE_FILL: rf"^vq (?P<vq>{PTR}) elem (?P<elem>{PTR}) len (?P<len>{UDEC}) idx (?P<idx>{UDEC})$",
    s.VIRTQUEUE_FLUSH: rf"^vq (?P<vq>{PTR}) count (?P<count>{UDEC})$",
    s.VIRTIO_NOTIFY: rf"^vdev (?P<vdev>{PTR}) vq (?P<vq>{PTR})$",
    s.VIRTIO_NOTIFY_IRQFD: rf"^vdev (?P<vdev>{PTR}) vq (?P<vq>{PTR})$",
    "virtio_blk_handle_read": rf"^vdev (?P<vdev>{PTR}) req (?P<req>{PTR}) sector (?P<sector>{SECTORS}) nsectors (?P<nsectors>{SECTORS})$",
    "virtio_blk_handle_write": rf"^vdev (?P<vdev>{PTR}) req (?P<req>{PTR}) sector (?P<sector>{SECTORS}) nsectors (?P<nsectors>{SECTORS})$",
    "virtio_blk_submit_multireq": (
        rf"^vdev (?P<vdev>{PTR}) mrb (?P<mrb>{PTR}) start (?P<start>{DEC}) num_reqs (?P<num_reqs>{DEC}) "
        rf"offset (?P<offset>{UDEC}) size (?P<size>{UDEC}) is_write (?P<is_write>{UDEC})$"
    ),
    "virtio_blk_req_complete": rf"^vdev (?P<vdev>{PTR}) req (?P<req>{PTR}) status (?P<status>{DEC})$",
    s.MEMORY_REGION_OPS_READ: (
        rf"^cpu (?P<cpu>{DEC}) mr (?P<mr>{PTR}) addr 0x(?P<addr>{HEX}) value 0x(?P<value>{HEX}) "
        rf"size (?P<size>{UDEC}) name '(?P<name>.*)'$"
    ),
    s.MEMORY_REGION_OPS_WRITE: (
        rf"^cpu (?P<cpu>{DEC}) mr (?P<mr>{PTR}) addr 0x(?P<addr>{HEX}) value 0x(?P<value>{HEX}) "
        rf"size (?P<size>{UDEC}) name '(?P<name>.*)'$"
    ),
    s.KVM_RUN_EXIT: rf"^cpu_index (?P<cpu>{DEC}), reason (?P<reason>{UDEC})$",
}
# Other events (virtio_blk_rw_complete, virtio_set_status, ...): only a leading device pointer
# is taken, the rest stays in `raw`. The pointer too is matched whole: a text that starts
# with "vdev " and no whole pointer after it is malformed.
VDEV_PREFIX = rf"^vdev (?P<vdev>{PTR})(?:\s|$)"
ALL_GROUPS = sorted(
    {g for p in [*PATTERNS.values(), VDEV_PREFIX] for g in re.compile(p).groupindex}
)


def _dec(name: str) -> pl.Expr:
    return pl.col(name).str.to_integer(dtype=pl.Int64, strict=False)


def _hex(name: str) -> pl.Expr:
    return pl.col(name).str.to_integer(base=16, dtype=pl.UInt64, strict=False)


def _parse_args(events: pl.DataFrame) -> pl.DataFrame:
    """Split each event's payload into its named arguments (String columns), per event kind."""
    parts = []
    for (name,), part in events.partition_by("event", as_dict=True).items():
        pattern = PATTERNS.get(name)
        # Other events are kept as they are; a leading device pointer still names the device.
        fields = part.select(
            pl.col("payload").fill_null("").str.extract_groups(pattern or VDEV_PREFIX).alias("a")
        )
        args = fields.unnest("a")
        matched = pl.col(args.columns[0]).is_not_null()
        ok = (
            matched
            if pattern
            else matched | ~pl.col("payload").fill_null("").str.starts_with("vdev ")
        )
        parts.append(pl.concat([part, args], how="horizontal").with_columns(ok=ok))
    frame = pl.concat(parts, how="diagonal_relaxed").sort("lineno")
    return frame.with_columns(
        pl.lit(None, pl.String).alias(g) for g in ALL_GROUPS if g not in frame.columns
    )


def _device_names(args: pl.DataFrame) -> pl.DataFrame:
    """vdev pointer -> device name, numbered per kind in order of first appearance."""
    blk = args.filter(pl.col("event").str.starts_with("virtio_blk_")).get_column("vdev").unique()
    vdevs = (
        args.filter(pl.col("vdev").is_not_null() & (pl.col("vdev") != "(nil)"))
        .group_by("vdev")
        .agg(first=pl.col("lineno").min())
        .sort("first")
        .with_columns(
            kind=pl.when(pl.col("vdev").is_in(blk.implode()))
            .then(pl.lit("virtio-blk"))
            .otherwise(pl.lit("virtio"))
        )
        .with_columns(nth=pl.int_range(pl.len()).over("kind"), of_kind=pl.len().over("kind"))
    )
    return vdevs.select(
        "vdev",
        device=pl.when(pl.col("of_kind") == 1)
        .then(pl.col("kind"))
        .otherwise(pl.col("kind") + pl.col("nth").cast(pl.String)),
    )


def read_qemu(path: str | Path, *, strict: bool = False) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Parse a QEMU `log` trace backend file into an events frame and meta."""
    p = Path(path)
    text = read_text_lines(p)
    lines = text.lines
    check_last_line(p, lines, ends_in_newline=text.ends_in_newline, what="QEMU trace log")
    total = lines.height
    fields = lines.with_columns(pl.col("line").str.extract_groups(HEADER).alias("h")).unnest("h")
    timed = fields.get_column("tid").is_not_null().any()
    # In a log with timestamps, a line without one (or with seconds that overflow Int64
    # nanoseconds, or a thread id too big for one) is not an event.
    in_range = (_dec("sec") < MAX_SECONDS) & _dec("tid").cast(pl.Int32, strict=False).is_not_null()
    is_event = pl.col("event").is_not_null() & (in_range if timed else pl.lit(True))
    blank = pl.col("line").str.strip_chars() == ""
    events = fields.filter(is_event)
    rest = fields.filter(~is_event & ~blank).select("lineno", "line")
    if events.height == 0:
        first = first_line_numbers(rest, 1)
        where = f"{p}:{first[0]}" if first else str(p)
        raise VtraceError(f"{where}: no QEMU trace events in this file (is it a QEMU -D log?)")
    meta = check_unparsed(p, rest, strict=strict, what="QEMU trace log")

    args = _parse_args(events.select("lineno", "tid", "sec", "usec", "event", "payload"))
    if text.has_nul:  # a NUL (a zero-filled block) in an argument: damaged, not an event
        args = args.with_columns(
            ok=pl.col("ok") & ~pl.col("payload").fill_null("").str.contains("\x00", literal=True)
        )

    # Queue pointer -> queue index, from virtio_queue_notify; queue pointer -> device
    # pointer, from every event that names both (virtio_notify too, so a receive queue
    # the guest never kicks still gets its device).
    both = pl.col("ok") & pl.col("vq").is_not_null() & pl.col("vdev").is_not_null()
    owners = args.filter(both).group_by("vq").agg(q_vdev=pl.col("vdev").first())
    queues = (
        args.filter((pl.col("event") == s.VIRTIO_QUEUE_NOTIFY) & pl.col("ok"))
        .group_by("vq")
        .agg(q_index=_dec("n").first())
    )
    args = (
        args.join(owners, on="vq", how="left")
        .join(queues, on="vq", how="left")
        .with_columns(vdev=pl.coalesce("vdev", "q_vdev"))
    )
    args = args.join(_device_names(args), on="vdev", how="left").sort("lineno")

    ev = pl.col("event")
    write_ev = ev.is_in(["virtio_blk_handle_write", s.MEMORY_REGION_OPS_WRITE])
    mr = ev.is_in([s.MEMORY_REGION_OPS_READ, s.MEMORY_REGION_OPS_WRITE])
    blk_rw = ev.is_in(["virtio_blk_handle_read", "virtio_blk_handle_write"])
    multireq = ev == "virtio_blk_submit_multireq"
    cpu = _dec("cpu")
    if timed:
        ts = (
            _dec("sec") * NS_PER_S
            + pl.col("usec").str.pad_end(6, "0").str.to_integer(dtype=pl.Int64) * 1000
        )
    else:
        ts = pl.col("lineno").cast(pl.Int64)
    columns = dict(
        vcpu=pl.when(cpu >= 0).then(cpu),
        reason=pl.when(ev == s.KVM_RUN_EXIT).then(_dec("reason")),
        reason_name=pl.when(ev == s.KVM_RUN_EXIT).then(
            s.userspace_reason_name(_dec("reason")).cast(pl.String)
        ),
        addr=pl.when(mr)
        .then(_hex("addr"))
        .when(blk_rw)
        .then(_dec("sector").cast(pl.UInt64) * SECTOR_BYTES)
        .when(multireq)
        .then(_dec("offset").cast(pl.UInt64)),
        size=pl.when(mr)
        .then(_dec("size"))
        .when(blk_rw)
        .then(_dec("nsectors") * SECTOR_BYTES)
        .when(multireq)
        .then(_dec("size"))
        .when(ev == s.VIRTQUEUE_FILL)
        .then(_dec("len")),
        write=pl.when(mr | blk_rw).then(write_ev).when(multireq).then(_dec("is_write") != 0),
        value=pl.when(mr)
        .then(_hex("value"))
        .when(ev == "virtio_blk_req_complete")
        .then(_dec("status").cast(pl.UInt64, strict=False)),
        count=pl.when(ev == s.VIRTQUEUE_POP)
        .then(_dec("in_num") + _dec("out_num"))
        .when(ev == s.VIRTQUEUE_FLUSH)
        .then(_dec("count"))
        .when(multireq)
        .then(_dec("num_reqs")),
        queue=pl.when(ev == s.VIRTIO_QUEUE_NOTIFY).then(_dec("n")).otherwise(pl.col("q_index")),
        device=pl.when(mr).then(pl.col("name")).otherwise(pl.col("device")),
    )
    # Each column once, as computed (replacing the argument of the same name, if any).
    args = args.with_columns(**columns)
    typed = {c: pl.col(c).cast(s.EVENTS_SCHEMA[c], strict=False) for c in columns}
    # A number that matched but does not fit its column is no value: the line is malformed.
    fits = [
        pl.col(c).is_null() | typed[c].is_not_null()
        for c in columns
        if args.schema[c] != s.EVENTS_SCHEMA[c] and s.EVENTS_SCHEMA[c].is_numeric()
    ]
    args = args.with_columns(ok=pl.all_horizontal("ok", *fits))
    malformed = args.filter(~pl.col("ok"))
    if strict and malformed.height:
        first = int(malformed.get_column("lineno")[0])
        raise VtraceError(
            f"{p}:{first}: {malformed.get_column('event')[0]} arguments do not match QEMU's "
            f"format ({malformed.height} such lines)"
        )
    frame = args.select(
        ts_ns=ts,
        source=pl.lit(s.SOURCE_QEMU),
        event=ev,
        tid=_dec("tid"),
        # A malformed line has its header and its text, no columns from the text.
        **{c: pl.when("ok").then(e) for c, e in typed.items()},
        # The arguments that have no column (pointers of elements and requests, ...).
        # A malformed line keeps its whole text.
        raw=pl.when(pl.col("ok").not_())
        .then(pl.col("payload"))
        .when(mr | (ev == s.KVM_RUN_EXIT) | (ev == s.VIRTQUEUE_FLUSH))
        .then(None)
        .otherwise(pl.col("payload")),
    )
    frame = s.conform(frame)
    s.validate(frame, where=str(p))
    notified = queues.height
    meta.update(
        {
            "importer": "qemu",
            "source_files": [str(p.resolve())],
            "lines": total,
            "events": frame.height,
            "malformed": malformed.height,
            "malformed_first_lines": first_line_numbers(malformed),
            "clock": "realtime" if timed else "line_order",
            "ts_note": (
                "ts_ns is wall-clock time (gettimeofday) from -msg timestamp=on"
                if timed
                else "no timestamps in the log: ts_ns is the line number"
            ),
            "queues_mapped": notified,
        }
    )
    return frame, meta
