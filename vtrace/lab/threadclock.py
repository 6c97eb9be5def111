"""What one lab thread cost the host: its CPU time and the scheduler's view of it.

Each vCPU and back-end thread reads its own counters when it starts and when it ends: its
CPU time (``CLOCK_THREAD_CPUTIME_ID``, :func:`time.thread_time_ns`) and the kernel's
``/proc/self/task/TID/schedstat`` line, which gives the time it ran on a CPU, the time it
waited on a run queue (runnable, holding no CPU: the scheduling latency of its wake-ups and
of being pre-empted) and how many times it was switched in. A back-end thread also counts
its wake-ups (sleeps that ended with work), so that its CPU time, less what its passes
took, gives the CPU one wake-up costs: ``vtrace calibrate`` sets from it the share of a
wake-up's latency that holds a CPU (docs/model.md).
"""

from __future__ import annotations

import threading
import time
from typing import Any


def schedstat(tid: int) -> tuple[int, int, int] | None:
    """``(run_ns, wait_ns, slices)`` of thread ``tid`` of this process, or None where the
    kernel has no schedstat (CONFIG_SCHED_INFO off)."""
    try:
        with open(f"/proc/self/task/{tid}/schedstat", "rb") as f:
            run_ns, wait_ns, slices = (int(x) for x in f.read().split()[:3])
    except (OSError, ValueError):
        return None
    return run_ns, wait_ns, slices


class ThreadClock:
    """One thread's counters between :meth:`start` and :meth:`stop`, both called in it."""

    def __init__(self, role: str, index: int) -> None:
        self.role = role  # "vcpu" or "backend"
        self.index = index
        self.tid = 0
        self.cpu_ns = 0
        self.sched: tuple[int, int, int] | None = None
        self.wakeups = 0  # back end: sleeps that ended with work to do
        self._cpu0 = 0
        self._sched0: tuple[int, int, int] | None = None

    def start(self) -> None:
        self.tid = threading.get_native_id()
        self._sched0 = schedstat(self.tid)
        self._cpu0 = time.thread_time_ns()

    def stop(self) -> None:
        self.cpu_ns = time.thread_time_ns() - self._cpu0
        end = schedstat(self.tid)
        if end is not None and self._sched0 is not None:
            self.sched = (
                end[0] - self._sched0[0],
                end[1] - self._sched0[1],
                end[2] - self._sched0[2],
            )

    def to_json(self) -> dict[str, Any]:
        """``role``, ``index``, ``tid``, ``cpu_ns``; ``run_ns``, ``wait_ns``, ``slices``
        where the kernel keeps schedstat; a back end's ``wakeups``."""
        out: dict[str, Any] = {
            "role": self.role,
            "index": self.index,
            "tid": self.tid,
            "cpu_ns": self.cpu_ns,
        }
        if self.sched is not None:
            out["run_ns"], out["wait_ns"], out["slices"] = self.sched
        if self.role == "backend":
            out["wakeups"] = self.wakeups
        return out
