"""Figure builders and the emulated-vs-virtio tables, on the shipped real traces.

The per-request figures are checked against what each trace's maker counted at capture
time (`meta.json`: the lab's counters, the QEMU lab's `qemu_lab` summary), which vtrace's
analyses never read.
"""

from __future__ import annotations

import itertools

import numpy as np
import plotly.graph_objects as go
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vtrace import open_trace, plots
from vtrace.analyze import (
    accesses,
    accesses_by_target,
    by_reason,
    log2_histogram,
    user_exits,
)
from vtrace.compare import COLUMNS, model_costs, side_of, trace_costs, traces_costs
from vtrace.notebook import shipped_traces, traces_dir

TRACES = {t.name: t for t in shipped_traces(traces_dir())}


def _trace(name: str):
    # the traces are in git: one missing is a broken checkout, not a host without a feature
    assert name in TRACES, f"traces/{name} is missing: git checkout traces/{name}"
    return TRACES[name]


@pytest.fixture(autouse=True)
def _no_show(monkeypatch: pytest.MonkeyPatch) -> None:
    # Builders return figures; showing is the caller's business.
    def refuse(*args, **kwargs):
        raise AssertionError("a plot builder called .show()")

    monkeypatch.setattr(go.Figure, "show", refuse)


def _axis_titles(fig: go.Figure) -> list[str]:
    return [
        a.title.text
        for name, a in fig.layout.to_plotly_json().items()
        if name.startswith(("xaxis", "yaxis"))
        for a in [getattr(fig.layout, name)]
        if a.title.text
    ]


# --- axis labels and units ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("col", "text", "factor"),
    [
        ("duration_ns", "duration (µs)", 1e-3),
        ("latency_ns.p99", "latency p99 (µs)", 1e-3),
        ("p999_ns", "p99.9 (µs)", 1e-3),
        ("throughput_rps", "throughput (requests/s)", 1.0),
        ("rate_per_s", "rate (per second)", 1.0),
        ("workload.request_bytes", "request (bytes)", 1.0),
        ("virtqueue.ring_size", "ring size", 1.0),
        ("vcpu_exit_time_share", "vCPU exit time share", 1.0),
        ("kicks_per_request", "kicks per request", 1.0),
    ],
)
def test_labels_carry_the_unit_of_the_column(col: str, text: str, factor: float):
    assert plots.label(col) == text
    assert plots.unit_of(col)[1] == factor


# --- what is in a trace -------------------------------------------------------------------


def test_event_counts_of_a_real_trace():
    t = _trace("qemu-ide")
    fig = plots.event_counts(open_trace(t.path).events, title="ide")
    assert fig.layout.title.text == "ide"
    assert fig.layout.xaxis.type == "log"
    shown = sum(int(x) for tr in fig.data for x in tr.x)
    assert shown == t.events == 34_816
    assert all(tr.hovertemplate and "share" in tr.hovertemplate for tr in fig.data)


def test_timeline_thins_evenly_and_says_so():
    t = _trace("lab-emulated")
    events = open_trace(t.path).events
    full = plots.timeline(events, max_events=25_000)
    n = t.events
    assert sum(len(tr.x) for tr in full.data) == n == 20_002
    thin = plots.timeline(events, max_events=1_000)
    step = -(-n // 1_000)
    assert sum(len(tr.x) for tr in thin.data) == len(range(0, n, step))
    assert f"every {step}th of {n:,} events" in thin.layout.title.text
    assert "time since first event (ms)" in _axis_titles(thin)
    # Hover shows the port in hex: the lab's emulated device sits at ports 0x100-0x10c.
    addresses = {a for tr in full.data for row in tr.customdata for a in row if isinstance(a, str)}
    assert {"0x100", "0x104", "0x108", "0x10c"} <= addresses


def test_reason_bars_and_histogram_of_real_user_exits():
    t = _trace("lab-emulated")
    user = user_exits(open_trace(t.path).events)
    table = by_reason(user, "until_next_ns")
    fig = plots.reason_bars(table, title="user exits")
    count, time = fig.data
    assert list(count.y) == ["KVM_EXIT_IO"]
    assert int(count.x[0]) == t.meta["lab"]["userspace_exits"] == 8_001
    # Total time shown in µs: the table's ns divided by 1000.
    assert time.x[0] == pytest.approx(table["total_ns"][0] / 1e3)
    assert "exits" in _axis_titles(fig)
    hist = plots.log2_histogram_bars(log2_histogram(user, "until_next_ns"))
    assert sum(int(y) for tr in hist.data for y in tr.y) == user["until_next_ns"].count()
    assert "duration bucket (µs, log2 steps)" in _axis_titles(hist)


def test_top_accesses_of_the_ide_disk_split_by_where_handled():
    t = _trace("qemu-ide")
    targets = accesses_by_target(accesses(open_trace(t.path).events))
    fig = plots.top_accesses(targets, n=5)
    user, kernel = fig.data
    assert user.name == "handled in user space" and kernel.name == "handled in kernel"
    assert len(user.y) == 5
    # Under TCG every access reached QEMU: all in user space.
    assert sum(user.x) == targets.head(5)["count"].sum() and sum(kernel.x) == 0
    assert all(label.startswith(("ide", "piix")) for label in user.y)


def test_empty_inputs_give_a_figure_that_says_why():
    empty = user_exits(pl.DataFrame(schema=_events_schema()))
    fig = plots.reason_bars(by_reason(empty, "until_next_ns"))
    assert fig.layout.annotations[0].text == "no exits of this kind in this trace"
    fig = plots.pareto_front(pl.DataFrame({"throughput_rps": [], "p99_ns": []}))
    assert fig.layout.annotations[0].text == "the sweep has no points"


def _events_schema():
    from vtrace.schema import EVENTS_SCHEMA

    return EVENTS_SCHEMA


# --- sweeps -----------------------------------------------------------------------------------


def test_sweep_heatmap_cells_are_the_means_of_their_points():
    rows = list(itertools.product([8, 64, 256], [1, 4], [1, 16]))
    frame = pl.DataFrame(rows, schema=["ring_size", "batch", "depth"], orient="row").with_columns(
        (pl.col("ring_size") * 1000 + pl.col("batch") * 10 + pl.col("depth")).alias("p99_ns")
    )
    fig = plots.sweep_heatmap(frame, x="ring_size", y="batch", z="p99_ns")
    (heat,) = fig.data
    assert list(heat.x) == ["8", "64", "256"] and list(heat.y) == ["1", "4"]
    z = np.asarray(heat.z)
    for i, b in enumerate([1, 4]):
        for j, r in enumerate([8, 64, 256]):
            assert z[i][j] == pytest.approx((r * 1000 + b * 10 + 8.5) / 1e3)  # mean, in µs
    assert "p99 (µs)" in heat.hovertemplate
    assert _axis_titles(fig) == ["ring size", "batch"]


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.integers(0, 20), st.integers(0, 20)), min_size=1, max_size=40, unique=True
    )
)
def test_pareto_mask_is_exactly_the_undominated_points(points):
    frame = pl.DataFrame(points, schema=["tput", "lat"], orient="row")
    mask = plots.pareto_mask(frame, maximise="tput", minimise="lat").to_list()
    for (t, lat), on in zip(points, mask, strict=True):
        dominated = any((t2 >= t and l2 <= lat) and (t2, l2) != (t, lat) for t2, l2 in points)
        assert on == (not dominated)


# --- emulated vs virtio, measured --------------------------------------------------------------


def test_ide_costs_match_what_the_qemu_lab_counted():
    t = _trace("qemu-ide")
    row = trace_costs(t.path)
    lab = t.meta["qemu_lab"]
    assert row["side"] == "emulated" and row["requests"] == lab["requests"] == 1024
    assert row["trapping_accesses_per_request"] == lab["device_accesses_per_request"] == 26.0
    assert row["irqs_per_request"] == lab["interrupts_per_request"] == 1.0
    assert row["kicks_per_request"] == 0.0 and row["requests_per_kick"] is None
    assert row["exits_per_request"] is None  # TCG: no kvm_exit to count


@pytest.mark.parametrize(
    "name", ["qemu-virtio-blk-qd1", "qemu-virtio-blk-qd16", "qemu-e1000", "qemu-virtio-net"]
)
def test_qemu_guest_costs_match_what_the_qemu_lab_counted(name: str):
    t = _trace(name)
    row = trace_costs(t.path)
    lab = t.meta["qemu_lab"]
    assert row["requests"] == lab["requests"]
    assert row["trapping_accesses_per_request"] == lab["device_accesses_per_request"]
    assert row["kicks_per_request"] == (lab["kicks_per_request"] or 0.0)
    assert row["irqs_per_request"] == lab["interrupts_per_request"]


def test_batching_shows_in_the_virtio_blk_traces():
    qd1 = trace_costs(_trace("qemu-virtio-blk-qd1").path)
    qd16 = trace_costs(_trace("qemu-virtio-blk-qd16").path)
    assert qd1["kicks_per_request"] == 1.0 and qd1["requests_per_kick"] == 1.0
    # Batched submission: several requests per kick, never more than one plug's 16.
    assert qd16["kicks_per_request"] < qd1["kicks_per_request"] / 2
    assert 2 < qd16["requests_per_kick"] <= 16


@pytest.mark.parametrize("name", ["lab-emulated", "lab-virtio-b8"])
def test_lab_costs_match_the_lab_counters(name: str):
    t = _trace(name)
    row = trace_costs(t.path)
    lab = t.meta["lab"]
    assert row["requests"] == lab["requests"]
    assert row["userspace_exits_per_request"] == lab["userspace_exits"] / lab["requests"]
    assert row["kicks_per_request"] == lab["kicks"] / lab["requests"]


def test_traces_costs_has_one_row_per_trace_and_the_documented_columns():
    paths = [t.path for t in TRACES.values()]
    assert paths, "traces/ holds no traces: git checkout traces/"
    frame = traces_costs(paths)
    assert frame.columns == list(COLUMNS) and frame.height == len(paths)
    fig = plots.comparison(frame, metrics=["trapping_accesses_per_request", "throughput_rps"])
    assert [a.text for a in fig.layout.annotations] == [
        "trapping accesses per request",
        "throughput (requests/s)",
    ]
    colors = dict(zip(fig.data[0].x, fig.data[0].marker.color, strict=True))
    for name, color in colors.items():
        expected = {"emulated": plots.EMULATED_COLOR, "virtio": plots.VIRTIO_COLOR}
        assert color == expected.get(side_of(name), "#7f7f7f")


def test_model_costs_put_emulated_exits_in_user_space():
    frame = model_costs(["lab-emulated", "lab-virtio"], requests=500)
    emulated, virtio = frame.rows(named=True)
    assert emulated["side"] == "emulated" and virtio["side"] == "virtio"
    assert emulated["trapping_accesses_per_request"] == emulated["userspace_exits_per_request"]
    assert emulated["userspace_exits_per_request"] > 1
    assert virtio["trapping_accesses_per_request"] == 0.0
    assert virtio["kicks_per_request"] <= 1.0
