"""Derived tables: pure functions from the events table to polars frames.

Each analysis takes the events (a LazyFrame from :func:`vtrace.open_trace`, or a
DataFrame) and returns a DataFrame; its ``*_plan`` twin returns the LazyFrame so several
can be collected together. An analysis whose events are absent returns an empty frame
with its full schema; ``fn.required_events`` names what it needs. :mod:`vtrace.analyze.tables`
runs each of them on a trace of any length in bounded memory (:func:`write_table`,
:func:`aggregate`).
"""

from __future__ import annotations

from vtrace.analyze.accesses import accesses, accesses_by_target, accesses_plan
from vtrace.analyze.distributions import log2_histogram, percentiles
from vtrace.analyze.exits import by_reason, exits, exits_plan, user_exits, user_exits_plan
from vtrace.analyze.interrupts import interrupts, interrupts_by_line, interrupts_plan
from vtrace.analyze.kicks import kicks, kicks_by_queue, kicks_plan
from vtrace.analyze.requests import batching, batching_plan, requests, requests_plan
from vtrace.analyze.requires import event_names, missing_events
from vtrace.analyze.summary import summary
from vtrace.analyze.tables import (
    AGGREGATES,
    ROW_TABLES,
    aggregate,
    table_chunks,
    table_histogram,
    table_percentiles,
    write_table,
)

# Analysis name -> plan function (each carries `required_events`).
ANALYSES = {
    "exits": exits_plan,
    "user_exits": user_exits_plan,
    "accesses": accesses_plan,
    "kicks": kicks_plan,
    "requests": requests_plan,
    "interrupts": interrupts_plan,
}

__all__ = [
    "AGGREGATES",
    "ANALYSES",
    "ROW_TABLES",
    "accesses",
    "accesses_by_target",
    "accesses_plan",
    "aggregate",
    "batching",
    "batching_plan",
    "by_reason",
    "event_names",
    "exits",
    "exits_plan",
    "interrupts",
    "interrupts_by_line",
    "interrupts_plan",
    "kicks",
    "kicks_by_queue",
    "kicks_plan",
    "log2_histogram",
    "missing_events",
    "percentiles",
    "requests",
    "requests_plan",
    "summary",
    "table_chunks",
    "table_histogram",
    "table_percentiles",
    "user_exits",
    "user_exits_plan",
    "write_table",
]
