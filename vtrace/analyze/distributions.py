"""Percentiles and log2 histograms of durations.

Every duration column in vtrace carries its unit in its name (`duration_ns`,
`latency_ns`); the summary columns keep that unit (`p99_ns`, `lo_ns`).
"""

from __future__ import annotations

from collections.abc import Sequence

import polars as pl

# The quantiles every duration is reported with, by column-name stem.
QUANTILES: dict[str, float] = {"p50": 0.50, "p90": 0.90, "p99": 0.99, "p999": 0.999}


def _unit(col: str) -> str:
    """The unit suffix of a column name (`_ns` of `duration_ns`), or '' when it has none."""
    stem, sep, unit = col.rpartition("_")
    return f"_{unit}" if sep and stem and unit in {"ns", "us", "ms", "s", "bytes"} else ""


def percentile_exprs(col: str, dtype: pl.DataType | None = pl.Int64) -> list[pl.Expr]:
    """Aggregations of one duration column: count, total, mean, p50/p90/p99/p999 and max.

    Quantiles use the nearest observed value, so every figure is a duration that happened;
    they are cast back to ``dtype`` (the column's type; None keeps floats). Nulls (unpaired
    exits, requests never completed) are not counted.
    """
    unit = _unit(col)
    c = pl.col(col)
    quantiles = [c.quantile(q, "nearest").alias(f"{name}{unit}") for name, q in QUANTILES.items()]
    if dtype is not None:
        quantiles = [q.cast(dtype) for q in quantiles]
    return [
        c.count().cast(pl.Int64).alias("count"),
        c.sum().alias(f"total{unit}"),
        c.mean().alias(f"mean{unit}"),
        *quantiles,
        c.max().alias(f"max{unit}"),
    ]


def percentiles(
    frame: pl.DataFrame | pl.LazyFrame, col: str, by: str | Sequence[str] | None = None
) -> pl.DataFrame:
    """Count, total, mean, p50, p90, p99, p999 and max of ``col``, overall or per ``by`` group.

    Output columns keep the unit of ``col``: for `duration_ns`, `count`, `total_ns`, `mean_ns`,
    `p50_ns`, `p90_ns`, `p99_ns`, `p999_ns`, `max_ns` (quantiles are nearest observed values).
    Grouped results are sorted by `total` descending.
    """
    lf = frame.lazy()
    dtype = lf.collect_schema()[col]
    exprs = percentile_exprs(col, dtype if dtype.is_integer() else None)
    if by is None:
        return lf.select(exprs).collect()
    keys = [by] if isinstance(by, str) else list(by)
    unit = _unit(col)
    return (
        lf.group_by(keys)
        .agg(exprs)
        .sort([f"total{unit}", *keys], descending=[True] + [False] * len(keys), nulls_last=True)
        .collect()
    )


def log2_bucket(col: str) -> pl.Expr:
    """Bucket index of a non-negative value: k such that 2**k <= value < 2**(k+1); 0 and 1 -> 0."""
    # Integer bit length rather than a float log2, so exact powers of two never land one
    # bucket low through rounding.
    v = pl.col(col).cast(pl.UInt64)
    return (64 - v.bitwise_leading_zeros().cast(pl.Int64) - 1).clip(lower_bound=0).alias("bucket")


def log2_histogram(
    frame: pl.DataFrame | pl.LazyFrame, col: str, by: str | Sequence[str] | None = None
) -> pl.DataFrame:
    """Log2 histogram of a non-negative column: one row per non-empty bucket.

    Columns: the ``by`` keys, `bucket` (k), `lo{unit}` = 2**k (0 for k = 0), `hi{unit}` =
    2**(k+1) (values v with lo <= v < hi), `count`, and `share` (of the group's count).
    Negative values are an error in the data, not a bucket: they are dropped here.
    """
    keys = [] if by is None else ([by] if isinstance(by, str) else list(by))
    lf = frame.lazy().filter(pl.col(col).is_not_null() & (pl.col(col) >= 0))
    counted = lf.group_by([*keys, log2_bucket(col)]).agg(pl.len().cast(pl.Int64).alias("count"))
    return log2_histogram_from_counts(counted, col, keys).collect()


def log2_histogram_from_counts(
    counted: pl.LazyFrame, col: str, keys: Sequence[str] = ()
) -> pl.LazyFrame:
    """:func:`log2_histogram` from the keys, `bucket` and `count` (one row per bucket of a
    group), as the counts of a trace's chunks merge into."""
    unit = _unit(col)
    keys = list(keys)
    total = pl.col("count").sum()
    return counted.with_columns(
        pl.when(pl.col("bucket") == 0)
        .then(0)
        .otherwise(2 ** pl.col("bucket"))
        .cast(pl.Int64)
        .alias(f"lo{unit}"),
        (2 ** (pl.col("bucket") + 1)).cast(pl.Int64).alias(f"hi{unit}"),
        (pl.col("count") / (total.over(keys) if keys else total)).alias("share"),
    ).sort([*keys, "bucket"])
