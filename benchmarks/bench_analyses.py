"""Benchmark: every analysis of a 10M-event (or 100M) synthetic trace, in bounded memory.

The trace is benchmarks/bench_summary.py's (4 vCPU threads with exits, accesses, kicks; a
QEMU iothread and the lab back end with kicks, pops, flushes, interrupts), written a part at
a time. Each measurement runs in a fresh process: wall time, CPU time (all threads) and
peak RSS (`ru_maxrss`); medians of R runs, the largest RSS.

* row tables (exits, user_exits, accesses, kicks, requests, interrupts):
  `vtrace.analyze.write_table` to a Parquet file;
* aggregates (exits_by_reason ... batching): `vtrace.analyze.aggregate`; percentiles and
  log2 histogram of the exits' durations: `table_percentiles`, `table_histogram`;
* anchors: a bare scan, in batches, of the columns each group of analyses reads;
* with --before, the in-memory plans as they were (`exits_plan(ev).sink_parquet(...)`,
  `by_reason(exits_plan(ev), ...)`) on polars' streaming engine, killed past --cap MiB.

Run: .venv/bin/python benchmarks/bench_analyses.py [--events N] [--repeat R] [--keep DIR]
     [--dir DIR] [--only a,b] [--before] [--cap MIB]
Goals: every analysis under 2 GB at 100M; the summary-like ones (aggregates) under 30 s.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_summary import BYTES_PER_EVENT, write_synthetic

from vtrace.store import open_trace

ROWS = ("exits", "user_exits", "accesses", "kicks", "requests", "interrupts")
AGGS = ("exits_by_reason", "user_exits_by_reason", "accesses_by_target", "kicks_by_queue",
        "interrupts_by_line", "batching", "percentiles", "log2_histogram")  # fmt: skip
# The columns each group of analyses reads: the anchor scans them.
KVM_COLUMNS = ("ts_ns", "source", "event", "pid", "tid", "cpu", "vcpu", "reason", "reason_name",
               "isa", "flags", "addr", "size", "write", "value", "count", "queue", "device", "rip")  # fmt: skip
QUEUE_COLUMNS = ("ts_ns", "source", "event", "pid", "tid", "vcpu", "device", "queue", "addr",
                 "value", "count")  # fmt: skip
IRQ_COLUMNS = ("ts_ns", "source", "event", "pid", "tid", "cpu", "vcpu", "device", "queue", "addr",
               "value", "raw")  # fmt: skip
SCANS = {"kvm": KVM_COLUMNS, "queue": QUEUE_COLUMNS, "irq": IRQ_COLUMNS}
READS = {"requests": "queue", "batching": "queue", "interrupts": "irq",
         "interrupts_by_line": "irq"}  # fmt: skip

# One analysis in a fresh process: (wall s, CPU s, peak RSS KiB) on stdout.
PROBE = """
import resource, sys, time
import polars as pl
from vtrace import analyze as a
from vtrace.analyze import tables as T
from vtrace.store import open_trace
how, name, path, out = sys.argv[1:5]
t = open_trace(path)
ev = t.events
t0, c0 = time.perf_counter(), time.process_time()
if how == "scan":
    for batch in ev.select(sys.argv[5].split(",")).collect_batches():
        pass
elif how == "now":
    if name in T.ROW_TABLES:
        T.write_table(name, t, out, force=True)
    elif name == "percentiles":
        T.table_percentiles("exits", t, "duration_ns", "reason_name")
    elif name == "log2_histogram":
        T.table_histogram("exits", t, "duration_ns")
    else:
        T.aggregate(name, t)
else:  # the in-memory plans on the streaming engine
    from vtrace.analyze.accesses import accesses_by_target_plan
    from vtrace.analyze.exits import by_reason_plan
    from vtrace.analyze.interrupts import interrupts_by_line_plan
    from vtrace.analyze.kicks import kicks_by_queue_plan
    if name in T.ROW_TABLES:
        T.ROW_TABLES[name](ev).sink_parquet(out)
    elif name == "percentiles":
        a.percentiles(a.exits_plan(ev), "duration_ns", by="reason_name")
    elif name == "log2_histogram":
        a.log2_histogram(a.exits_plan(ev), "duration_ns")
    else:
        {
            "exits_by_reason": lambda: by_reason_plan(a.exits_plan(ev), "duration_ns"),
            "user_exits_by_reason": lambda: by_reason_plan(a.user_exits_plan(ev), "until_next_ns"),
            "accesses_by_target": lambda: accesses_by_target_plan(a.accesses_plan(ev)),
            "kicks_by_queue": lambda: kicks_by_queue_plan(a.kicks_plan(ev)),
            "interrupts_by_line": lambda: interrupts_by_line_plan(a.interrupts_plan(ev)),
            "batching": lambda: a.batching_plan(ev),
        }[name]().collect(engine="streaming")
print(time.perf_counter() - t0, time.process_time() - c0,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def probe(args: list[str], cap_mib: float) -> tuple[float, float, float] | None:
    """Run :data:`PROBE` in a fresh interpreter: (wall s, CPU s, peak RSS MiB), or None when
    it passed ``cap_mib`` of memory and was stopped."""
    child = subprocess.Popen(
        [sys.executable, "-c", PROBE, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )  # fmt: skip
    while child.poll() is None:
        try:
            with open(f"/proc/{child.pid}/status") as status:
                rss = next(int(x.split()[1]) for x in status if x.startswith("VmRSS"))
        except (OSError, StopIteration):
            rss = 0
        if rss / 1024 > cap_mib:
            child.kill()
            child.wait()
            return None
        time.sleep(0.05)
    out, err = child.communicate()
    if child.returncode:
        sys.exit(f"{' '.join(args[:2])}: failed: {err.strip().splitlines()[-1:]}")
    wall, cpu, kib = map(float, out.split()[-3:])
    return wall, cpu, kib / 1024


def measure(args: list[str], repeat: int, cap_mib: float) -> tuple[float, float, float] | None:
    """Median wall and CPU, largest peak RSS of ``repeat`` fresh runs (None: over the cap)."""
    runs = []
    for _ in range(repeat):
        run = probe(args, cap_mib)
        if run is None:
            return None
        runs.append(run)
    return (
        statistics.median(r[0] for r in runs),
        statistics.median(r[1] for r in runs),
        max(r[2] for r in runs),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="write (or reuse) the trace here")
    ap.add_argument("--dir", type=Path, help="where the temporary trace goes (default: TMPDIR)")
    ap.add_argument("--only", help="comma-separated analyses (default: all)")
    ap.add_argument("--before", action="store_true", help="also the in-memory plans")
    ap.add_argument("--cap", type=float, default=6000, help="MiB past which a run is stopped")
    args = ap.parse_args()

    tmp = None
    if args.keep and (args.keep / "meta.json").exists():
        path = args.keep
        n = open_trace(path).meta["events"]
        print(f"reusing {path}: {n:,} events")
    else:
        where = args.keep.parent if args.keep else (args.dir or Path(tempfile.gettempdir()))
        free, need = shutil.disk_usage(where).free, args.events * BYTES_PER_EVENT
        if free < need:
            sys.exit(f"{where}: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed")
        tmp = None if args.keep else tempfile.mkdtemp(prefix="vtrace-bench-", dir=args.dir)
        path = args.keep or Path(tmp) / "trace"
        t0 = time.perf_counter()
        n = write_synthetic(path, args.events)
        print(f"wrote {n:,} events to {path} in {time.perf_counter() - t0:.1f} s")
    names = args.only.split(",") if args.only else [*ROWS, *AGGS]
    out_dir = Path(tempfile.mkdtemp(prefix="vtrace-bench-out-", dir=args.dir))
    out = str(out_dir / "table.parquet")
    try:
        print(f"{n:,} events; {os.cpu_count()} CPUs; medians of {args.repeat} fresh processes, "
              "largest peak RSS; load average before each row")  # fmt: skip
        anchors: dict[str, float] = {}
        for group in sorted({READS.get(name, "kvm") for name in names}):
            load = os.getloadavg()[0]
            cols = ",".join(SCANS[group])
            got = measure(["scan", group, str(path), out, cols], args.repeat, args.cap)
            assert got is not None
            anchors[group] = got[0]
            report(f"scan of the {group} columns ({len(SCANS[group])}), batches", got, load, None)
        for name in names:
            anchor = anchors[READS.get(name, "kvm")]
            for how in ("before", "now") if args.before else ("now",):
                load = os.getloadavg()[0]
                got = measure([how, name, str(path), out], args.repeat, args.cap)
                report(f"{name} {how}", got, load, anchor, args.cap)
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


def report(
    what: str,
    got: tuple[float, float, float] | None,
    load: float,
    anchor: float | None,
    cap: float = 0,
) -> None:
    if got is None:
        print(f"{what:34s} stopped past {cap:,.0f} MiB  (load {load:.1f})", flush=True)
        return
    wall, cpu, rss = got
    ratio = f"  {wall / anchor:5.1f}x the scan" if anchor else ""
    print(f"{what:34s} wall {wall:6.2f} s  cpu {cpu:6.2f} s  peak {rss:7,.0f} MiB"
          f"{ratio}  (load {load:.1f})", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
