"""The lab's bounded records: latency statistics and events in fixed memory at any length.

Before, the lab kept every request's timestamps in lists and built one frame at the end: its
memory grew with the requests (10 MB to 1.39 GB over 180 s at batch 1), so the accepted
maximum of 2^31 requests could not fit.
"""

from __future__ import annotations

import tracemalloc
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from vtrace import schema
from vtrace.lab import records, run_lab
from vtrace.lab.records import EventLog, LatencyStats

# Half a bin's width: a histogram percentile is within this of a value at its rank.
REL = 2 ** (1 / (2 * records.BINS_PER_OCTAVE)) - 1 + 1e-9
QS = [0, 1, 50, 90, 99, 99.9, 100]


def _fold(values: np.ndarray, chunk: int, exact_max: int) -> LatencyStats:
    s = LatencyStats(exact_max=exact_max)
    for i in range(0, values.size, chunk):
        s.add(values[i : i + chunk])
    return s


@settings(max_examples=60, deadline=None)
@given(
    hnp.arrays(np.int64, st.integers(1, 3000), elements=st.integers(0, 10**12)),
    st.integers(1, 700),
)
def test_percentiles_are_numpys_up_to_the_exact_size(values: np.ndarray, chunk: int) -> None:
    s = _fold(values, chunk, exact_max=values.size)
    assert s.exact and s.n == values.size and s.total == sum(int(x) for x in values)
    assert s.percentiles(QS) == pytest.approx(list(np.percentile(values, QS)), rel=1e-12)


@settings(max_examples=80, deadline=None)
@given(
    hnp.arrays(
        np.int64,
        st.integers(2, 4000),
        elements=st.one_of(st.integers(0, 300), st.integers(0, 10**9), st.integers(0, 1 << 62)),
    ),
    st.integers(1, 900),
)
def test_beyond_it_each_percentile_is_within_half_a_bin(values: np.ndarray, chunk: int) -> None:
    s = _fold(values, chunk, exact_max=1)
    assert not s.exact and s.n == values.size
    exact_sum = sum(int(x) for x in values)  # Python ints: numpy's int64 sum would wrap
    assert s.summary()["mean"] == exact_sum / values.size  # the sum stays exact
    x = np.sort(values)
    for q, got in zip(QS, s.percentiles(QS), strict=True):
        rank = q / 100 * (x.size - 1)
        lo, hi = x[int(np.floor(rank))], x[int(np.ceil(rank))]
        assert lo * (1 - REL) - 1e-9 <= got <= hi * (1 + REL) + 1e-9, (q, got, lo, hi)


def test_no_values_summarise_as_zeros() -> None:
    assert LatencyStats().summary() == {"mean": 0.0, "p50": 0.0, "p99": 0.0}


def test_event_log_keeps_the_first_rows_and_hands_on_all() -> None:
    sunk: list[pl.DataFrame] = []
    log = EventLog(sink=sunk.append, keep=5)
    built = []
    for start in (0, 3, 6):

        def build(start: int = start) -> pl.DataFrame:
            built.append(start)
            return pl.DataFrame({"ts_ns": [start, start + 1, start + 2]})

        log.add(3, build)
    assert log.total == 9 and sum(f.height for f in sunk) == 9
    assert log.frame()["ts_ns"].to_list() == [0, 1, 2, 3, 4]
    quiet = EventLog(keep=3)  # nobody wants rows past the kept ones: no frame is built
    quiet.add(3, lambda: pl.DataFrame({"ts_ns": [0, 1, 2]}))
    quiet.add(3, lambda: pytest.fail("built a frame nobody keeps"))
    assert quiet.total == 6 and quiet.frame().height == 3


# --- real runs: the lists are folded, the results are the same ------------------------------


@pytest.fixture
def small_records(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fold every 64 requests and keep 200 events rows, so short runs cross every limit."""
    monkeypatch.setattr(records, "CHUNK_REQUESTS", 64)
    monkeypatch.setattr(records, "EXACT_VALUES", 100)
    monkeypatch.setattr(records, "KEEP_EVENTS", 200)


@pytest.mark.kvm
@pytest.mark.parametrize("device", ["emulated", "virtio"])
def test_folded_runs_count_every_event_and_keep_the_first(device: str, small_records) -> None:
    n = 1000
    r = run_lab(device, requests=n, batch=1, ring_size=16, request_bytes=64)
    assert r.completed == n and r.events.height == 200
    per_request = 2 if device == "emulated" else None  # pop + complete
    if per_request:
        assert r.events_total == per_request * n
    else:  # kicks and completes per wake-up vary; every pop is there
        assert r.events_total >= 2 * n
    schema.validate(r.events)
    pops = r.events.filter(pl.col("event") == schema.LAB_POP)
    assert pops["value"].to_list() == list(range(pops.height))  # the first, in order
    assert r.events["ts_ns"].is_sorted()
    assert 0 < r.latency_ns["p50"] <= r.latency_ns["p99"]
    assert r.to_json()["events"] == r.events_total


def _peak_bytes(device: str, n: int) -> int:
    tracemalloc.start()
    try:
        run_lab(device, requests=n, batch=1, ring_size=16, request_bytes=64)
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


@pytest.mark.kvm
@pytest.mark.parametrize("device", ["emulated", "virtio"])
def test_memory_does_not_grow_with_the_requests(device: str, small_records) -> None:
    _peak_bytes(device, 200)  # first use: imports and caches
    short, long = _peak_bytes(device, 2_000), _peak_bytes(device, 16_000)
    # Before: every request's timestamps stayed in lists (about 300 B a request here).
    assert long - short < 256 << 10, (short, long)


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_a_recording_gets_every_event_while_the_result_keeps_the_first(
    small_records, tmp_path: Path
) -> None:
    from vtrace.store import open_trace

    out = tmp_path / "trace"
    r = run_lab("virtio", requests=500, batch=1, ring_size=16, request_bytes=64, record=out)
    lab = open_trace(out).events.filter(pl.col("source").cast(pl.String) == "lab").collect()
    assert lab.height == r.events_total > r.events.height == 200
    pops = lab.filter(pl.col("event") == schema.LAB_POP).sort("ts_ns")
    assert pops["value"].to_list() == list(range(500))


def test_the_sum_of_huge_values_stays_exact() -> None:
    """Values near 2^62 overflow an int64 sum after two; the mean must not wrap."""
    values = np.full(4, 1 << 62, dtype=np.int64)
    for exact_max in (1, 8):  # past the exact window, and inside it
        s = _fold(values, 4, exact_max=exact_max)
        assert s.total == 4 << 62
        assert s.summary()["mean"] == float(1 << 62)
