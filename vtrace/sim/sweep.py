"""Sweeps: one model over a grid of parameters, in local processes or on a Dask cluster.

The point function :func:`run_point` is pure and picklable (a model, overrides in, one flat
row out), so the same grid runs on any executor: local processes, or a Dask client's
(:func:`dask_executor`). Everything that can be checked (every point's values, the worker
count, the output file) is checked before any point runs. Points are deduplicated before they
are submitted. A point that raises is reported with its values while the others complete.
With an output file, rows are written as they arrive into Parquet parts next to it
(``OUTPUT.parts/``), so an interrupted sweep resumes and runs only the points it lacks.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import itertools
import json
import math
import multiprocessing
import os
import shutil
import stat
import time
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, Executor, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from vtrace.errors import VtraceError
from vtrace.output import check_new_file, write_file
from vtrace.sim.config import Config, load_config, parse_value, resolve_key
from vtrace.sim.engine import simulate
from vtrace.sim.report import flatten

# A grid is built and every point checked before anything runs; beyond this many points that
# alone takes minutes, and the runs would take days.
MAX_POINTS = 100_000
# Each worker is a Python process with numpy, polars and SimPy loaded (about 100 MB).
MAX_WORKERS = 256
# Rows reach the parts directory at least this often (seconds) or every this many rows:
# a killed sweep loses at most that much, and a 100,000-point sweep makes no more than
# a few hundred files.
FLUSH_S = 2.0
FLUSH_ROWS = 1000
PARTS_SUFFIX = ".parts"
KEY = "_point"  # the parts' column naming each row's point (dropped from the output)
MANIFEST = "sweep.json"
# Metrics a closing table can rank by: the best is the highest throughput, the lowest of
# every other (costs, latencies, stalls).
METRICS = (
    "throughput_rps", "latency_ns.mean", "latency_ns.p50", "latency_ns.p90", "latency_ns.p99",
    "exits_per_request", "userspace_exits_per_request", "kicks_per_request",
    "kicks_suppressed_per_request", "irqs_per_request", "backend_wakeups_per_request",
    "vcpu_exit_time_share", "ring_full_stalls", "empty_polls", "backend_utilization",
    "blocking_probability",
)  # fmt: skip
HIGHER_IS_BETTER = frozenset({"throughput_rps"})


@dataclass(frozen=True)
class Failure:
    """A point that raised: its values and the error, as one line."""

    point: dict[str, Any]
    error: str

    def __str__(self) -> str:
        return f"point {describe(self.point)}: {self.error}"


class SweepFailed(VtraceError):
    """Some points raised; the others completed (``frame``: their rows, grid order)."""

    def __init__(self, message: str, failures: list[Failure], frame: pl.DataFrame) -> None:
        super().__init__(message)
        self.failures = failures
        self.frame = frame


def describe(point: dict[str, Any]) -> str:
    """A point as ``key=value, ...`` (how the grid names it)."""
    return ", ".join(f"{k}={v}" for k, v in point.items()) or "(the base model)"


def point_key(point: dict[str, Any]) -> str:
    """A point's identity: the same values give the same key, whatever their order."""
    return json.dumps(point, sort_keys=True)


def dedupe(points: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The points without repeats, first occurrences in order."""
    first: dict[str, dict[str, Any]] = {}
    for p in points:
        first.setdefault(point_key(p), p)
    return list(first.values())


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


def check_metric(metric: str) -> None:
    """Fail, before anything runs, on a metric no closing table can rank by."""
    if metric not in METRICS:
        raise VtraceError(f"--best: {metric}: not a metric (one of {', '.join(METRICS)})")


def best_points(frame: pl.DataFrame, metric: str, n: int, keys: list[str]) -> pl.DataFrame:
    """The ``n`` best rows by ``metric`` (see :data:`METRICS`): the grid's columns and the
    metric's. Empty where the model has no such metric (``blocking_probability`` is a
    finite queue's alone)."""
    if metric not in frame.columns or n == 0:
        return pl.DataFrame()
    ranked = frame.drop_nulls(metric).sort(metric, descending=metric in HIGHER_IS_BETTER)
    return ranked.head(n).select(*[k for k in keys if k != metric], metric)


def run_point(
    model: str | os.PathLike[str] | Config, base: dict[str, Any], point: dict[str, Any]
) -> dict[str, Any]:
    """Simulate one grid point; one flat row: the point's values, then the summary.

    ``model`` is a model name or file, or a loaded :class:`Config` (what a sweep sends, so
    a remote worker needs vtrace but not the model file).
    """
    cfg = model if isinstance(model, Config) else load_config(model)
    if base:
        cfg = cfg.with_overrides(base)
    summary = simulate(cfg.with_overrides(point, where="--grid")).summary
    summary.pop("overrides", None)  # the point's own columns say them (before flattening)
    return {**point, **flatten(summary)}


def parts_dir(output: str | os.PathLike[str]) -> Path:
    """Where a sweep writing ``output`` keeps the rows it has so far."""
    return Path(f"{os.fspath(output)}{PARTS_SUFFIX}")


def check_options(
    output: str | os.PathLike[str] | None,
    workers: int | None,
    force: bool = False,
    resume: bool = False,
) -> None:
    """Fail, before anything runs, on a worker count out of range, an output that cannot
    be written (a trial file is made and removed; an existing file needs ``force``), or an
    interrupted sweep's parts that neither ``resume`` nor ``force`` says what to do with."""
    if workers is not None and not 1 <= workers <= MAX_WORKERS:
        raise VtraceError(
            f"--workers: {workers} is not between 1 and {MAX_WORKERS} "
            "(each is a Python process of about 100 MB)"
        )
    if output is None:
        if resume:
            raise VtraceError("--resume: needs an output file (its parts are what resumes)")
        return
    check_new_file(output, force=force)
    parts = parts_dir(output)
    try:
        st = parts.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISDIR(st.st_mode):
        raise VtraceError(f"{parts}: exists and is not a directory of sweep parts")
    if not resume and not force:
        raise VtraceError(
            f"{parts}: an interrupted sweep's rows; --resume runs only the points it lacks, "
            "--force starts over"
        )


def _fingerprint(cfg: Config) -> str:
    """What a resumed sweep must share with the one that wrote the parts: every value of
    the model with ``--set`` applied (not the grid: a resumed grid may grow or shrink)."""
    text = json.dumps(cfg.values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


class _Parts:
    """The rows done so far, in Parquet parts under ``OUTPUT.parts/`` (made at the first
    row; removed once the output is written)."""

    def __init__(self, output: str | os.PathLike[str], cfg: Config) -> None:
        self.dir = parts_dir(output)
        self.manifest = {"model": cfg.path, "config": _fingerprint(cfg)}
        self.pending: list[dict[str, Any]] = []
        self.last = time.monotonic()
        self.n = 0

    def load(self) -> dict[str, dict[str, Any]]:
        """The rows an earlier run of the same sweep wrote, by point key."""
        if not self.dir.is_dir():
            return {}
        try:
            manifest = json.loads((self.dir / MANIFEST).read_text())
        except (OSError, ValueError) as e:
            raise VtraceError(f"{self.dir / MANIFEST}: cannot read: {e}") from None
        if manifest.get("config") != self.manifest["config"]:
            raise VtraceError(
                f"{self.dir}: written by a sweep of another model or other --set values "
                f"({manifest.get('model')}); --force starts over"
            )
        files = sorted(self.dir.glob("part-*.parquet"))
        self.n = len(files)
        if not files:
            return {}
        try:
            frame = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
        except (OSError, pl.exceptions.PolarsError) as e:
            raise VtraceError(f"{self.dir}: cannot read its parts: {e}") from None
        return {row[KEY]: row for row in frame.to_dicts()}

    def clear(self) -> None:
        """Start over: the parts of an earlier run go."""
        if self.dir.is_dir() and not self.dir.is_symlink():
            shutil.rmtree(self.dir)

    def add(self, key: str, row: dict[str, Any]) -> None:
        self.pending.append({KEY: key, **row})
        if len(self.pending) >= FLUSH_ROWS or time.monotonic() - self.last >= FLUSH_S:
            self.flush()

    def flush(self) -> None:
        """Write the rows not yet written as the next part (atomically: a part is whole or
        absent)."""
        self.last = time.monotonic()
        if not self.pending:
            return
        if not self.dir.is_dir():
            self.dir.mkdir(mode=0o755)
            (self.dir / MANIFEST).write_text(json.dumps(self.manifest) + "\n")
        buf = io.BytesIO()
        pl.DataFrame(self.pending, infer_schema_length=None).write_parquet(buf)
        self.n += 1
        write_file(self.dir / f"part-{self.n:06d}.parquet", lambda f: f.write(buf.getvalue()))
        self.pending = []

    def remove(self) -> None:
        shutil.rmtree(self.dir, ignore_errors=True)


def _stop_workers(pool: Executor) -> None:
    """Terminate a process pool's workers now: a point may run for minutes, and shutdown
    waits for the running ones (no public way to stop them before Python 3.14)."""
    for proc in list((getattr(pool, "_processes", None) or {}).values()):
        proc.terminate()


def _error_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0]}" if text else type(e).__name__


def run_sweep(
    model: str,
    points: list[dict[str, Any]],
    base: list[str] | None = None,
    output: str | os.PathLike[str] | None = None,
    *,
    workers: int | None = None,
    executor: Executor | None = None,
    on_point: Callable[[], None] | None = None,
    on_failure: Callable[[Failure], None] | None = None,
    on_start: Callable[[int, int], None] | None = None,
    force: bool = False,
    resume: bool = False,
) -> pl.DataFrame:
    """Run every point; a frame with one row per distinct point (grid order), written to
    ``output``.

    ``executor``: any :class:`concurrent.futures.Executor` (a Dask client's too, see
    :func:`dask_executor`); default: ``workers`` spawned local processes. ``output`` is
    checked before any point runs; an existing file is replaced only with ``force``. Rows
    are kept in ``OUTPUT.parts/`` as they arrive; ``resume`` runs only the points missing
    there (same model and ``base``), ``force`` starts over. ``on_start(to_run, done)`` is
    called once the points left to run are known, ``on_point()`` as each point ends,
    ``on_failure(failure)`` for one that raised. If any raised, the others
    still run and :class:`SweepFailed` names them (the parts stay, for ``resume``); on any
    error no output file is left.
    """
    check_options(output, workers, force, resume)
    cfg = load_config(model, base or None)
    unique = dedupe(points)
    parts = _Parts(output, cfg) if output is not None else None
    done: dict[str, dict[str, Any]] = {}
    if parts is not None:
        if resume:
            done = parts.load()
        else:
            parts.clear()  # only with force (check_options refused it otherwise)
    todo = [p for p in unique if point_key(p) not in done]
    if on_start:
        on_start(len(todo), len(unique) - len(todo))
    failures: list[Failure] = []
    if todo:
        _run(cfg, todo, workers, executor, parts, done, failures, on_point, on_failure)
    rows = [done[k] for k in map(point_key, unique) if k in done]
    frame = pl.DataFrame(rows, infer_schema_length=None)
    if KEY in frame.columns:
        frame = frame.drop(KEY)
    if failures:
        kept = f"; the {len(rows)} done are in {parts.dir}, --resume runs the rest" if parts else ""
        raise SweepFailed(
            f"{len(failures)} of {len(unique)} points failed, first {failures[0]}{kept}",
            failures,
            frame,
        )
    if output is not None:
        # Whole in memory first (a row per point: small), so a full disk is an OSError
        # from the file, not an error inside the Parquet writer.
        buf = io.BytesIO()
        frame.write_parquet(buf)
        write_file(output, lambda f: f.write(buf.getvalue()), force=force)
        if parts is not None:
            parts.remove()
    return frame


def _run(
    cfg: Config,
    todo: list[dict[str, Any]],
    workers: int | None,
    executor: Executor | None,
    parts: _Parts | None,
    done: dict[str, dict[str, Any]],
    failures: list[Failure],
    on_point: Callable[[], None] | None,
    on_failure: Callable[[Failure], None] | None,
) -> None:
    """Submit ``todo``; each row lands in ``done`` (and the parts) as it arrives."""
    own = executor is None
    # spawn, not fork: polars' thread pool does not survive a fork; never more processes
    # than points (each one costs a start-up and its memory)
    n_workers = min(workers or os.cpu_count() or 1, len(todo))
    pool = executor or ProcessPoolExecutor(
        max_workers=n_workers, mp_context=multiprocessing.get_context("spawn")
    )
    futures: dict[Future[dict[str, Any]], dict[str, Any]] = {}
    try:
        # The loaded model goes with each point: a remote worker reads no model file.
        futures = {pool.submit(run_point, cfg, {}, p): p for p in todo}
        pending = set(futures)
        while pending:
            # Timed waits: a Ctrl-C that another thread takes is seen within half a second
            # (an untimed wait would sleep through it until the next point ends), and the
            # parts are written on time while points are slow.
            finished, pending = wait(pending, timeout=0.5, return_when=FIRST_COMPLETED)
            for fut in finished:
                point = futures[fut]
                try:
                    row = fut.result()
                except Exception as e:  # the point's own error (or its worker's death)
                    failures.append(Failure(point, _error_line(e)))
                    if on_failure:
                        on_failure(failures[-1])
                else:
                    key = point_key(point)
                    done[key] = {KEY: key, **row}
                    if parts is not None:
                        parts.add(key, row)
                if on_point:
                    on_point()
            if parts is not None and time.monotonic() - parts.last >= FLUSH_S:
                parts.flush()
    except BaseException:  # Ctrl-C, SIGTERM's exit: the running points are wasted
        if own:
            _stop_workers(pool)
        for fut in futures:
            fut.cancel()
        raise
    finally:
        if parts is not None:
            parts.flush()  # what finished is kept, also on Ctrl-C
        if own:
            pool.shutdown(cancel_futures=True)


@contextlib.contextmanager
def dask_executor(
    address: str, workers: int | None = None, timeout_s: float = 10
) -> Iterator[Executor]:
    """An executor on a Dask cluster: ``address`` (``tcp://host:8786``) of a running
    scheduler, or ``local`` for a ``LocalCluster`` of single-threaded worker processes
    (``workers`` of them; default one per CPU). A scheduler not reached in ``timeout_s``
    is one error line. The client (and a local cluster) close on exit, cancelling what is
    left."""
    import logging

    from distributed import Client, LocalCluster

    if address == "local":
        cluster = LocalCluster(
            n_workers=workers or os.cpu_count() or 1,
            threads_per_worker=1,  # SimPy holds the GIL: one point per process
            processes=True,
            dashboard_address=None,
            silence_logs=logging.ERROR,
        )
        client = Client(cluster)
    else:
        if workers is not None:
            raise VtraceError(f"--workers: the cluster at {address} has its own workers")
        cluster = None
        try:
            client = Client(address, timeout=f"{timeout_s}s")
        except (OSError, TimeoutError, ValueError) as e:
            raise VtraceError(f"--dask {address}: cannot connect: {_error_line(e)}") from None
    try:
        # Not pure: a key per submission, so a point cancelled by an interrupted sweep can
        # be submitted again at once (a pure key would still be the cancelled one's).
        yield client.get_executor(pure=False)
    finally:
        client.close()
        if cluster is not None:
            cluster.close()
