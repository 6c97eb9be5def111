"""Sweeps: one model over a grid of parameters, in parallel local processes.

The point function :func:`run_point` is pure and picklable (a model path, overrides in,
one flat row out), so the same grid can run on any executor.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

import polars as pl

from vtrace.errors import VtraceError
from vtrace.sim.config import load_config, model_path, parse_assignments, parse_value, resolve_key
from vtrace.sim.engine import simulate
from vtrace.sim.report import flatten


def parse_grid(model: str, grid: list[str], base: list[str] | None = None) -> list[dict[str, Any]]:
    """The grid's points (cartesian product of ``key=v1,v2,...``), each checked against the model."""
    cfg = load_config(model, base or None)
    axes: list[tuple[str, list[Any]]] = []
    for item in grid:
        key, sep, values = item.partition("=")
        if not sep or not values.strip():
            raise VtraceError(f"--grid: {item!r}: expected key=v1,v2,...")
        dotted = resolve_key(key.strip(), cfg.kind, "--grid")
        if any(dotted == k for k, _ in axes):
            raise VtraceError(f"--grid: {dotted}: given twice")
        axes.append((dotted, [parse_value(v.strip()) for v in values.split(",")]))
    points = [dict(zip([k for k, _ in axes], combo, strict=True)) for combo in
              itertools.product(*[vals for _, vals in axes])]  # fmt: skip
    for p in points:  # fail before starting any process, naming the bad value
        cfg.with_overrides(p, where="--grid")
    return points


def run_point(model: str, base: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """Simulate one grid point; one flat row: the point's values, then the summary."""
    cfg = load_config(model, base or None).with_overrides(point, where="--grid")
    summary = flatten(simulate(cfg).summary)
    summary.pop("overrides", None)
    return {**point, **summary}


def run_sweep(
    model: str,
    points: list[dict[str, Any]],
    base: list[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    *,
    workers: int | None = None,
    executor: Executor | None = None,
    on_point: Callable[[], None] | None = None,
) -> pl.DataFrame:
    """Run every point; a frame with one row per point (grid order), written to ``output``."""
    path = str(model_path(model))
    overrides = parse_assignments(base or [])
    own = executor is None
    # spawn, not fork: polars' thread pool does not survive a fork
    pool = executor or ProcessPoolExecutor(
        max_workers=workers or os.cpu_count() or 1, mp_context=multiprocessing.get_context("spawn")
    )
    rows: list[dict[str, Any] | None] = [None] * len(points)
    try:
        futures = {pool.submit(run_point, path, overrides, p): i for i, p in enumerate(points)}
        for fut in as_completed(futures):
            rows[futures[fut]] = fut.result()
            if on_point:
                on_point()
    finally:
        if own:
            pool.shutdown(cancel_futures=True)
    frame = pl.DataFrame(rows)
    if output is not None:
        out = Path(output)
        tmp = out.with_name(f".{out.name}.tmp")
        try:
            frame.write_parquet(tmp)
            os.replace(tmp, out)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            raise VtraceError(f"{out}: cannot write: {e.strerror}") from None
    return frame
