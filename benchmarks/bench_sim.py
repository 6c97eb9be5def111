"""Model speed: simulated requests per second of the virtio model against a bare SimPy M/M/1.

The anchor (about 100-115 k M/M/1 customers/s with SimPy on the development machines,
docs/sources.md) is measured in
the same run: a Resource with one server, one process per customer, exponential
inter-arrival and service times at rho = 0.5. Goal: the single-queue models at least 40 % of
the anchor's rate, and 1M-request runs (one queue; 4 vCPUs x 4 queues) in under a minute.

    .venv/bin/python benchmarks/bench_sim.py            # medians of 3, plus the 1M replay
    .venv/bin/python benchmarks/bench_sim.py --quick    # skip the 1M replay
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import numpy as np
import simpy

from vtrace.sim import load_config, simulate

CUSTOMERS = 100_000
# a 4-vCPU guest with a 4-queue virtio-blk, one job per vCPU, a thread per queue
MULTI_QUEUE = {
    "vm.vcpus": 4,
    "virtqueue.queues": 4,
    "workload.jobs": 4,
    "backend.threads": "per_queue",
    "device.max_outstanding": 32,
    "workload.warmup_requests": 1000,
}


def bare_mm1(customers: int, seed: int = 1) -> float:
    """Customers per second of wall time for a textbook SimPy M/M/1."""
    rng = np.random.default_rng(seed)
    gaps = rng.exponential(20_000.0, customers).tolist()
    services = rng.exponential(10_000.0, customers).tolist()
    env = simpy.Environment()
    server = simpy.Resource(env, capacity=1)

    def customer(env: simpy.Environment, service_ns: float):
        with server.request() as req:
            yield req
            yield env.timeout(service_ns)

    def source(env: simpy.Environment):
        for gap, service in zip(gaps, services, strict=True):
            yield env.timeout(gap)
            env.process(customer(env, service))

    t0 = time.perf_counter()
    env.process(source(env))
    env.run()
    return customers / (time.perf_counter() - t0)


def model_rate(model: str, requests: int, **overrides: object) -> tuple[float, float]:
    """Simulated requests per second of wall time (whole run: setup, engine, frame, summary)."""
    cfg = load_config(model, {"workload.requests": requests, **overrides})
    t0 = time.perf_counter()
    simulate(cfg)
    wall = time.perf_counter() - t0
    return requests / wall, wall


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="skip the 1M-request replay")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    anchor = statistics.median(bare_mm1(CUSTOMERS) for _ in range(args.repeats))
    print(
        f"bare SimPy M/M/1 (Resource + timeout): {anchor:,.0f} customers/s (median of {args.repeats})"
    )
    for model in ("virtio-blk", "virtio-net", "vhost-net", "lab-virtio", "ide-emulated", "mm1"):
        rate = statistics.median(model_rate(model, CUSTOMERS)[0] for _ in range(args.repeats))
        print(f"  {model:15s} {rate:10,.0f} requests/s   {rate / anchor:6.1%} of the M/M/1 anchor")
    if not args.quick:
        rate, wall = model_rate("virtio-net", 1_000_000, **{"workload.warmup_requests": 1000})
        print(f"1M-request virtio-net run: {wall:.1f} s ({rate:,.0f} requests/s), goal < 60 s")
        rate, wall = model_rate("virtio-blk", 1_000_000, **MULTI_QUEUE)
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(
            f"1M-request virtio-blk, 4 vCPUs x 4 queues: {wall:.1f} s ({rate:,.0f} requests/s), "
            f"goal < 60 s; peak RSS of this process {peak_mib:,.0f} MiB"
        )


if __name__ == "__main__":
    main()
