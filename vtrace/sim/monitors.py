"""What a run records, in memory that does not grow with the requests simulated.

Per request, exactly, for the first :data:`EXACT_REQUESTS` requests (the per-request frame
of a result); beyond that only streaming sums and a fixed log-spaced latency histogram
(1 % wide bins), so a run of 10^8 requests fits in the memory of a run of 10^6. The
actors write through a few named operations; the summary reads :meth:`RunMonitor.frame`
and :meth:`RunMonitor.tail`.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import polars as pl

EXACT_REQUESTS = 1_000_000
HIST_BASE = 1.01  # relative width of a latency bin
HIST_BINS = 3600  # 1.01 ** 3600 ns is far beyond any simulated latency
FOLD_EVERY = 65_536  # latencies gathered before they are folded into the histogram
PROGRESS_EVERY = 1 << 16  # completions between two progress reports


@dataclass
class Tail:
    """Requests past the exact window that are measured (after the warm-up)."""

    requests: int = 0
    completed: int = 0
    dropped: int = 0
    exits: int = 0
    userspace_exits: int = 0
    kicks: int = 0
    interrupts: int = 0
    latency_sum_ns: float = 0.0
    last_complete_ns: float = 0.0


class LatencyHistogram:
    """Log-spaced latency histogram: counts per 1 % bin, folded in numpy batches."""

    def __init__(self) -> None:
        self.counts = np.zeros(HIST_BINS, dtype=np.int64)
        self.pending: list[float] = []

    def add(self, latency_ns: float) -> None:
        self.pending.append(latency_ns)
        if len(self.pending) >= FOLD_EVERY:
            self.fold()

    def add_many(self, latencies_ns: np.ndarray) -> None:
        self.fold()
        self._fold(latencies_ns)

    def fold(self) -> None:
        if self.pending:
            self._fold(np.asarray(self.pending, dtype=np.float64))
            self.pending.clear()

    def _fold(self, values: np.ndarray) -> None:
        b = np.floor(np.log(np.maximum(values, 1.0)) / math.log(HIST_BASE)).astype(np.int64)
        np.add.at(self.counts, np.clip(b, 0, HIST_BINS - 1), 1)

    def quantile(self, q: float) -> float:
        """The ``q`` quantile, to within a bin (1 %): the bin's geometric middle."""
        self.fold()
        total = int(self.counts.sum())
        if not total:
            return 0.0
        k = int(np.searchsorted(np.cumsum(self.counts), q * total, side="left"))
        return HIST_BASE ** (k + 0.5)


class RunMonitor:
    """Per-request records (exact window) and streaming totals (beyond it)."""

    def __init__(self, n: int, warmup: int, exact: int | None = None) -> None:
        self.n = n
        self.warmup = warmup
        self.exact = k = min(n, EXACT_REQUESTS if exact is None else exact)
        nan = math.nan
        self.submit_ns = [nan] * k
        self.start_ns = [nan] * k
        self.complete_ns = [nan] * k
        self.exits = [0] * k
        self.userspace_exits = [0] * k
        self.kicks = [0] * k
        self.irqs = [0] * k
        self.dropped = [False] * k
        self.tail = Tail()
        self.histogram = LatencyHistogram() if n > k else None
        # in flight past the window: submit time, until the request completes
        self._tail_submit: dict[int, float] = {}
        # run counters
        self.kicks_suppressed = 0
        self.backend_wakeups = 0
        self.ring_full_stalls = 0
        self.empty_polls = 0
        self.backend_busy_ns = 0.0
        self.completed = 0
        self.end_ns = 0.0
        self.progress: Callable[[int, int], None] | None = None  # (completed, requests)

    def _measured_tail(self, request: int) -> bool:
        return request >= self.exact and request >= self.warmup

    # -- the actors' operations ------------------------------------------------------------
    def submitted(self, request: int, at_ns: float) -> None:
        if request < self.exact:
            self.submit_ns[request] = at_ns
        else:
            self._tail_submit[request] = at_ns
            if request >= self.warmup:
                self.tail.requests += 1

    def started(self, request: int, at_ns: float) -> None:
        if request < self.exact:
            self.start_ns[request] = at_ns

    def completed_at(self, request: int, at_ns: float) -> None:
        self.completed += 1
        if self.progress is not None and not self.completed % PROGRESS_EVERY:
            self.progress(self.completed, self.n)
        if at_ns > self.end_ns:
            self.end_ns = at_ns
        if request < self.exact:
            self.complete_ns[request] = at_ns
            return
        submit = self._tail_submit.pop(request)
        if request >= self.warmup:
            t = self.tail
            t.completed += 1
            t.latency_sum_ns += at_ns - submit
            if at_ns > t.last_complete_ns:
                t.last_complete_ns = at_ns
            self.histogram.add(at_ns - submit)

    def dropped_at(self, request: int, at_ns: float) -> None:
        if request < self.exact:
            self.dropped[request] = True
            self.submit_ns[request] = at_ns
        else:
            self._tail_submit.pop(request, None)
            if request >= self.warmup:
                self.tail.requests += 1
                self.tail.dropped += 1

    def exit(self, request: int, exits: int, userspace_exits: int) -> None:
        if request < self.exact:
            self.exits[request] += exits
            self.userspace_exits[request] += userspace_exits
        elif request >= self.warmup:
            self.tail.exits += exits
            self.tail.userspace_exits += userspace_exits

    def kick(self, request: int) -> None:
        if request < self.exact:
            self.kicks[request] += 1
            self.exits[request] += 1
        elif request >= self.warmup:
            self.tail.kicks += 1
            self.tail.exits += 1

    def interrupt(self, request: int) -> None:
        if request < self.exact:
            self.irqs[request] += 1
        elif request >= self.warmup:
            self.tail.interrupts += 1

    # -- the run's records ---------------------------------------------------------------
    def frame(self) -> pl.DataFrame:
        """The exact window as one frame (times in ns from the start of the run)."""
        return pl.DataFrame(
            {
                "request": np.arange(self.exact, dtype=np.int64),
                "submit_ns": np.asarray(self.submit_ns, dtype=np.float64),
                "start_ns": np.asarray(self.start_ns, dtype=np.float64),
                "complete_ns": np.asarray(self.complete_ns, dtype=np.float64),
                "exits": np.asarray(self.exits, dtype=np.int32),
                "userspace_exits": np.asarray(self.userspace_exits, dtype=np.int32),
                "kicks": np.asarray(self.kicks, dtype=np.int32),
                "interrupts": np.asarray(self.irqs, dtype=np.int32),
                "dropped": np.asarray(self.dropped, dtype=np.bool_),
            },
            nan_to_null=True,
        ).with_columns(latency_ns=pl.col("complete_ns") - pl.col("submit_ns"))
