"""How imported events are stored: the parts' column encodings, the same values.

The importers write with :data:`vtrace.ingest.IMPORT_WRITE`: lz4, ``ts_ns`` as deltas with
its statistics (readers prune by time), every other column through a dictionary and without
statistics, categorical columns as Parquet dictionaries that any reader takes back as such.
A writer with these encodings cuts more than ``part_rows`` rows into equal parts, encoded on
threads and written in order; a full disk stops it at the first part it cannot write.
"""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from vtrace.errors import VtraceError
from vtrace.ingest import import_file, read_events
from vtrace.store import TraceWriter, open_trace

DATA = Path(__file__).parent / "data"


def _chunks(part: Path) -> dict[str, pq.ColumnChunkMetaData]:
    group = pq.ParquetFile(part).metadata.row_group(0)
    chunks = (group.column(i) for i in range(group.num_columns))
    return {c.path_in_schema: c for c in chunks}


def test_imported_parts_have_the_column_encodings_and_the_parsed_values(tmp_path: Path) -> None:
    source = DATA / "kvm_tracefs.txt"
    trace = import_file("ftrace", source, tmp_path / "t")
    (part,) = trace.parts
    chunks = _chunks(part)
    assert "DELTA_BINARY_PACKED" in chunks["ts_ns"].encodings
    assert chunks["ts_ns"].is_stats_set
    assert [c for c, m in chunks.items() if c != "ts_ns" and m.is_stats_set] == []
    assert {m.compression for m in chunks.values()} == {"LZ4"}
    # Categorical columns are Parquet dictionaries in any reader's eyes, not plain strings.
    schema = pq.read_schema(part)
    for name in ("source", "event", "reason_name", "isa", "device"):
        assert pa.types.is_dictionary(schema.field(name).type), name
    # The values are the parsed ones, column for column.
    parsed, _ = read_events("ftrace", source)
    assert trace.events.collect().equals(parsed)


def test_a_dictionary_over_a_mebibyte_stays_a_dictionary(tmp_path: Path) -> None:
    # 40,000 distinct texts of 60 bytes (2.4 MB of dictionary), each 5 times: encoded through
    # the dictionary, the column holds each text once; written plain, every one of them.
    distinct, repeats = 40_000, 5
    raw = pl.Series("raw", [f"text {i:054d}" for i in range(distinct)] * repeats)
    frame = pl.DataFrame({"ts_ns": pl.int_range(len(raw), eager=True), "raw": raw})
    with TraceWriter(tmp_path / "t", {}, column_encodings=True, compression="lz4") as w:
        w.append(frame)
        trace = w.close()
    (part,) = trace.parts
    plain_bytes = len(raw) * (60 + 4)  # Parquet's plain strings: 4-byte length + bytes
    assert _chunks(part)["raw"].total_uncompressed_size < plain_bytes / 2
    assert open_trace(tmp_path / "t").events.select("raw").collect()["raw"].equals(raw)


def _events(n: int, seed: int) -> pl.DataFrame:
    # Random addresses: parts that do not compress (about 8 bytes a row on disk).
    rng = np.random.default_rng(seed)
    return pl.DataFrame(
        {
            "ts_ns": np.arange(n, dtype=np.int64),
            "event": ["kvm_pio"] * n,
            "addr": rng.integers(0, 1 << 62, n, dtype=np.int64),
        }
    )


def test_more_than_part_rows_are_equal_parts_in_order(tmp_path: Path) -> None:
    frame = _events(2_500, 1).sample(fraction=1.0, shuffle=True, seed=2)  # out of order
    with TraceWriter(tmp_path / "t", {}, column_encodings=True, part_rows=1_000) as w:
        w.append(frame)
        trace = w.close()
    sizes = [pq.ParquetFile(p).metadata.num_rows for p in trace.parts]
    assert sizes == [833, 833, 834] and trace.meta["parts"] == 3
    assert trace.meta["events"] == 2_500 and trace.problem(trace.events_on_disk()) is None
    got = trace.events.select("ts_ns", "addr").collect()
    assert got.equals(frame.sort("ts_ns").select("ts_ns", "addr").cast({"addr": pl.UInt64}))


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 1 MiB tmpfs (root), unmounted after the test."""
    at = tmp_path / "fs"
    at.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(at)],
                   check=True)  # fmt: skip
    yield at
    subprocess.run(["umount", "-l", str(at)], check=False)


@pytest.mark.root
def test_a_full_disk_stops_a_flush_of_many_parts_at_the_first_it_cannot_write(
    small_fs: Path,
) -> None:
    # 20 parts of 10,000 rows (about 80 KB each) onto 1 MiB: the disk fills part-way.
    w = TraceWriter(small_fs / "t", {}, column_encodings=True, part_rows=10_000, keep_on_error=True)
    with pytest.raises(VtraceError, match=r"part-\d+\.parquet: No space left on device"):
        w.append(_events(200_000, 3))
    kept = w.parts
    assert 3 <= kept < 20
    with pytest.raises(VtraceError, match="No space left on device"):
        w.close()
    trace = open_trace(small_fs / "t")
    assert len(trace.parts) == trace.meta["parts"] == kept
    assert trace.events.collect().height == trace.meta["events"] == kept * 10_000
    assert trace.meta["events_not_written"] == 200_000 - kept * 10_000
    assert [p.name for p in (small_fs / "t").iterdir() if p.name.startswith(".")] == []
