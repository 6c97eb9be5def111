"""The device: how long it takes to serve one request (a service law plus a cost per byte).

Laws (``device.service_distribution``; the reference queue's ``queue.service_distribution``):

* ``deterministic``: every request takes the mean;
* ``exponential``: mean ``service_ns`` (coefficient of variation 1);
* ``lognormal``: mean and coefficient of variation ``service_cv``; the underlying normal has
  ``sigma^2 = ln(1 + cv^2)`` and ``mu = ln(mean) - sigma^2 / 2``, so the mean and cv come out
  as given (a heavy right tail, like a real disk's);
* ``empirical``: the durations a trace measured, drawn with replacement as given: from each
  ``virtqueue_pop`` to the ``virtqueue_flush`` that completed it (QEMU) or ``lab_pop`` to
  ``lab_complete`` (the lab), as :func:`vtrace.analyze.requests` pairs them.

The device adds ``per_byte_ns x request_bytes`` (copies, DMA) to every law's draw.
Service times are drawn in vectorised chunks from the run's seeded generator, so a fixed seed
gives the same run; a deterministic law draws nothing from it.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl

from vtrace.errors import VtraceError
from vtrace.sim.config import Config
from vtrace.store import open_trace

Sampler = Callable[[int], np.ndarray]  # k -> k service times in ns (float64)


def service_sampler(cfg: Config, rng: np.random.Generator) -> Sampler:
    """A function that draws ``k`` service times (ns) at a time from ``rng``."""
    if cfg.kind == "queue":
        q = cfg.values["queue"]
        law = q["service_distribution"]
        if law == "auto":  # the older files: service_ns is M/D/1, service_mean_ns is M/M/1
            law = "exponential" if q["service_mean_ns"] > 0 else "deterministic"
        mean = q["service_mean_ns"] if q["service_mean_ns"] > 0 else q["service_ns"]
        return law_sampler(law, mean, q["service_cv"], rng)
    d = cfg.values["device"]
    fixed = d["per_byte_ns"] * cfg.values["workload"]["request_bytes"]
    law = d["service_distribution"]
    durations = trace_service_ns(d["service_trace"], cfg.path) if law == "empirical" else None
    draw = law_sampler(law, d["service_ns"], d["service_cv"], rng, durations)
    if fixed == 0:
        return draw
    return lambda k: draw(k) + fixed


def service_times_ns(cfg: Config, rng: np.random.Generator, n: int) -> list[float]:
    """Service time of each of ``n`` requests, in ns."""
    return service_sampler(cfg, rng)(n).tolist()


def law_sampler(
    law: str,
    mean_ns: float,
    cv: float,
    rng: np.random.Generator,
    durations_ns: np.ndarray | None = None,
) -> Sampler:
    """Draws of one law: ``mean_ns`` and ``cv`` for the parametric ones, ``durations_ns``
    (the values to resample) for ``empirical``."""
    if law == "empirical":
        if durations_ns is None or len(durations_ns) == 0:
            raise ValueError("an empirical law needs the durations to draw from")
        values = durations_ns
        return lambda k: values[rng.integers(0, len(values), k)]
    if mean_ns <= 0 or law == "deterministic":
        return lambda k: np.full(k, float(mean_ns))
    if law == "exponential":
        return lambda k: rng.exponential(mean_ns, k)
    if law == "lognormal":
        sigma2 = np.log1p(cv * cv)
        mu, sigma = np.log(mean_ns) - sigma2 / 2, np.sqrt(sigma2)
        return lambda k: rng.lognormal(mu, sigma, k)
    raise ValueError(f"unknown service law {law!r}")


def trace_service_ns(path: str, where: str = "") -> np.ndarray:
    """The request durations (ns) a trace measured: pop to completion on the same queue.

    A missing or unreadable trace, or one without any completed request, is one
    :class:`VtraceError` line naming ``device.service_trace`` and the path. A relative path
    is taken from the current directory. The array is shared (read-only) between calls.
    """
    prefix = f"{where}: device.service_trace" if where else "device.service_trace"
    if not str(path):
        raise VtraceError(f"{prefix}: an empirical service law needs a trace directory")
    p = Path(path)
    try:
        trace = open_trace(p)  # its errors name the path as given
        stamp = tuple((f.name, f.stat().st_mtime_ns, f.stat().st_size) for f in trace.parts)
        measured = _durations(str(p.resolve()), stamp)
    except VtraceError as e:
        raise VtraceError(f"{prefix}: {e}") from None
    except (OSError, pl.exceptions.PolarsError) as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise VtraceError(f"{prefix}: {path}: unreadable trace: {first}") from None
    if len(measured) == 0:
        raise VtraceError(
            f"{prefix}: {path}: no request durations (needs virtqueue_pop and "
            "virtqueue_flush, or lab_pop and lab_complete events)"
        )
    return measured


@functools.lru_cache(maxsize=8)
def _durations(path: str, stamp: tuple[tuple[str, int, int], ...]) -> np.ndarray:
    """Durations of one trace; ``stamp`` (names, mtimes, sizes) keys the cache, so a trace
    written again is read again."""
    from vtrace.analyze import requests

    measured = (
        requests(open_trace(path).events)
        .filter(pl.col("latency_ns").is_not_null() & (pl.col("latency_ns") >= 0))
        .get_column("latency_ns")
        .cast(pl.Float64)
        .to_numpy()
        .copy()
    )
    measured.setflags(write=False)
    return measured


def merged_extra_ns(cfg: Config) -> float:
    """What each request after the first adds to a merged I/O: its bytes' ``per_byte_ns``."""
    values = cfg.values
    if "device" not in values or "workload" not in values:
        return 0.0
    return values["device"]["per_byte_ns"] * values["workload"]["request_bytes"]
