"""Derived tables: pure functions from the events table to polars frames.

Each analysis takes the events (a LazyFrame from :func:`vtrace.open_trace`, or a
DataFrame) and returns a DataFrame; its ``*_plan`` twin returns the LazyFrame so several
can be collected together. An analysis whose events are absent returns an empty frame
with its full schema; ``fn.required_events`` names what it needs.
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
    "ANALYSES",
    "accesses",
    "accesses_by_target",
    "accesses_plan",
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
    "user_exits",
    "user_exits_plan",
]
