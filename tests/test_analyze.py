"""Core analyses on small, hand-checked events frames: every expected number is worked out
in the comments from the rows above it."""

from __future__ import annotations

import json

import polars as pl
import pytest

from vtrace.analyze import (
    ANALYSES,
    accesses,
    accesses_by_target,
    batching,
    by_reason,
    exits,
    interrupts,
    interrupts_by_line,
    kicks,
    kicks_by_queue,
    log2_histogram,
    percentiles,
    requests,
    user_exits,
)
from vtrace.schema import conform, empty_events

IO, MMIO = 2, 6  # KVM_EXIT_IO, KVM_EXIT_MMIO


def events(*rows: dict) -> pl.DataFrame:
    """An events frame from partial rows (source defaults to kvm, pid to 1)."""
    full = [{"source": "kvm", "pid": 1, **r} for r in rows]
    return conform(pl.DataFrame(full, infer_schema_length=None))  # type: ignore[return-value]


def kexit(ts: int, tid: int, reason: int = 30, name: str = "IO_INSTRUCTION") -> dict:
    return {"ts_ns": ts, "tid": tid, "event": "kvm_exit", "reason": reason, "reason_name": name,
            "isa": "vmx"}  # fmt: skip


def kentry(ts: int, tid: int) -> dict:
    return {"ts_ns": ts, "tid": tid, "event": "kvm_entry"}


def uexit(ts: int, tid: int, reason: int = IO) -> dict:
    name = {IO: "KVM_EXIT_IO", MMIO: "KVM_EXIT_MMIO", 5: "KVM_EXIT_HLT"}[reason]
    return {"ts_ns": ts, "tid": tid, "event": "kvm_userspace_exit", "reason": reason,
            "reason_name": name}  # fmt: skip


def pio(ts: int, tid: int, port: int, write: bool, value: int = 0) -> dict:
    return {"ts_ns": ts, "tid": tid, "event": "kvm_pio", "addr": port, "write": write,
            "size": 1, "count": 1, "value": value}  # fmt: skip


def mmio(ts: int, tid: int, gpa: int, write: bool, mmio_type: int | None = None) -> dict:
    kind = mmio_type if mmio_type is not None else (2 if write else 1)
    return {"ts_ns": ts, "tid": tid, "event": "kvm_mmio", "addr": gpa, "write": write,
            "size": 4, "flags": kind}  # fmt: skip


# --- exits ------------------------------------------------------------------------------------


def test_exit_pairs_with_next_entry_of_its_own_thread() -> None:
    ev = events(
        kexit(100, 7),
        kexit(110, 8, 12, "HLT"),  # thread 8 interleaved with thread 7
        kentry(150, 7),  # 7: 100 -> 150 = 50, kernel
        kexit(200, 7),
        uexit(210, 7),  # a user-space exit inside 7's second exit
        kentry(300, 7),  # 7: 200 -> 300 = 100, user
        kentry(400, 8),  # 8: 110 -> 400 = 290, kernel
    )
    out = exits(ev.sample(fraction=1.0, shuffle=True, seed=3))  # input order must not matter
    assert out.select("tid", "ts_ns", "entry_ts_ns", "duration_ns").rows() == [
        (7, 100, 150, 50),
        (7, 200, 300, 100),
        (8, 110, 400, 290),
    ]
    assert out.get_column("handled").cast(pl.String).to_list() == ["kernel", "user", "kernel"]
    assert out.get_column("user_reason_name").cast(pl.String).to_list() == [
        None,
        "KVM_EXIT_IO",
        None,
    ]
    assert out.get_column("reason_name").cast(pl.String).to_list() == [
        "IO_INSTRUCTION",
        "IO_INSTRUCTION",
        "HLT",
    ]


def test_lost_entry_leaves_exit_unpaired_instead_of_borrowing_the_next_one() -> None:
    ev = events(
        kexit(100, 7),
        # entry of the first exit lost
        kexit(500, 7),
        kentry(520, 7),
        kexit(600, 7),
        uexit(610, 7),
        # entry lost again: user space is still known, the duration is not
        kexit(900, 7),
        kentry(950, 7),
    )
    out = exits(ev)
    assert out.select("ts_ns", "entry_ts_ns", "duration_ns").rows() == [
        (100, None, None),
        (500, 520, 20),
        (600, None, None),
        (900, 950, 50),
    ]
    assert out.get_column("handled").cast(pl.String).to_list() == [None, "kernel", "user", "kernel"]


def test_an_entry_in_the_same_microsecond_as_the_next_exit_stays_with_its_own() -> None:
    """Text traces print microseconds: a guest that runs under a microsecond between two
    exits leaves an entry and the next exit with one timestamp. The entry, before the exit
    in the trace, belongs to the exit before it; the exit pairs with the entry after it."""
    ev = events(
        kexit(1_000, 7),
        kentry(2_000, 7),
        kexit(2_000, 7, reason=49, name="EPT_MISCONFIG"),
        kentry(5_000, 7),
        kexit(5_000, 7),
        uexit(5_000, 7),
        kentry(9_000, 7),
    )
    out = exits(ev)
    assert out.select("ts_ns", "entry_ts_ns", "duration_ns").rows() == [
        (1_000, 2_000, 1_000),
        (2_000, 5_000, 3_000),
        (5_000, 9_000, 4_000),
    ]
    assert out.get_column("handled").cast(pl.String).to_list() == ["kernel", "kernel", "user"]


def test_exit_tolerance_bounds_the_pairing() -> None:
    ev = events(kexit(0, 7), kentry(2_000_000_000, 7))
    # The default tolerance is 1 s: an entry 2 s later is taken for another exit's.
    assert exits(ev).get_column("duration_ns").to_list() == [None]
    assert exits(ev, tolerance_ns=3_000_000_000).get_column("duration_ns").to_list() == [
        2_000_000_000
    ]


def test_exits_by_reason_counts_share_and_times() -> None:
    ev = events(
        kexit(0, 1), kentry(10, 1),
        kexit(20, 1), kentry(50, 1),
        kexit(60, 1, 12, "HLT"), kentry(160, 1),
        kexit(200, 1),  # never entered again: counted, not timed
    )  # fmt: skip
    table = by_reason(exits(ev), "duration_ns")
    assert table.select("reason_name", "count", "share", "timed", "total_ns", "max_ns").rows() == [
        ("IO_INSTRUCTION", 3, 0.75, 2, 40, 30),
        ("HLT", 1, 0.25, 1, 100, 100),
    ]


# --- user-space exits -------------------------------------------------------------------------


def test_user_exit_time_runs_to_the_threads_next_kvm_event() -> None:
    ev = events(
        pio(100, 5, 0x500, True),
        uexit(101, 5),
        pio(100, 6, 0x70, True),  # another thread, between them in time
        uexit(105, 6),
        {"ts_ns": 120, "tid": 5, "event": "lab_kick", "source": "lab"},  # user space: ignored
        pio(140, 5, 0x500, True),  # 5's next KVM event: 140 - 101 = 39
        uexit(150, 5, MMIO),  # last event of thread 5: no time
        kentry(125, 6),  # 6's next: 125 - 105 = 20
    )
    out = user_exits(ev)
    assert out.select("tid", "ts_ns", "until_next_ns").rows() == [
        (5, 101, 39),
        (5, 150, None),
        (6, 105, 20),
    ]
    assert out.get_column("next_event").cast(pl.String).to_list() == ["kvm_pio", None, "kvm_entry"]
    table = by_reason(out, "until_next_ns")
    assert table.select("reason_name", "count", "timed", "total_ns").rows() == [
        ("KVM_EXIT_IO", 2, 2, 59),
        ("KVM_EXIT_MMIO", 1, 0, 0),
    ]


# --- accesses ---------------------------------------------------------------------------------


def loop_of_the_lab_capture(t0: int, tid: int = 9) -> list[dict]:
    """One loop of tests/data/make_kvm_capture.py's guest, in the order the kernel traces it."""
    return [
        pio(t0 + 0, tid, 0x500, True),  # out 0x500: user
        uexit(t0 + 1, tid),
        pio(t0 + 2, tid, 0x504, True),  # out 0x504: ioeventfd, kernel
        uexit(t0 + 3, tid),  # in 0x500 exits before it is traced ...
        pio(t0 + 4, tid, 0x500, False, 0x5A),  # ... and is traced on completion: user
        mmio(t0 + 5, tid, 0x10000, True),  # MMIO store: user
        uexit(t0 + 6, tid, MMIO),
        mmio(t0 + 7, tid, 0x10008, True),  # ioeventfd: kernel
        mmio(t0 + 8, tid, 0x10004, False, 0),  # unsatisfied-read: user
        uexit(t0 + 9, tid, MMIO),
        mmio(t0 + 10, tid, 0x10004, False, 1),  # its completion: not a second access
    ]


def test_accesses_are_classified_as_the_kernel_orders_them() -> None:
    ev = events(*loop_of_the_lab_capture(0), *loop_of_the_lab_capture(100))
    out = accesses(ev)
    assert out.height == 12  # 2 loops x 6 accesses; the 2 MMIO read completions dropped
    got = out.filter(pl.col("ts_ns") < 100).select(
        "addr", "write", pl.col("handled").cast(pl.String)
    )
    assert got.rows() == [
        (0x500, True, "user"),
        (0x504, True, "kernel"),
        (0x500, False, "user"),
        (0x10000, True, "user"),
        (0x10008, True, "kernel"),
        (0x10004, False, "user"),
    ]
    table = accesses_by_target(out)
    assert table.select("event", "addr", "count", "reads", "writes", "user", "kernel").rows() == [
        ("kvm_pio", 0x500, 4, 2, 2, 4, 0),  # most accessed first, ties by event and address
        ("kvm_mmio", 0x10000, 2, 0, 2, 2, 0),
        ("kvm_mmio", 0x10004, 2, 2, 0, 2, 0),
        ("kvm_mmio", 0x10008, 2, 0, 2, 0, 2),
        ("kvm_pio", 0x504, 2, 0, 2, 0, 2),
    ]


def test_accesses_with_exits_and_entries_in_the_trace() -> None:
    ev = events(
        kexit(0, 1), pio(1, 1, 0x1F7, True), uexit(2, 1), kentry(10, 1),  # user
        kexit(20, 1), pio(21, 1, 0x40, False), kentry(22, 1),  # in-kernel PIT read
        kexit(30, 1), pio(31, 1, 0xC050, True), kentry(32, 1),  # ioeventfd kick
        kexit(40, 1), uexit(41, 1), pio(50, 1, 0x1F7, False), kentry(51, 1),  # user in
        kexit(60, 1), pio(61, 1, 0xC050, True), uexit(62, 1, 5), kentry(70, 1),  # HLT, not IO
        kexit(80, 1), {"ts_ns": 81, "tid": 1, "event": "kvm_fast_mmio", "addr": 0xFE003000},
        kentry(82, 1),
    )  # fmt: skip
    out = accesses(ev)
    assert out.select("ts_ns", "write", pl.col("handled").cast(pl.String)).rows() == [
        (1, True, "user"),
        (21, False, "kernel"),
        (31, True, "kernel"),
        (50, False, "user"),
        (61, True, "kernel"),
        (81, True, "kernel"),
    ]
    assert exits(ev).get_column("handled").cast(pl.String).to_list() == [
        "user", "kernel", "kernel", "user", "user", "kernel",
    ]  # fmt: skip


def test_qemu_region_accesses_are_user_space() -> None:
    ev = events(
        {"ts_ns": 1, "source": "qemu", "event": "memory_region_ops_write", "device": "ide",
         "addr": 7, "value": 0x20},
        {"ts_ns": 2, "source": "qemu", "event": "memory_region_ops_read", "device": "ide",
         "addr": 7},
    )  # fmt: skip
    out = accesses(ev)
    assert out.select(
        pl.col("device").cast(pl.String), "addr", "write", pl.col("handled").cast(pl.String)
    ).rows() == [("ide", 7, True, "user"), ("ide", 7, False, "user")]


# --- kicks ------------------------------------------------------------------------------------


def test_kicks_from_kvm_lab_and_qemu() -> None:
    ev = events(
        *loop_of_the_lab_capture(0),  # one PIO and one MMIO ioeventfd kick
        pio(50, 9, 0x20, True),  # PIC EOI: in the kernel, but not a kick
        {"ts_ns": 60, "source": "lab", "event": "lab_kick", "device": "lab-virtio", "queue": 0},
        {"ts_ns": 70, "source": "qemu", "event": "virtio_queue_notify", "device": "virtio-blk",
         "queue": 0},
        {"ts_ns": 80, "source": "qemu", "event": "virtio_queue_notify", "device": "virtio-blk",
         "queue": 0},
    )  # fmt: skip
    out = kicks(ev)
    assert out.select("source", "event", "addr").cast(
        {"source": pl.String, "event": pl.String}
    ).rows() == [
        ("kvm", "kvm_pio", 0x504),
        ("kvm", "kvm_mmio", 0x10008),
        ("lab", "lab_kick", None),
        ("qemu", "virtio_queue_notify", None),
        ("qemu", "virtio_queue_notify", None),
    ]
    table = kicks_by_queue(out)
    assert table.select("source", "device", "queue", "kicks").row(0) == (
        "qemu", "virtio-blk", 0, 2,
    )  # fmt: skip
    assert table.row(0, named=True)["rate_per_s"] == pytest.approx(2e8)  # 2 kicks in 10 ns


# --- requests ---------------------------------------------------------------------------------


def q(ts: int, event: str, queue: int, count: int | None = None, source: str = "qemu") -> dict:
    return {"ts_ns": ts, "source": source, "event": event, "device": "virtio-blk",
            "queue": queue, "count": count, "tid": 30}  # fmt: skip


def test_requests_match_pops_to_flushes_in_order_per_queue() -> None:
    ev = events(
        q(5, "virtio_queue_notify", 0),
        q(10, "virtqueue_pop", 0),
        q(12, "virtqueue_pop", 1),  # queue 1 interleaved
        q(20, "virtqueue_pop", 0),
        q(25, "virtio_queue_notify", 0),
        q(30, "virtqueue_pop", 0),
        q(40, "virtqueue_flush", 0, 2),  # completes queue 0's first two pops
        q(45, "virtqueue_flush", 1, 1),
        q(50, "virtqueue_flush", 0, 1),  # the third
        q(60, "virtqueue_pop", 0),  # never completed; found after flushes, with no new kick
    )
    out = requests(ev)
    assert out.select(
        "queue", "seq", "pop_ts_ns", "complete_ts_ns", "latency_ns", "kick_ts_ns", "kick_to_pop_ns"
    ).rows() == [
        (0, 1, 10, 40, 30, 5, 5),
        (0, 2, 20, 40, 20, 5, 15),
        (0, 3, 30, 50, 20, 25, 5),
        (0, 4, 60, None, None, None, None),  # the kick at 25 announced only pops before 40
        (1, 1, 12, 45, 33, None, None),
    ]
    b = batching(ev)
    assert b.select(
        "queue",
        "requests",
        "completed",
        "completions",
        "kicks",
        "requests_per_kick",
        "requests_per_completion",
    ).rows() == [
        (0, 4, 3, 2, 2, 2.0, 1.5),
        (1, 1, 1, 1, 0, None, 1.0),
    ]


def test_lab_requests_complete_one_each_when_count_is_missing() -> None:
    ev = events(
        q(1, "lab_kick", 0, source="lab"),
        q(2, "lab_pop", 0, source="lab"),
        q(3, "lab_pop", 0, source="lab"),
        q(7, "lab_complete", 0, source="lab"),  # count null: one request
        q(9, "lab_complete", 0, source="lab"),
    )
    out = requests(ev)
    assert out.select("source", "latency_ns", "kick_to_pop_ns").rows() == [
        ("lab", 5, 1),
        ("lab", 6, 2),
    ]


# --- interrupts -------------------------------------------------------------------------------


def test_interrupts_by_gsi_and_vector() -> None:
    ev = events(
        {"ts_ns": 1, "event": "kvm_set_irq", "addr": 5, "value": 1, "flags": 0},
        {"ts_ns": 2, "event": "kvm_set_irq", "addr": 5, "value": 0, "flags": 0},
        {"ts_ns": 3, "event": "kvm_msi_set_irq", "addr": 0xFEE00000, "value": 0x4031},
        {"ts_ns": 4, "event": "kvm_inj_virq", "value": 0x31, "vcpu": 0},
        {"ts_ns": 5, "source": "qemu", "event": "virtio_notify_irqfd", "device": "virtio-blk",
         "queue": 0},
    )  # fmt: skip
    out = interrupts(ev)
    assert out.select("gsi", "level", "vector", "msi_address").rows() == [
        (5, 1, None, None),
        (5, 0, None, None),
        (None, None, 0x31, 0xFEE00000),
        (None, None, 0x31, None),
        (None, None, None, None),
    ]
    table = interrupts_by_line(out)
    assert table.select("event", "gsi", "vector", "count", "raised").row(0) == (
        "kvm_set_irq", 5, None, 2, 1,
    )  # fmt: skip


# --- distributions ----------------------------------------------------------------------------


def test_percentiles_are_nearest_observed_values() -> None:
    frame = pl.DataFrame({"d_ns": list(range(1, 1001)), "g": ["a"] * 500 + ["b"] * 500})
    p = percentiles(frame, "d_ns").row(0, named=True)
    # nearest rank on 1..1000: index round(q * 999)
    assert p == {"count": 1000, "total_ns": 500500, "mean_ns": 500.5, "p50_ns": 501,
                 "p90_ns": 900, "p99_ns": 990, "p999_ns": 999, "max_ns": 1000}  # fmt: skip
    by = percentiles(frame, "d_ns", by="g")
    assert by.select("g", "count", "max_ns").rows() == [("b", 500, 1000), ("a", 500, 500)]


def test_log2_histogram_bucket_edges() -> None:
    frame = pl.DataFrame({"d_ns": [0, 1, 2, 3, 4, 7, 8, 1023, 1024, None, -5]})
    h = log2_histogram(frame, "d_ns")
    assert h.select("lo_ns", "hi_ns", "count").rows() == [
        (0, 2, 2),  # 0 and 1
        (2, 4, 2),
        (4, 8, 2),
        (8, 16, 1),
        (512, 1024, 1),
        (1024, 2048, 1),
    ]
    assert h.get_column("share").sum() == pytest.approx(1.0)


# --- missing events ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(ANALYSES))
def test_absent_events_give_an_empty_frame_with_the_full_schema(name: str) -> None:
    plan = ANALYSES[name]
    with_rows = plan(
        events(
            *loop_of_the_lab_capture(0),
            kexit(100, 9), kentry(110, 9),
            q(120, "virtqueue_pop", 0), q(130, "virtqueue_flush", 0, 1),
            {"ts_ns": 140, "event": "kvm_set_irq", "addr": 5, "value": 1},
        ).lazy()
    ).collect()  # fmt: skip
    assert with_rows.height > 0
    empty = plan(empty_events().lazy()).collect()
    assert empty.height == 0
    assert empty.schema == with_rows.schema
    unrelated = plan(events({"ts_ns": 1, "event": "kvm_fpu", "tid": 1}).lazy()).collect()
    assert unrelated.height == 0 and unrelated.schema == with_rows.schema
    assert plan.required_events


def test_summary_dict_is_json(tmp_path) -> None:
    from vtrace.analyze import summary
    from vtrace.store import write_trace

    ev = events(*loop_of_the_lab_capture(0), *loop_of_the_lab_capture(100))
    write_trace(tmp_path / "t", ev, {"lost_events": {"0": 1, "1": 2}, "unparsed": 4})
    data = summary(tmp_path / "t")
    json.dumps(data)
    assert data["trace"]["events"] == 22
    assert data["lost_events"] == 3 and data["unparsed"] == 4
    assert {r["reason_name"]: r["count"] for r in data["user_exits"]} == {
        "KVM_EXIT_IO": 4,
        "KVM_EXIT_MMIO": 4,
    }
    assert data["exits"] == [] and "exits" in data["missing"]
    assert "requests" in data["missing"] and "user_exits" not in data["missing"]
    assert [(r["addr"], r["kicks"]) for r in data["kicks"]] == [(0x504, 2), (0x10008, 2)]


def test_summary_agrees_with_the_functions_on_interleaved_threads(tmp_path) -> None:
    from vtrace.analyze import summary
    from vtrace.store import write_trace

    # Thread 12 appears first; the threads' events interleave in time.
    ev = events(
        *loop_of_the_lab_capture(0, tid=12),
        *loop_of_the_lab_capture(5, tid=3),
        *loop_of_the_lab_capture(200, tid=12),
        kexit(400, 3), kentry(450, 3), kexit(401, 12), kentry(420, 12),
    )  # fmt: skip
    write_trace(tmp_path / "t", ev, {})
    data = summary(tmp_path / "t")
    direct = by_reason(user_exits(ev), "until_next_ns")
    assert [(r["reason_name"], r["count"], r["total_ns"]) for r in data["user_exits"]] == (
        direct.select("reason_name", "count", "total_ns").rows()
    )
    assert [(r["reason_name"], r["count"], r["total_ns"]) for r in data["exits"]] == [
        ("IO_INSTRUCTION", 2, 50 + 19)
    ]
    target = accesses_by_target(accesses(ev))
    assert [(r["addr"], r["user"], r["kernel"]) for r in data["accesses"]] == (
        target.select("addr", "user", "kernel").rows()
    )


@pytest.mark.parametrize(
    ("meta", "total", "per_cpu"),
    [
        ({"lost_events": 7}, 7, None),  # importers: a total
        ({"lost_events": {"0": 1, "1": 2}}, 3, {"0": 1, "1": 2}),  # per CPU
        ({"lost": 5, "lost_per_cpu": [2, 3]}, 5, {"0": 2, "1": 3}),  # the collector
        ({"lost_per_cpu": [0, 4]}, 4, {"0": 0, "1": 4}),
        ({}, 0, None),
    ],
)
def test_lost_events_from_every_meta_shape(meta: dict, total: int, per_cpu: dict | None) -> None:
    from vtrace.analyze.summary import lost_events, lost_per_cpu

    assert lost_events(meta) == total
    assert lost_per_cpu(meta) == per_cpu


def test_requests_get_the_interrupt_that_notified_their_completion() -> None:
    ev = events(
        q(10, "virtqueue_pop", 0),
        q(20, "virtqueue_pop", 0),
        q(30, "virtqueue_pop", 0),
        q(40, "virtqueue_flush", 0, 1),
        q(41, "virtio_notify_irqfd", 0),  # notifies the first completion
        q(50, "virtqueue_flush", 0, 1),  # not notified: the next interrupt comes after ...
        q(60, "virtqueue_flush", 0, 1),  # ... the next completion, so it is this one's
        q(65, "virtio_notify_irqfd", 0),
        q(70, "virtio_notify_irqfd", 1),  # another queue's
    )
    out = requests(ev)
    assert out.select("seq", "complete_ts_ns", "irq_ts_ns", "complete_to_irq_ns").rows() == [
        (1, 40, 41, 1),
        (2, 50, None, None),
        (3, 60, 65, 5),
    ]
    b = batching(ev).row(0, named=True)
    assert (b["requests"], b["interrupts"], b["requests_per_interrupt"]) == (3, 2, 1.5)


def test_lab_kick_count_is_the_kicks_merged_into_one_wake_up() -> None:
    ev = events(
        q(1, "lab_kick", 0, count=3, source="lab"),
        q(2, "lab_pop", 0, source="lab"),
        q(3, "lab_pop", 0, source="lab"),
        q(4, "lab_pop", 0, source="lab"),
        q(9, "lab_complete", 0, count=3, source="lab"),
    )
    b = batching(ev).row(0, named=True)
    assert (b["kicks"], b["kick_events"], b["requests_per_kick"], b["interrupts"]) == (3, 1, 1.0, 0)
    assert requests(ev).get_column("latency_ns").to_list() == [7, 6, 5]
    assert kicks_by_queue(kicks(ev)).select("source", "kicks", "events").rows() == [("lab", 3, 1)]


def test_summary_of_an_empty_trace(tmp_path) -> None:
    from vtrace.analyze import summary
    from vtrace.store import write_trace

    write_trace(tmp_path / "t", empty_events(), {})
    data = summary(tmp_path / "t")
    json.dumps(data)
    assert data["trace"]["events"] == 0 and data["trace"]["duration_ns"] is None
    assert set(data["missing"]) == set(ANALYSES)
    assert all(data[k] == [] for k in ("events", "exits", "user_exits", "accesses", "kicks"))


def test_missing_events_names_what_to_record() -> None:
    from vtrace.analyze import event_names, exits_plan, missing_events, user_exits_plan

    names = event_names(events(*loop_of_the_lab_capture(0)).lazy())
    assert names == {"kvm_pio", "kvm_mmio", "kvm_userspace_exit"}
    assert missing_events(exits_plan, names) == ("kvm_exit", "kvm_entry")
    assert missing_events(user_exits_plan, names) == ()
