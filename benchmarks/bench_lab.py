"""The lab's costs on this host, side by side: one PIO write handled in user space vs in the
kernel through ioeventfd, and a request through the emulated device vs the virtio ring.

    .venv/bin/python benchmarks/bench_lab.py [--repeats 5] [--requests 5000]

Prints medians over the repeats and ratios against the anchors measured on this machine
kind (about 9.6 us per user-space PIO round trip, about 1.9 us per ioeventfd PIO write:
docs/sources.md), plus the anchors' own ratio measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics

from vtrace.lab import measure_exit_cost, run_lab

ANCHOR_USERSPACE_NS = 9600.0
ANCHOR_IOEVENTFD_NS = 1900.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--writes", type=int, default=20000)
    args = parser.parse_args()

    def med(values: list[float]) -> float:
        return statistics.median(values)

    print(f"exit cost, {args.writes} writes, median of {args.repeats}:")
    per_write: dict[str, float] = {}
    for handling in ("userspace", "ioeventfd", "none"):
        per_write[handling] = med(
            [measure_exit_cost(args.writes, handling).per_write_ns for _ in range(args.repeats)]
        )
    for handling, anchor in (
        ("userspace", ANCHOR_USERSPACE_NS),
        ("ioeventfd", ANCHOR_IOEVENTFD_NS),
        ("none", None),
    ):
        vs = (
            f"  ({per_write[handling] / anchor:.2f}x the {anchor / 1e3:.1f} us anchor)"
            if anchor
            else ""
        )
        print(f"  {handling:10s} {per_write[handling] / 1e3:8.2f} us per loop iteration{vs}")
    print(
        f"  user space / ioeventfd: {per_write['userspace'] / per_write['ioeventfd']:.1f}x "
        f"(anchor {ANCHOR_USERSPACE_NS / ANCHOR_IOEVENTFD_NS:.1f}x); without the loop's own "
        f"cost: {(per_write['userspace'] - per_write['none']) / 1e3:.2f} us vs "
        f"{(per_write['ioeventfd'] - per_write['none']) / 1e3:.2f} us"
    )

    print(f"\nper request, {args.requests} requests of 4096 bytes, median of {args.repeats}:")
    rows = [("emulated", 1, 1, "poll")] + [
        ("virtio", b, 256, w) for w in ("poll", "irq") for b in (1, 8, 32)
    ]
    base = None
    for device, batch, ring, wait in rows:
        results = [
            run_lab(device, args.requests, batch, ring, 4096, wait=wait)
            for _ in range(args.repeats)
        ]
        rate = med([r.requests_per_s for r in results])
        exits = med([r.userspace_exits / r.requests for r in results])
        kicks = med([r.kicks / r.requests for r in results])
        p50 = med([r.latency_ns["p50"] for r in results])
        base = base or rate
        print(
            f"  {device:8s} batch {batch:3d} {wait:4s} {1e9 / rate:9.0f} ns/request "
            f"{rate:9.0f} requests/s ({rate / base:4.2f}x emulated)  "
            f"exits/request {exits:5.3f}  kicks/request {kicks:5.3f}  p50 {p50 / 1e3:7.1f} us"
        )


if __name__ == "__main__":
    main()
