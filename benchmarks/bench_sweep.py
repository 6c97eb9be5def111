"""Sweep throughput: 200 points in local processes, on `--dask local`, and on a real
cluster of a `dask scheduler` and two `dask worker` processes on 127.0.0.1.

Each run writes its Parquet output (with the parts written as rows arrive). Reported:
points per second, and the overhead per point: a worker slot's time per point beyond the
model's own time, (wall x workers - the points' model time as the workers measured it) /
points, so a loaded machine slows the model without counting as overhead. Goal: under
50 ms per point. Cluster start-up is reported apart.

    .venv/bin/python benchmarks/bench_sweep.py             # 200 points of 2,000 requests
    .venv/bin/python benchmarks/bench_sweep.py --requests 500 --workers 4
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Executor, ProcessPoolExecutor
from pathlib import Path
from typing import Any

from vtrace.sim.sweep import dask_executor, parse_grid, run_point, run_sweep

MODEL = "virtio-blk"
# 5 x 5 x 8 = 200 points
GRID = [
    "virtqueue.ring_size=8,16,32,64,128",
    "virtqueue.batch=1,2,4,8,16",
    "workload.queue_depth=1,2,4,8,16,32,64,128",
]
DASK = Path(sys.executable).with_name("dask")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_cluster(workers: int) -> tuple[str, list[subprocess.Popen[bytes]]]:
    """A scheduler and ``workers`` single-threaded workers as separate processes."""
    from distributed import Client

    address = f"tcp://127.0.0.1:{_free_port()}"
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL}
    cmds = [[str(DASK), "scheduler", "--host", "127.0.0.1", "--port",
             address.rsplit(":", 1)[1], "--no-dashboard"]]  # fmt: skip
    cmds += [[str(DASK), "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
              "--no-dashboard", "--death-timeout", "30"]] * workers  # fmt: skip
    procs = [subprocess.Popen(c, start_new_session=True, **quiet) for c in cmds]  # type: ignore[call-overload]
    with Client(address, timeout="30s") as client:
        client.wait_for_workers(workers, timeout=120)
    return address, procs


def stop_cluster(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        os.killpg(p.pid, signal.SIGTERM)
    for p in procs:
        try:
            p.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


def timed_point(*args: Any) -> dict[str, Any]:
    """run_point, with the time it took where it ran (a column of the row)."""
    t0 = time.perf_counter()
    row = run_point(*args)
    return {**row, "_model_s": time.perf_counter() - t0}


class Timing(Executor):
    """Submits timed_point for run_point to ``inner``."""

    def __init__(self, inner: Executor) -> None:
        self.inner = inner

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        return self.inner.submit(timed_point, *args)


def timed(
    label: str, points: list[dict], base: list[str], workers: int, out: Path, executor: Executor
) -> None:
    t0 = time.perf_counter()
    frame = run_sweep(MODEL, points, base, out, executor=Timing(executor))
    wall = time.perf_counter() - t0
    assert frame.height == len(points)
    model_s = frame["_model_s"].sum()
    print(
        f"{label:<28} {wall:7.2f} s  {len(points) / wall:7.1f} points/s  "
        f"model {1000 * model_s / len(points):6.1f} ms/point  "
        f"overhead {1000 * (wall * workers - model_s) / len(points):6.1f} ms/point"
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=2000, help="requests per point")
    ap.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    # A SIGTERM (timeout) still stops the cluster's processes (the finally below).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    base = [f"workload.requests={args.requests}", "workload.warmup_requests=0"]
    points = parse_grid(MODEL, GRID, base)
    w = args.workers
    print(f"{len(points)} points of {MODEL}, {args.requests} requests each, {w} workers")

    spawn = multiprocessing.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="bench-sweep-") as tmp:
        out: Callable[[str], Path] = lambda name: Path(tmp) / f"{name}.parquet"  # noqa: E731
        t0 = time.perf_counter()
        with ProcessPoolExecutor(w, mp_context=spawn) as pool:
            # Started and imported beforehand, like the clusters below: start-up apart.
            tiny = {"workload.requests": 10, "workload.warmup_requests": 0}
            list(pool.map(run_point, [MODEL] * w, [tiny] * w, [{}] * w))
            print(f"{'local processes start-up':<28} {time.perf_counter() - t0:7.2f} s")
            timed("local processes", points, base, w, out("local"), pool)

        t0 = time.perf_counter()
        with dask_executor("local", w) as ex:
            print(f"{'--dask local start-up':<28} {time.perf_counter() - t0:7.2f} s")
            timed("--dask local", points, base, w, out("dask-local"), ex)

        t0 = time.perf_counter()
        address, procs = start_cluster(2)
        try:
            print(f"{'2-worker cluster start-up':<28} {time.perf_counter() - t0:7.2f} s")
            with dask_executor(address) as ex:
                timed("scheduler + 2 workers", points, base, 2, out("cluster"), ex)
        finally:
            stop_cluster(procs)


if __name__ == "__main__":
    main()
