"""Attaching to running QEMU guests: `vtrace qemu-lab start/stop`, `vtrace record --qmp`,
`vtrace doctor --qmp`, and per-VM attribution.

The guests are the lab's own, booted in the background under QEMU (TCG here, ~6 s each).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from vtrace.lab.qemu import console_counts

VTRACE = [str(Path(sys.executable).parent / "vtrace")]


def vtrace(*args: str, timeout: float = 120, check: bool = True) -> subprocess.CompletedProcess:
    done = subprocess.run([*VTRACE, *args], capture_output=True, text=True, timeout=timeout)
    if check and done.returncode != 0:
        raise AssertionError(f"vtrace {' '.join(args)}: {done.returncode}\n{done.stderr}")
    return done


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    stat = Path(f"/proc/{pid}/stat").read_text()
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


@pytest.fixture(scope="module")
def lab_vm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, int]]:
    """A background lab guest: virtio-blk, queue depth 1 (its QMP socket, its pid)."""
    qmp = tmp_path_factory.mktemp("vm") / "vm1.qmp"
    done = vtrace("qemu-lab", "start", "--device", "virtio-blk", "--qmp", str(qmp))
    pid = int(done.stdout.strip())
    try:
        yield qmp, pid
    finally:
        vtrace("qemu-lab", "stop", "--qmp", str(qmp), check=False)


@pytest.mark.qemu
def test_lab_start_runs_until_stop(tmp_path: Path) -> None:
    qmp = tmp_path / "vm.qmp"
    pid = int(vtrace("qemu-lab", "start", "--qmp", str(qmp)).stdout)
    try:
        assert _alive(pid) and qmp.is_socket()
        console = Path(f"{qmp}.console")
        first = console_counts(console)
        time.sleep(1.0)
        later = console_counts(console)
        # The workload keeps going: more rounds, each adding requests the guest completed.
        assert len(later) > len(first) >= 0 and later[-1][0] > (first[-1][0] if first else 0)
        again = vtrace("qemu-lab", "start", "--qmp", str(qmp), check=False)
        assert again.returncode == 2 and "already listens" in again.stderr
    finally:
        stopped = vtrace("qemu-lab", "stop", "--qmp", str(qmp))
    assert int(stopped.stdout) == pid and not _alive(pid)
    assert not qmp.exists()
    gone = vtrace("qemu-lab", "stop", "--qmp", str(qmp), check=False)
    assert gone.returncode == 2 and "no QMP socket" in gone.stderr
