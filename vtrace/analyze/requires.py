"""Which events each analysis needs, and a check that says what a trace lacks.

Like LISA's ``@requires_events``: an analysis declares the events it derives from. When
none of them are in a trace the analysis returns an empty frame with its full schema (never
numbers made from the wrong events), and :func:`missing_events` tells the user what to
record.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TypeVar

import polars as pl

F = TypeVar("F", bound=Callable[..., object])


def requires_events(*names: str) -> Callable[[F], F]:
    """Declare the events an analysis is built from (any one of them gives rows)."""

    def mark(fn: F) -> F:
        fn.required_events = tuple(names)  # type: ignore[attr-defined]
        return fn

    return mark


def event_names(events: pl.LazyFrame | pl.DataFrame) -> set[str]:
    """The distinct event names in an events frame (one scan of the `event` column)."""
    return set(
        events.lazy().select(pl.col("event").unique().cast(pl.String)).collect().to_series()
    ) - {None}


def missing_events(analysis: Callable[..., object], present: Iterable[str]) -> tuple[str, ...]:
    """The events ``analysis`` declares that are not in ``present``."""
    have = set(present)
    return tuple(n for n in getattr(analysis, "required_events", ()) if n not in have)
