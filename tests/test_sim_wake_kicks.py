"""A back end's wake-up counts from the first kick that found it asleep.

The lab back end's eventfd counts the kicks written while its thread slept or waited to be
scheduled (``lab_kick``'s ``count``). The guest goes on adding and kicking while the thread
is still waking, so a stalled wake-up merges many kicks: the stall began at the first of
them. Measured from the last, a stall of milliseconds looks like a wake-up of microseconds.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from vtrace import open_trace
from vtrace.sim.calibrate import trace_facts
from vtrace.store import write_trace

TRACES = Path(__file__).resolve().parent.parent / "traces"


def only_first_merged_kicks(name: str, out: Path) -> tuple[Path, int]:
    """``traces/name`` without the kicks a wake-up merged after its first one (the guest
    writing them or not changes nothing for a thread that is already being woken), and
    its eventfd's count with them; the number of kicks taken out. The lab's notify port
    is 0x200 (vtrace/lab/guest/layout.inc)."""
    t = open_trace(TRACES / name)
    events = t.events.collect().sort("ts_ns")
    ev = pl.col("event").cast(pl.String)
    kick = (ev == "kvm_pio") & pl.col("write") & (pl.col("addr") == 512)
    kick_ts = events.filter(kick)["ts_ns"].to_numpy()
    wakes = events.filter(ev == "lab_kick").select("ts_ns", "count")
    last = np.searchsorted(kick_ts, wakes["ts_ns"].to_numpy(), side="right") - 1
    merged = wakes["count"].to_numpy().astype(np.int64)
    later = [kick_ts[i - c + 2 : i + 1] for i, c in zip(last, merged, strict=True) if c > 1]
    drop = np.concatenate(later) if later else np.empty(0, np.int64)
    kept = events.filter(~(kick & pl.col("ts_ns").is_in(drop.tolist()))).with_columns(
        count=pl.when(ev == "lab_kick").then(1).otherwise(pl.col("count")).cast(pl.Int32)
    )  # each wake-up's eventfd now counts the one kick the guest wrote
    write_trace(out / name, kept, dict(t.meta))
    return out / name, int(drop.size)


@pytest.mark.parametrize("name", ["lab-virtio-b1", "lab-virtio-b8"])
def test_kicks_written_while_the_back_end_wakes_do_not_shorten_its_wake_up(
    tmp_path: Path, name: str
) -> None:
    thinned, dropped = only_first_merged_kicks(name, tmp_path)
    assert dropped > 0  # the shipped runs have wake-ups that merged several kicks
    full = np.sort(trace_facts(TRACES / name).wake_ns)
    first_only = np.sort(trace_facts(thinned).wake_ns)
    assert full.size == first_only.size
    np.testing.assert_array_equal(full, first_only)
    # a merged wake-up is a stalled one: the longest wake-ups are the milliseconds it took
    assert full[-1] > 1_000_000
