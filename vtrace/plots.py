"""Plotly figure builders over events and analysis frames.

Every function takes polars frames (the events table, or a table from `vtrace.analyze` or
`vtrace.sim`) and *returns* a :class:`plotly.graph_objects.Figure`; nothing here shows,
writes or opens anything. Figures carry a title, units on their axes and hover text.

Column names carry their unit (`duration_ns`, `request_bytes`, `throughput_rps`); the
figures show nanosecond columns in microseconds, which is the scale exits and requests
live at, and say so on the axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import plotly.express as px
import plotly.graph_objects as go
import polars as pl
from plotly.subplots import make_subplots

Frame = pl.DataFrame | pl.LazyFrame

TEMPLATE = "plotly_white"
# One colour per side of the comparison, kept across figures so a reader learns them once.
EMULATED_COLOR = "#d62728"
VIRTIO_COLOR = "#1f77b4"
# A timeline of more events than this is thinned (evenly, keeping the first and last)
# so the browser stays responsive; the title says so.
TIMELINE_MAX_EVENTS = 20_000

# Unit suffix -> (axis unit, factor from the column's unit to the axis unit).
_UNITS: dict[str, tuple[str, float]] = {
    "ns": ("µs", 1e-3),
    "us": ("µs", 1.0),
    "ms": ("ms", 1.0),
    "s": ("s", 1.0),
    "bytes": ("bytes", 1.0),
    "rps": ("requests/s", 1.0),
    "per_s": ("per second", 1.0),
}
# Words that read better spelled out on an axis than as a column name.
_WORDS = {"p50": "p50", "p90": "p90", "p99": "p99", "p999": "p99.9", "rps": "", "vcpu": "vCPU"}


def _collect(frame: Frame) -> pl.DataFrame:
    return frame.collect() if isinstance(frame, pl.LazyFrame) else frame


def _split(col: str) -> tuple[str, str]:
    """A column name as (words stem, unit suffix): `latency_ns.p99` -> (`latency p99`, `ns`).

    Dotted names come from flattened summaries (`latency_ns.p99`) and sweep axes
    (`virtqueue.ring_size`, where the table name is left out).
    """
    head, dot, sub = col.rpartition(".")
    for suffix in sorted(_UNITS, key=len, reverse=True):
        if dot and head.endswith(f"_{suffix}"):
            return f"{head[: -len(suffix) - 1]}_{sub}", suffix
        if col.endswith(f"_{suffix}"):
            return (sub if dot else col)[: -len(suffix) - 1], suffix
    return (sub if dot else col), ""


def unit_of(col: str) -> tuple[str, float]:
    """The axis unit of a column and the factor that converts it: `("µs", 1e-3)` for `_ns`."""
    _, suffix = _split(col)
    if suffix:
        return _UNITS[suffix]
    if col.endswith("_share") or col == "share":
        return ("share", 1.0)
    return ("", 1.0)


def label(col: str) -> str:
    """An axis title for a column: words, then the unit in parentheses (`latency p99 (µs)`)."""
    unit, _ = unit_of(col)
    stem, _ = _split(col)
    words = " ".join(_WORDS.get(w, w) for w in stem.split("_") if _WORDS.get(w, w))
    return f"{words} ({unit})" if unit and unit != "share" else words


def _scaled(frame: pl.DataFrame, cols: Sequence[str]) -> pl.DataFrame:
    """Convert unit-carrying columns to their axis unit (ns -> µs), keeping the names."""
    exprs = []
    for c in cols:
        _, factor = unit_of(c)
        if factor != 1.0 and c in frame.columns:
            exprs.append((pl.col(c).cast(pl.Float64) * factor).alias(c))
    return frame.with_columns(exprs) if exprs else frame


def _finish(fig: go.Figure, title: str, **layout) -> go.Figure:
    fig.update_layout(
        title={"text": title, "x": 0.01, "xanchor": "left"},
        template=TEMPLATE,
        margin={"l": 60, "r": 20, "t": 60, "b": 50},
        **layout,
    )
    return fig


def _side_color(name: str) -> str | None:
    low = name.lower()
    if any(k in low for k in ("emul", "ide", "e1000")):
        return EMULATED_COLOR
    if any(k in low for k in ("virtio", "vhost")):
        return VIRTIO_COLOR
    return None


def empty_figure(title: str, why: str) -> go.Figure:
    """A figure that says why there is nothing to draw (no events of a kind in this trace)."""
    fig = go.Figure()
    fig.add_annotation(
        text=why, showarrow=False, x=0.5, y=0.5, xref="paper", yref="paper", font={"size": 14}
    )
    fig.update_xaxes(visible=False)
    fig.update_yaxes(visible=False)
    return _finish(fig, title, height=260)


# --- what is in a trace ---------------------------------------------------------------------


def event_counts(events: Frame, *, title: str = "Events by name and source") -> go.Figure:
    """Horizontal bars: how many events of each name the trace holds, coloured by source."""
    counts = (
        _collect(
            events.lazy()
            .group_by("source", "event")
            .agg(pl.len().alias("count"))
            .with_columns(pl.col("source").cast(pl.String), pl.col("event").cast(pl.String))
        )
        .sort("count")
        .with_columns((pl.col("count") / pl.col("count").sum()).alias("share"))
    )
    if counts.height == 0:
        return empty_figure(title, "this trace has no events")
    fig = px.bar(
        counts,
        x="count",
        y="event",
        color="source",
        orientation="h",
        log_x=True,
        hover_data={"share": ":.1%", "count": ":,"},
        labels={"count": "events (log scale)", "event": "event"},
    )
    return _finish(fig, title, height=max(260, 24 * counts.height + 120))


def timeline(
    events: Frame,
    *,
    lane: str = "tid",
    title: str = "Timeline: events per thread",
    max_events: int = TIMELINE_MAX_EVENTS,
) -> go.Figure:
    """Each event as a mark on its thread's (or vCPU's, with ``lane="vcpu"``) lane over time.

    Time is in milliseconds from the first event. Hover shows the event, device, address,
    size, direction and reason where the event has them.
    """
    cols = ["ts_ns", lane, "event", "device", "addr", "size", "write", "reason_name"]
    lf = events.lazy().select(cols).sort("ts_ns")
    frame = _collect(lf)
    if frame.height == 0:
        return empty_figure(title, "this trace has no events")
    shown = frame
    if frame.height > max_events:
        # Even thinning by row number keeps the shape of bursts without a Python loop.
        step = -(-frame.height // max_events)
        shown = frame.gather_every(step)
        title = f"{title} (every {step}th of {frame.height:,} events)"
    t0 = frame["ts_ns"].min()
    shown = shown.with_columns(
        ((pl.col("ts_ns") - t0) / 1e6).alias("time_ms"),
        pl.col(lane).cast(pl.String).fill_null("?").alias("lane"),
        pl.col("event").cast(pl.String),
        pl.col("device").cast(pl.String),
        pl.col("reason_name").cast(pl.String),
        pl.col("addr").map_batches(_to_hex, return_dtype=pl.String).alias("address"),
    )
    fig = px.scatter(
        shown,
        x="time_ms",
        y="lane",
        color="event",
        hover_data={
            "time_ms": ":.3f",
            "device": True,
            "address": True,
            "size": True,
            "write": True,
            "reason_name": True,
            "lane": False,
        },
        labels={
            "time_ms": "time since first event (ms)",
            "lane": "vCPU" if lane == "vcpu" else lane,
        },
        render_mode="webgl",
    )
    fig.update_traces(marker={"size": 5, "symbol": "line-ns-open", "line": {"width": 1}})
    return _finish(fig, title, height=max(300, 40 * shown["lane"].n_unique() + 160))


def _to_hex(s: pl.Series) -> pl.Series:
    # polars has no integer -> hex string expression; Arrow's formatter would be per row too,
    # so convert through numpy's vectorised formatting of a whole array at once.
    import numpy as np

    values = s.fill_null(0).cast(pl.UInt64).to_numpy()
    text = np.char.add("0x", np.char.mod("%x", values.astype(np.uint64)))
    out = pl.Series(s.name, text, dtype=pl.String)
    return pl.select(pl.when(s.is_null()).then(None).otherwise(out)).to_series()


def reason_bars(
    table: Frame,
    *,
    reason: str = "reason_name",
    count: str = "count",
    time: str = "total_ns",
    title: str = "Exits by reason",
) -> go.Figure:
    """Two panels side by side: how many exits of each reason, and the time they took.

    ``table`` is a per-reason table such as ``percentiles(exits, "duration_ns",
    by="reason_name")``: one row per reason with a count and a total time.
    """
    frame = _collect(table)
    if frame.height == 0:
        return empty_figure(title, "no exits of this kind in this trace")
    has_time = time in frame.columns
    frame = frame.with_columns(pl.col(reason).cast(pl.String).fill_null("(unknown)"))
    frame = frame.with_columns((pl.col(count) / pl.col(count).sum()).alias("_share"))
    if has_time:
        frame = _scaled(frame, [time]).with_columns(
            (pl.col(time) / pl.col(time).sum()).alias("_time_share")
        )
    frame = frame.sort(count)
    ncols = 2 if has_time else 1
    fig = make_subplots(
        rows=1,
        cols=ncols,
        shared_yaxes=True,
        horizontal_spacing=0.04,
        subplot_titles=("count", f"total time ({unit_of(time)[0]})") if has_time else ("count",),
    )
    fig.add_trace(
        go.Bar(
            x=frame[count],
            y=frame[reason],
            orientation="h",
            name="count",
            customdata=frame["_share"],
            hovertemplate="%{y}<br>%{x:,} exits (%{customdata:.1%})<extra></extra>",
            marker_color=VIRTIO_COLOR,
        ),
        row=1,
        col=1,
    )
    if has_time:
        fig.add_trace(
            go.Bar(
                x=frame[time],
                y=frame[reason],
                orientation="h",
                name="time",
                customdata=frame["_time_share"],
                hovertemplate="%{y}<br>%{x:,.1f} µs (%{customdata:.1%} of the time)<extra></extra>",
                marker_color=EMULATED_COLOR,
            ),
            row=1,
            col=2,
        )
        fig.update_xaxes(title_text=label(time).replace("total ", "total time "), row=1, col=2)
    fig.update_xaxes(title_text="exits", row=1, col=1)
    return _finish(fig, title, showlegend=False, height=max(260, 28 * frame.height + 140))


def _short(value: pl.Expr) -> pl.Expr:
    """A bucket edge as short text: whole numbers from 10 up, one decimal from 1, else three."""
    return (
        pl.when(value >= 10)
        .then(value.round(0).cast(pl.Int64).cast(pl.String))
        .when(value >= 1)
        .then(value.round(1).cast(pl.String))
        .otherwise(value.round(3).cast(pl.String))
    )


def log2_histogram_bars(
    hist: Frame,
    *,
    lo: str = "lo_ns",
    hi: str = "hi_ns",
    color: str | None = None,
    title: str = "Duration distribution",
) -> go.Figure:
    """Bars of a log2 histogram (``vtrace.analyze.log2_histogram``): one bar per bucket.

    The x axis is the bucket's range (for `_ns` columns in µs); hover gives the count and
    the share of the group's events.
    """
    frame = _collect(hist)
    if frame.height == 0:
        return empty_figure(title, "no durations to show")
    unit, factor = unit_of(lo)
    frame = frame.sort([*([color] if color else []), lo]).with_columns(
        pl.format("{}–{}", _short(pl.col(lo) * factor), _short(pl.col(hi) * factor)).alias("range"),
        *([pl.col(color).cast(pl.String)] if color else []),
    )
    order = frame.sort(lo).unique("range", keep="first", maintain_order=True)["range"].to_list()
    fig = px.bar(
        frame,
        x="range",
        y="count",
        color=color,
        barmode="group",
        hover_data={"share": ":.1%", "count": ":,"},
        category_orders={"range": order},
        labels={"range": f"duration bucket ({unit}, log2 steps)", "count": "events"},
    )
    return _finish(fig, title, height=380)


def top_accesses(
    table: Frame,
    *,
    n: int = 15,
    title: str = "Hottest device registers",
) -> go.Figure:
    """The ``n`` most accessed ports / addresses, split by where they were handled.

    ``table`` is ``vtrace.analyze.accesses_by_target(...)``: one row per (source, event,
    device, addr) with `count`, `reads`, `writes`, and `user` / `kernel` counts, which
    stack as "user space" and "kernel" bars.
    """
    frame = _collect(table)
    if frame.height == 0:
        return empty_figure(title, "no port or MMIO accesses in this trace")
    frame = frame.sort("count", descending=True).head(n)
    parts = [pl.col("device").cast(pl.String).fill_null("?")] if "device" in frame.columns else []
    if "addr" in frame.columns:
        parts.append(pl.col("addr").map_batches(_to_hex, return_dtype=pl.String).fill_null("?"))
    if "event" in frame.columns:
        parts.append(pl.format("({})", pl.col("event").cast(pl.String)))
    frame = frame.with_columns(
        pl.concat_str(parts, separator=" ").alias("register") if parts else pl.lit("all")
    ).reverse()
    rw = [c for c in ("reads", "writes") if c in frame.columns]
    custom = frame.select(rw).to_numpy() if rw else None
    hover = "".join(f"<br>{c}: %{{customdata[{i}]:,}}" for i, c in enumerate(rw))
    fig = go.Figure()
    stacks = [("user", "user space", EMULATED_COLOR), ("kernel", "kernel", VIRTIO_COLOR)]
    split = all(c in frame.columns for c, _, _ in stacks)
    for col, name, color in stacks if split else [("count", "accesses", VIRTIO_COLOR)]:
        fig.add_trace(
            go.Bar(
                x=frame[col],
                y=frame["register"],
                orientation="h",
                name=f"handled in {name}" if split else name,
                marker_color=color,
                customdata=custom,
                hovertemplate=f"%{{y}}<br>{name}: %{{x:,}}{hover}<extra></extra>",
            )
        )
    fig.update_xaxes(title_text="accesses")
    fig.update_yaxes(title_text="device, address (event)")
    return _finish(fig, title, barmode="stack", height=max(280, 26 * frame.height + 140))


# --- emulated vs virtio -------------------------------------------------------------------


def comparison(
    frame: Frame,
    *,
    name: str = "name",
    metrics: Sequence[str] = (),
    title: str = "Emulated vs virtio",
    cols: int = 3,
) -> go.Figure:
    """Small multiples: one panel per metric, one bar per configuration (row of ``frame``).

    Bars of emulated devices are red and of virtio devices blue (by their names), so the
    two sides read the same in every panel. Missing values are left out, not drawn as zero.
    """
    data = _collect(frame)
    metrics = [m for m in metrics if m in data.columns] or [
        c for c in data.columns if c != name and data.schema[c].is_numeric()
    ]
    if data.height == 0 or not metrics:
        return empty_figure(title, "nothing to compare")
    data = _scaled(data.with_columns(pl.col(name).cast(pl.String)), metrics)
    names = data[name].to_list()
    colors = [_side_color(n) or "#7f7f7f" for n in names]
    ncols = min(cols, len(metrics))
    nrows = -(-len(metrics) // ncols)
    fig = make_subplots(
        rows=nrows,
        cols=ncols,
        subplot_titles=[label(m) for m in metrics],
        vertical_spacing=0.5 / nrows if nrows > 1 else 0.1,
        horizontal_spacing=0.08,
    )
    for i, metric in enumerate(metrics):
        unit = unit_of(metric)[0]
        fig.add_trace(
            go.Bar(
                x=names,
                y=data[metric],
                marker_color=colors,
                name=label(metric),
                hovertemplate=f"%{{x}}<br>{label(metric)}: %{{y:,.3~f}}"
                + (f" {unit}" if unit and unit != "share" else "")
                + "<extra></extra>",
            ),
            row=i // ncols + 1,
            col=i % ncols + 1,
        )
    fig.update_xaxes(tickangle=-30)
    return _finish(fig, title, showlegend=False, height=300 * nrows + 80)


def latency_cdf(
    frame: Frame,
    *,
    col: str = "latency_ns",
    color: str | None = None,
    title: str = "Request latency",
) -> go.Figure:
    """Empirical CDF of a duration column, one line per ``color`` group; log-scaled x axis."""
    data = _collect(frame)
    data = data.filter(pl.col(col).is_not_null())
    if data.height == 0:
        return empty_figure(title, "no completed requests")
    data = _scaled(data, [col])
    if color:
        data = data.with_columns(pl.col(color).cast(pl.String))
    fig = px.ecdf(data, x=col, color=color, log_x=True, labels={col: label(col)})
    fig.update_yaxes(title_text="share of requests at or below", tickformat=".0%")
    if color:
        for trace in fig.data:
            c = _side_color(trace.name or "")
            if c:
                trace.line.color = c
    return _finish(fig, title, height=380)


# --- what-if sweeps ---------------------------------------------------------------------------


def sweep_heatmap(
    results: Frame,
    *,
    x: str,
    y: str,
    z: str,
    title: str | None = None,
) -> go.Figure:
    """A heat map of one sweep metric ``z`` over two swept parameters ``x`` and ``y``.

    Points swept over other parameters too are averaged per (x, y) cell; hover gives the
    value with its unit. Axes are categorical so powers of two sit evenly.
    """
    data = _scaled(_collect(results), [z])
    title = title or f"{label(z)} by {label(x)} and {label(y)}"
    if data.height == 0:
        return empty_figure(title, "the sweep has no points")
    cells = data.group_by(x, y).agg(pl.col(z).mean()).sort(x, y)
    xs = cells[x].unique().sort().to_list()
    ys = cells[y].unique().sort().to_list()
    grid = cells.pivot(on=x, index=y, values=z).sort(y)
    matrix = grid.select([str(v) for v in xs]).to_numpy()
    unit = unit_of(z)[0]
    fig = go.Figure(
        go.Heatmap(
            x=[str(v) for v in xs],
            y=[str(v) for v in ys],
            z=matrix,
            colorscale="Viridis",
            colorbar={"title": {"text": label(z)}},
            hovertemplate=f"{label(x)} %{{x}}<br>{label(y)} %{{y}}<br>{label(z)}: %{{z:,.3~f}}"
            + (f" {unit}" if unit and unit != "share" else "")
            + "<extra></extra>",
            texttemplate="%{z:.3~s}",
        )
    )
    fig.update_xaxes(title_text=label(x), type="category")
    fig.update_yaxes(title_text=label(y), type="category")
    return _finish(fig, title, height=420)


def pareto_mask(results: pl.DataFrame, *, maximise: str, minimise: str) -> pl.Series:
    """True for the points no other point beats on both ``maximise`` and ``minimise``.

    Sorting by ``maximise`` descending, a point is on the front when its ``minimise`` is
    below every point before it: one sort and a cumulative minimum over the whole column.
    """
    order = results.with_row_index("_row").sort(
        [maximise, minimise], descending=[True, False], nulls_last=True
    )
    best_before = order[minimise].cum_min().shift(1, fill_value=float("inf"))
    on_front = order.select(_row=pl.col("_row"), front=pl.col(minimise) < best_before)
    return on_front.sort("_row")["front"].alias("pareto")


def pareto_front(
    results: Frame,
    *,
    x: str = "throughput_rps",
    y: str = "p99_ns",
    color: str | None = None,
    hover: Sequence[str] = (),
    title: str = "Throughput against tail latency",
) -> go.Figure:
    """Every sweep point as throughput (x) against a latency (y), the Pareto front as a line.

    The front is the set of points no other point beats on both: more throughput and lower
    latency. Hover shows the swept parameters named in ``hover``.
    """
    data = _collect(results).filter(pl.col(x).is_not_null() & pl.col(y).is_not_null())
    if data.height == 0:
        return empty_figure(title, "the sweep has no points")
    data = data.with_columns(pareto_mask(data, maximise=x, minimise=y))
    data = _scaled(data, [x, y])
    if color:
        data = data.with_columns(pl.col(color).cast(pl.String))
    fig = px.scatter(
        data,
        x=x,
        y=y,
        color=color,
        hover_data={h: True for h in hover if h in data.columns} | {"pareto": True},
        labels={x: label(x), y: label(y), **({color: label(color)} if color else {})},
        log_y=True,
    )
    fig.update_traces(marker={"size": 8, "opacity": 0.7})
    front = data.filter(pl.col("pareto")).sort(x)
    fig.add_trace(
        go.Scatter(
            x=front[x],
            y=front[y],
            mode="lines+markers",
            line={"color": "black", "dash": "dot"},
            marker={"symbol": "diamond-open", "size": 13, "color": "black"},
            name="Pareto front",
            hoverinfo="skip",
        )
    )
    return _finish(fig, title, height=440)


def sensitivity(
    results: Frame,
    *,
    x: str,
    y: str,
    color: str | None = None,
    title: str | None = None,
    log_x: bool = False,
    log_y: bool = False,
) -> go.Figure:
    """Lines of one output ``y`` against one swept input ``x``, one line per ``color`` group."""
    data = _collect(results)
    title = title or f"{label(y)} against {label(x)}"
    if data.height == 0:
        return empty_figure(title, "no points")
    data = _scaled(data, [x, y]).sort([*([color] if color else []), x])
    if color:
        data = data.with_columns(pl.col(color).cast(pl.String))
    fig = px.line(
        data,
        x=x,
        y=y,
        color=color,
        markers=True,
        log_x=log_x,
        log_y=log_y,
        labels={x: label(x), y: label(y)},
    )
    if color:
        for trace in fig.data:
            c = _side_color(trace.name or "")
            if c:
                trace.line.color = c
                trace.marker.color = c
    return _finish(fig, title, height=400)
