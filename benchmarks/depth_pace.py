"""How much the depth-16 and depth-32 predictions owe to the guest's pace.

    .venv/bin/python benchmarks/depth_pace.py [--kick-exit-us 9.5] [--series DIR] [--json]

Reads the shipped series traces/qemu-virtio-blk-sched (8 rounds of QEMU virtio-blk runs at
queue depths 1, 4, 16 and 32, with the host scheduler's events; no root, no QEMU needed),
its second batch (`--series traces/qemu-virtio-blk-sched-2`), or a series of your own
(`--series`: qd1-rN, qd4-rN, qd16-rN and qd32-rN for each round N, taken with `vtrace
qemu-lab run --sched`).

Whether a deep lot goes in one kick or several is a race between the guest's adds and
QEMU's pops, so the guest's time per add decides much of it. Calibration fits that time
from depths 1 and 4 (the slope of whole lots' kick write to the vCPU's halt over depth,
fast mode, `vtrace.sim.qemu_timing`). The same measure taken from depth 4 to depth 16 and
to depth 32 gives the pace of the deep lots themselves.

Per round this prints the three slopes and, from the depth-4 run, what the host's trace
shows of a kick's cost to the vCPU: where QEMU's main loop pre-empted the vCPU right
after its write and popped one request, the time from the vCPU's return to its next kick
write (the rest of that cost plus the lot's second add). Then the median of the rounds'
predictions against the median of the runs, with the calibrated pace (what `vtrace
calibrate` gives) and with each round's deep pace put in by hand (the 4-to-16 slope for
depth 16, the 4-to-32 slope for depth 32). The second uses the runs it predicts, so it is
a diagnosis, not a prediction: where it is further off, the calibrated model is right in
part because its pace is slower than the deep lots'. With --kick-exit-us a third column
also sets a kick's cost to the vCPU after its write (`kvm.kernel_exit_ns`; calibration
keeps the base model's 1.5 us; the guest's own trace, `qemu-lab run --guest-trace`, puts
it near 13 us, its tracepoints included). Takes about 10 s.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from statistics import median

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vtrace.sim import simulate  # noqa: E402
from vtrace.sim.calibrate import calibrate  # noqa: E402
from vtrace.sim.qemu_timing import kick_writes, qemu_timing, timing_events, two_speeds  # noqa: E402
from vtrace.store import open_trace  # noqa: E402

SERIES = ROOT / "traces" / "qemu-virtio-blk-sched"
DEPTHS = (1, 4, 16, 32)


def per_request(events: pl.DataFrame) -> dict[str, float]:
    """Kicks and interrupts per request of a QEMU virtio trace's events."""
    counts = dict(events.group_by(pl.col("event").cast(pl.String)).len().iter_rows())
    pops = counts["virtqueue_pop"]
    return {
        "kicks": counts["virtio_queue_notify"] / pops,
        "irqs": counts["virtio_notify_irqfd"] / pops,
    }


def to_halt_us(events: pl.DataFrame, name: str, depth: int) -> float:
    """The median kick write to halt of a run's whole lots, fast mode, in us."""
    timing = qemu_timing(name, events.lazy(), depth)
    x = timing.to_halt_ns
    bound = two_speeds(x)
    fast = x if bound is None else x[x <= bound]
    return float(np.median(fast)) / 1e3


def kick_tail_us(events: pl.DataFrame, depth: int) -> np.ndarray:
    """From the vCPU's return to its next kick write, in us, for each lot whose first kick
    QEMU's main loop took by pre-empting the vCPU (switched out runnable, to the main loop)
    and whose pass popped the one request there was: the rest of the kick's cost to the
    vCPU plus the lot's second add. Lots whose vCPU left its CPU again first are left out
    (it waited for QEMU's lock)."""
    ev = timing_events(events.lazy())
    k = kick_writes(ev)
    if k is None or k.kicks.size < 2:
        return np.empty(0)
    before = np.searchsorted(k.pops, k.kicks)  # pops before each kick
    piece = np.diff(np.append(before, k.pops.size))
    first = (before % depth == 0) & np.append(True, np.diff(before) > 0) & (k.write_of >= 0)
    write = k.write_of[first & (piece == 1)]
    sw = ev.filter(
        (pl.col("ev") == "sched_switch") & ((pl.col("tid") == k.vcpu) | (pl.col("value") == k.vcpu))
    )
    ts, out = sw["ts_ns"].to_numpy(), (sw["tid"] == k.vcpu).to_numpy()
    to_main = (sw["value"] == k.main).to_numpy() & (sw["flags"] == 0).to_numpy()
    h = np.searchsorted(ts, write)  # the vCPU's next switch after the write
    h = h[h < ts.size]
    h = h[out[h] & to_main[h]]  # pre-empted by the main loop
    back_i = h + 1  # its return: the next switch, into it
    back_i = back_i[back_i < ts.size]
    back_i = back_i[~out[back_i]]
    back = ts[back_i]
    again = np.append(ts, np.iinfo(np.int64).max)[back_i + 1]  # off its CPU again
    nxt = np.searchsorted(k.writes, back)
    has = nxt < k.writes.size
    second = np.where(has, k.writes[np.minimum(nxt, k.writes.size - 1)], np.iinfo(np.int64).max)
    keep = has & (second < again)
    return (second[keep] - back[keep]) / 1e3


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--series", type=Path, default=SERIES,
        help="a directory of qd{1,4,16,32}-r{N} traces taken with --sched (default: the shipped one)",
    )  # fmt: skip
    ap.add_argument("--requests", type=int, default=16384, help="requests per model run")
    ap.add_argument("--seed", type=int, default=1, help="the model's seed")
    ap.add_argument(
        "--kick-exit-us", type=float, default=None,
        help="also predict with the deep pace and this cost of a kick to the vCPU, in us",
    )  # fmt: skip
    ap.add_argument("--json", action="store_true", help="print the figures as JSON too")
    args = ap.parse_args()
    if args.kick_exit_us is not None and not 0 <= args.kick_exit_us <= 1000:
        sys.exit("depth_pace: --kick-exit-us: give 0 to 1000 (us)")
    series: Path = args.series
    if not series.is_dir():
        sys.exit(f"depth_pace: {series}: no such directory")
    rounds = sorted(
        int(p.name.split("-r")[1]) for p in series.glob("qd1-r*") if p.name.split("-r")[1].isdigit()
    )
    missing = [
        f"qd{d}-r{r}" for r in rounds for d in DEPTHS if not (series / f"qd{d}-r{r}").is_dir()
    ]
    if not rounds or missing:
        sys.exit(f"depth_pace: {series}: missing {', '.join(missing[:3]) or 'qd1-r1'}")

    rows = []
    for r in rounds:
        ev = {d: open_trace(series / f"qd{d}-r{r}").events.collect() for d in DEPTHS}
        halt = {d: to_halt_us(ev[d], f"qd{d}-r{r}", d) for d in DEPTHS}
        config = calibrate([series / f"qd1-r{r}", series / f"qd4-r{r}"], "virtio-blk", None).config
        rows.append(
            {
                "round": r,
                "config": config,
                "pace_1_4": config["vcpu.request_prep_ns"] / 1e3,
                "pace_4_16": (halt[16] - halt[4]) / 12,
                "pace_4_32": (halt[32] - halt[4]) / 28,
                "kick_tail": kick_tail_us(ev[4], 4),
                "runs": {d: per_request(ev[d]) for d in (16, 32)},
            }
        )
    print("         time per add, us                  depth 4: vCPU's return to its next kick")
    print("round   depths 1-4 (calibrated)  4-16  4-32   lots  median us")
    for row in rows:
        tail = row["kick_tail"]
        median_tail = f"{np.median(tail):9.1f}" if tail.size else f"{'-':>9s}"
        print(
            f"{row['round']:5d}   {row['pace_1_4']:23.2f}  {row['pace_4_16']:4.2f}  "
            f"{row['pace_4_32']:4.2f}   {tail.size:4d}  {median_tail}"
        )

    out: dict[str, dict[str, float]] = {}
    extra = "" if args.kick_exit_us is None else f"   + kick {args.kick_exit_us:g} us"
    print(
        f"\ndepth  per request   runs     calibrated pace        deep pace{extra}"
        f"   ({args.requests} requests a model)"
    )
    for depth, deep in ((16, "pace_4_16"), (32, "pace_4_32")):
        real = [row["runs"][depth] for row in rows]
        run = {"workload.queue_depth": depth, "workload.requests": args.requests,
               "workload.warmup_requests": 0, "workload.seed": args.seed}  # fmt: skip
        paced = [{"vcpu.request_prep_ns": row[deep] * 1e3} for row in rows]
        variants = {"calibrated": [{}] * len(rows), "deep_pace": paced}
        if args.kick_exit_us is not None:
            variants["deep_pace_kick"] = [
                {**o, "kvm.kernel_exit_ns": args.kick_exit_us * 1e3} for o in paced
            ]
        summaries = {
            name: [
                simulate(row["config"].with_overrides({**run, **o})).summary
                for row, o in zip(rows, over, strict=True)
            ]
            for name, over in variants.items()
        }
        for name in ("kicks", "irqs"):
            runs = median(x[name] for x in real)
            figures = {"runs": runs}
            line = f"{depth:5d}  {name:11s} {runs:7.4f}"
            for variant, ss in summaries.items():
                m = median(s[f"{name}_per_request"] for s in ss)
                figures[variant] = m
                line += f"  {m:7.4f} ({m / runs - 1:+6.1%})"
            out[f"d{depth}_{name}"] = figures
            print(line)
    if args.json:
        paces = [
            {**{k: v for k, v in row.items() if k not in ("config", "kick_tail", "runs")},
             "kick_tail_us": row["kick_tail"].tolist()}
            for row in rows
        ]  # fmt: skip
        print(json.dumps({"paces": paces, "predictions": out}, indent=1))


if __name__ == "__main__":
    main()
