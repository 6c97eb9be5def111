"""One model run from the outside: a model name or file, overrides, optionally a trace."""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

from vtrace.sim.config import Config, load_config
from vtrace.sim.engine import SimResult, simulate


def replay(
    model: str | os.PathLike[str] | Config,
    trace: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    requests: int | None = None,
    seed: int | None = None,
    arrival_event: str | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> SimResult:
    """Run ``model``; with ``trace``, its request arrivals (open loop) drive the guest."""
    cfg = model if isinstance(model, Config) else load_config(model)
    extra: dict[str, Any] = {}
    if requests is not None:
        extra["workload.requests"] = requests
        # a shorter run keeps its warm-up in proportion rather than failing on it
        extra["workload.warmup_requests"] = min(cfg["workload.warmup_requests"], requests // 5)
    if seed is not None:
        extra["workload.seed"] = seed
    if overrides:
        cfg = cfg.with_overrides(overrides)
    if extra:
        cfg = cfg.with_overrides(extra, where="--requests/--seed")
    if trace is None:
        return simulate(cfg, progress=progress)
    from vtrace import open_trace
    from vtrace.sim.workloads import trace_arrivals_ns
    from vtrace.store import check_whole

    opened = open_trace(trace)
    check_whole(opened, "its arrivals would have a hole where the missing events were")
    arrivals, event = trace_arrivals_ns(opened.events, arrival_event)
    if requests is None:
        n = max(1, len(arrivals))
        warmup = min(cfg["workload.warmup_requests"], n // 5)
        cfg = cfg.with_overrides(
            {"workload.requests": n, "workload.warmup_requests": warmup}, where=str(trace)
        )
    result = simulate(cfg, arrivals, progress)
    result.summary["trace"] = str(trace)
    result.summary["arrival_event"] = event
    return result
