"""Soak: `vtrace record --max-size` in ring mode for minutes at the lab's highest event rate.

    .venv/bin/python benchmarks/bench_soak.py [--seconds 600] [--max-size 16M] [--json]

The load is the lab's emulated device (`vtrace lab run --device emulated`: 4 user-space PIO
exits per request, each a kvm_pio and a kvm_userspace_exit, the lab's highest event rate
here, above virtio's one kick per request), run round after round of --round-requests in
one process until --seconds have passed; the process sums the lab's own counts. The
recorder is attached to its pid with `--events kvm_pio,kvm_userspace_exit` before the first
round: every event of the lab falls inside the recording, which ends when the lab exits.

Every --sample-s (10) seconds: the recorder's resident memory (VmRSS) and the bytes of the
parts on disk. At the end the lab's own counts are checked against the trace: the events
the lab caused (its user-space exits, IO exits and ioeventfd kicks) must each be kept in a
part, or counted as dropped by the ring, lost in the kernel or not written.

Prints the RSS samples (min and max in MiB), the most the parts took on disk against
--max-size, what the ring dropped, and the accounting.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
VTRACE = [sys.executable, "-m", "vtrace.cli"]
EVENTS = "kvm_pio,kvm_userspace_exit"


# The load: one process (one pid to record), waiting for a line on stdin, then lab rounds
# until the deadline; prints its pid first and the summed counts last.
LAB_ROUNDS = """
import json, os, sys, time
from vtrace.lab import run_lab
seconds, per_round = float(sys.argv[1]), int(sys.argv[2])
print(json.dumps({"pid": os.getpid()}), flush=True)
sys.stdin.readline()
t0 = time.monotonic()
total = {"rounds": 0, "requests": 0, "userspace_exits": 0, "exit_reasons": {}, "guest_kicks": 0}
while time.monotonic() - t0 < seconds:
    r = run_lab("emulated", per_round)
    total["rounds"] += 1
    total["requests"] += r.requests
    total["userspace_exits"] += r.userspace_exits
    total["guest_kicks"] += r.guest_kicks
    for k, v in r.exit_reasons.items():
        total["exit_reasons"][k] = total["exit_reasons"].get(k, 0) + v
total["duration_s"] = time.monotonic() - t0
total["requests_per_s"] = total["requests"] / total["duration_s"]
print(json.dumps(total), flush=True)
"""


def lab_events(res: dict) -> int:
    """kvm_pio + kvm_userspace_exit events the lab caused: one kvm_userspace_exit per
    user-space exit, one kvm_pio per IO exit and per ioeventfd kick."""
    io = res["exit_reasons"].get("KVM_EXIT_IO", 0)
    return int(res["userspace_exits"]) + int(io) + int(res.get("guest_kicks", 0))


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def parts_bytes(trace: Path) -> tuple[int, int]:
    """Bytes of the parts on disk (those being written included), and the biggest part."""
    total = biggest = 0
    for p in [*trace.glob("part-*.parquet"), *trace.glob(".part-*.tmp")]:
        try:
            size = p.stat().st_size
        except FileNotFoundError:  # dropped or renamed meanwhile
            continue
        total += size
        biggest = max(biggest, size)
    return total, biggest


def soak(seconds: float, max_size: str, sample_s: float, per_round: int, tmp: Path) -> dict:
    out = tmp / "soak"
    lab = subprocess.Popen(
        [sys.executable, "-c", LAB_ROUNDS, str(seconds), str(per_round)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    assert lab.stdin is not None and lab.stdout is not None
    lab_pid = json.loads(lab.stdout.readline())["pid"]
    rec = subprocess.Popen(
        [*VTRACE, "record", "-o", str(out), "--pid", str(lab_pid), "--events", EVENTS,
         "--max-size", max_size, "--on-full", "ring"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
    )  # fmt: skip
    samples: list[dict] = []
    peak_disk = biggest_part = 0
    try:
        deadline = time.monotonic() + 120
        while not (out / "meta.json").exists():
            if rec.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"recorder did not start: {rec.communicate()}")
            time.sleep(0.05)
        t0 = time.monotonic()
        lab.stdin.write("go\n")
        lab.stdin.flush()
        next_sample = t0
        while rec.poll() is None:  # it stops once the lab has exited
            now = time.monotonic()
            disk, biggest = parts_bytes(out)
            peak_disk, biggest_part = max(peak_disk, disk), max(biggest_part, biggest)
            if now >= next_sample:
                try:
                    samples.append(
                        {"t_s": round(now - t0, 1), "rss_mib": round(rss_mib(rec.pid), 1),
                         "parts_bytes": disk}
                    )  # fmt: skip
                except (OSError, RuntimeError):
                    break  # the recorder is exiting
                next_sample += sample_s
            time.sleep(0.05)
        lab_out, _ = lab.communicate(timeout=60)
        _, rec_err = rec.communicate(timeout=60)
    finally:
        for p in (lab, rec):
            if p.poll() is None:
                p.kill()
    if rec.returncode != 0:
        raise RuntimeError(f"recorder failed ({rec.returncode}): {rec_err}")
    res = json.loads(lab_out.splitlines()[-1])
    meta = json.loads((out / "meta.json").read_text())
    max_bytes = meta["max_size"]["bytes"]
    dropped = meta.get("dropped", {"parts": 0, "events": 0, "bytes": 0})
    caused = lab_events(res)
    kept = int(meta["events"])
    lost_kernel = sum(meta["lost_per_cpu"])
    not_written = int(meta.get("events_not_written", 0))
    accounted = kept + int(dropped["events"]) + lost_kernel + not_written
    final_disk, _ = parts_bytes(out)
    rss = [s["rss_mib"] for s in samples]
    result = {
        "seconds": round(
            meta["end"]["monotonic_ns"] / 1e9 - meta["start"]["monotonic_ns"] / 1e9, 1
        ),
        "lab_requests": res["requests"],
        "lab_rounds": res["rounds"],
        "lab_requests_per_s": round(res["requests_per_s"]),
        "events_per_s": round(caused / max(res["duration_s"], 1e-9)),
        "max_size_bytes": max_bytes,
        "peak_parts_bytes": peak_disk,
        "final_parts_bytes": final_disk,
        "biggest_part_bytes": biggest_part,
        "parts_written": meta["parts"],
        "dropped": dropped,
        "lab_events": caused,
        "seen": meta["seen"],
        "kept": kept,
        "lost_in_kernel": lost_kernel,
        "not_written": not_written,
        "accounted": accounted,
        "every_event_accounted": accounted == caused == meta["seen"],
        "rss_mib_min": min(rss) if rss else None,
        "rss_mib_max": max(rss) if rss else None,
        "rss_samples": samples,
        "stopped_by": meta.get("stopped_by"),
    }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=600.0)
    parser.add_argument("--max-size", default="16M")
    parser.add_argument("--sample-s", type=float, default=10.0)
    parser.add_argument("--round-requests", type=int, default=20_000, help="Requests a round.")
    parser.add_argument("--json", action="store_true", help="Print one JSON object.")
    args = parser.parse_args()
    load = os.getloadavg()
    tmp = Path(tempfile.mkdtemp(prefix="vtrace-soak-"))
    try:
        r = soak(args.seconds, args.max_size, args.sample_s, args.round_requests, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    r["loadavg_start"], r["loadavg_end"] = load, os.getloadavg()
    if args.json:
        print(json.dumps(r))
        return
    mib = 2**20
    print(
        f"soak: {r['seconds']} s of `vtrace lab run --device emulated` "
        f"({r['lab_requests_per_s']:,} requests/s, {r['events_per_s']:,} events/s), "
        f"load average {r['loadavg_start'][0]:.1f} -> {r['loadavg_end'][0]:.1f}"
    )
    print(
        f"recorder RSS over {len(r['rss_samples'])} samples: min {r['rss_mib_min']} MiB, "
        f"max {r['rss_mib_max']} MiB  "
        + " ".join(f"{s['t_s']:.0f}s:{s['rss_mib']}" for s in r["rss_samples"])
    )
    d = r["dropped"]
    print(
        f"parts on disk: peak {r['peak_parts_bytes'] / mib:.2f} MiB, at the end "
        f"{r['final_parts_bytes'] / mib:.2f} MiB, --max-size {r['max_size_bytes'] / mib:.2f} MiB, "
        f"biggest part {r['biggest_part_bytes'] / mib:.2f} MiB; {r['parts_written']} parts "
        f"written, {d['parts']} dropped ({d['events']:,} events, {d['bytes'] / mib:.1f} MiB)"
    )
    print(
        f"events: the lab caused {r['lab_events']:,}, the recorder saw {r['seen']:,}: "
        f"kept {r['kept']:,} + dropped {d['events']:,} + lost {r['lost_in_kernel']:,} + "
        f"not written {r['not_written']:,} = {r['accounted']:,} -> "
        + ("every event accounted for" if r["every_event_accounted"] else "MISMATCH")
    )


if __name__ == "__main__":
    main()
