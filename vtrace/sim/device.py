"""The device: how long it takes to serve one request (per request plus per byte).

Service times are drawn up front from the run's seeded generator, one per request, so the
hot path only indexes a list and a fixed seed gives the same run.
"""

from __future__ import annotations

import numpy as np

from vtrace.sim.config import Config


def service_times_ns(cfg: Config, rng: np.random.Generator, n: int) -> list[float]:
    """Service time of each of ``n`` requests, in ns."""
    if cfg.kind == "queue":
        q = cfg.values["queue"]
        if q["service_mean_ns"] > 0:
            return rng.exponential(q["service_mean_ns"], n).tolist()
        return [q["service_ns"]] * n
    d = cfg.values["device"]
    fixed = d["per_byte_ns"] * cfg.values["workload"]["request_bytes"]
    if d["service_distribution"] == "exponential" and d["service_ns"] > 0:
        return (rng.exponential(d["service_ns"], n) + fixed).tolist()
    return [d["service_ns"] + fixed] * n
