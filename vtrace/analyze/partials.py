"""Distributions merged chunk by chunk: count, total, mean, percentiles and max of a duration
per group, in memory that does not grow with the trace.

:class:`DurationStats` keeps, per group, the number of rows, of values, their total and
maximum (exact, whatever the size), and how often each value occurred. Percentiles are read
off those counts the way polars' ``quantile(q, "nearest")`` picks them, so they are the
same numbers as over the whole column. While the trace has at most ``exact_limit`` distinct
(group, value) pairs (a million by default) every figure is exact. Past that, values are
kept to :data:`SIGNIFICANT_BITS` significant bits: a percentile is then an observed value
from the same bucket as the exact one, never larger, and less than 2**-(bits - 1) of it
smaller (0.05% for 12 bits; values below 2**12 stay exact). Counts, totals, means, maxima
and log2 histograms stay exact.
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

from vtrace.analyze.distributions import QUANTILES, _unit, log2_bucket

# Distinct (group, value) pairs kept exactly; about 24 bytes each.
EXACT_LIMIT = 1 << 20
# Significant bits a value keeps once the pairs pass EXACT_LIMIT: a bucket is at most
# 2**-(bits-1) of its values wide, and a group has at most 2**(bits-1) buckets per octave.
SIGNIFICANT_BITS = 12
# Partial results held before they are merged into one (a trace of many chunks).
MERGE_EVERY = 64


def relative_error_bound(bits: int = SIGNIFICANT_BITS) -> float:
    """The most a percentile can be below the exact one, as a fraction of it, once values
    are bucketed: a bucket of values with b bits spans 2**(b - bits) of them, 2**(b - 1) at
    least."""
    return 2.0 ** (1 - bits)


def bucket_floor(col: str, bits: int = SIGNIFICANT_BITS) -> pl.Expr:
    """``col`` with its magnitude cut to ``bits`` significant bits (toward zero): the bucket a
    value falls in. Values below 2**bits are their own bucket."""
    magnitude = pl.col(col).abs()
    width = 64 - magnitude.cast(pl.UInt64).bitwise_leading_zeros().cast(pl.Int64)
    step = pl.lit(2, pl.Int64).pow((width - bits).clip(lower_bound=0))
    return (pl.col(col).sign() * (magnitude // step) * step).alias("_bucket")


class DurationStats:
    """Count, total, mean, percentiles and max of one duration column per group, added to a
    chunk at a time (see the module's docstring for what stays exact)."""

    def __init__(self, keys: Sequence[str], col: str, *, exact_limit: int = EXACT_LIMIT) -> None:
        self.keys = list(keys)
        self.col = col
        self.exact_limit = exact_limit
        self.exact = True
        self._stats: list[pl.DataFrame] = []
        self._counts: list[pl.DataFrame] = []
        self._pending = 0  # rows in _counts since the last merge

    def add(self, frame: pl.DataFrame) -> None:
        """Add rows (the keys and the value column; a null value is a row without a value)."""
        if frame.height == 0:
            return
        c = pl.col(self.col)
        self._stats.append(
            frame.group_by(self.keys).agg(
                pl.len().cast(pl.Int64).alias("_rows"),
                c.count().cast(pl.Int64).alias("_count"),
                c.sum().cast(pl.Int64).alias("_total"),
                c.max().cast(pl.Int64).alias("_max"),
            )
        )
        counts = self._value_counts(frame.filter(c.is_not_null()).lazy()).collect()
        self._counts.append(counts)
        self._pending += counts.height
        if self._pending > self.exact_limit or len(self._counts) > MERGE_EVERY:
            self._merge()

    def _value_counts(self, frame: pl.LazyFrame, weight: str | None = None) -> pl.LazyFrame:
        """(keys, value, n): how often each value occurred; bucketed once no longer exact
        (the value kept is the bucket's smallest, an observed one)."""
        n = pl.col(weight).sum() if weight else pl.len()
        if self.exact:
            return frame.group_by(*self.keys, self.col).agg(n.cast(pl.Int64).alias("_n"))
        return (
            frame.group_by(*self.keys, bucket_floor(self.col))
            .agg(pl.col(self.col).min(), n.cast(pl.Int64).alias("_n"))
            .drop("_bucket")
        )

    def _merge(self) -> None:
        """Merge the value counts into one table; past ``exact_limit`` pairs, bucket them."""
        if self._counts:
            merged = self._counts[0]
            if len(self._counts) > 1:
                merged = self._value_counts(pl.concat(self._counts).lazy(), "_n").collect()
            if self.exact and merged.height > self.exact_limit:
                self.exact = False
                merged = self._value_counts(merged.lazy(), "_n").collect()
            self._counts = [merged]
        if len(self._stats) > 1:
            self._stats = [self._merged_stats(self.keys)]
        self._pending = 0

    def _merged_stats(self, by: Sequence[str]) -> pl.DataFrame:
        return (
            pl.concat(self._stats)
            .group_by(by)
            .agg(pl.col("_rows", "_count", "_total").sum(), pl.col("_max").max())
        )

    def table(self, by: Sequence[str]) -> pl.DataFrame:
        """Per ``by`` group (a subset of the keys): `rows`, then what
        :func:`~vtrace.analyze.distributions.percentile_exprs` gives: `count` (values),
        `total{unit}`, `mean{unit}`, `p50{unit}` ... `p999{unit}` (nearest observed values),
        `max{unit}`. Empty (no columns) when nothing was added."""
        if not self._stats:
            return pl.DataFrame()
        self._merge()
        by = list(by)
        unit = _unit(self.col)
        stats = self._merged_stats(by)
        counts = pl.concat(self._counts).lazy()
        if self.exact:
            counts = counts.group_by(*by, self.col).agg(pl.col("_n").sum())
        else:
            counts = (
                counts.group_by(*by, bucket_floor(self.col))
                .agg(pl.col(self.col).min(), pl.col("_n").sum())
                .drop("_bucket")
            )
        # polars' "nearest" quantile of n sorted values is the one at round((n - 1) * q).
        n = pl.col("_n")
        ranked = counts.sort(*by, self.col).with_columns(
            n.cum_sum().over(by).alias("_upto"), n.sum().over(by).alias("_of")
        )
        picks = ranked.group_by(by).agg(
            pl.col(self.col)
            .filter(pl.col("_upto") > ((pl.col("_of") - 1) * q + 0.5).floor())
            .first()
            .cast(pl.Int64)
            .alias(f"{name}{unit}")
            for name, q in QUANTILES.items()
        )
        total = pl.col("_total")
        return (
            stats.lazy()
            .join(picks, on=by, how="left", nulls_equal=True)
            .select(
                *by,
                pl.col("_rows").alias("rows"),
                pl.col("_count").alias("count"),
                total.alias(f"total{unit}"),
                pl.when(pl.col("_count") > 0)
                .then(total / pl.col("_count"))
                .cast(pl.Float64)
                .alias(f"mean{unit}"),
                *(pl.col(f"{name}{unit}") for name in QUANTILES),
                pl.col("_max").alias(f"max{unit}"),
            )
            .collect()
        )

    def histogram(self) -> pl.DataFrame:
        """Log2 buckets of the non-negative values: `bucket`, `count` (exact: a bucketed value
        keeps its top bit, so it stays in its power of two)."""
        if not self._counts:
            return pl.DataFrame(schema={"bucket": pl.Int64, "count": pl.Int64})
        self._merge()
        return (
            pl.concat(self._counts)
            .lazy()
            .filter(pl.col(self.col) >= 0)
            .group_by(log2_bucket(self.col))
            .agg(pl.col("_n").sum().cast(pl.Int64).alias("count"))
            .sort("bucket")
            .collect()
        )
