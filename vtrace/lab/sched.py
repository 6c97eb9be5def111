"""The host scheduler's view of a QEMU guest: which thread woke which, and who ran where.

A QEMU trace says when QEMU *took* a kick (``virtio_queue_notify``), not when the guest
wrote it. Under TCG the guest's notify write is its vCPU thread signalling the
ioeventfd, which wakes QEMU's main loop: the scheduler's ``sched_waking`` of the main loop
by the vCPU thread is the moment of the write. ``sched_switch`` says when the vCPU thread
halted (the guest went idle, ``prev_state`` S) or was pre-empted (R), and on which CPU
the main loop ran. :class:`SchedRecorder` records both through a tracefs instance of its
own (so it disturbs no other tracing) while QEMU's events are on; :func:`sched_events`
keeps the events of QEMU's threads as rows of the events table:

- ``sched_waking``: ``tid`` the waking thread, ``cpu`` its CPU, ``value`` the woken thread,
  ``flags`` the CPU it is to run on;
- ``sched_switch``: ``tid`` the thread leaving the CPU, ``cpu`` the CPU, ``value`` the
  thread that runs next (0: the idle task), ``flags`` the leaving thread's state as the
  kernel's ``TASK_*`` bits (0 runnable: pre-empted; 1 sleeping: S; 2 uninterruptible: D).

Timestamps: tracefs uses the monotonic clock; QEMU's log the wall clock
(``-msg timestamp=on``). The offset between the two, read around the window, aligns them
within a few microseconds.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import polars as pl

from vtrace import schema as s

TRACEFS = Path("/sys/kernel/tracing")
EVENTS = ("sched/sched_waking", "sched/sched_switch")
# The ring buffers: 16 MiB a CPU (a 4096-request run makes about 20,000 events on 2 CPUs,
# well under 1 MiB), but at most 128 MiB in all on a large host, and at least 2 MiB a CPU.
BUFFER_KB_PER_CPU = 16384
BUFFER_KB_TOTAL = 131072
BUFFER_KB_MIN = 2048


def buffer_kb(cpus: int) -> int:
    """Each CPU's ring buffer size in KiB for ``cpus`` CPUs."""
    return max(BUFFER_KB_MIN, min(BUFFER_KB_PER_CPU, BUFFER_KB_TOTAL // max(1, cpus)))


# prev_state letters as the kernel prints them, to the TASK_* bits (include/linux/sched.h)
TASK_STATES = {"R": 0, "R+": 0, "S": 1, "D": 2, "T": 4, "t": 8, "X": 16, "Z": 32, "P": 64,
               "I": 0x402}  # fmt: skip
_LINE = (
    r"^\s*.+?-(?<cur>\d+)\s+\[(?<cpu>\d+)\]\s+\S+\s+(?<secs>\d+)\.(?<frac>\d+): "
    r"(?<ev>sched_waking|sched_switch): (?<rest>.*)$"
)


def unavailable_reason() -> str | None:
    """Why the scheduler cannot be recorded here, or None when it can."""
    if os.geteuid() != 0:
        return "not root: tracefs instances need root"
    if not (TRACEFS / "instances").is_dir():
        return f"no tracefs at {TRACEFS} (mount -t tracefs nodev {TRACEFS})"
    if not all((TRACEFS / "events" / e).is_dir() for e in EVENTS):
        return "this kernel has no sched_waking / sched_switch tracepoints"
    return None


def realtime_offset_ns() -> int:
    """CLOCK_REALTIME minus CLOCK_MONOTONIC."""
    return time.time_ns() - time.monotonic_ns()


class SchedRecorder:
    """A tracefs instance recording ``sched_waking`` and ``sched_switch`` on every CPU."""

    def __init__(self) -> None:
        self.dir = TRACEFS / "instances" / f"vtrace-sched-{os.getpid()}-{time.monotonic_ns()}"
        self.offsets: list[int] = []

    def __enter__(self) -> SchedRecorder:
        self.dir.mkdir()
        try:
            (self.dir / "trace_clock").write_text("mono")
            (self.dir / "buffer_size_kb").write_text(str(buffer_kb(os.cpu_count() or 1)))
            for e in EVENTS:
                (self.dir / "events" / e / "enable").write_text("1")
        except OSError:
            self.dir.rmdir()
            raise
        return self

    def start(self) -> None:
        self.offsets.append(realtime_offset_ns())
        (self.dir / "tracing_on").write_text("1")

    def stop(self) -> str:
        """Stop and return what was recorded (tracefs text)."""
        (self.dir / "tracing_on").write_text("0")
        self.offsets.append(realtime_offset_ns())
        return (self.dir / "trace").read_text()

    def lost(self) -> int:
        """Events the instance's ring buffers overwrote or dropped (per_cpu stats)."""
        lost = 0
        for stats in (self.dir / "per_cpu").glob("cpu*/stats"):
            for line in stats.read_text().splitlines():
                key, _, value = line.partition(":")
                if key.strip() in ("overrun", "dropped events"):
                    lost += int(value.split()[0])
        return lost

    @property
    def offset_ns(self) -> int:
        """Wall clock minus monotonic, the mean of the readings around the window."""
        return sum(self.offsets) // max(1, len(self.offsets))

    def __exit__(self, *exc: object) -> None:
        try:
            (self.dir / "tracing_on").write_text("0")
        finally:
            self.dir.rmdir()


def process_threads(pid: int) -> set[int]:
    """The thread ids of ``pid`` now (empty if it is gone)."""
    try:
        return {int(t) for t in os.listdir(f"/proc/{pid}/task")}
    except OSError:
        return set()


def sched_events(text: str, offset_ns: int, pid: int, tids: set[int]) -> pl.DataFrame:
    """The recorded events that involve one of ``tids`` (QEMU's threads), as events rows
    of ``pid`` with source ``sched`` (see the module docstring for the columns)."""
    lines = pl.Series("line", text.splitlines(), dtype=pl.String)
    f = lines.str.extract_groups(_LINE).struct.unnest().drop_nulls("ev")
    rest = pl.col("rest")
    frac = pl.col("frac").str.pad_end(9, "0").str.slice(0, 9).cast(pl.Int64)
    waking = pl.col("ev") == "sched_waking"
    other = (
        pl.when(waking)
        .then(rest.str.extract(r"(?:^|\s)pid=(\d+)"))
        .otherwise(rest.str.extract(r"next_pid=(\d+)"))
    )
    state = rest.str.extract(r"prev_state=(\S+)").replace_strict(
        TASK_STATES, default=-1, return_dtype=pl.Int64
    )
    rows = f.select(
        ts_ns=pl.col("secs").cast(pl.Int64) * 1_000_000_000 + frac + offset_ns,
        event=pl.col("ev"),
        tid=pl.col("cur").cast(pl.Int32),
        cpu=pl.col("cpu").cast(pl.Int16),
        value=other.cast(pl.UInt64),
        flags=pl.when(waking)
        .then(rest.str.extract(r"target_cpu=(\d+)").cast(pl.Int64))
        .otherwise(state),
    )
    keep = list(tids)
    rows = rows.filter(pl.col("tid").is_in(keep) | pl.col("value").cast(pl.Int64).is_in(keep))
    return s.conform(
        rows.with_columns(source=pl.lit(s.SOURCE_SCHED), pid=pl.lit(pid, pl.Int32)).sort("ts_ns")
    )
