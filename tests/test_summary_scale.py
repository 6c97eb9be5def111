"""`summary()` on traces larger than memory: chunk by chunk, with the same results.

The summary reads a trace a chunk of parts at a time; the per-thread and per-queue state
that crosses a chunk boundary (an exit whose entry is in the next part, a request whose
completion is) is carried over. These tests cut random traces into tiny chunks and check
every table against one chunk holding the whole trace and against the per-row analyses.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from vtrace import schema as s
from vtrace.analyze import (
    by_reason,
    exits,
    log2_histogram,
    partials,
    percentiles,
    requests,
    user_exits,
)
from vtrace.analyze.chunks import part_ranges, plan_chunks
from vtrace.analyze.distributions import percentile_exprs
from vtrace.analyze.partials import DurationStats, relative_error_bound
from vtrace.analyze.summary import summary
from vtrace.store import TraceWriter, open_trace

ROOT = Path(__file__).resolve().parent.parent
summary_module = sys.modules["vtrace.analyze.summary"]  # the package exports the function

# One vCPU action: the events after its kvm_exit, as (event, reason, addr, write) with the
# exit's own reason first. Each ends in the kvm_entry that resumes the guest.
IO_USER = [(s.KVM_EXIT, 30, None, None), (s.KVM_PIO, None, 0x1F7, True),
           (s.KVM_USERSPACE_EXIT, 2, None, None), (s.KVM_ENTRY, None, None, None)]  # fmt: skip
KICK = [(s.KVM_EXIT, 30, None, None), (s.KVM_PIO, None, 0xC050, True),
        (s.KVM_ENTRY, None, None, None)]  # fmt: skip
IN_USER = [(s.KVM_EXIT, 30, None, None), (s.KVM_USERSPACE_EXIT, 2, None, None),
           (s.KVM_PIO, None, 0x1F7, False), (s.KVM_ENTRY, None, None, None)]  # fmt: skip
MMIO_READ = [(s.KVM_EXIT, 49, None, None), (s.KVM_MMIO, None, 0xFEBD1000, False),
             (s.KVM_USERSPACE_EXIT, 6, None, None), (s.KVM_MMIO, None, 0xFEBD1000, False),
             (s.KVM_ENTRY, None, None, None)]  # fmt: skip
MMIO_WRITE = [(s.KVM_EXIT, 49, None, None), (s.KVM_MMIO, None, 0xFEBD1004, True),
              (s.KVM_USERSPACE_EXIT, 6, None, None), (s.KVM_ENTRY, None, None, None)]  # fmt: skip
FAST = [(s.KVM_EXIT, 49, None, None), (s.KVM_FAST_MMIO, None, 0xFEBD3000, None),
        (s.KVM_ENTRY, None, None, None)]  # fmt: skip
HLT = [(s.KVM_EXIT, 12, None, None), (s.KVM_INJ_VIRQ, None, None, None),
       (s.KVM_ENTRY, None, None, None)]  # fmt: skip
EXTINT = [(s.KVM_EXIT, 1, None, None), (s.KVM_ENTRY, None, None, None)]
ACTIONS = [IO_USER, KICK, IN_USER, MMIO_READ, MMIO_WRITE, FAST, HLT, EXTINT]
REASONS = {30: "IO_INSTRUCTION", 49: "EPT_MISCONFIG", 12: "HLT", 1: "EXTERNAL_INTERRUPT",
           2: "KVM_EXIT_IO", 6: "KVM_EXIT_MMIO"}  # fmt: skip


def _vcpu_rows(rng: np.random.Generator, tid: int, actions: int) -> list[tuple]:
    """One vCPU thread's KVM events: ``actions`` random exits, with gaps and durations
    spread over five orders of magnitude (many distinct values), a few HLTs longer than the
    exit pairing's 1 s tolerance."""
    rows, ts = [], int(rng.integers(0, 10_000))
    for _ in range(actions):
        action = ACTIONS[rng.integers(len(ACTIONS))]
        for event, reason, addr, write in action:
            step = int(rng.lognormal(7, 1.5)) + 1
            if action is HLT and event == s.KVM_ENTRY and rng.random() < 0.05:
                step += 1_500_000_000
            ts += step
            rows.append((ts, s.SOURCE_KVM, event, tid, reason, addr, write, None, None, None))
        ts += int(rng.lognormal(9, 2)) + 1
    return rows


def _queue_rows(rng: np.random.Generator, source: str, tid: int, cycles: int) -> list[tuple]:
    """A back end's kicks, pops, completions (some partial, some batched) and interrupts of
    two queues of two devices."""
    names = {
        s.SOURCE_QEMU: (s.VIRTIO_QUEUE_NOTIFY, s.VIRTQUEUE_POP, s.VIRTQUEUE_FLUSH, s.VIRTIO_NOTIFY),
        s.SOURCE_LAB: (s.LAB_KICK, s.LAB_POP, s.LAB_COMPLETE, None),
    }[source]
    rows, ts, pending = [], int(rng.integers(0, 10_000)), {}
    for _ in range(cycles):
        device, queue = ("blk0", "blk1")[rng.integers(2)], int(rng.integers(2))
        key = (device, queue)
        ts += int(rng.lognormal(8, 1.5)) + 1
        if rng.random() < 0.8:
            n = int(rng.integers(1, 4)) if source == s.SOURCE_LAB else None
            rows.append((ts, source, names[0], tid, None, None, None, device, queue, n))
        for _ in range(int(rng.integers(0, 4))):
            ts += int(rng.lognormal(6, 1)) + 1
            rows.append((ts, source, names[1], tid, None, None, None, device, queue, None))
            pending[key] = pending.get(key, 0) + 1
        if pending.get(key) and rng.random() < 0.7:
            done = int(rng.integers(1, pending[key] + 1))
            pending[key] -= done
            ts += int(rng.lognormal(10, 1.5)) + 1
            rows.append((ts, source, names[2], tid, None, None, None, device, queue, done))
            if names[3] and rng.random() < 0.8:
                ts += int(rng.lognormal(6, 1)) + 1
                rows.append((ts, source, names[3], tid, None, None, None, device, queue, None))
    return rows


def random_trace(
    path: Path, seed: int, *, vcpus: int = 3, actions: int = 400, part_rows: int = 700,
    overlap: bool = True,
) -> int:  # fmt: skip
    """A trace with lost events (5% dropped), of about ``vcpus * actions * 3.5`` KVM events
    plus back ends, interrupts and QEMU accesses, in parts of about ``part_rows`` events;
    with ``overlap`` some parts hold events earlier than the end of the part before them."""
    rng = np.random.default_rng(seed)
    rows: list[tuple] = []
    for v in range(vcpus):
        rows += _vcpu_rows(rng, 100 + v, actions)
    rows += _queue_rows(rng, s.SOURCE_QEMU, 200, actions)
    rows += _queue_rows(rng, s.SOURCE_LAB, 300, actions)
    cols = {"ts_ns": pl.Int64, "source": pl.String, "event": pl.String, "tid": pl.Int32,
            "reason": pl.UInt32, "addr": pl.UInt64, "write": pl.Boolean, "device": pl.String,
            "queue": pl.Int32, "count": pl.Int32}  # fmt: skip
    frame = pl.DataFrame(rows, schema=cols, orient="row").with_columns(
        pl.col("reason").replace_strict(REASONS, default=None).alias("reason_name"),
        pl.when(pl.col("tid") < 300).then(1000).otherwise(1001).cast(pl.Int32).alias("pid"),
    )
    span = int(frame.get_column("ts_ns").max())
    n_irq = len(rows) // 20
    extra = pl.DataFrame(
        {
            "ts_ns": rng.integers(0, span, n_irq),
            "source": s.SOURCE_KVM,
            "event": rng.choice([s.KVM_SET_IRQ, s.KVM_MSI_SET_IRQ], n_irq),
            "tid": rng.choice([90, 100], n_irq).astype(np.int32),
            "addr": rng.integers(10, 13, n_irq).astype(np.uint64),
            "value": rng.integers(0, 2, n_irq).astype(np.uint64),
        }
    ).vstack(
        pl.DataFrame(
            {
                "ts_ns": rng.integers(0, span, n_irq),
                "source": s.SOURCE_QEMU,
                "event": rng.choice([s.MEMORY_REGION_OPS_READ, s.MEMORY_REGION_OPS_WRITE], n_irq),
                "tid": np.full(n_irq, 200, np.int32),
                "addr": rng.integers(0, 4, n_irq).astype(np.uint64) * 4,
                "value": rng.integers(0, 2, n_irq).astype(np.uint64),
            }
        )
    )
    frame = s.conform(
        pl.concat([frame, extra.with_columns(pl.lit(1000, pl.Int32).alias("pid"))], how="diagonal")
    )
    frame = frame.sort("ts_ns", maintain_order=True)
    frame = frame.filter(pl.Series(rng.random(frame.height) >= 0.05))  # lost events
    if overlap:
        # Some events land one part late (a ring buffer drained after the next flush).
        late = pl.Series(rng.random(frame.height) < 0.0003)
        block = pl.int_range(pl.len()) // part_rows + late.cast(pl.Int64)
        frame = frame.with_columns(block.alias("_block"))
    else:
        frame = frame.with_columns((pl.int_range(pl.len()) // part_rows).alias("_block"))
    with TraceWriter(path, {"importer": "test"}, part_rows=10**9) as w:
        for part in frame.partition_by("_block", maintain_order=True, include_key=False):
            w.append(part)
            w.flush()
        w.close()
    return frame.height


def _summary_json(trace: Path, **kw: int) -> dict:
    return json.loads(json.dumps(summary(trace, top=100, **kw)))


SEEDS = [(0, True), (1, False), (2, True), (3, False)]


@pytest.fixture(
    scope="module", params=SEEDS, ids=lambda p: f"seed{p[0]}-{'overlap' if p[1] else 'ordered'}"
)
def random_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    seed, overlap = request.param
    path = tmp_path_factory.mktemp("scale") / f"t{seed}"
    random_trace(path, seed, vcpus=2 + seed % 3, actions=300 + 100 * seed, overlap=overlap)
    return path


@pytest.mark.parametrize("chunk_rows", [1, 1500, 4000])
def test_chunked_summary_equals_one_chunk(random_dir: Path, chunk_rows: int) -> None:
    """Every table is the same whether the trace is read a part at a time or at once."""
    whole = _summary_json(random_dir, chunk_rows=10**9)
    assert whole["exits"] and whole["requests"] and whole["accesses"]
    assert _summary_json(random_dir, chunk_rows=chunk_rows) == whole


def test_partial_results_merged_along_the_way(
    random_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A trace of many chunks holds a few partial results, merged every MERGE_EVERY
    chunks: merging them early changes nothing."""
    whole = _summary_json(random_dir, chunk_rows=10**9)
    monkeypatch.setattr(summary_module, "MERGE_EVERY", 2)
    monkeypatch.setattr(partials, "MERGE_EVERY", 2)
    assert _summary_json(random_dir, chunk_rows=1) == whole


def test_one_chunk_is_the_row_analyses(random_dir: Path) -> None:
    """The merged counts give what the per-row analyses give over the whole trace."""
    data = _summary_json(random_dir, chunk_rows=1)
    events = open_trace(random_dir).events
    rows = lambda frame: json.loads(json.dumps(frame.to_dicts()))  # noqa: E731
    assert data["exits"] == rows(by_reason(exits(events), "duration_ns"))
    assert data["user_exits"] == rows(by_reason(user_exits(events), "until_next_ns"))
    reqs = requests(events)
    keys = ["source", "pid", "device", "queue"]
    want = percentiles(reqs, "latency_ns", by=keys).sort(keys, nulls_last=True)
    got = pl.DataFrame(data["requests"]).sort(keys, nulls_last=True)
    for col in ("p50_ns", "p90_ns", "p99_ns", "p999_ns", "max_ns", "total_ns"):
        assert got.get_column(col).to_list() == want.get_column(col).to_list(), col
    hist = log2_histogram(exits(events), "duration_ns")
    assert [(h["bucket"], h["count"]) for h in data["histograms"]["exits_duration_ns"]] == list(
        hist.select("bucket", "count").iter_rows()
    )


def test_overlapping_parts_are_read_together(tmp_path: Path) -> None:
    """A part with events earlier than the end of the part before it is never cut from it."""
    random_trace(tmp_path / "t", 4, overlap=True, part_rows=300)
    trace = open_trace(tmp_path / "t")
    ranges = part_ranges(trace)
    chunks = plan_chunks(trace, rows=1)
    assert any(b[1] <= a[2] for a, b in itertools.pairwise(ranges))  # overlaps
    assert len(chunks) < len(trace.parts)
    seen: int | None = None
    for chunk in chunks:
        first = min(r[1] for p, r in zip(trace.parts, ranges, strict=True) if p in chunk.parts)
        assert seen is None or first > seen
        seen = chunk.last_ts_ns
    assert [p for c in chunks for p in c.parts] == trace.parts


def test_percentiles_past_the_exact_limit_keep_the_bound(random_dir: Path) -> None:
    """Past `exact_limit` distinct values a percentile is an observed value at most
    2**-11 of the exact one below it; counts, totals, means, maxima, histograms stay exact."""
    exact = _summary_json(random_dir, chunk_rows=1500)
    approx = _summary_json(random_dir, chunk_rows=1500, exact_limit=50)
    bound = relative_error_bound()
    assert bound == 2**-11
    for table, key in (("exits", "reason_name"), ("user_exits", "reason_name"),
                       ("exits_handled", "handled"), ("requests", "queue")):  # fmt: skip
        assert [r[key] for r in approx[table]] == [r[key] for r in exact[table]]
        for a, e in zip(approx[table], exact[table], strict=True):
            for col, value in e.items():
                if col in ("p50_ns", "p90_ns", "p99_ns", "p999_ns") and value is not None:
                    assert value - abs(value) * bound < a[col] <= value, (table, col)
                else:
                    assert a[col] == value, (table, col)
    assert approx["histograms"] == exact["histograms"]


def test_bucketed_percentiles_against_exact_ones() -> None:
    """Many distinct durations added a chunk at a time: past the limit, every percentile is
    within the bound of polars' exact one over the whole column, and some did move."""
    rng = np.random.default_rng(7)
    n = 300_000
    frame = pl.DataFrame(
        {
            "reason_name": rng.choice(["HLT", "IO", "EPT"], n),
            "duration_ns": rng.lognormal(12, 2, n).astype(np.int64) - 1000,  # a few negative
        }
    ).with_columns(
        pl.when(pl.int_range(pl.len()) % 97 == 0).then(None).otherwise(pl.col("duration_ns"))
    )
    stats = DurationStats(["reason_name"], "duration_ns", exact_limit=20_000)
    for part in frame.iter_slices(25_000):
        stats.add(part)
    assert not stats.exact
    got = stats.table(["reason_name"]).sort("reason_name")
    want = (
        frame.group_by("reason_name")
        .agg(pl.len().cast(pl.Int64).alias("rows"), *percentile_exprs("duration_ns"))
        .sort("reason_name")
    )
    moved = 0
    for col in want.columns:
        if col in ("p50_ns", "p90_ns", "p99_ns", "p999_ns"):
            for a, e in zip(got.get_column(col), want.get_column(col), strict=True):
                assert e - abs(e) * relative_error_bound() < a <= e, col
                moved += a != e
        else:
            assert got.get_column(col).to_list() == want.get_column(col).to_list(), col
    assert moved > 0
    exact_hist = log2_histogram(frame, "duration_ns").select("bucket", "count")
    assert stats.histogram().equals(exact_hist)


MEMORY_PROBE = """
import resource, sys
from vtrace.analyze import partials
from vtrace.analyze.summary import summary
from vtrace.store import Trace, open_trace
t = open_trace(sys.argv[1])
t = Trace(t.path, t.meta, t.parts[: int(sys.argv[2])])
data = summary(t, chunk_rows=250_000)
print(data["trace"]["events"], resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def write_synthetic(path: Path, events: int, part_rows: int) -> None:
    """benchmarks/bench_summary.py's synthetic trace of ``events`` events at ``path``."""
    spec = importlib.util.spec_from_file_location("bench", ROOT / "benchmarks/bench_summary.py")
    assert spec and spec.loader
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    bench.write_synthetic(path, events, part_rows=part_rows)


def test_memory_does_not_grow_with_the_trace(tmp_path: Path) -> None:
    """Peak memory of `summary()` on 6M events is within 30% of that on 1.5M (all in memory
    it was twice as much): it holds a chunk at a time, not the trace."""
    path = tmp_path / "big"
    write_synthetic(path, 6_000_000, part_rows=250_000)
    parts = len(open_trace(path).parts)
    peaks = {}
    for n in (parts // 4, parts):
        done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(n)],
                              capture_output=True, text=True, check=True)  # fmt: skip
        events, kib = map(int, done.stdout.split())
        peaks[events] = kib
    (small, small_kib), (big, big_kib) = sorted(peaks.items())
    assert big >= 3.5 * small
    assert big_kib < 1.3 * small_kib, peaks
