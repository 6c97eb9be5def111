"""Benchmark: `summary()` and `vtrace summary` on a 10M-event (or 100M) synthetic trace.

The trace mimics a VM with hardware virtualisation doing block I/O: per request cycle each
vCPU thread exits for a user-space PIO, an ioeventfd kick, a user-space MMIO, an external
interrupt and a HLT (each `kvm_exit` ... `kvm_entry`, with its `kvm_pio`/`kvm_mmio` and
`kvm_userspace_exit`), KVM injects the completion interrupt, an iothread runs QEMU's
virtio back end (`virtio_queue_notify`, two `virtqueue_pop`, `virtqueue_flush`,
`virtio_notify_irqfd`), a kernel worker raises the MSI, and the lab back end logs its own
kick/pop/complete. Timestamps have random jitter; the trace is written with vtrace.store
in time-ordered parts, generated a part at a time: 100M events hold a part's worth of
memory and take about 240 MB of disk.

Run: .venv/bin/python benchmarks/bench_summary.py [--events N] [--repeat R] [--keep DIR]
     [--dir DIR]
Each measurement runs in a fresh process: wall time, CPU time (all threads) and peak RSS
(`ru_maxrss`); medians of R runs, the largest RSS. The anchor is a bare scan of the columns
the summary reads, in bounded memory (`collect_batches`, each batch dropped); up to 20M
events also the whole projection collected (the anchor of earlier figures). Goals: 10M
under 3 s; 100M under 30 s and 2 GB.
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

import numpy as np
import polars as pl

from vtrace import schema as s
from vtrace.store import TraceWriter, open_trace

# One request cycle of one vCPU thread: (event, offset_ns, reason, reason_name, addr, write).
# VMX reasons: 30 IO_INSTRUCTION, 49 EPT_MISCONFIG, 1 EXTERNAL_INTERRUPT, 12 HLT.
VCPU_CYCLE = [
    (s.KVM_EXIT, 0, 30, "IO_INSTRUCTION", None, None),
    (s.KVM_PIO, 300, None, None, 0x1F7, True),
    (s.KVM_USERSPACE_EXIT, 600, 2, "KVM_EXIT_IO", None, None),
    (s.KVM_ENTRY, 9_000, None, None, None, None),
    (s.KVM_EXIT, 12_000, 30, "IO_INSTRUCTION", None, None),
    (s.KVM_PIO, 12_300, None, None, 0xC050, True),
    (s.KVM_ENTRY, 13_800, None, None, None, None),
    (s.KVM_EXIT, 16_000, 49, "EPT_MISCONFIG", None, None),
    (s.KVM_MMIO, 16_400, None, None, 0xFEBD1000, True),
    (s.KVM_USERSPACE_EXIT, 16_700, 6, "KVM_EXIT_MMIO", None, None),
    (s.KVM_ENTRY, 27_000, None, None, None, None),
    (s.KVM_EXIT, 30_000, 1, "EXTERNAL_INTERRUPT", None, None),
    (s.KVM_ENTRY, 31_500, None, None, None, None),
    (s.KVM_EXIT, 33_000, 12, "HLT", None, None),
    (s.KVM_INJ_VIRQ, 60_000, None, None, None, None),
    (s.KVM_ENTRY, 60_500, None, None, None, None),
]
IOTHREAD_CYCLE = [
    (s.SOURCE_QEMU, s.VIRTIO_QUEUE_NOTIFY, 14_000, None),
    (s.SOURCE_QEMU, s.VIRTQUEUE_POP, 15_000, None),
    (s.SOURCE_QEMU, s.VIRTQUEUE_POP, 16_000, None),
    (s.SOURCE_QEMU, s.VIRTQUEUE_FLUSH, 45_000, 2),
    (s.SOURCE_QEMU, s.VIRTIO_NOTIFY_IRQFD, 46_000, None),
    (s.SOURCE_KVM, s.KVM_MSI_SET_IRQ, 47_000, None),
    (s.SOURCE_LAB, s.LAB_KICK, 14_500, None),
    (s.SOURCE_LAB, s.LAB_POP, 15_500, None),
    (s.SOURCE_LAB, s.LAB_COMPLETE, 40_000, 1),
]
CYCLE_NS = 70_000


def _events_col(names: list[str], codes: np.ndarray) -> pl.Series:
    """A Categorical column from small integer codes, without one Python string per row."""
    return pl.Series(names, dtype=pl.Categorical).gather(codes.astype(np.uint32))


def cycle_frame(
    first_cycle: int, cycles: int, vcpus: int, rng: np.random.Generator
) -> pl.DataFrame:
    """``cycles`` request cycles on each of ``vcpus`` vCPU threads (plus the back-end threads)."""
    frames = []
    base = (first_cycle + np.arange(cycles, dtype=np.int64)) * CYCLE_NS
    vc = VCPU_CYCLE
    names = sorted({e[0] for e in vc} | {e[3] for e in vc if e[3]} | {"x"})
    for v in range(vcpus):
        k = len(vc)
        offs = np.array([e[1] for e in vc], dtype=np.int64)
        # Jitter below half the gap between template events keeps each thread's order.
        jitter = rng.integers(0, 150, size=(cycles, k))
        ts = (base[:, None] + offs[None, :] + jitter + v * 7).ravel()
        idx = np.tile(np.arange(k), cycles)
        ev = np.array([names.index(e[0]) for e in vc])[idx]
        reason = np.array([e[2] if e[2] is not None else -1 for e in vc])[idx]
        rname = np.array([names.index(e[3]) if e[3] else names.index("x") for e in vc])[idx]
        addr = np.array([e[4] if e[4] is not None else 0 for e in vc], dtype=np.uint64)[idx]
        is_access = np.array([e[4] is not None for e in vc])[idx]
        frames.append(
            pl.DataFrame(
                {
                    "ts_ns": ts,
                    "source": pl.repeat(s.SOURCE_KVM, len(ts), eager=True).cast(pl.Categorical),
                    "event": _events_col(names, ev),
                    "pid": pl.repeat(1000, len(ts), dtype=pl.Int32, eager=True),
                    "tid": pl.repeat(1001 + v, len(ts), dtype=pl.Int32, eager=True),
                    "cpu": pl.Series(np.full(len(ts), v % 2, dtype=np.int16)),
                    "vcpu": pl.repeat(v, len(ts), dtype=pl.Int32, eager=True),
                    "reason": pl.Series(reason).replace(-1, None),
                    "reason_name": _events_col(names, rname).replace("x", None),
                    "isa": pl.Series(np.where(reason >= 0, "vmx", None)).cast(pl.Categorical),
                    "addr": pl.Series(addr).set(pl.Series(~is_access), None),
                    "size": pl.Series(np.where(is_access, 1, 0).astype(np.int32)),
                    "write": pl.Series(is_access).replace(False, None),
                    "value": pl.Series(np.where(is_access, v % 4, 0).astype(np.uint64)),
                }
            ).with_columns(
                pl.when(pl.col("event").cast(pl.String).is_in([s.KVM_PIO, s.KVM_MMIO]))
                .then(pl.col(c))
                .alias(c)
                for c in ("size", "value")
            )
        )
    bc = IOTHREAD_CYCLE
    k = len(bc)
    offs = np.array([e[2] for e in bc], dtype=np.int64)
    ts = (base[:, None] + offs[None, :] + rng.integers(0, 300, size=(cycles, k))).ravel()
    idx = np.tile(np.arange(k), cycles)
    src_names = [s.SOURCE_KVM, s.SOURCE_QEMU, s.SOURCE_LAB]
    ev_names = sorted({e[1] for e in bc})
    tids = np.array(
        [2000 if e[0] == s.SOURCE_QEMU else 3000 if e[0] == s.SOURCE_LAB else 90 for e in bc]
    )
    frames.append(
        pl.DataFrame(
            {
                "ts_ns": ts,
                "source": _events_col(
                    src_names, np.array([src_names.index(e[0]) for e in bc])[idx]
                ),
                "event": _events_col(ev_names, np.array([ev_names.index(e[1]) for e in bc])[idx]),
                "pid": pl.repeat(1000, len(ts), dtype=pl.Int32, eager=True),
                "tid": pl.Series(tids[idx].astype(np.int32)),
                "count": pl.Series(np.array([e[3] or 0 for e in bc], dtype=np.int32)[idx]),
                "queue": pl.repeat(0, len(ts), dtype=pl.Int32, eager=True),
                "device": pl.repeat("virtio-blk", len(ts), eager=True).cast(pl.Categorical),
            }
        ).with_columns(pl.when(pl.col("count") > 0).then(pl.col("count")).alias("count"))
    )
    frame = s.conform(pl.concat(frames, how="diagonal"))
    return frame.sort("ts_ns")  # type: ignore[union-attr]


def events_per_cycle(vcpus: int) -> int:
    return vcpus * len(VCPU_CYCLE) + len(IOTHREAD_CYCLE)


def write_synthetic(
    path: Path, events: int, vcpus: int = 4, seed: int = 1, part_rows: int = 2_000_000
) -> int:
    """Write a synthetic trace of about ``events`` events in parts of about ``part_rows``,
    generated a part at a time (memory does not grow with ``events``); returns the exact
    count."""
    rng = np.random.default_rng(seed)
    per_cycle = events_per_cycle(vcpus)
    cycles = events // per_cycle
    chunk = max(1, -(-part_rows // per_cycle))  # at least part_rows: one part per chunk
    meta = {"importer": "bench_summary", "lost_events": {"0": 0, "1": 0}}
    with TraceWriter(path, meta, part_rows=part_rows) as w:
        for start in range(0, cycles, chunk):
            w.append(cycle_frame(start, min(chunk, cycles - start), vcpus, rng))
        w.close()
    return cycles * per_cycle


# Run in a fresh process each: (wall s, CPU s, peak RSS KiB) on stdout.
SUMMARY_PROBE = """
import resource, sys, time
from vtrace.analyze import summary
from vtrace.store import open_trace
t = open_trace(sys.argv[1])
t0, c0 = time.perf_counter(), time.process_time()
summary(t)
print(time.perf_counter() - t0, time.process_time() - c0,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
SCAN_PROBE = """
import resource, sys, time
import polars as pl
from vtrace.store import open_trace
t = open_trace(sys.argv[1])
cols = sys.argv[3].split(",")
t0, c0 = time.perf_counter(), time.process_time()
if sys.argv[2] == "batches":
    for batch in t.events.select(cols).collect_batches():
        pass
else:
    t.events.select(cols).collect()
print(time.perf_counter() - t0, time.process_time() - c0,
      resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""
# The CLI as a child of a fresh process: its time, CPU and peak RSS are the child's.
CLI_PROBE = """
import resource, subprocess, sys, time
t0 = time.perf_counter()
subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL)
r = resource.getrusage(resource.RUSAGE_CHILDREN)
print(time.perf_counter() - t0, r.ru_utime + r.ru_stime, r.ru_maxrss)
"""
SCAN_COLUMNS = ("ts_ns", "source", "event", "pid", "tid", "reason", "reason_name", "addr",
                "write", "count", "queue", "device")  # fmt: skip
# Disk a synthetic event takes in a part (zstd), with room to spare.
BYTES_PER_EVENT = 5


def probe(code: str, *args: str) -> tuple[float, float, float]:
    """Run ``code`` in a fresh interpreter; its (wall s, CPU s, peak RSS MiB)."""
    out = subprocess.run(
        [sys.executable, "-c", code, *args], check=True, capture_output=True, text=True
    ).stdout.split()
    wall, cpu, kib = map(float, out[-3:])
    return wall, cpu, kib / 1024


def measure(code: str, args: list[str], repeat: int) -> tuple[float, float, float]:
    """Median wall and CPU, largest peak RSS, of ``repeat`` fresh runs."""
    runs = [probe(code, *args) for _ in range(repeat)]
    return (
        statistics.median(r[0] for r in runs),
        statistics.median(r[1] for r in runs),
        max(r[2] for r in runs),
    )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--events", type=int, default=10_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument(
        "--keep", type=Path, help="write (or reuse) the trace here instead of a temp dir"
    )
    ap.add_argument("--dir", type=Path, help="where the temporary trace goes (default: TMPDIR)")
    args = ap.parse_args()

    tmp = None
    if args.keep and (args.keep / "meta.json").exists():
        path = args.keep
        n = open_trace(path).meta["events"]
        print(f"reusing {path}: {n:,} events")
    else:
        where = args.keep.parent if args.keep else (args.dir or Path(tempfile.gettempdir()))
        free = shutil.disk_usage(where).free
        need = args.events * BYTES_PER_EVENT
        if free < need:
            sys.exit(f"{where}: {free / 2**30:.1f} GiB free, {need / 2**30:.1f} GiB needed")
        tmp = None if args.keep else tempfile.mkdtemp(prefix="vtrace-bench-", dir=args.dir)
        path = args.keep or Path(tmp) / "trace"
        t0 = time.perf_counter()
        n = write_synthetic(path, args.events)
        size = sum(p.stat().st_size for p in path.iterdir())
        print(f"wrote {n:,} events to {path} in {time.perf_counter() - t0:.1f} s, "
              f"{size / 2**20:,.0f} MiB")  # fmt: skip
    try:
        cols = ",".join(SCAN_COLUMNS)
        rows = [("scan of 12 columns, batches (anchor)",
                 measure(SCAN_PROBE, [str(path), "batches", cols], args.repeat))]  # fmt: skip
        if n <= 20_000_000:
            rows.append(("scan of 12 columns, collected",
                         measure(SCAN_PROBE, [str(path), "collect", cols], args.repeat)))  # fmt: skip
        rows.append(("summary()", measure(SUMMARY_PROBE, [str(path)], args.repeat)))
        cli = [str(Path(sys.executable).with_name("vtrace")), "summary", str(path), "--json"]
        rows.append(("vtrace summary --json (CLI)", measure(CLI_PROBE, cli, args.repeat)))
        print(
            f"{n:,} events; {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; "
            f"medians of {args.repeat} fresh processes, largest peak RSS"
        )
        anchor = rows[0][1][0]
        for name, (wall, cpu, rss) in rows:
            print(
                f"{name:38s} wall {wall:6.2f} s  cpu {cpu:6.2f} s  peak {rss:7,.0f} MiB  "
                f"({wall / anchor:.1f}x the scan; {n / wall / 1e6:.1f} M events/s)"
            )
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
