"""Property: for any interleaving of threads, exits() recovers each thread's exits exactly."""

from __future__ import annotations

import polars as pl
from hypothesis import given, settings
from hypothesis import strategies as st

from vtrace.analyze import exits, user_exits
from vtrace.schema import conform

# One exit: (gap before it, duration, handled in user space?, entry lost?)
exit_st = st.tuples(st.integers(1, 5_000), st.integers(2, 100_000), st.booleans(), st.booleans())
thread_st = st.lists(exit_st, min_size=1, max_size=30)


@settings(max_examples=60, deadline=None)
@given(threads=st.lists(thread_st, min_size=1, max_size=4), seed=st.integers(0, 2**16))
def test_exits_recovered_per_thread(threads: list[list[tuple]], seed: int) -> None:
    rows, expected = [], []
    for tid, thread in enumerate(threads, start=100):
        t = 0
        for gap, duration, user, lost in thread:
            t += gap
            rows.append({"ts_ns": t, "tid": tid, "event": "kvm_exit", "reason": 30,
                         "reason_name": "IO_INSTRUCTION"})  # fmt: skip
            if user:
                rows.append({"ts_ns": t + 1, "tid": tid, "event": "kvm_userspace_exit",
                             "reason": 2, "reason_name": "KVM_EXIT_IO"})  # fmt: skip
            if not lost:
                rows.append({"ts_ns": t + duration, "tid": tid, "event": "kvm_entry"})
            expected.append(
                (
                    tid,
                    t,
                    None if lost else duration,
                    "user" if user else (None if lost else "kernel"),
                )
            )
            t += duration
    frame = conform(pl.DataFrame([{"source": "kvm", **r} for r in rows]))
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=seed)  # type: ignore[union-attr]
    got = exits(shuffled).select("tid", "ts_ns", "duration_ns", pl.col("handled").cast(pl.String))
    assert got.rows() == sorted(expected)
    users = user_exits(shuffled)
    assert users.height == sum(e[2] for th in threads for e in th)
