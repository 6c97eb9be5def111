"""Model predictions judged against repeated real runs of the same command."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from vtrace import open_trace


def qemu_per_request(path: Path) -> dict[str, float]:
    """Kicks and interrupts per request of a shipped QEMU virtio trace."""
    counts = dict(
        open_trace(path)
        .events.group_by(pl.col("event").cast(pl.String))
        .len()
        .collect()
        .iter_rows()
    )
    pops = counts["virtqueue_pop"]
    return {
        "kicks": counts["virtio_queue_notify"] / pops,
        "irqs": counts["virtio_notify_irqfd"] / pops,
    }


def judge(what: str, model: float, shipped: float, runs: tuple[float, float, float]) -> None:
    """Print the prediction's error against the shipped run and the runs' median, and
    require the shipped run and the prediction to lie within the runs' range."""
    low, median, high = runs
    print(
        f"\n{what}: model {model:.4f}, shipped run {shipped:.4f} ({model / shipped - 1:+.0%}), "
        f"median of the runs {median:.3f} ({model / median - 1:+.0%}), runs {low:.3f}-{high:.3f}"
    )
    assert low <= shipped <= high  # the shipped trace is one of those runs
    assert low <= model <= high, (what, model, low, high)


def depth_cases(misses: dict[tuple[int, str], str]) -> list:
    """(depth, name) for depths 16 and 32, kicks and interrupts: a strict expected failure,
    with its reason, where ``misses`` names the case."""
    return [
        pytest.param(d, n, marks=pytest.mark.xfail(strict=True, reason=misses[d, n]))
        if (d, n) in misses
        else pytest.param(d, n)
        for d in (16, 32)
        for n in ("kicks", "irqs")
    ]
