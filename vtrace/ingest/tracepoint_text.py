"""Text output of kernel tracepoints (ftrace, trace-cmd, perf script) into the events table.

Every format here is a per-line header (task, thread, CPU, timestamp, event name) followed
by the tracepoint's own text. In ftrace files, the compiled reader
(:mod:`vtrace.ingest.native`) takes first the lines it is sure of; every line it hands back,
and every line of a file read without it, takes the polars path below, where all the checks
on bad lines are. Lines with tracefs' fixed-width header are read by
:func:`split_fast` (the header from the file's bytes, :mod:`vtrace.ingest.tracefs_layout`);
every other line is cut apart with searches and slices over the whole column
(:func:`split_lines`). The payloads are then parsed once per event name with that
tracepoint's pattern (:mod:`vtrace.ingest.kvm_payloads`). Lines that are neither events,
nor comments, nor lost-event markers are counted as unparsed.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from vtrace import schema as s
from vtrace.errors import VtraceError
from vtrace.ingest import native
from vtrace.ingest.kvm_payloads import PAYLOADS, PayloadFormat, field
from vtrace.ingest.textlines import (
    TextLines,
    check_last_line,
    check_last_text,
    check_unparsed,
    check_utf8,
    first_line_numbers,
    read_text_bytes,
    read_text_lines,
)
from vtrace.ingest.tracefs_layout import tracefs_header

NS_PER_S = 1_000_000_000
MAX_SECONDS = (2**63 - 1) // NS_PER_S


@dataclass(frozen=True)
class LineFormat:
    """How one text format writes its lines: ``HEAD[CPU] ... TIMESTAMP: EVENT: PAYLOAD``.

    ``stamp`` finds where the timestamp starts and checks what follows it (no groups: a
    plain search is cheap); the line is cut there into HEAD and REST. In HEAD, the thread
    id (``tid``, first group) and, where the format has it, the process id (``pid``) end
    the text before ``[CPU]``, so a task name with spaces or dashes needs no group. In REST
    the timestamp ends at the first colon and the event name at the next ": ";
    ``system_prefix`` says the name is written ``SYSTEM:EVENT`` (perf). ``ignore`` matches
    lines that carry no event and are not a problem (comments, banners); ``lost`` matches
    lost-event markers with the number lost in its first group.
    """

    name: str
    stamp: str
    tid: str
    pid: str | None
    system_prefix: bool
    ignore: str
    lost: str | None
    clock: str
    # Lines may have the fixed-width header of tracefs (:func:`split_fast` reads those).
    tracefs_layout: bool = False


CPU_FIELD = r"\[\d+\]"
# Event names longer than this go the general way (kernel event names are far shorter).
NAME_WINDOW = 64
EVENT_NAME = re.compile(r"\w+", re.ASCII)


def split_fast(text: TextLines) -> tuple[pl.DataFrame | None, pl.DataFrame]:
    """Event lines with the tracefs layout (:mod:`vtrace.ingest.tracefs_layout`), seconds
    as `%5lu` (:func:`split_tracefs_run` also takes wider ones).

    Returns ``(events, rest)``: the columns of :func:`split_lines` (without ``line``) for
    the lines of that layout, and ``lineno``/``line`` of every other line, for the general
    path; ``events`` is None when the file's lines cannot be located in its bytes.
    """
    if text.starts is None:
        return None, text.lines
    return _split_fast_run(text.lines, text.data, text.starts, ascii=text.data.isascii())


def split_tracefs_run(
    lines: pl.DataFrame, data: bytes, starts: np.ndarray, *, ascii: bool
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """:func:`split_fast` for a run of lines (``starts``: their offsets in ``data``), also
    taking lines whose seconds are wider than `%5lu` (a host up for more than 27.7 hours)."""
    return _split_fast_run(lines, data, starts, ascii=ascii, wide_seconds=True)


def _split_fast_run(
    lines: pl.DataFrame, data: bytes, starts: np.ndarray, *, ascii: bool, wide_seconds: bool = False
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """:func:`split_fast` for a run of lines; ``starts`` are their offsets in ``data``.

    The header comes from the bytes; the event name and the text from slices of each line.
    The checks are those of the general patterns (the first ``[`` starts the CPU field, the
    timestamp ends at the first ``": "``, then a word, a colon and a blank or the end of the
    line), so both paths give the same result for these lines.
    """
    line = pl.col("line")
    # Slices count characters, the header bytes: only ASCII lines here.
    ascii_line = pl.lit(True) if ascii else line.str.len_bytes() == line.str.len_chars()
    pos = lines.select(
        b=line.str.find("[", literal=True),
        c1=line.str.find(": ", literal=True),
        ascii=ascii_line,
    )
    bracket, colon = pos.get_column("b"), pos.get_column("c1")
    usable = bracket.is_not_null() & colon.is_not_null() & pos.get_column("ascii")
    head = tracefs_header(
        data,
        starts,
        bracket.fill_null(0).to_numpy(),
        colon.fill_null(0).to_numpy(),
        usable.to_numpy(),
        wide_seconds=wide_seconds,
    )
    # After the timestamp's ": ": the event name, up to the next ": " or to a colon that
    # ends the line (an event with no text), then the text. Slices are taken of the bytes
    # (str.slice counts characters from the start of each line: twice the work); a slice
    # of a line that is not ASCII may be no text (null), and such a line is not claimed.
    # Eager steps: here they cost less than the same lazy query.
    tail = lines.select(
        pl.col("line").cast(pl.Binary).bin.slice(pl.lit(colon) + 2).alias("tail")
    ).to_series()
    text = tail.cast(pl.String, strict=False)
    name_end = pl.select(
        pl.coalesce(
            text.str.find(": ", literal=True),
            pl.when(text.str.ends_with(":")).then(text.str.len_bytes() - 1),
        ).alias("name_end")
    ).to_series()
    df = pl.DataFrame(
        {
            "lineno": lines.get_column("lineno"),
            "ok": head.ok,
            "ts_ns": head.ts_ns,
            "tid": pl.Series(head.tid, dtype=pl.Int32),
            "cpu": pl.Series(head.cpu, dtype=pl.Int16),
            "name_end": name_end,
            "tail": tail,
        }
    ).select(
        pl.exclude("tail"),
        event=pl.col("tail")
        .bin.slice(0, pl.col("name_end"))
        .cast(pl.String, strict=False)
        .cast(pl.Categorical),
        payload=pl.col("tail")
        .bin.slice(pl.col("name_end") + 2)
        .cast(pl.String, strict=False)
        .str.strip_chars(),
    )
    name_end = pl.col("name_end")
    # Event names are few: check each once, not once per line.
    names = df.get_column("event").unique().drop_nulls().cast(pl.String).to_list()
    bad = [n for n in names if not EVENT_NAME.fullmatch(n)]
    fast = pl.col("ok") & (name_end <= NAME_WINDOW)
    if bad:
        fast &= ~pl.col("event").cast(pl.String).is_in(bad)
    claimed = df.select(fast.fill_null(False)).to_series()
    columns = (
        "lineno",
        "payload",
        "ts_ns",
        pl.lit(None, pl.Int32).alias("pid"),
        "tid",
        "cpu",
        "event",
    )
    if claimed.all():  # the usual case: no row is moved
        return df.select(*columns), lines.clear()
    return df.filter(claimed).select(*columns), lines.filter(~claimed)


def split_lines(lines: pl.DataFrame, fmt: LineFormat) -> pl.DataFrame:
    """Add ``event``, ``ts_ns``, ``pid``, ``tid``, ``cpu`` and ``payload`` to every line.

    Only searches, slices and short end-anchored extractions: each costs a fraction of a
    capturing regular expression over the whole line. ``event`` is null for lines that are
    not events.
    """
    line = pl.col("line")
    # str.find counts bytes but str.slice counts characters. Offsets are found on a copy
    # where each non-ASCII character (in a task name, say) is one byte, so they are
    # character offsets into the line too.
    probe = line
    if lines.select(line.str.len_bytes().sum() != line.str.len_chars().sum()).item():
        probe = line.str.replace_all(r"[^\x00-\x7F]", "?")
    at = probe.str.find(fmt.stamp)
    bracket = probe.str.find(CPU_FIELD)
    # One lazy query: polars runs independent expressions in parallel and computes shared
    # ones once. Long strings are sliced as few times as possible; short fields are cut
    # from short windows.
    cut = lines.lazy().with_columns(
        at=at,
        pre=line.str.slice(0, bracket).str.strip_chars_end(),
        cpu_text=line.str.slice(bracket + 1, 12),
        window=probe.str.slice(at, 40),
    )
    # The timestamp ends at the first colon after `at` (a timestamp is at most 30 chars).
    colon = pl.col("at") + pl.col("window").str.find(":", literal=True)
    cut = cut.with_columns(
        stamp=line.str.slice(pl.col("at"), colon - pl.col("at")).str.strip_chars_start(),
        after=line.str.slice(colon + 1).str.strip_chars_start(),
    )
    pre, stamp, after = pl.col("pre"), pl.col("stamp"), pl.col("after")
    cpu_text = pl.col("cpu_text")
    dot = stamp.str.find(".", literal=True)
    # The event name ends at ": ", or at the end of a line with an empty payload.
    name_end = pl.coalesce(after.str.find(": ", literal=True), after.str.len_chars() - 1)
    cut = cut.with_columns(
        token=after.str.slice(0, name_end),
        payload=after.str.slice(name_end + 1).str.strip_chars(),
        sec=pl.when(dot.is_null()).then(stamp).otherwise(stamp.str.slice(0, dot)),
        frac=stamp.str.slice(dot + 1),
    )
    token = pl.col("token")
    if fmt.system_prefix:
        token = token.str.slice(token.str.find(":", literal=True) + 1)
    frac = pl.col("frac")
    sec = pl.col("sec").str.to_integer(dtype=pl.Int64, strict=False)
    # Seconds that would overflow Int64 nanoseconds are not a timestamp (the line is unparsed).
    sec = pl.when(sec < MAX_SECONDS).then(sec)
    # Up to 9 decimals (ns): more would be cut off, a value that is not what was printed.
    frac_ns = pl.when(frac.str.len_bytes() <= 9).then(
        frac.str.pad_end(9, "0").str.to_integer(dtype=pl.Int64, strict=False)
    )
    tid = pre.str.extract(fmt.tid, 1).str.to_integer(dtype=pl.Int32, strict=False)
    cpu = cpu_text.str.slice(0, cpu_text.str.find("]", literal=True))
    cpu = cpu.str.to_integer(dtype=pl.Int16, strict=False)
    pid = pre.str.extract(fmt.pid, 1) if fmt.pid else pl.lit(None, pl.String)
    cut = cut.with_columns(
        event=token,
        # Seconds with up to 9 decimals -> ns exactly (no float on the way); an integer
        # timestamp (counter clocks) is kept as it is.
        ts_ns=pl.when(frac.is_null()).then(sec).otherwise(sec * NS_PER_S + frac_ns),
        pid_text=pid,
        pid=pid.str.to_integer(dtype=pl.Int32, strict=False),
        tid=tid,
        cpu=cpu,
    )
    # Every header field whole: a printed pid that does not fit is no pid, not a null one.
    whole = pl.all_horizontal(pl.col("tid", "cpu", "ts_ns").is_not_null()) & (
        pl.col("pid_text").is_null() | pl.col("pid").is_not_null()
    )
    return cut.select(
        "lineno",
        "line",
        "payload",
        "ts_ns",
        "pid",
        "tid",
        "cpu",
        event=pl.when(whole).then("event"),
    ).collect()


# Columns that come from the line's header, not from the tracepoint's text.
HEADER_COLUMNS = ("ts_ns", "event", "pid", "tid", "cpu")
PAYLOAD_COLUMNS = tuple(c for c in s.COLUMNS if c not in (*HEADER_COLUMNS, "source", "raw"))


def _extract(lines: pl.DataFrame, spec: PayloadFormat) -> pl.LazyFrame:
    """``lines`` with ``f``, the struct of the pattern's groups (null fields: no match).

    With a ``quick`` pattern, it runs first and the full one only on the payloads it did not
    match: where the quick one matches it captures what the full one would.
    """
    payload = pl.col("payload")
    if spec.quick is None:
        return lines.lazy().with_columns(f=payload.str.extract_groups(f"^{spec.pattern}"))
    quick = lines.with_columns(f=payload.str.extract_groups(f"^{spec.quick}"))
    missed = field(spec.required).is_null()
    rest = quick.filter(missed)
    if rest.height == 0:
        return quick.lazy()
    rest = rest.with_columns(f=payload.str.extract_groups(f"^{spec.pattern}"))
    return pl.concat([quick.filter(~missed), rest]).lazy()


def parse_event_lines(events: pl.DataFrame, *, nul: bool = False) -> pl.DataFrame:
    """Event lines (``lineno``, ``payload`` and the header columns, in line order) -> rows.

    The payload of each event name is parsed with that event's pattern, for all its lines at
    once; the event names are independent queries that polars runs in parallel. Each yields
    only its own numeric and name columns plus ``ok`` (the text matched) and ``keep`` (the
    text goes to ``raw``); putting them back in line order moves those narrow columns, and
    the wide ones (header, ``raw``) never leave their place. A payload that does not match,
    or has a number too big for its column, is kept whole in ``raw`` with ``ok`` false and
    none of its columns filled. ``nul``: the file has NUL bytes; a payload with one (a
    zero-filled block, say) is malformed too.
    """
    # One pass splits the lines by event name.
    # ``at``: the row, to put the parsed rows back in line order.
    by_name = events.select(
        pl.int_range(pl.len(), dtype=pl.UInt32).alias("at"), "event", "payload"
    ).partition_by("event", as_dict=True, include_key=False)
    parts: list[pl.LazyFrame] = []
    other: list[pl.LazyFrame] = []
    for (name,), lines in by_name.items():
        spec = PAYLOADS.get(name)
        if spec is None:
            other.append(lines.lazy())
            continue
        part = _extract(lines, spec)
        if spec.lookup is not None:
            group, table = spec.lookup
            part = part.join(table().lazy(), left_on=field(group), right_on="key", how="left")
        columns = spec.columns()
        checks = [field(spec.required).is_not_null()]
        if spec.valid is not None:
            checks.append(spec.valid().fill_null(False))
        # Each column once, as computed; then cast to the schema's types.
        part = part.select("at", pl.all_horizontal(checks).alias("ok"), **columns)
        have = part.collect_schema()
        typed = {c: pl.col(c).cast(s.EVENTS_SCHEMA[c], strict=False) for c in columns}
        # A number that matched but does not fit a narrower column (count 3000000000 in
        # Int32, level -1 in UInt64) is no value: the payload is malformed.
        narrowed = [
            c for c in columns if have[c] != s.EVENTS_SCHEMA[c] and s.EVENTS_SCHEMA[c].is_numeric()
        ]
        ok = pl.all_horizontal(
            "ok", *[pl.col(c).is_null() | typed[c].is_not_null() for c in narrowed]
        )
        parts.append(
            part.with_columns(ok=ok).select(
                "at",
                "ok",
                (pl.lit(spec.keep_raw) | ~pl.col("ok")).alias("keep"),
                *[pl.when("ok").then(expr).alias(c) for c, expr in typed.items()],
            )
        )
    # Events with no pattern: every column null, the text in raw.
    parts += [lines.select("at", ok=pl.lit(True), keep=pl.lit(True)) for lines in other]
    by_event = pl.concat(parts, how="diagonal").collect()
    # Rows grouped by event -> line order: a gather by the inverse of ``at`` (no sort).
    order = np.empty(by_event.height, dtype=np.int64)
    order[by_event.get_column("at").to_numpy()] = np.arange(by_event.height)
    parsed = by_event.drop("at")[order].lazy()
    have = parsed.collect_schema().names()
    parsed = parsed.select(
        "ok",
        "keep",
        *[
            pl.col(c) if c in have else pl.lit(None, s.EVENTS_SCHEMA[c]).alias(c)
            for c in PAYLOAD_COLUMNS
        ],
    )
    header = events.lazy().select("lineno", *HEADER_COLUMNS, "payload")
    rows = pl.concat([header, parsed], how="horizontal")
    if nul:
        damaged = pl.col("payload").str.contains("\x00", literal=True)
        rows = rows.with_columns(
            [pl.when(~damaged).then(pl.col(c)).alias(c) for c in PAYLOAD_COLUMNS],
            ok=pl.col("ok") & ~damaged,
            keep=pl.col("keep") | damaged,
        )
    return rows.with_columns(raw=pl.when("keep").then("payload")).drop("payload", "keep").collect()


def event_lines(text: TextLines, fmt: LineFormat) -> tuple[pl.DataFrame, pl.DataFrame]:
    """``(events, rest)``: the split event lines in line order, and the other lines."""
    fast, rest = split_fast(text) if fmt.tracefs_layout else (None, text.lines)
    return _with_general(fast, rest, fmt)


def _with_general(
    fast: pl.DataFrame | None, rest: pl.DataFrame, fmt: LineFormat
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Split ``rest`` with the general parser; its events merged in line order with ``fast``."""
    if fast is not None and rest.height == 0:
        return fast, rest
    general = split_lines(rest, fmt)
    is_event = pl.col("event").is_not_null()
    events = (
        general.filter(is_event).drop("line").with_columns(pl.col("event").cast(pl.Categorical))
    )
    rest = general.filter(~is_event).select("lineno", "line")
    if fast is not None and events.height:
        events = pl.concat([fast, events]).sort("lineno")
    elif fast is not None:
        events = fast
    return events, rest


# Lines per run of the tracefs fast path: runs are split and parsed by parallel threads
# (polars and numpy release the GIL), each run small enough to stay in the caches longer.
FAST_RUN_LINES = 200_000


def parsed_lines(text: TextLines, fmt: LineFormat) -> tuple[pl.DataFrame | None, pl.DataFrame]:
    """``(parsed, rest)``: every event line parsed (:func:`parse_event_lines`, line order;
    None without events) and the lines that are not events.

    With the tracefs layout, runs of lines are split and parsed in parallel; the lines that
    do not have the layout are split by the general parser afterwards and merged in.
    """
    lines = text.lines
    if not fmt.tracefs_layout or text.starts is None:
        events, rest = _with_general(None, lines, fmt)
        return (parse_event_lines(events, nul=text.has_nul) if events.height else None), rest
    ascii = text.data.isascii()
    starts = text.starts

    def run(offset: int) -> tuple[pl.DataFrame | None, pl.DataFrame]:
        events, rest = split_tracefs_run(
            lines.slice(offset, FAST_RUN_LINES),
            text.data,
            starts[offset : offset + FAST_RUN_LINES],
            ascii=ascii,
        )
        return (parse_event_lines(events, nul=text.has_nul) if events.height else None), rest

    offsets = range(0, lines.height, FAST_RUN_LINES)
    if len(offsets) > 1:
        with ThreadPoolExecutor(min(len(offsets), pl.thread_pool_size())) as pool:
            runs = list(pool.map(run, offsets))
    else:
        runs = [run(0)]
    fast = [p for p, _ in runs if p is not None]
    rest = pl.concat([r for _, r in runs])
    general, rest = _with_general(None, rest, fmt)
    if general.height:
        fast.append(parse_event_lines(general, nul=text.has_nul))
    if not fast:
        return None, rest
    parsed = pl.concat(fast)
    if general.height:
        parsed = parsed.sort("lineno")
    return parsed, rest


def _compiled_lines(
    p: Path, data: bytes, fmt: LineFormat
) -> tuple[int, pl.DataFrame | None, pl.DataFrame] | None:
    """``(lines, parsed, rest)`` as :func:`parsed_lines` gives them, with the lines the
    compiled reader accepts (:mod:`vtrace.ingest.native`) parsed there and every other
    line parsed here; None when the extension is not there or the file is one whose lines
    polars splits another way (carriage returns, the unit separator)."""
    got = native.parse(data)
    if got is None or got.cr or got.unit_separator:
        return None
    if got.non_ascii:
        check_utf8(p, data)  # what reading the lines with polars would report
    ends_in_newline = data.endswith(b"\n")
    rest = got.rest
    if not ends_in_newline:
        in_rest = rest.height > 0 and int(rest.get_column("lineno")[-1]) == got.lines
        # A line the compiled reader accepted is an event line: never blank.
        last = rest.get_column("line")[-1] if in_rest else "event"
        check_last_text(p, last, lineno=got.lines, what=fmt.name)
    parsed = got.rows if got.rows.height else None
    if rest.height == 0:
        return got.lines, parsed, rest
    text = TextLines(rest, ends_in_newline, data, got.rest_starts, got.nul)
    others, rest = parsed_lines(text, fmt)
    if others is None:
        return got.lines, parsed, rest
    if parsed is None:
        return got.lines, others, rest
    return got.lines, parsed.merge_sorted(others, key="lineno"), rest


def read_tracepoint_text(
    fmt: LineFormat, path: str | Path, *, strict: bool = False
) -> tuple[pl.DataFrame, dict[str, Any]]:
    """Parse one text file of tracepoint lines into an events frame and its meta."""
    p = Path(path)
    data = read_text_bytes(p)
    got = _compiled_lines(p, data, fmt) if fmt.tracefs_layout else None
    if got is None:
        text = read_text_lines(p, data)
        lines = text.lines
        check_last_line(p, lines, ends_in_newline=text.ends_in_newline, what=fmt.name)
        total = lines.height
        parsed, rest = parsed_lines(text, fmt)
    else:
        total, parsed, rest = got
    line = pl.col("line")

    is_ignored = line.str.contains(fmt.ignore)
    ignored = rest.filter(is_ignored).height
    rest = rest.filter(~is_ignored)
    lost_events = 0
    if fmt.lost is not None:
        lost_n = line.str.extract(fmt.lost, 1).cast(pl.Int64, strict=False)
        lost_events = int(rest.select(lost_n.sum()).item() or 0)
        rest = rest.filter(lost_n.is_null())

    if parsed is None or parsed.height == 0:
        first = first_line_numbers(rest, 1)
        where = f"{p}:{first[0]}" if first else str(p)
        raise VtraceError(f"{where}: no {fmt.name} events in this file (is it {fmt.name} output?)")
    meta = check_unparsed(p, rest, strict=strict, what=fmt.name)
    malformed = parsed.filter(~pl.col("ok"))
    if strict and malformed.height:
        first = int(malformed.get_column("lineno")[0])
        raise VtraceError(
            f"{p}:{first}: {malformed.get_column('event')[0]} text does not match its format "
            f"({malformed.height} such lines)"
        )
    # Decided once per event name, then looked up per line.
    names = parsed.get_column("event").unique().cast(pl.String).to_list()
    kvm = pl.col("event").is_in([n for n in names if n.startswith("kvm")])
    frame = s.conform(
        parsed.with_columns(
            source=pl.when(kvm)
            .then(pl.lit(s.SOURCE_KVM, pl.Categorical))
            .otherwise(pl.lit("kernel", pl.Categorical))
        ).drop("lineno", "ok")
    )
    s.validate(frame, where=str(p))
    meta.update(
        {
            "importer": fmt.name,
            "source_files": [str(p.resolve())],
            "lines": total,
            "events": frame.height,
            "ignored_lines": ignored,
            "lost_events": lost_events,
            "malformed": malformed.height,
            "malformed_first_lines": first_line_numbers(malformed),
            "clock": fmt.clock,
        }
    )
    return frame, meta
