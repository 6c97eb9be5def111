"""How the shipped QEMU virtio-blk traces dispatched their lots (docs/model.md, "Split lots
and shared interrupts"): the figures the model is judged against, checked on the traces.

A lot is one ``dd`` transfer of ``queue_depth`` requests (the guest waits for the whole lot
before the next), so the n-th ``virtqueue_pop`` of a queue belongs to lot n // depth; a
piece is the pops after one ``virtio_queue_notify``.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from vtrace import open_trace

TRACES = Path(__file__).resolve().parent.parent / "traces"


def lot_pieces(name: str, depth: int) -> pl.DataFrame:
    """Per lot and queue: its kicks and the size of its first piece."""
    ev = pl.col("event").cast(pl.String)
    return (
        open_trace(TRACES / name)
        .events.filter(ev.is_in(["virtqueue_pop", "virtio_queue_notify"]))
        .select("ts_ns", "queue", pop=(ev == "virtqueue_pop").cast(pl.Int64))
        .sort("ts_ns", maintain_order=True)
        .with_columns(kick=1 - pl.col("pop"))
        .with_columns(
            lot=pl.when(pl.col("pop") == 1)
            .then((pl.col("pop").cum_sum() - 1) // depth)
            .over("queue"),
            piece=pl.col("kick").cum_sum().over("queue"),
        )
        # a kick belongs to the lot of the pop that follows it
        .with_columns(lot=pl.col("lot").fill_null(strategy="backward").over("queue"))
        .drop_nulls("lot")
        .group_by("queue", "lot")
        .agg(
            kicks=pl.col("kick").sum(),
            first=(pl.col("pop") * (pl.col("piece") == pl.col("piece").min())).sum(),
        )
        .collect()
    )


@pytest.mark.parametrize(
    ("name", "depth", "lots", "whole", "split_first_single", "kicks_per_lot"),
    [
        ("qemu-virtio-blk-qd4", 4, 1024, 506, 517, 1.85),
        ("qemu-virtio-blk-qd32", 32, 128, 58, 66, 2.27),
        ("qemu-virtio-blk-qd4-2x2", 4, 1024, 713, 308, 1.49),
        ("qemu-virtio-blk-qd16", 16, 256, 225, 0, 1.29),  # an older series: late splits
    ],
)
def test_lots_go_whole_or_start_with_one_request(
    name: str, depth: int, lots: int, whole: int, split_first_single: int, kicks_per_lot: float
) -> None:
    per_lot = lot_pieces(name, depth)
    split = per_lot.filter(pl.col("kicks") > 1)
    assert per_lot.height == lots
    assert (per_lot["kicks"] == 1).sum() == whole
    assert (split["first"] == 1).sum() == split_first_single
    assert per_lot["kicks"].mean() == pytest.approx(kicks_per_lot, abs=0.005)
