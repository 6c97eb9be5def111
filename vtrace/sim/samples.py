"""Summaries of measured samples that calibration writes into a model.

A rare host preemption of milliseconds would swamp a few hundred samples of a cost the
model takes as a mean, so means are taken below the 99th percentile; a law the model draws
from is kept as its quantiles at equal steps (:func:`vtrace.sim.draws.from_quantiles`).
"""

from __future__ import annotations

import math

import numpy as np

QUANTILES = 21  # a measured law is kept as its quantiles at 5 % steps


def trimmed_mean(samples: list[np.ndarray | None]) -> float:
    """Mean of every sample below the 99th percentile; nan when there are none."""
    present = [s for s in samples if s is not None and s.size]
    if not present:
        return math.nan
    joined = np.concatenate(present)
    return float(joined[joined <= np.percentile(joined, 99)].mean())


def law(samples: np.ndarray) -> list[float]:
    """A measured law as its quantiles at 5 % steps, least first (to 0.1).

    The model draws linearly between them, so a segment stands for its samples' mean only
    where they are spread evenly across it. The two end ones are not: the top 5 % of a
    wake-up's samples run from tens of microseconds to a rare millisecond. So the ends are
    placed where the end segments keep their samples' means (twice the mean less the inner
    quantile): the law keeps the samples' mean, where the largest sample as the end drew
    wake-ups twice as long on average as measured."""
    s = np.sort(np.asarray(samples, dtype=float))
    steps = np.linspace(0.0, 1.0, QUANTILES)
    q = np.quantile(s, steps)
    n = s.size
    top = s[math.floor(steps[-2] * n) :]
    bottom = s[: max(1, math.ceil(steps[1] * n))]
    q[-1] = max(q[-2], 2.0 * top.mean() - q[-2])
    q[0] = min(q[1], max(0.0, 2.0 * bottom.mean() - q[1]))
    return [round(float(v), 1) for v in q]
