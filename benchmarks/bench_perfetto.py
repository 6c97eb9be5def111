"""Benchmark: `vtrace export perfetto` on a large synthetic trace, in events per second.

The trace is bench_summary's (vCPU threads exiting for user-space PIO and MMIO, ioeventfd
kicks, external interrupts and HLT; an iothread running QEMU's virtio back end; the lab back
end's own events), so every part of the timeline is drawn: exit and user-space slices,
passes, requests, kicks, pops, completions, interrupts, flows and both counters.

Run: .venv/bin/python benchmarks/bench_perfetto.py [--events N] [--repeat R] [--keep DIR]
Prints the median of R exports (wall and CPU) and events per second, the goal being at least
300,000; and how long building the timeline (the analyses and rows) and encoding the
packets took in the last run. The written file is parsed back once with protobuf to count
its packets.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_summary import median_time, write_synthetic

from vtrace.export.perfetto import build_timeline, export_perfetto, packets
from vtrace.store import open_trace

GOAL_EVENTS_PER_S = 300_000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=3_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--keep", type=Path, help="write (or reuse) the trace here")
    args = ap.parse_args()

    tmp = tempfile.mkdtemp(prefix="vtrace-bench-perfetto-")
    try:
        if args.keep and (args.keep / "meta.json").exists():
            path = args.keep
            n = open_trace(path).meta["events"]
            print(f"reusing {path}: {n:,} events")
        else:
            path = args.keep or Path(tmp) / "trace"
            t0 = time.perf_counter()
            n = write_synthetic(path, args.events)
            print(f"wrote {n:,} events to {path} in {time.perf_counter() - t0:.1f} s")
        out = Path(tmp) / "trace.pftrace"
        wall, cpu = median_time(lambda: export_perfetto(path, out, force=True), args.repeat)
        t0 = time.perf_counter()
        timeline = build_timeline(open_trace(path).events)
        t1 = time.perf_counter()
        size = sum(len(chunk) for chunk in packets(timeline))
        t2 = time.perf_counter()
        print(
            f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; medians of {args.repeat}"
        )
        # Both rates: the machine may be shared, and CPU time moves less with other load
        # (polars uses both cores, so on an idle machine wall time is below CPU time).
        print(
            f"export perfetto   wall {wall:5.2f} s  cpu {cpu:5.2f} s  "
            f"{n / wall:,.0f} events/s by wall, {n / cpu:,.0f} by CPU time "
            f"(goal >= {GOAL_EVENTS_PER_S:,})"
        )
        print(
            f"  timeline {t1 - t0:5.2f} s ({timeline.rows.height:,} track events, "
            f"{len(timeline.tracks)} tracks); encoding {t2 - t1:5.2f} s "
            f"({size / 1e6:.0f} MB, {timeline.rows.height / (t2 - t1):,.0f} packets/s)"
        )
        try:
            from perfetto.protos.perfetto.trace import perfetto_trace_pb2 as pb
        except ImportError:
            return
        trace = pb.Trace()
        trace.ParseFromString(out.read_bytes())
        print(f"  parsed back: {len(trace.packet):,} packets; counts {timeline.counts}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
