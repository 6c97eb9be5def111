"""A measured law kept as quantiles (vtrace.sim.samples.law) and drawn linearly between them
(vtrace.sim.draws.from_quantiles) keeps the samples' mean, heavy tail and all."""

from __future__ import annotations

import numpy as np
import pytest

from vtrace.sim.draws import from_quantiles
from vtrace.sim.samples import QUANTILES, law


def wakeups(rng: np.random.Generator) -> np.ndarray:
    """Wake-ups as this host gives them: 95 % within 20 to 40 us, most of the rest up to
    150 us, and one in a thousand 1 to 2 ms (the thread found its CPU taken)."""
    return np.concatenate(
        [
            rng.uniform(20_000, 40_000, 9_500),
            rng.uniform(40_000, 150_000, 490),
            rng.uniform(1_000_000, 2_000_000, 10),
        ]
    )


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_draws_from_a_law_keep_the_samples_mean(seed: int) -> None:
    samples = wakeups(np.random.default_rng(seed))
    q = law(samples)
    assert len(q) == QUANTILES and q == sorted(q)
    draws = from_quantiles(tuple(q), np.random.default_rng(seed + 10))
    drawn = np.array([draws.next() for _ in range(200_000)])
    # the largest sample as the last quantile drew the top 5 % uniformly up to it: a mean
    # twice too high on these samples
    assert drawn.mean() == pytest.approx(samples.mean(), rel=0.03)
    assert np.median(drawn) == pytest.approx(np.median(samples), rel=0.03)


def test_a_law_of_even_samples_is_their_quantiles() -> None:
    samples = np.arange(0.0, 2_001.0)  # 0 to 2000 evenly: the ends are the ends
    assert law(samples) == [float(v) for v in range(0, 2_001, 100)]
