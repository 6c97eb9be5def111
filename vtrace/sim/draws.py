"""Random values an actor needs one at a time, drawn in vectorised chunks.

Drawing a whole run's values up front holds memory in proportion to the run; drawing one
at a time from numpy is slow. A :class:`Draws` keeps one chunk and refills it, so the hot
path pays a list index and the memory stays that of one chunk.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

CHUNK = 16_384


class Draws:
    """``next()`` values of ``draw(k)``, ``CHUNK`` at a time; a constant when ``draw`` is None."""

    __slots__ = ("_constant", "_draw", "_i", "_values")

    def __init__(self, draw: Callable[[int], np.ndarray] | None, constant: float = 0.0) -> None:
        self._draw = draw
        self._constant = constant
        self._values: list[float] = []
        self._i = 0

    @property
    def constant(self) -> bool:
        return self._draw is None

    def next(self) -> float:
        if self._draw is None:
            return self._constant
        i = self._i
        if i >= len(self._values):
            self._values = self._draw(CHUNK).tolist()
            i = 0
        self._i = i + 1
        return self._values[i]


def stalled(base_ns: float, probability: float, stall_ns: float, rng: np.random.Generator) -> Draws:
    """``base_ns`` per step plus, now and then (a thread the host preempted, with
    ``probability`` per step), an exponential extra delay of mean ``stall_ns``."""
    if probability <= 0 or stall_ns <= 0:
        return Draws(None, base_ns)

    def draw(k: int) -> np.ndarray:
        hit = rng.random(k) < probability
        return base_ns + rng.exponential(stall_ns, k) * hit

    return Draws(draw)


def from_quantiles(quantiles: tuple[float, ...], rng: np.random.Generator) -> Draws | None:
    """Draws from a measured law given by its quantiles at equal steps (the least first,
    the most last): a uniform draw mapped through the piecewise-linear inverse CDF. None
    when no law is given."""
    if not quantiles:
        return None
    q = np.asarray(quantiles, dtype=float)
    steps = np.linspace(0.0, 1.0, len(q))

    def draw(k: int) -> np.ndarray:
        return np.interp(rng.random(k), steps, q)

    return Draws(draw)
