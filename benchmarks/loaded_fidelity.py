"""The calibrated lab model on a loaded host: small rings, where the back end's stalls decide.

    sudo .venv/bin/python benchmarks/loaded_fidelity.py [--rounds 4] [--hogs 1] [--json]

Starts ``--hogs`` CPU-bound processes (``yes``) beside the lab, as another tenant's work
would, then per round records the lab's virtio runs at batch 1 and 8 on a ring of 256 and
runs the configurations to predict (a ring of 16 and of 32 at batch 1, a ring of 4 at batch
2), interleaved. Each round calibrates ``lab-virtio`` on its own two recordings and predicts
the others; prints per configuration the model's error against each round's run and the
mean absolute error, and the round's fitted wake-up stalls. On 2 CPUs one hog makes the
back-end thread wait for a CPU now and then (``backend.stall_*``), which a ring of 256 hides
and a small ring does not (docs/model.md, "Calibration").

Beside it, in the same run, the anchor: the same recordings with every wake-up's merged kicks
counted as one (``lab_kick`` count 1), so that the wake-up is measured from the last kick
before it, as calibration did before it read the count.

Needs root, /dev/kvm and bcc (the recordings); a round takes about 2 s.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import polars as pl  # noqa: E402

from vtrace import open_trace  # noqa: E402
from vtrace.lab import run_lab  # noqa: E402
from vtrace.sim import simulate  # noqa: E402
from vtrace.sim.calibrate import calibrate  # noqa: E402
from vtrace.store import write_trace  # noqa: E402

CALIBRATE = ((1, 256), (8, 256))
PREDICT = ((1, 16), (1, 32), (2, 4))


def counted_once(trace: Path, out: Path) -> Path:
    """A copy of ``trace`` whose wake-ups each count one kick (the last before them)."""
    t = open_trace(trace)
    is_kick = pl.col("event").cast(pl.String) == "lab_kick"
    events = t.events.with_columns(
        count=pl.when(is_kick).then(1).otherwise(pl.col("count")).cast(pl.Int32)
    ).collect()
    write_trace(out / trace.name, events, dict(t.meta))
    return out / trace.name


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=4, help="rounds, configurations interleaved")
    ap.add_argument("--hogs", type=int, default=1, help="CPU-bound processes beside the lab")
    ap.add_argument("--requests", type=int, default=2000, help="requests per run")
    ap.add_argument("--json", action="store_true", help="print every run as JSON")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="vtrace-loaded-") as tmp:
        rows = measure(args, Path(tmp))
    if args.json:
        print(json.dumps(rows, indent=1))
        return
    report(args, rows)


def measure(args: argparse.Namespace, out: Path) -> list[dict]:
    """Every round's predictions, from either wake-up measure."""
    hogs = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(args.hogs)]
    runs: dict[tuple[int, int], list] = {}
    try:
        for i in range(args.rounds):
            for batch, ring in CALIBRATE + PREDICT:
                rec = out / f"b{batch}-r{ring}-{i}" if (batch, ring) in CALIBRATE else None
                runs.setdefault((batch, ring), []).append(
                    run_lab("virtio", requests=args.requests, batch=batch, ring_size=ring,
                            record=rec)
                )  # fmt: skip
    finally:
        for h in hogs:
            h.kill()
    rows = []
    for i in range(args.rounds):
        traces = [runs[key][i].trace for key in CALIBRATE]
        fits = {
            "first": calibrate(traces, "lab-virtio").config,
            "last": calibrate([counted_once(Path(t), out / "once") for t in traces],
                              "lab-virtio").config,
        }  # fmt: skip
        for batch, ring in PREDICT:
            over = {
                "workload.requests": args.requests,
                "virtqueue.batch": batch,
                "virtqueue.ring_size": ring,
            }
            real = runs[batch, ring][i].requests_per_s
            for wake, cfg in fits.items():
                model = simulate(cfg.with_overrides(over)).summary["throughput_rps"]
                rows.append({
                    "round": i, "batch": batch, "ring": ring, "wake_from": wake,
                    "real_rps": real, "model_rps": model, "error": model / real - 1,
                    "stall_probability": cfg["backend.stall_probability"],
                    "stall_ns": cfg["backend.stall_ns"],
                })  # fmt: skip
    return rows


def report(args: argparse.Namespace, rows: list[dict]) -> None:
    print(f"{args.hogs} hog(s), {args.rounds} rounds, {args.requests} requests a run")
    for wake in ("first", "last"):
        print(f"wake-ups measured from the {wake} kick they merged:")
        for batch, ring in PREDICT:
            mine = [
                r for r in rows if (r["batch"], r["ring"], r["wake_from"]) == (batch, ring, wake)
            ]
            errs = " ".join(f"{r['error']:+6.1%}" for r in mine)
            mean = sum(abs(r["error"]) for r in mine) / len(mine)
            print(
                f"  ring {ring:3d} batch {batch}: model vs each round {errs}  mean |error| {mean:.1%}"
            )
        for r in rows:
            if r["wake_from"] == wake and (r["batch"], r["ring"]) == PREDICT[0]:
                print(
                    f"  round {r['round']}: stalls {r['stall_probability']:.2%} of wake-ups, "
                    f"{r['stall_ns'] / 1e3:.0f} us each"
                )


if __name__ == "__main__":
    main()
