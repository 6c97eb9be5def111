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
    """A measured law as its quantiles at 5 % steps, least first (to 0.1)."""
    return [round(float(v), 1) for v in np.quantile(samples, np.linspace(0.0, 1.0, QUANTILES))]
