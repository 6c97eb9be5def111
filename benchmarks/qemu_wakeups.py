"""How QEMU's main loop takes a virtio-blk guest's kicks, seen by the host's scheduler.

    sudo .venv/bin/python benchmarks/qemu_wakeups.py [--depths 1,4,16,32] [--repeats 3] [--json]

Runs `vtrace qemu-lab run --device virtio-blk --requests N --queue-depth D --sched` for each
depth, round after round (depths interleaved); the lab records the host's `sched_waking` and
`sched_switch` of QEMU's threads with the trace (docs/qemu-lab.md). A QEMU trace shows
when QEMU took a kick (`virtio_queue_notify`), not when the guest wrote it; under TCG the write is the vCPU
thread signalling the ioeventfd, which is the scheduler's `sched_waking` of the main loop
by the vCPU thread. So per kick QEMU took:

- where the main loop ran: on the vCPU's CPU, pre-empting the vCPU ("pre-empts"), on the
  other CPU while the vCPU went on ("other CPU"), or once the vCPU had halted ("after
  halt"); and the time from the guest's write to QEMU taking it;
- how many requests that kick's pass popped (a lot of `queue_depth` goes whole, or in
  pieces);
- the guest's pace: from a whole lot's kick write to the vCPU's halt (the guest adds the
  rest of the lot, then waits), per depth; the slope over depths is its time per add;
- QEMU's pace: the median gap between the pops of one pass.

Prints one row per depth (medians over the runs) and, with --json, every run. Needs root
(tracefs), /dev/kvm is not needed (the guest runs under TCG here), QEMU and a guest kernel
(scripts/setup-host.sh). Each run of 4096 requests takes about 7 s.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import polars as pl

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from vtrace.store import open_trace  # noqa: E402


def sched_frame(trace_dir: Path) -> pl.DataFrame:
    """The trace's host scheduler rows (source sched, recorded by the lab) with named
    columns: ts, cur (the thread the event ran in), cpu, ev, pid (the woken thread),
    prev / next / state (a switch)."""
    trace = open_trace(trace_dir)
    if not (trace.meta.get("sched") or {}).get("recorded"):
        why = (trace.meta.get("sched") or {}).get("reason")
        raise SystemExit(f"{trace_dir}: no host scheduler events ({why}); run as root")
    rows = trace.events.filter(pl.col("source").cast(pl.String) == "sched").collect()
    waking = pl.col("ev") == "sched_waking"
    return rows.select(
        ts="ts_ns",
        cur=pl.col("tid").cast(pl.Int64),
        cpu=pl.col("cpu").cast(pl.Int64),
        ev=pl.col("event").cast(pl.String),
        value=pl.col("value").cast(pl.Int64),
        flags="flags",
    ).select(
        "ts",
        "cur",
        "cpu",
        "ev",
        pid=pl.when(waking).then("value"),
        prev=pl.when(~waking).then("cur"),
        next=pl.when(~waking).then("value"),
        state=pl.when(~waking).then(
            pl.when(pl.col("flags") == 1).then(pl.lit("S")).otherwise(pl.lit("R"))
        ),
    )


def classify(trace_dir: Path, sched: pl.DataFrame, depth: int) -> dict:
    """Per kick QEMU took: the main loop's placement, the write-to-take time, the pops."""
    ev = open_trace(trace_dir).events.select("ts_ns", "tid", event=pl.col("event").cast(pl.String))
    ev = ev.collect()
    pops = ev.filter(pl.col("event") == "virtqueue_pop")
    main = int(pops["tid"].mode()[0])
    pop_ts = pops["ts_ns"].sort().to_numpy()
    kick_ts = ev.filter(pl.col("event") == "virtio_queue_notify")["ts_ns"].sort().to_numpy()
    pieces = np.diff(np.searchsorted(pop_ts, np.append(kick_ts, np.iinfo(np.int64).max)))
    wakes = sched.filter((pl.col("ev") == "sched_waking") & (pl.col("pid") == main))
    by = wakes.filter(pl.col("cur") > 0).group_by("cur").len().sort("len")
    vcpu = int(by["cur"][-1])  # the thread that signals the main loop most: the vCPU
    vw = wakes.filter(pl.col("cur") == vcpu)
    vts, vcpu_cpu = vw["ts"].to_numpy(), vw["cpu"].to_numpy()
    sw = sched.filter(pl.col("ev") == "sched_switch")
    main_in = sw.filter(pl.col("next") == main)
    mts, mcpu = main_in["ts"].to_numpy(), main_in["cpu"].to_numpy()
    vsw = sw.filter((pl.col("prev") == vcpu) | (pl.col("next") == vcpu))
    vsts = vsw["ts"].to_numpy()
    v_runs = (vsw["next"] == vcpu).to_numpy()
    v_halts = vsw["state"].fill_null("").str.starts_with("S").to_numpy()
    halt_ts = vsts[~v_runs & v_halts]
    # the guest's write of each kick: the vCPU's last signal to the main loop before it
    i = np.searchsorted(vts, kick_ts, side="right") - 1
    ok = (i >= 0) & (kick_ts - vts[np.maximum(i, 0)] < 2_000_000)
    write = vts[np.maximum(i, 0)]
    j = np.minimum(np.searchsorted(mts, write), len(mts) - 1)
    ran_at, ran_on = mts[j], mcpu[j]
    k = np.searchsorted(vsts, ran_at, side="right") - 1
    v_running = v_runs[np.maximum(k, 0)]
    v_halted = ~v_running & v_halts[np.maximum(k, 0)]
    same = ran_on == vcpu_cpu[np.maximum(i, 0)]
    mode = np.where(v_halted, "after halt", np.where(same & ~v_running, "pre-empts", "other CPU"))
    h = np.minimum(np.searchsorted(halt_ts, write), len(halt_ts) - 1)
    k_frame = pl.DataFrame(
        {
            "mode": mode,
            "take_us": (kick_ts - write) / 1e3,
            "pieces": pieces,
            "to_halt_us": (halt_ts[h] - write) / 1e3,
        }
    ).filter(pl.Series(ok))
    gaps = np.diff(pop_ts)
    same_pass = np.diff(np.searchsorted(kick_ts, pop_ts, side="right")) == 0
    pop_gap = float(np.median(gaps[same_pass])) / 1e3 if same_pass.any() else float("nan")
    whole = k_frame.filter(pl.col("pieces") == depth)
    lots = max(1, len(pop_ts) // depth)
    return {
        "depth": depth,
        "kicks_per_lot": len(kick_ts) / lots,
        "kicks_matched": k_frame.height,
        "mode_share": {
            m: k_frame.filter(pl.col("mode") == m).height / max(1, k_frame.height)
            for m in ("pre-empts", "other CPU", "after halt")
        },
        "take_us_by_mode": {
            m: k_frame.filter(pl.col("mode") == m)["take_us"].median()
            for m in ("pre-empts", "other CPU", "after halt")
        },
        "single_pieces_pre_empting": k_frame.filter(pl.col("pieces") == 1)
        .select((pl.col("mode") == "pre-empts").mean())
        .item(),
        "whole_lot_write_to_halt_us": whole["to_halt_us"].median() if whole.height else None,
        "pop_gap_us": pop_gap,
    }


def one_run(depth: int, requests: int, out: Path) -> dict:
    cmd = [
        sys.executable, "-m", "vtrace.cli", "qemu-lab", "run", "--device", "virtio-blk",
        "--requests", str(requests), "--request-bytes", "4096", "--queue-depth", str(depth),
        "--sched", "-o", str(out),
    ]  # fmt: skip
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"qemu-lab run failed: {done.stderr.strip().splitlines()[-1:]}")
    return classify(out, sched_frame(out), depth)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--depths", default="1,4,16,32", help="queue depths, comma-separated")
    ap.add_argument("--repeats", type=int, default=3, help="rounds over the depths")
    ap.add_argument("--requests", type=int, default=4096, help="requests per run")
    ap.add_argument("--json", action="store_true", help="print every run as JSON")
    args = ap.parse_args()
    depths = [int(d) for d in args.depths.split(",")]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(args.repeats):
            for d in depths:
                row = one_run(d, args.requests, Path(tmp) / f"qd{d}-r{r}")
                row["load_avg_1m"] = os.getloadavg()[0]
                runs.append(row)
                print(
                    f"round {r + 1}/{args.repeats} depth {d}: {row['kicks_per_lot']:.2f} "
                    f"kicks per lot",
                    file=sys.stderr,
                )
    if args.json:
        print(json.dumps(runs, indent=1))
        return
    flat = pl.DataFrame(
        [
            {
                "depth": x["depth"],
                "kicks_per_lot": x["kicks_per_lot"],
                **{f"{m} share": v for m, v in x["mode_share"].items()},
                **{f"{m} take us": v for m, v in x["take_us_by_mode"].items()},
                "single pieces pre-empting": x["single_pieces_pre_empting"],
                "whole lot write to halt us": x["whole_lot_write_to_halt_us"],
                "pop gap us": x["pop_gap_us"],
            }
            for x in runs
        ]
    )
    table = flat.group_by("depth").agg(pl.len().alias("runs"), pl.all().median()).sort("depth")
    with pl.Config(tbl_cols=-1, tbl_width_chars=200, float_precision=2):
        print(table)
    loads = [x["load_avg_1m"] for x in runs]
    print(f"{len(runs)} runs, load average {min(loads):.2f} to {max(loads):.2f}")


if __name__ == "__main__":
    main()
