"""Handing vtrace's frames to other tools: pandas, pyarrow.dataset and globs over the parts.

The shipped traces convert with the dtypes docs/analyze.md documents, the same rows and the
same values; analysis results convert through polars' own `.to_pandas()`.
"""

from __future__ import annotations

import glob
import shutil
import tomllib
from pathlib import Path

import nbformat
import pandas as pd
import polars as pl
import pyarrow as pa
import pyarrow.dataset as ds
import pytest

import vtrace
from vtrace import analyze
from vtrace.errors import VtraceError
from vtrace.notebook import shipped_traces
from vtrace.schema import EVENTS_SCHEMA
from vtrace.store import PANDAS_MAX_ROWS, TraceWriter, pandas_types, write_trace

ROOT = Path(__file__).resolve().parent.parent
TRACES = shipped_traces()
NAMES = [t.name for t in TRACES]

# The dtypes of Trace.to_pandas(), as docs/analyze.md lists them.
EVENT_DTYPES = {
    "ts_ns": "int64[pyarrow]",
    "source": "category",
    "event": "category",
    "pid": "int32[pyarrow]",
    "tid": "int32[pyarrow]",
    "cpu": "int16[pyarrow]",
    "vcpu": "int32[pyarrow]",
    "reason": "int64[pyarrow]",
    "reason_name": "category",
    "isa": "category",
    "flags": "int64[pyarrow]",
    "addr": "uint64[pyarrow]",
    "size": "int32[pyarrow]",
    "write": "bool[pyarrow]",
    "value": "uint64[pyarrow]",
    "count": "int32[pyarrow]",
    "queue": "int32[pyarrow]",
    "device": "category",
    "rip": "uint64[pyarrow]",
    "raw": "str",
}
# The parts of a trace directory for pyarrow.dataset: hidden files (a part being written,
# the collector's space reserve) are pyarrow's default; meta.json is not Parquet.
DATASET_IGNORE = [".", "_", "meta.json"]


def _dtypes(frame: pd.DataFrame) -> dict[str, str]:
    return {c: str(t) for c, t in frame.dtypes.items()}


def _values(series: pd.Series) -> list:
    """A pandas column as Python values, its missing values as None (as polars' to_list)."""
    return [None if v is pd.NA or v is None or v != v else v for v in series.tolist()]


def test_pandas_is_a_locked_dependency():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert any(d.startswith("pandas") for d in project["dependencies"])
    lock = tomllib.loads((ROOT / "uv.lock").read_text())
    vtrace_pkg = next(p for p in lock["package"] if p["name"] == "vtrace")
    assert "pandas" in {d["name"] for d in vtrace_pkg["dependencies"]}
    assert any(p["name"] == "pandas" for p in lock["package"])
    assert int(pd.__version__.split(".")[0]) >= 3  # strings as pyarrow-backed `str`


@pytest.mark.parametrize("name", NAMES)
def test_shipped_traces_convert_with_the_documented_dtypes(name: str):
    trace = vtrace.open_trace(ROOT / "traces" / name)
    events = trace.events.collect()
    frame = trace.to_pandas()
    assert len(frame) == events.height == trace.meta["events"]
    assert _dtypes(frame) == EVENT_DTYPES
    # The same values, nulls where polars has nulls, 64-bit addresses exact.
    assert frame.isna().sum().to_dict() == events.null_count().row(0, named=True)
    for column in ("ts_ns", "event", "addr", "value", "rip", "write"):
        assert _values(frame[column]) == events[column].to_list(), column
    counts = frame.groupby("event", observed=True).size()
    expected = events.group_by("event").len()
    assert {str(k): v for k, v in counts.items()} == dict(expected.iter_rows())


def test_columns_and_events_choose_what_is_converted():
    trace = vtrace.open_trace(ROOT / "traces" / "lab-emulated")
    frame = trace.to_pandas(columns=["ts_ns", "addr", "event"], events="kvm_pio")
    expected = trace.events.filter(pl.col("event") == "kvm_pio").collect()
    assert list(frame.columns) == ["ts_ns", "addr", "event"]
    assert len(frame) == expected.height > 0
    assert _values(frame["addr"]) == expected["addr"].to_list()
    both = trace.to_pandas(columns=["event"], events=["kvm_pio", "kvm_userspace_exit"])
    assert set(both["event"].astype(str)) <= {"kvm_pio", "kvm_userspace_exit"}
    assert trace.to_pandas(events="no_such_event").empty


def test_more_rows_than_max_rows_is_one_line_before_converting():
    trace = vtrace.open_trace(ROOT / "traces" / "lab-emulated")
    total = trace.meta["events"]
    with pytest.raises(VtraceError) as info:
        trace.to_pandas(max_rows=1_000)
    message = str(info.value)
    assert "\n" not in message
    assert str(trace.path) in message and f"{total:,}" in message and "max_rows" in message
    # A bound the chosen events fit under converts them.
    pio = trace.events.filter(pl.col("event") == "kvm_pio").select(pl.len()).collect().item()
    assert len(trace.to_pandas(events="kvm_pio", max_rows=pio)) == pio
    with pytest.raises(VtraceError, match="max_rows"):
        trace.to_pandas(events="kvm_pio", max_rows=pio - 1)
    assert PANDAS_MAX_ROWS >= 1_000_000


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"columns": ["ts_ns", "nope"]}, "'nope'"),
        ({"columns": []}, "columns"),
        ({"columns": ["ts_ns", "ts_ns"]}, "'ts_ns'"),
        ({"columns": "ts_ns"}, "columns"),
        ({"max_rows": 0}, "max_rows"),
        ({"events": [1]}, "events"),
    ],
)
def test_bad_arguments_are_one_line(kwargs: dict, words: str):
    trace = vtrace.open_trace(ROOT / "traces" / "lab-virtio-b8")
    with pytest.raises(VtraceError) as info:
        trace.to_pandas(**kwargs)
    assert words in str(info.value) and "\n" not in str(info.value)


def test_a_datetime_column_only_on_request():
    trace = vtrace.open_trace(ROOT / "traces" / "qemu-virtio-blk-qd1")
    assert "time" not in trace.to_pandas(columns=["ts_ns"]).columns
    frame = trace.to_pandas(columns=["ts_ns", "event"], datetime=True)
    assert list(frame.columns) == ["ts_ns", "time", "event"]
    assert str(frame["ts_ns"].dtype) == "int64[pyarrow]"
    assert str(frame["time"].dtype) == "datetime64[ns]"
    ts = frame["ts_ns"].to_numpy(dtype="int64")
    assert (frame["time"].to_numpy().view("int64") == ts).all()
    alone = trace.to_pandas(columns=["event"], datetime=True)
    assert list(alone.columns) == ["time", "event"]


def test_a_trace_without_parts_converts_to_no_rows_with_the_same_dtypes(tmp_path: Path):
    trace = write_trace(tmp_path / "empty", pl.DataFrame(schema=EVENTS_SCHEMA), {})
    assert not trace.parts
    frame = trace.to_pandas()
    assert frame.empty and _dtypes(frame) == EVENT_DTYPES


# -- analysis frames: polars' own .to_pandas() -----------------------------------------------
ANALYSES = {
    "accesses": analyze.accesses,
    "kicks": analyze.kicks,
    "interrupts": analyze.interrupts,
    "user_exits": analyze.user_exits,
    "requests": analyze.requests,
}


# Each analysis on a trace where its unsigned or nullable columns have nulls.
CASES = [
    *((a, "lab-virtio-b8-irq") for a in sorted(ANALYSES)),
    ("accesses", "qemu-ide"),
    ("interrupts", "qemu-ide"),
    ("kicks", "qemu-virtio-blk-qd16"),
    ("requests", "qemu-virtio-blk-qd16"),
]


@pytest.mark.parametrize(("analysis", "name"), CASES)
def test_analysis_frames_keep_their_types_in_pandas(analysis: str, name: str):
    result = ANALYSES[analysis](vtrace.open_trace(ROOT / "traces" / name).events)
    assert result.height > 0
    plain = result.to_pandas()
    exact = result.to_pandas(types_mapper=pandas_types)
    nulls = result.null_count().row(0, named=True)
    for column, dtype in result.schema.items():
        if dtype == pl.Categorical:
            assert str(plain[column].dtype) == str(exact[column].dtype) == "category", column
            assert _values(exact[column].astype(object)) == result[column].to_list()
        elif dtype.is_integer():
            # Exact: the same integer type, backed by Arrow, nulls as <NA>.
            arrow = result.select(column).to_arrow().schema.field(column).type
            assert exact[column].dtype == pd.ArrowDtype(arrow), column
            assert _values(exact[column]) == result[column].to_list(), column
            # Plain: numpy's type while the column has no null (then float64, as documented).
            numpy = str(arrow) if not nulls[column] else "float64"
            assert str(plain[column].dtype) == numpy, column
    if "ts_ns" in result.columns:
        assert str(plain["ts_ns"].dtype) == "int64"


def test_a_pandas_groupby_matches_the_polars_one():
    user = analyze.user_exits(vtrace.open_trace(ROOT / "traces" / "lab-emulated").events)
    by_polars = (
        user.group_by("reason_name")
        .agg(pl.len().alias("exits"), pl.col("until_next_ns").sum().alias("total_ns"))
        .sort("reason_name")
    )
    frame = user.to_pandas(types_mapper=pandas_types)
    by_pandas = (
        frame.groupby("reason_name", observed=True)
        .agg(exits=("ts_ns", "size"), total_ns=("until_next_ns", "sum"))
        .sort_index()
    )
    assert [str(r) for r in by_pandas.index] == by_polars["reason_name"].cast(str).to_list()
    assert by_pandas["exits"].tolist() == by_polars["exits"].to_list()
    assert by_pandas["total_ns"].tolist() == by_polars["total_ns"].to_list()


@pytest.mark.slow  # a kernel
def test_notebook_01_hands_a_table_to_pandas_with_the_polars_numbers(tmp_path: Path):
    """The hand-over cell as shipped, run in a kernel after the cells it builds on (the whole
    notebook runs in test_demo.py)."""
    import jupytext

    from vtrace.report import PARAMETERS_TAG, execute_notebook

    nb = jupytext.read(ROOT / "notebooks" / "01-explore-a-trace.py")
    code = [c for c in nb.cells if c.cell_type == "code"]
    handover = [c for c in code if ".groupby(" in c.source]
    assert len(handover) == 1 and "to_pandas(" in handover[0].source
    needed = [
        next(c for c in code if PARAMETERS_TAG in c.metadata.get("tags", [])),
        next(c for c in code if "vtrace.open_trace(" in c.source),
        next(c for c in code if "user = user_exits(" in c.source),
        handover[0],
    ]
    nb.cells = needed
    source = tmp_path / "01-handover.ipynb"
    nbformat.write(nb, source)
    trace = "lab-emulated"
    run = execute_notebook(
        source, tmp_path / "out", {"TRACES": str(ROOT / "traces"), "TRACE": trace}
    )
    assert run.error is None, run.error
    cells = nbformat.read(run.ipynb, as_version=4).cells
    shown = cells[-1].outputs[-1]["data"]
    assert "text/html" in shown  # a pandas DataFrame, as JupyterLab shows one
    user = analyze.user_exits(vtrace.open_trace(ROOT / "traces" / trace).events)
    table = analyze.by_reason(user, "until_next_ns")
    for reason, count, total in table.select("reason_name", "count", "total_ns").rows():
        assert reason in shown["text/plain"] and str(count) in shown["text/plain"]
        assert str(total) in shown["text/plain"]


# -- the directory for other readers -----------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_pyarrow_dataset_and_a_glob_read_every_shipped_trace(name: str):
    trace = vtrace.open_trace(ROOT / "traces" / name)
    rows = trace.meta["events"]
    # The plain call reads meta.json as Parquet: the documented call leaves it out.
    with pytest.raises(pa.ArrowInvalid, match=r"meta\.json"):
        ds.dataset(trace.path, format="parquet")
    dataset = ds.dataset(trace.path, format="parquet", ignore_prefixes=DATASET_IGNORE)
    assert sorted(Path(f) for f in dataset.files) == trace.parts
    assert dataset.count_rows() == rows
    # DuckDB's read_parquet('DIR/*.parquet'), polars, pyarrow: the glob is the parts.
    assert sorted(Path(f) for f in glob.glob(f"{trace.path}/*.parquet")) == trace.parts
    assert pl.scan_parquet(f"{trace.path}/*.parquet").select(pl.len()).collect().item() == rows


def test_the_dataset_call_skips_a_part_being_written_and_the_space_reserve(tmp_path: Path):
    source = vtrace.open_trace(ROOT / "traces" / "lab-virtio-b8")
    frame = source.events.collect()
    path = tmp_path / "t"
    with TraceWriter(path, {}, part_rows=1000) as writer:
        writer.append(frame.head(1000))
        writer.append(frame.slice(1000))
        trace = writer.close()
    assert len(trace.parts) == 2
    # What a writer leaves while it works (or after a crash) next to the parts.
    shutil.copy(trace.parts[0], path / ".part-000002.parquet.tmp")
    (path / ".space-reserve").write_bytes(b"\0" * 4096)
    dataset = ds.dataset(path, format="parquet", ignore_prefixes=DATASET_IGNORE)
    assert [Path(f) for f in sorted(dataset.files)] == trace.parts
    assert dataset.count_rows() == frame.height
    assert sorted(Path(f) for f in glob.glob(f"{path}/*.parquet")) == trace.parts
    # Every part has the same Arrow schema, so the dataset's first file speaks for all.
    schemas = {ds.dataset(p, format="parquet").schema for p in trace.parts}
    assert len(schemas) == 1
