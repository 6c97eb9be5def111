"""Sweeps: one model over a grid of parameters, in parallel local processes.

The point function :func:`run_point` is pure and picklable (a model path, overrides in,
one flat row out), so the same grid can run on any executor. Everything that can be checked
(every point's values, the worker count, the output file) is checked before any point runs.
"""

from __future__ import annotations

import io
import itertools
import math
import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Executor, ProcessPoolExecutor, wait
from typing import Any

import polars as pl

from vtrace.errors import VtraceError
from vtrace.output import check_new_file, write_file
from vtrace.sim.config import load_config, model_path, parse_assignments, parse_value, resolve_key
from vtrace.sim.engine import simulate
from vtrace.sim.report import flatten

# A grid is built and every point checked before anything runs; beyond this many points that
# alone takes minutes, and the runs would take days.
MAX_POINTS = 100_000
# Each worker is a Python process with numpy, polars and SimPy loaded (about 100 MB).
MAX_WORKERS = 256


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
    n = math.prod(len(vals) for _, vals in axes)
    if n > MAX_POINTS:
        raise VtraceError(f"--grid: {n} points; at most {MAX_POINTS} (sweep in several runs)")
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


def check_options(
    output: str | os.PathLike[str] | None, workers: int | None, force: bool = False
) -> None:
    """Fail, before anything runs, on a worker count out of range or an output that cannot
    be written (a trial file is made and removed; an existing file needs ``force``)."""
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise VtraceError(
            f"--workers: {workers} is not between 1 and {MAX_WORKERS} "
            "(each is a Python process of about 100 MB)"
        )
    if output is not None:
        check_new_file(output, force=force)


def _stop_workers(pool: Executor) -> None:
    """Terminate a process pool's workers now: a point may run for minutes, and shutdown
    waits for the running ones (no public way to stop them before Python 3.14)."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()


def run_sweep(
    model: str,
    points: list[dict[str, Any]],
    base: list[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    *,
    workers: int | None = None,
    executor: Executor | None = None,
    on_point: Callable[[], None] | None = None,
    force: bool = False,
) -> pl.DataFrame:
    """Run every point; a frame with one row per point (grid order), written to ``output``.

    ``output`` is checked before any point runs; an existing file is replaced only with
    ``force``, and on any error nothing is left there.
    """
    check_options(output, workers, force)
    path = str(model_path(model))
    overrides = parse_assignments(base or [])
    own = executor is None
    # spawn, not fork: polars' thread pool does not survive a fork; never more processes
    # than points (each one costs a start-up and its memory)
    n_workers = min(workers or os.cpu_count() or 1, max(len(points), 1))
    pool = executor or ProcessPoolExecutor(
        max_workers=n_workers, mp_context=multiprocessing.get_context("spawn")
    )
    rows: list[dict[str, Any] | None] = [None] * len(points)
    try:
        futures = {pool.submit(run_point, path, overrides, p): i for i, p in enumerate(points)}
        pending = set(futures)
        while pending:
            # Timed waits: a Ctrl-C that another thread takes is seen within half a second
            # (an untimed wait would sleep through it until the next point ends).
            done, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in done:
                rows[futures[fut]] = fut.result()
                if on_point:
                    on_point()
    except BaseException:  # Ctrl-C, SIGTERM's exit, a failed point: the rest is wasted
        if own:
            _stop_workers(pool)
        raise
    finally:
        if own:
            pool.shutdown(cancel_futures=True)
    frame = pl.DataFrame(rows)
    if output is not None:
        # Whole in memory first (a row per point: small), so a full disk is an OSError
        # from the file, not an error inside the Parquet writer.
        buf = io.BytesIO()
        frame.write_parquet(buf)
        write_file(output, lambda f: f.write(buf.getvalue()), force=force)
    return frame
