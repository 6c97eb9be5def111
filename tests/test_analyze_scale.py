"""Every analysis of a whole trace in bounded memory: `vtrace.analyze.write_table`,
`aggregate`, `table_percentiles`, `table_histogram` and `vtrace table`.

Traces are cut into tiny parts read a part at a time, so every per-thread and per-queue
carry-over crosses many chunk boundaries; each result must be the very frame the in-memory
analysis gives (rows, columns, types and order).
"""

from __future__ import annotations

import random
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from test_summary_scale import random_trace, write_synthetic

from vtrace import analyze as a
from vtrace.analyze.tables import (
    ROW_TABLES,
    aggregate,
    table_chunks,
    table_histogram,
    table_percentiles,
    write_table,
)
from vtrace.errors import VtraceError
from vtrace.notebook import shipped_traces
from vtrace.schema import EVENTS_SCHEMA
from vtrace.store import TraceWriter, open_trace, write_trace

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = [t.name for t in shipped_traces()]

# The in-memory function each aggregate equals.
IN_MEMORY: dict[str, Callable[[pl.LazyFrame], pl.DataFrame]] = {
    "exits_by_reason": lambda ev: a.by_reason(a.exits(ev), "duration_ns"),
    "user_exits_by_reason": lambda ev: a.by_reason(a.user_exits(ev), "until_next_ns"),
    "accesses_by_target": lambda ev: a.accesses_by_target(a.accesses(ev)),
    "kicks_by_queue": lambda ev: a.kicks_by_queue(a.kicks(ev)),
    "interrupts_by_line": lambda ev: a.interrupts_by_line(a.interrupts(ev)),
    "batching": a.batching,
}
# (table, column, by) for the percentiles and histograms.
DISTRIBUTIONS = [
    ("exits", "duration_ns", None),
    ("exits", "duration_ns", "reason_name"),
    ("user_exits", "until_next_ns", "reason_name"),
    ("requests", "latency_ns", ["source", "device", "queue"]),
    ("requests", "kick_to_pop_ns", None),
]


def same(got: pl.DataFrame, want: pl.DataFrame) -> None:
    assert got.schema == want.schema
    assert got.equals(want), (got, want)


def split(source: Path, path: Path, part_rows: int) -> Path:
    """A copy of a trace in parts of ``part_rows`` events."""
    frame = open_trace(source).events.collect()
    with TraceWriter(path, open_trace(source).meta, part_rows=10**9) as w:
        for part in frame.iter_slices(part_rows):
            w.append(part)
            w.flush()
        w.close()
    return path


@pytest.fixture(scope="module")
def shipped_split(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    where = tmp_path_factory.mktemp("shipped")
    # About eight parts each, read a part at a time (chunk_rows=1).
    return {
        n: split(
            ROOT / "traces" / n,
            where / n,
            max(250, open_trace(ROOT / "traces" / n).meta["events"] // 8),
        )
        for n in SHIPPED
    }


@pytest.fixture(scope="module", params=[(0, True), (3, False)], ids=["overlap", "ordered"])
def random_dir(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Path:
    seed, overlap = request.param
    path = tmp_path_factory.mktemp("tables") / f"t{seed}"
    random_trace(path, seed, vcpus=3, actions=300, overlap=overlap)
    return path


@pytest.mark.parametrize("name", SHIPPED)
def test_every_row_table_of_a_shipped_trace_is_the_in_memory_one(
    name: str, shipped_split: dict[str, Path], tmp_path: Path
) -> None:
    trace = open_trace(shipped_split[name])
    assert len(trace.parts) >= 8
    for table, plan in ROW_TABLES.items():
        want = plan(open_trace(ROOT / "traces" / name).events).collect()
        out = tmp_path / f"{table}.parquet"
        done = write_table(table, trace, out, chunk_rows=1)
        assert done.rows == want.height
        same(pl.read_parquet(out), want)


@pytest.mark.parametrize("chunk_rows", [1, 1500, 10**9])
def test_every_row_table_across_chunks(random_dir: Path, tmp_path: Path, chunk_rows: int) -> None:
    """Exits whose entry is in a later part, HLTs past the 1 s pairing, requests completed
    chunks later, parts that overlap in time: the same rows in the same order."""
    events = open_trace(random_dir).events
    for table, plan in ROW_TABLES.items():
        want = plan(events).collect()
        assert want.height, table
        out = tmp_path / f"{table}.parquet"
        write_table(table, random_dir, out, chunk_rows=chunk_rows)
        same(pl.read_parquet(out), want)
        # The frames a chunk at a time hold the same rows, each once.
        stacked = pl.concat(list(table_chunks(table, random_dir, chunk_rows=chunk_rows)))
        assert stacked.sort(pl.all()).equals(want.sort(pl.all()))


def test_aggregates_are_the_in_memory_ones(random_dir: Path) -> None:
    events = open_trace(random_dir).events
    for name, fn in IN_MEMORY.items():
        same(aggregate(name, random_dir, chunk_rows=1500), fn(events))


@pytest.mark.parametrize("name", SHIPPED)
def test_aggregates_of_a_shipped_trace_are_the_in_memory_ones(
    name: str, shipped_split: dict[str, Path]
) -> None:
    events = open_trace(ROOT / "traces" / name).events
    for agg, fn in IN_MEMORY.items():
        same(aggregate(agg, shipped_split[name], chunk_rows=1), fn(events))


@pytest.mark.parametrize(("table", "col", "by"), DISTRIBUTIONS)
def test_percentiles_and_histograms_are_the_in_memory_ones(
    random_dir: Path, table: str, col: str, by: str | list[str] | None
) -> None:
    rows = ROW_TABLES[table](open_trace(random_dir).events).collect()
    same(
        table_percentiles(table, random_dir, col, by, chunk_rows=1500), a.percentiles(rows, col, by)
    )
    same(
        table_histogram(table, random_dir, col, by, chunk_rows=1500),
        a.log2_histogram(rows, col, by),
    )


def test_a_trace_without_events_gives_empty_frames_with_the_schema(tmp_path: Path) -> None:
    empty = write_trace(tmp_path / "empty", pl.DataFrame(schema=EVENTS_SCHEMA), {})
    qemu_only = ROOT / "traces" / "qemu-ide"  # no kvm_exit: exits are empty
    for path in (empty.path, qemu_only):
        events = open_trace(path).events
        for table, plan in ROW_TABLES.items():
            out = tmp_path / f"{path.name}-{table}.parquet"
            assert write_table(table, path, out).rows == plan(events).collect().height
            same(pl.read_parquet(out), plan(events).collect())
        for name, fn in IN_MEMORY.items():
            same(aggregate(name, path), fn(events))
        same(
            table_percentiles("exits", path, "duration_ns"),
            a.percentiles(a.exits(events), "duration_ns"),
        )
        same(
            table_histogram("exits", path, "duration_ns"),
            a.log2_histogram(a.exits(events), "duration_ns"),
        )


def test_the_written_table_is_read_by_pyarrow_alone(random_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "requests.parquet"
    write_table("requests", random_dir, out, chunk_rows=1500)
    want = a.requests(open_trace(random_dir).events)
    assert ds.dataset(out, format="parquet").count_rows() == want.height
    table = pq.read_table(out)
    assert table.column_names == want.columns
    assert table.column("latency_ns").to_pylist() == want.get_column("latency_ns").to_list()


def test_an_existing_file_needs_force_and_nothing_else_is_left(
    random_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "exits.parquet"
    out.write_bytes(b"old")
    with pytest.raises(VtraceError, match="exists; pass --force"):
        write_table("exits", random_dir, out)
    assert out.read_bytes() == b"old"
    write_table("exits", random_dir, out, force=True, chunk_rows=1500)
    same(pl.read_parquet(out), a.exits(open_trace(random_dir).events))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exits.parquet"]  # no temporaries
    with pytest.raises(VtraceError, match="not a row table"):
        write_table("exits_by_reason", random_dir, tmp_path / "x.parquet")
    with pytest.raises(VtraceError, match="no column nope"):
        table_percentiles("exits", random_dir, "nope")


def test_a_damaged_part_is_one_line_and_no_output(random_dir: Path, tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    shutil.copytree(random_dir, bad)
    part = sorted(bad.glob("part-*.parquet"))[3]
    data = bytearray(part.read_bytes())
    # Noise over the pages, not the footer nor the magic bytes at the ends.
    data[8 : len(data) // 2] = random.Random(1).randbytes(len(data) // 2 - 8)
    part.write_bytes(bytes(data))
    out = tmp_path / "out" / "exits.parquet"
    out.parent.mkdir()
    for table in ("exits", "requests", "interrupts"):
        with pytest.raises(VtraceError, match=f"^{part}: cannot read events"):
            write_table(table, bad, out, chunk_rows=1)
        assert not any(out.parent.iterdir())  # neither the file nor a temporary


def vtrace(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vtrace.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env={"COLUMNS": "100", "PATH": "/usr/bin:/bin"},
    )


LAB = ROOT / "traces" / "lab-virtio-b8"


def test_cli_writes_a_table_and_prints_an_aggregate(tmp_path: Path) -> None:
    random_dir = LAB
    out = tmp_path / "user_exits.parquet"
    done = vtrace("table", "user_exits", str(random_dir), "-o", str(out))
    assert done.returncode == 0, done.stderr
    want = a.user_exits(open_trace(random_dir).events)
    assert want.height and f"{want.height:,} rows of user_exits" in done.stdout
    same(pl.read_parquet(out), want)
    done = vtrace("table", "kicks_by_queue", str(random_dir))
    assert done.returncode == 0, done.stderr
    kicks = a.kicks_by_queue(a.kicks(open_trace(random_dir).events))
    for n in kicks.get_column("kicks"):
        assert f"{n:,}" in done.stdout
    agg = tmp_path / "batching.parquet"
    assert vtrace("table", "batching", str(random_dir), "-o", str(agg)).returncode == 0
    same(pl.read_parquet(agg), a.batching(open_trace(random_dir).events))


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (("table", "nope", "{trace}", "-o", "{tmp}/x.parquet"), "nope: no such table"),
        (("table", "exits", "{trace}"), "give -o FILE.parquet"),
        (("table", "exits", "{tmp}/none", "-o", "{tmp}/x.parquet"), "no such trace directory"),
        (("table", "exits", "{trace}", "-o", "{tmp}/old.parquet"), "exists; pass --force"),
        (("table", "batching", "{trace}", "-o", "{tmp}/old.parquet"), "exists; pass --force"),
    ],
)
def test_cli_errors_are_one_line_before_any_work(
    tmp_path: Path, args: tuple[str, ...], words: str
) -> None:
    (tmp_path / "old.parquet").write_bytes(b"old")
    done = vtrace(*(x.format(trace=LAB, tmp=tmp_path) for x in args))
    assert done.returncode == 2 and done.stdout == ""
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and words in lines[0], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["old.parquet"]
    assert (tmp_path / "old.parquet").read_bytes() == b"old"


MEMORY_PROBE = """
import resource, sys
from vtrace.analyze.tables import aggregate, table_percentiles, write_table
from vtrace.store import Trace, open_trace
t = open_trace(sys.argv[1])
t = Trace(t.path, t.meta, t.parts[: int(sys.argv[2])])
for table in ("exits", "requests"):
    write_table(table, t, f"{sys.argv[3]}/{table}.parquet", force=True, chunk_rows=250_000)
aggregate("kicks_by_queue", t, chunk_rows=250_000)
table_percentiles("exits", t, "duration_ns", "reason_name", chunk_rows=250_000)
print(sum(1 for _ in t.parts), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def test_memory_does_not_grow_with_the_trace(tmp_path: Path) -> None:
    """Peak memory of the row tables and aggregates on 6M events is within 30% of that on
    1.5M: a chunk at a time, not the trace (the in-memory plans, even on polars' streaming
    engine, hold the whole table: 1.6 GB at 10M events, over 6 GB at 100M)."""
    path = tmp_path / "big"
    write_synthetic(path, 6_000_000, part_rows=250_000)
    parts = len(open_trace(path).parts)
    peaks = {}
    for n in (parts // 4, parts):
        done = subprocess.run([sys.executable, "-c", MEMORY_PROBE, str(path), str(n), str(tmp_path)],
                              capture_output=True, text=True, check=True)  # fmt: skip
        _, kib = map(int, done.stdout.split())
        peaks[n] = kib
    small, big = peaks[parts // 4], peaks[parts]
    assert big < 1.3 * small, peaks


def _tied(events: list[dict]) -> list[pl.DataFrame]:
    """``events`` (two groups of equal counts) as frames in both orders."""
    frame = pl.DataFrame(events).with_row_index("_i")
    return [frame.sort("_i", descending=d).drop("_i") for d in (False, True)]


def test_groups_of_equal_counts_come_in_one_order() -> None:
    """Ties on the count are broken by every key, so a table does not depend on the order
    rows came in (each chunk's, or a group-by's)."""
    irqs = [{"source": "qemu", "event": "virtio_notify", "device": "net", "queue": q, "gsi": None,
             "vector": None, "level": None} for q in (0, 0, 1, 1)]  # fmt: skip
    kicks = [{"source": "kvm", "event": "kvm_pio", "device": None, "queue": None, "addr": addr,
              "count": None, "ts_ns": addr} for addr in (0x10, 0x10, 0x20, 0x20)]  # fmt: skip
    access = [{"source": "qemu", "event": "memory_region_ops_write", "device": dev, "addr": 0,
               "write": True, "handled": "user"} for dev in ("b", "b", "a", "a")]  # fmt: skip
    for fn, rows in ((a.interrupts_by_line, irqs), (a.kicks_by_queue, kicks),
                     (a.accesses_by_target, access)):  # fmt: skip
        first, second = (fn(f) for f in _tied(rows))
        assert first.equals(second), (first, second)


def test_an_imported_trace_opens_with_pyarrow_dataset_alone(tmp_path: Path) -> None:
    """Any Parquet reader takes an importer's output: pyarrow.dataset, no vtrace code."""
    from vtrace.ingest import import_file

    trace = import_file("ftrace", ROOT / "tests" / "data" / "kvm_tracefs.txt", tmp_path / "t")
    dataset = ds.dataset(trace.path, format="parquet", ignore_prefixes=[".", "_", "meta.json"])
    table = dataset.to_table()
    assert table.num_rows == trace.meta["events"] > 0
    events = trace.events.collect()
    for col in ("ts_ns", "event", "tid", "addr"):
        assert (
            pl.from_arrow(table.column(col)).cast(pl.String).to_list()
            == events.get_column(col).cast(pl.String).to_list()
        )
