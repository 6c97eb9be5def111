"""Bounded records of a lab run: whatever the number of requests, memory stays the same.

A lab run may take 2^31 requests. The device models note each request's timestamps in
plain lists (the cheapest thing to do in the hot path) and fold them every
:data:`CHUNK_REQUESTS` requests into

- a :class:`LatencyStats`: count and sum (an exact mean), every value while there are at
  most :data:`EXACT_VALUES` (percentiles as numpy computes them), and always a fixed
  log-scale histogram (:data:`BINS_PER_OCTAVE` bins per doubling) that gives the
  percentiles beyond that within 0.3 %;
- an :class:`EventLog`: each chunk's events frame goes to a recording as it is made, and
  the first :data:`KEEP_EVENTS` rows stay in memory for the result.

The module's limits are read when a run starts, so a test can make them small.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable

import numpy as np
import polars as pl

from vtrace import schema

# Requests per fold: the lists never hold more (a fold of 65,536 takes about 10 ms).
CHUNK_REQUESTS = 1 << 16
# Latencies kept as they are; beyond this many the percentiles come from the histogram.
EXACT_VALUES = 1 << 16
# Events rows a result keeps in memory (about 10 MB); a recording gets every row.
KEEP_EVENTS = 1 << 17
# 128 bins per doubling: a bin is 0.54 % wide, its middle within 0.27 % of any value in it.
BINS_PER_OCTAVE = 128
_BINS = 64 * BINS_PER_OCTAVE + 1  # bin 0 holds 0; nanosecond values stay below 2^64


def as_array(values: list[int], dtype: type = np.int64) -> np.ndarray:
    """A list of Python ints as an array (``fromiter`` with the length: twice as fast as
    ``asarray``, which first scans the list for a type)."""
    return np.fromiter(values, dtype=dtype, count=len(values))


def _bin(values: np.ndarray) -> np.ndarray:
    """The histogram bin of each value: 0 for 0, else 1 + floor(log2(v) x bins per octave)."""
    v = np.maximum(values, 0).astype(np.float64)
    out = np.zeros(v.shape, dtype=np.int64)
    pos = v >= 1
    out[pos] = 1 + np.floor(np.log2(v[pos]) * BINS_PER_OCTAVE).astype(np.int64)
    return np.minimum(out, _BINS - 1)


def _bin_value(i: np.ndarray) -> np.ndarray:
    """The value a bin stands for: the geometric middle of its bounds."""
    return np.where(i == 0, 0.0, np.exp2((i - 0.5) / BINS_PER_OCTAVE))


class LatencyStats:
    """Count, mean and percentiles of non-negative nanosecond values, in bounded memory."""

    def __init__(self, exact_max: int | None = None) -> None:
        self.exact_max = EXACT_VALUES if exact_max is None else exact_max
        self.n = 0
        self.total = 0  # exact (Python int): the mean of 2^31 values loses nothing
        self.lo = 0
        self.hi = 0
        self._exact: list[np.ndarray] | None = []  # None once past exact_max
        self._bins = np.zeros(_BINS, dtype=np.int64)

    def add(self, values: np.ndarray) -> None:
        """Fold in a chunk of values (vectorised: one pass over the chunk)."""
        v = np.asarray(values, dtype=np.int64)
        if v.size == 0:
            return
        lo, hi = int(v.min()), int(v.max())
        self.lo, self.hi = (lo, hi) if self.n == 0 else (min(self.lo, lo), max(self.hi, hi))
        self.n += v.size
        # exact for any chunk: a plain int64 sum wraps past 2^63, so add the high and low 32
        # bits apart (each sum fits while the chunk has under 2^31 values)
        self.total += (int((v >> 32).sum()) << 32) + int((v & 0xFFFFFFFF).sum())
        self._bins += np.bincount(_bin(v), minlength=_BINS)
        if self._exact is not None:
            if self.n <= self.exact_max:
                self._exact.append(v.copy())
            else:
                self._exact = None  # the histogram has them all

    @classmethod
    def merged(cls, parts: Iterable[LatencyStats]) -> LatencyStats:
        """One set of statistics over the values of several (the queues of a run)."""
        parts = [p for p in parts if p.n]
        out = cls(max((p.exact_max for p in parts), default=None))
        for p in parts:
            out.lo, out.hi = (p.lo, p.hi) if out.n == 0 else (min(out.lo, p.lo), max(out.hi, p.hi))
            out.n += p.n
            out.total += p.total
            out._bins += p._bins
            if out._exact is not None and p._exact is not None and out.n <= out.exact_max:
                out._exact.extend(p._exact)
            else:
                out._exact = None  # the histogram has them all
        return out

    @property
    def exact(self) -> bool:
        """Whether the percentiles are numpy's on every value (else the histogram's)."""
        return self._exact is not None

    def percentiles(self, qs: list[float]) -> list[float]:
        """Percentiles ``qs`` (0-100) with numpy's linear interpolation between ranks."""
        if self.n == 0:
            return [0.0] * len(qs)
        if self._exact is not None:
            return [float(x) for x in np.percentile(np.concatenate(self._exact), qs)]
        ranks = np.asarray(qs, dtype=np.float64) / 100 * (self.n - 1)
        below = np.floor(ranks).astype(np.int64)
        above = np.minimum(below + 1, self.n - 1)
        cum = np.cumsum(self._bins)
        # The value at rank k is in the first bin whose cumulative count exceeds k.
        at_below = _bin_value(np.searchsorted(cum, below, side="right"))
        at_above = _bin_value(np.searchsorted(cum, above, side="right"))
        est = at_below + (ranks - below) * (at_above - at_below)
        return [float(x) for x in np.clip(est, self.lo, self.hi)]

    def summary(self) -> dict[str, float]:
        """Mean, median and 99th percentile (zeros when there are no values)."""
        p50, p99 = self.percentiles([50, 99])
        return {"mean": self.total / self.n if self.n else 0.0, "p50": p50, "p99": p99}


class EventLog:
    """A run's events frames as they are made: each goes to ``sink`` (a recording's
    ``add_events``), the first ``keep`` rows stay for the result, ``total`` counts all.

    Several back-end threads (one per queue) add to one log: a lock keeps the count, the
    kept rows and the sink's writes whole.
    """

    def __init__(
        self, sink: Callable[[pl.DataFrame], None] | None = None, keep: int | None = None
    ) -> None:
        self.sink = sink
        self.keep = KEEP_EVENTS if keep is None else keep
        self.total = 0
        self._kept: list[pl.DataFrame] = []
        self._kept_rows = 0
        self._lock = threading.Lock()

    def add(self, rows: int, build: Callable[[], pl.DataFrame]) -> None:
        """Count ``rows`` events; build their frame only if a sink or the kept rows want it."""
        with self._lock:
            self.total += rows
            if rows == 0 or (self.sink is None and self._kept_rows >= self.keep):
                return
            frame = build()
            if self.sink is not None:
                self.sink(frame)
            if self._kept_rows < self.keep:
                head = frame.head(self.keep - self._kept_rows)
                self._kept.append(head)
                self._kept_rows += head.height

    def frame(self) -> pl.DataFrame:
        """The kept rows: the run's first events, in time order (the folds of several
        threads interleave)."""
        if not self._kept:
            return schema.empty_events()
        if len(self._kept) == 1:
            return self._kept[0]
        return pl.concat(self._kept).sort("ts_ns", maintain_order=True)
