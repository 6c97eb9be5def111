"""Sweeps on a real Dask cluster: `dask scheduler` and two `dask worker` processes on
127.0.0.1 (free ports), the same results as local processes, a worker killed mid-sweep,
--resume, and a failing point that leaves the others to complete."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import polars as pl
import pytest

from vtrace.errors import VtraceError
from vtrace.sim.sweep import SweepFailed, dask_executor, parse_grid, parts_dir, run_sweep

ROOT = Path(__file__).resolve().parent.parent
DASK = Path(sys.executable).with_name("dask")
BASE = ["requests=3000", "warmup_requests=0"]
GRID = ["queue.arrival_rate_per_s=1000,2000,3000", "queue.service_mean_ns=20000,40000"]
ARGS = [f"--grid={g}" for g in GRID] + [f"--set={b}" for b in BASE]
# Points of about 0.3 s: a killed worker is inside one.
SLOW = ["requests=20000", "warmup_requests=0"]

pytestmark = pytest.mark.timeout(120)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(procs: list[subprocess.Popen[bytes]]) -> None:
    """Each process group (a worker's nanny and its worker) gets SIGTERM, then SIGKILL."""
    for p in procs:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    for p in procs:
        try:
            p.wait(max(deadline - time.monotonic(), 0.1))
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The address of a scheduler with two single-threaded workers (each under a nanny,
    which starts a new worker when one dies)."""
    from distributed import Client

    logs = tmp_path_factory.mktemp("dask")
    address = f"tcp://127.0.0.1:{_free_port()}"
    common = {"cwd": ROOT, "start_new_session": True, "stdout": subprocess.DEVNULL}
    cmds = [[str(DASK), "scheduler", "--host", "127.0.0.1", "--port", address.rsplit(":", 1)[1],
             "--no-dashboard"]]  # fmt: skip
    cmds += [[str(DASK), "worker", address, "--host", "127.0.0.1", "--nthreads", "1",
              "--no-dashboard", "--death-timeout", "30", "--name", f"w{i}"]
             for i in range(2)]  # fmt: skip
    procs: list[subprocess.Popen[bytes]] = []
    try:
        for i, cmd in enumerate(cmds):
            procs.append(
                subprocess.Popen(cmd, stderr=(logs / f"{i}.log").open("wb"), **common)  # type: ignore[call-overload]
            )
        with Client(address, timeout="30s") as client:
            client.wait_for_workers(2, timeout=60)
        yield address
    finally:
        _stop(procs)


@pytest.fixture(scope="module")
def local() -> pl.DataFrame:
    """The grid run in local processes: what the cluster must reproduce."""
    return run_sweep("mm1", parse_grid("mm1", GRID, BASE), BASE, workers=2)


def test_the_cluster_gives_the_local_results_and_runs_each_point_once(
    cluster: str, local: pl.DataFrame
) -> None:
    points = parse_grid("mm1", GRID, BASE)
    ran: list[int] = []
    with dask_executor(cluster) as ex:
        # A repeated point is run once and has one row.
        frame = run_sweep(
            "mm1", points + points[:2], BASE, executor=ex, on_point=lambda: ran.append(1)
        )
    assert len(ran) == len(points) == 6
    assert frame.equals(local)
    assert frame["queue.arrival_rate_per_s"].to_list() == [1000, 1000, 2000, 2000, 3000, 3000]


def _sweep(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "vtrace.cli", "sweep", *args],
        capture_output=True, text=True, cwd=ROOT, timeout=90,
    )  # fmt: skip


def test_an_interrupted_sweep_resumes_with_only_the_missing_points(
    cluster: str, local: pl.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "s.parquet"
    points = parse_grid("mm1", GRID, BASE)
    ended: list[int] = []

    def interrupt_at_the_third() -> None:
        ended.append(1)
        if len(ended) == 3:
            raise KeyboardInterrupt

    with dask_executor(cluster) as ex, pytest.raises(KeyboardInterrupt):
        run_sweep("mm1", points, BASE, out, executor=ex, on_point=interrupt_at_the_third)
    assert not out.exists()
    kept = pl.read_parquet(parts_dir(out) / "*.parquet")
    assert kept.height == 3

    # Without --resume the parts are not silently dropped: an error before any point runs.
    with pytest.raises(VtraceError, match=f"{parts_dir(out)}: an interrupted sweep's rows"):
        run_sweep("mm1", points, BASE, out, executor=_Refuse())
    # The CLI: resumes from the kept parts, runs three, writes the whole grid.
    r = _sweep("-m", "mm1", *ARGS, "-o", str(out), "--dask", cluster, "--resume")
    assert r.returncode == 0, r.stderr
    assert "resuming: 3 of 6 points done before, running 3" in r.stderr
    assert pl.read_parquet(out).equals(local)
    assert not parts_dir(out).exists()


def test_a_resume_from_parts_runs_only_what_they_lack(
    cluster: str, local: pl.DataFrame, tmp_path: Path
) -> None:
    out = tmp_path / "s.parquet"
    points = parse_grid("mm1", GRID, BASE)
    with dask_executor(cluster) as ex:
        with pytest.raises(KeyboardInterrupt):
            run_sweep("mm1", points, BASE, out, executor=ex, on_point=_raise(KeyboardInterrupt))
        assert pl.read_parquet(parts_dir(out) / "*.parquet").height == 1
        ran: list[int] = []
        frame = run_sweep(
            "mm1", points, BASE, out, executor=ex, resume=True, on_point=lambda: ran.append(1)
        )
    assert len(ran) == 5
    assert frame.equals(local) and pl.read_parquet(out).equals(local)
    assert not parts_dir(out).exists()
    # Other --set values: the parts are not theirs.
    other = tmp_path / "other.parquet"
    with dask_executor(cluster) as ex, pytest.raises(KeyboardInterrupt):
        run_sweep("mm1", points, BASE, other, executor=ex, on_point=_raise(KeyboardInterrupt))
    with pytest.raises(VtraceError, match="written by a sweep of another model or other --set"):
        run_sweep("mm1", points, [*BASE, "seed=2"], other, executor=_Refuse(), resume=True)


class _Refuse(Executor):
    """An executor that fails any submission: nothing may run."""

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def]
        raise AssertionError("a point was submitted")


def _raise(exc: type[BaseException]):  # type: ignore[no-untyped-def]
    def f() -> None:
        raise exc

    return f


def test_a_failing_point_is_reported_with_its_values_and_the_rest_complete(
    cluster: str, tmp_path: Path
) -> None:
    # A virtio model told to replay a trace, given none: those points raise in the model.
    out = tmp_path / "s.parquet"
    grid = ["--grid=workload.arrivals=poisson,trace", "--grid=virtqueue.batch=1,4"]
    base = ["--set=requests=500", "--set=warmup_requests=0"]
    r = _sweep("-m", "virtio-blk", *grid, *base, "-o", str(out), "--dask", cluster)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.splitlines()
    for batch in (1, 4):
        assert (
            f"vtrace: point workload.arrivals=trace, virtqueue.batch={batch}: VtraceError: "
            in r.stderr
        ), r.stderr
    assert "give a trace to replay" in r.stderr
    assert lines[-1].startswith("vtrace: error: 2 of 4 points failed, first point "), lines
    assert lines[-1].endswith(f"the 2 done are in {parts_dir(out)}, --resume runs the rest")
    assert "Traceback" not in r.stderr and not out.exists()
    kept = pl.read_parquet(parts_dir(out) / "*.parquet")
    assert sorted(kept["virtqueue.batch"].to_list()) == [1, 4]
    assert set(kept["workload.arrivals"]) == {"poisson"}
    # The same in local processes, through the API.
    few = ["requests=500", "warmup_requests=0"]
    points = parse_grid("virtio-blk", ["workload.arrivals=trace,poisson"], few)
    with pytest.raises(SweepFailed) as e:
        run_sweep("virtio-blk", points, few, workers=1)
    assert [f.point for f in e.value.failures] == [{"workload.arrivals": "trace"}]
    assert e.value.frame["workload.arrivals"].to_list() == ["poisson"]


def test_an_unreachable_scheduler_is_an_error_before_any_point(tmp_path: Path) -> None:
    address = f"tcp://127.0.0.1:{_free_port()}"
    with (
        pytest.raises(VtraceError, match=f"--dask {address}: cannot connect"),
        dask_executor(address, timeout_s=1),
    ):
        pass


# Last: the nanny's new worker takes seconds to join.
def test_a_worker_killed_mid_sweep_costs_only_time(cluster: str) -> None:
    from distributed import Client

    points = parse_grid("mm1", [*GRID[:1], "queue.service_mean_ns=20000"], SLOW)
    with ThreadPoolExecutor(1) as serial:  # in this process, one point after another
        reference = run_sweep("mm1", points, SLOW, executor=serial)
    killed: list[int] = []
    with Client(cluster) as client, dask_executor(cluster) as ex:
        pids = client.run(os.getpid)

        def kill_one() -> None:
            if killed:
                return
            # A worker inside a point: its point is lost with it and must run again.
            busy = [w for w, keys in client.processing().items() if keys]
            assert busy
            killed.append(pids[busy[0]])
            os.kill(killed[0], signal.SIGKILL)

        frame = run_sweep("mm1", points, SLOW, executor=ex, on_point=kill_one)
        assert frame.equals(reference)
        assert not Path(f"/proc/{killed[0]}").exists()
