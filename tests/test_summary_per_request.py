"""vtrace summary answers what one request cost, when it can count the requests."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest

from vtrace import open_trace
from vtrace.analyze import aggregate
from vtrace.analyze.summary import summary
from vtrace.store import write_trace

ROOT = Path(__file__).resolve().parent.parent
TRACES = ROOT / "traces"


def test_emulated_ide_costs_26_trapping_accesses_and_one_interrupt_a_request() -> None:
    p = summary(TRACES / "qemu-ide")["per_request"]
    lab = open_trace(TRACES / "qemu-ide").meta["qemu_lab"]
    assert p["requests"] == lab["requests"] == 1024 and p["requests_from"] == "meta.json"
    assert p["trapping_accesses"] == pytest.approx(lab["device_accesses_per_request"])
    assert p["trapping_accesses"] == pytest.approx(26.0)
    assert p["interrupts"] == pytest.approx(1.0)  # rising edges of IOAPIC pin 14
    assert p["kicks"] is None and p["exits"] is None  # neither in a QEMU log of an IDE disk


@pytest.mark.parametrize("name", ["qemu-virtio-blk-qd4", "qemu-virtio-blk-qd16"])
def test_virtio_kicks_and_interrupts_a_request_match_the_capture(name: str) -> None:
    p = summary(TRACES / name)["per_request"]
    lab = open_trace(TRACES / name).meta["qemu_lab"]
    assert p["requests"] == lab["requests"] and p["requests_from"] == "request events"
    assert p["kicks"] == pytest.approx(lab["kicks_per_request"])
    assert p["interrupts"] == pytest.approx(lab["interrupts_per_request"])


def test_lab_kicks_are_the_kernels_notify_writes() -> None:
    p = summary(TRACES / "lab-virtio-b8")["per_request"]
    lab = open_trace(TRACES / "lab-virtio-b8").meta["lab"]
    assert p["requests"] == lab["requests"] == 2000
    assert p["kicks"] == pytest.approx(250 / 2000)  # kvm_pio on the notify port, not lab_kick
    assert p["userspace_exits"] == pytest.approx(1 / 2000)


def test_requests_option_and_json(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "summary", str(TRACES / "lab-virtio-b8"),
         "--json", "--requests", "1000"],
        capture_output=True, text=True, cwd=ROOT, check=False,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    p = json.loads(r.stdout)["per_request"]
    assert p["requests"] == 1000 and p["requests_from"] == "--requests"
    assert p["kicks"] == pytest.approx(0.25)


def test_readable_at_80_columns_when_not_a_terminal() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "summary", str(TRACES / "qemu-ide")],
        capture_output=True, text=True, cwd=ROOT, check=False, env={**os.environ, "COLUMNS": "80"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "Per request: 1,024 requests (meta.json)" in r.stdout
    assert "trapping accesses │        26.0" in r.stdout
    assert max(len(line) for line in r.stdout.splitlines()) <= 80


def test_a_ring_trimmed_trace_is_not_divided_by_the_whole_runs_count(tmp_path: Path) -> None:
    """meta's request count covers the whole run; after the ring dropped the oldest parts
    the kept events are only the end of it, so that count would under-state every cost."""
    import polars as pl

    from vtrace.store import TraceWriter

    t = open_trace(TRACES / "lab-virtio-b8")
    kernel = ~pl.col("event").cast(pl.String).str.starts_with("lab_")  # no request events
    events = t.events.filter(kernel).sort("ts_ns").collect()
    half = events.height // 2
    path = tmp_path / "trimmed"
    with TraceWriter(path, dict(t.meta), max_bytes=1, on_full="ring") as writer:
        for piece in (events.slice(0, half), events.slice(half)):
            writer.append(piece)
            writer.flush()  # a part each: the first is dropped
        writer.close()
    assert open_trace(path).meta["dropped"]["parts"] == 1
    data = summary(path)
    assert data["per_request"] is None
    given = summary(path, requests=1000)["per_request"]  # --requests still counts
    assert given["requests"] == 1000 and given["requests_from"] == "--requests"
    r = subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "summary", str(path)],
        capture_output=True, text=True, check=True,
        env={**os.environ, "COLUMNS": "200"},
    )  # fmt: skip
    assert "give --requests N for the kept events" in " ".join(r.stdout.split())


def test_a_vms_kicks_count_repeated_notify_writes_as_the_kicks_table_does(tmp_path: Path) -> None:
    """A `rep outs` to a notify port is `count` kicks; the per-VM row counted it as one."""
    t = open_trace(TRACES / "lab-virtio-b8")
    events = t.events.sort("ts_ns").collect()
    notify = pl.col("event").cast(pl.String) == "kvm_pio"
    first_pio = (notify & pl.col("write") & (pl.col("addr") == 512)).arg_true().first()
    at = int(events.select(first_pio).item())
    events = events.with_columns(
        pl.when(pl.int_range(pl.len()) == at).then(3).otherwise(pl.col("count"))
        .cast(events.schema["count"]).alias("count")
    )  # fmt: skip
    write_trace(tmp_path / "rep", events, dict(t.meta))
    s = summary(tmp_path / "rep")
    kvm = sum(r["kicks"] for r in s["kicks"] if r["source"] == "kvm")
    assert kvm == 252  # 250 notify writes, one of them repeated 3 times
    assert [(v["kicks"], v["kicks_from"]) for v in s["vms"]] == [(kvm, "kvm")]
    table = aggregate("kicks_by_queue", open_trace(tmp_path / "rep"))
    assert table.filter(pl.col("source") == "kvm").get_column("kicks").sum() == kvm
