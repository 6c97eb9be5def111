"""QEMU's virtio USDT probes, end to end: a small C program (tests/usdt/) declares them with
QEMU's provider, names, arguments and is-enabled semaphores (as QEMU's dtrace trace backend
does), the doctor and the planner find it on PATH, and `vtrace record` counts its probes
exactly."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from vtrace.collect import doctor, program
from vtrace.store import open_trace

USDT_DIR = Path(__file__).with_name("usdt")
PROBES = (
    "virtio_queue_notify",
    "virtqueue_pop",
    "virtqueue_flush",
    "virtio_notify",
    "virtio_notify_irqfd",
)
EVENTS = ",".join(PROBES)
VTRACE = [sys.executable, "-m", "vtrace.cli"]
SDT_FIX = "apt-get install systemtap-sdt-dev (sys/sdt.h and dtrace)"


def _missing_toolchain() -> str | None:
    if shutil.which("gcc") is None:
        return "no gcc: apt-get install gcc"
    if shutil.which("dtrace") is None:
        return f"no dtrace: {SDT_FIX}"
    r = subprocess.run(
        ["gcc", "-E", "-x", "c", "-"], input=b"#include <sys/sdt.h>\n", capture_output=True
    )
    return None if r.returncode == 0 else f"no sys/sdt.h: {SDT_FIX}"


@pytest.fixture(scope="module")
def qemu_binary(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The probe program, built under a qemu-system-* name in a folder of its own."""
    why = _missing_toolchain()
    if why:
        pytest.skip(why)
    d = tmp_path_factory.mktemp("usdt")
    provider, header = USDT_DIR / "qemu_virtio_probes.d", d / "qemu_virtio_probes.h"
    semaphores, exe = d / "qemu_virtio_probes_sema.o", d / "qemu-system-usdt"
    c_file = USDT_DIR / "qemu_virtio_probes.c"
    for cmd in (
        ["dtrace", "-h", "-s", str(provider), "-o", str(header)],  # probe and semaphore macros
        ["dtrace", "-G", "-s", str(provider), "-o", str(semaphores)],  # the semaphores
        ["gcc", "-O2", "-Wall", "-Werror", f"-I{d}", str(c_file), str(semaphores), "-o", str(exe)],
    ):
        r = subprocess.run(cmd, capture_output=True, text=True, cwd=d)
        assert r.returncode == 0, f"{cmd}: {r.stderr}"
    return exe


class ProbeProcess:
    """The probe program, waiting between bursts so a recording can attach or detach."""

    def __init__(self, binary: Path, count: int) -> None:
        self.proc = subprocess.Popen(
            [str(binary), str(count)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
        )
        self.pid: int = json.loads(self.proc.stdout.readline())["pid"]

    def fire(self) -> dict[str, int]:
        """One burst; returns how often each probe found its semaphore set (so fired)."""
        self.proc.stdin.write("go\n")
        self.proc.stdin.flush()
        return json.loads(self.proc.stdout.readline())

    def close(self) -> None:
        self.proc.stdin.close()
        assert self.proc.wait(timeout=10) == 0


def start_record(out: Path, binary: Path, *args: str) -> subprocess.Popen:
    """`vtrace record` with the probe program's folder first on PATH, once it has attached
    (meta.json is written after attaching); fails with its output if it exits instead."""
    env = {**os.environ, "PATH": f"{binary.parent}{os.pathsep}{os.environ['PATH']}"}
    rec = subprocess.Popen(
        # --duration: a failing test leaves no recording behind.
        [*VTRACE, "record", "-o", str(out), "--duration", "60", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    deadline = time.monotonic() + 30
    while not (out / "meta.json").exists():
        assert rec.poll() is None, rec.communicate()
        assert time.monotonic() < deadline, "vtrace record did not start in 30 s"
        time.sleep(0.05)
    return rec


def stop_record(rec: subprocess.Popen) -> str:
    rec.send_signal(signal.SIGTERM)
    out, err = rec.communicate(timeout=30)
    assert rec.returncode == 0, err
    return out


def test_doctor_and_planner_find_the_probes(qemu_binary):
    assert doctor.find_qemu_binaries(str(qemu_binary.parent)) == [qemu_binary.resolve()]
    assert doctor.usdt_probes(qemu_binary) == set(PROBES)
    check = doctor.check_qemu_usdt([qemu_binary])
    assert (check.status, check.verdict) == ("ok", "USDT notes in qemu-system-usdt (5 probes)")
    plan = program.plan_probes(list(PROBES), qemu_binaries=[qemu_binary])
    assert plan.usdt == {p: str(qemu_binary) for p in PROBES} and plan.unavailable == {}
    assert plan.events == list(PROBES)


@pytest.mark.root
@pytest.mark.bcc
def test_contexts_raise_semaphores_only_in_the_given_processes(qemu_binary):
    from vtrace.collect.bccload import load_bcc

    bcc = load_bcc()
    mine = ProbeProcess(qemu_binary, 10)
    stranger = subprocess.Popen(["sleep", "30"])  # does not run the probe program
    try:
        plan = program.plan_probes(list(PROBES), qemu_binaries=[qemu_binary])
        contexts = program.usdt_contexts(plan, [mine.pid, stranger.pid], bcc)
        assert len(contexts) == 1 and set(plan.usdt) == set(PROBES)
        assert mine.fire() == dict.fromkeys(PROBES, 10)
        del contexts  # freeing a context lowers its semaphores: the probes go quiet
        assert mine.fire() == dict.fromkeys(PROBES, 0)

        plan = program.plan_probes(list(PROBES), qemu_binaries=[qemu_binary])
        assert program.usdt_contexts(plan, [stranger.pid], bcc) == [] and plan.usdt == {}
        assert plan.unavailable == {
            p: f"USDT enable failed in pid {stranger.pid} (running {qemu_binary}?): "
            f"Failed to enable USDT probe '{p}'"
            for p in PROBES
        }

        plan = program.plan_probes(list(PROBES), qemu_binaries=[qemu_binary])
        assert program.usdt_contexts(plan, [], bcc) == [] and plan.usdt == {}
        assert set(plan.unavailable.values()) == {
            f"USDT probes in {qemu_binary} have is-enabled semaphores, which bcc can only set "
            "in a given process: pass --pid of the QEMU process"
        }
    finally:
        stranger.kill()
        stranger.wait()
    mine.close()


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_record_counts_every_probe_of_the_given_pids(qemu_binary, tmp_path):
    n_a, n_b = 1000, 700
    a, b = ProbeProcess(qemu_binary, n_a), ProbeProcess(qemu_binary, n_b)
    other = ProbeProcess(qemu_binary, 500)  # not recorded: its semaphores stay down
    out = tmp_path / "t"
    rec = start_record(
        out, qemu_binary, "--pid", str(a.pid), "--pid", str(b.pid), "--events", EVENTS
    )
    assert a.fire() == dict.fromkeys(PROBES, n_a)
    assert b.fire() == dict.fromkeys(PROBES, n_b)
    assert other.fire() == dict.fromkeys(PROBES, 0)
    summary = stop_record(rec)
    # Stopping lowers the semaphores again: the probes cost QEMU nothing once recording ends.
    assert a.fire() == dict.fromkeys(PROBES, 0)
    for p in (a, b, other):
        p.close()
    assert "lost 0" in summary and all(p in summary for p in PROBES)

    trace = open_trace(out)
    df = trace.events.collect().with_columns(pl.col(pl.Categorical).cast(pl.String))
    counts = dict(
        df.group_by("pid", "event").len().select(pl.concat_str("pid", "event"), "len").rows()
    )
    assert counts == {
        **{f"{a.pid}{p}": n_a for p in PROBES},
        **{f"{b.pid}{p}": n_b for p in PROBES},
    }
    assert df["source"].unique().to_list() == ["qemu"]
    # One thread per process, so the ring buffer keeps each process's probes in firing order.
    mine = df.filter(pl.col("pid") == a.pid).sort("ts_ns", maintain_order=True)
    assert mine["event"].to_list() == list(PROBES) * n_a
    meta = trace.meta
    assert meta["complete"] and meta["lost"] == 0 and sum(meta["lost_per_cpu"]) == 0
    assert meta["probes"]["attached"] == {p: f"usdt:{qemu_binary.resolve()}:{p}" for p in PROBES}
    assert meta["probes"]["unavailable"] == {}
    assert meta["filters"]["pids"] == sorted([a.pid, b.pid])


@pytest.mark.kvm
@pytest.mark.root
@pytest.mark.bcc
def test_without_pid_semaphore_probes_are_refused_with_the_fix(qemu_binary, tmp_path):
    # bcc raises a semaphore only in a process it is given: no silent, empty recording.
    proc = ProbeProcess(qemu_binary, 100)
    env = {**os.environ, "PATH": f"{qemu_binary.parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(
        [*VTRACE, "record", "-o", str(tmp_path / "u"), "--events", EVENTS],
        capture_output=True,
        text=True,
        env=env,
    )
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr
    assert "is-enabled semaphores" in r.stderr and "pass --pid" in r.stderr
    assert not (tmp_path / "u").exists()

    # With a tracepoint too, the recording runs and says which probes it left out and why.
    out = tmp_path / "t"
    rec = start_record(out, qemu_binary, "--events", f"kvm_userspace_exit,{EVENTS}")
    assert proc.fire() == dict.fromkeys(PROBES, 0)
    summary = " ".join(stop_record(rec).split())  # rich wraps long lines
    proc.close()
    assert f"{', '.join(PROBES)}: USDT probes in {qemu_binary.resolve()}" in summary
    assert "pass --pid of the QEMU process" in summary
    trace = open_trace(out)
    unavailable = trace.meta["probes"]["unavailable"]
    assert sorted(unavailable) == sorted(PROBES)
    assert all("pass --pid" in why for why in unavailable.values())
    assert set(trace.meta["probes"]["attached"]) == {"kvm_userspace_exit"}
    assert trace.events.filter(pl.col("source") == "qemu").collect().height == 0
