"""Timings a QEMU virtio-blk guest trace gives when it carries the host scheduler's events.

``vtrace qemu-lab run`` as root records the host scheduler over the workload window
(:mod:`vtrace.lab.sched`). With those events a trace shows what QEMU's own events cannot:

- when the guest *wrote* each kick (its vCPU thread waking QEMU's main loop through the
  ioeventfd), so the back end's wake-up, from the write to QEMU taking the kick;
- when the guest's vCPU halted after it had added a lot, so the guest's time per add:
  the slope of "kick write to halt" over lots of different sizes (traces at two depths);
- when QEMU's main loop woke the halted vCPU for an interrupt (the irqfd), to it running.

QEMU's events alone give its pace: the gap between two pops of one pass, and a pass's
merged I/O, from its last pop to its first completion. Under TCG these are the TCG guest's
and this host's timings, not KVM's: a model calibrated with them predicts runs of the same
lab on the same host, which is what the depth fidelity check does.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import polars as pl

from vtrace import schema as s
from vtrace.sim.samples import QUANTILES, law, trimmed_mean

PASS_GAP_NS = 50_000  # pops further apart than this belong to different passes
MATCH_NS = 2_000_000  # a kick's write is at most this long before QEMU takes it
THREAD_POOL = 64  # QEMU's thread pool runs at most 64 workers (util/thread-pool.c)
# a guest speed's mode (two_speeds): at least this many lots, and the slow one's median at
# least this many times the fast one's (the runs here: 41 and 70 us for lots of four)
MIN_MODE = 20
SLOW_RATIO = 1.3
DENSE_SHARE = 0.1  # densest(): the share of samples its interval holds
MIN_IRQ_LOTS = 50  # interrupts of one completion count at a depth for the handler's fit


@dataclass
class QemuTiming:
    """The timings of one QEMU virtio-blk trace with scheduler events (ns)."""

    name: str
    depth: int
    wake_ns: np.ndarray = field(default_factory=lambda: np.empty(0))  # first kick of a lot
    # of those, the ones where the main loop took the vCPU's own CPU (pre-empted it), and
    # the others (it ran on another CPU)
    preempt_wake_ns: np.ndarray = field(default_factory=lambda: np.empty(0))
    free_wake_ns: np.ndarray = field(default_factory=lambda: np.empty(0))
    to_halt_ns: np.ndarray = field(default_factory=lambda: np.empty(0))  # whole lots: kick
    # write to the vCPU's halt
    to_halt_at_ns: np.ndarray = field(default_factory=lambda: np.empty(0))  # their writes
    pop_gaps_ns: np.ndarray = field(default_factory=lambda: np.empty(0))
    merged_io_ns: np.ndarray = field(default_factory=lambda: np.empty(0))
    irq_wake_ns: np.ndarray = field(default_factory=lambda: np.empty(0))
    # per interrupt that woke the halted vCPU: from its running to its next kick write (the
    # handler, the guest's way back to its task and on to the next lot's first add), and
    # the completions QEMU filled since the interrupt before
    irq_to_kick_ns: np.ndarray = field(default_factory=lambda: np.empty(0))
    irq_completions: np.ndarray = field(default_factory=lambda: np.empty(0, dtype=np.int64))
    completion_wake_ns: np.ndarray = field(default_factory=lambda: np.empty(0))
    complete_gaps_ns: np.ndarray = field(default_factory=lambda: np.empty(0))  # one burst's
    # consecutive completions
    to_sleep_ns: np.ndarray = field(default_factory=lambda: np.empty(0))  # the main loop's
    # last event to its sleep
    vcpu_on_ns: float = 0.0  # the vCPU thread's time on a CPU over the window
    preempted_ns: np.ndarray = field(default_factory=lambda: np.empty(0))  # each time off


def _before(times: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Index of the last of ``times`` at or before each of ``at`` (-1: none)."""
    return np.searchsorted(times, at, side="right") - 1


@dataclass
class KickWrites:
    """Which threads a trace's kicks go between, and when the guest wrote each (ns)."""

    main: int  # QEMU's thread that pops (its main loop, or an iothread)
    vcpu: int  # the vCPU thread that signals it most: the guest's
    pops: np.ndarray  # virtqueue_pop times
    kicks: np.ndarray  # virtio_queue_notify times: QEMU taking each kick
    writes: np.ndarray  # the vCPU waking the main loop (sched_waking): its kick writes
    write_of: np.ndarray  # per kick, the guest's write of it (-1: none within MATCH_NS)


def timing_events(events: pl.LazyFrame) -> pl.DataFrame:
    """A trace's events in time order, with the columns the timings read."""
    return (
        events.select(
            "ts_ns",
            "tid",
            "value",
            "flags",
            src=pl.col("source").cast(pl.String),
            ev=pl.col("event").cast(pl.String),
        )
        .sort("ts_ns", maintain_order=True)
        .collect()
    )


def kick_writes(ev: pl.DataFrame) -> KickWrites | None:
    """The kicks of :func:`timing_events`' frame and the guest's write of each, or None
    without pops, kicks or a thread that signals the main loop."""
    pops_f = ev.filter(pl.col("ev") == s.VIRTQUEUE_POP)
    if pops_f.is_empty():
        return None
    main = int(pops_f["tid"].mode().sort()[0])
    kicks = ev.filter(pl.col("ev") == s.VIRTIO_QUEUE_NOTIFY)["ts_ns"].to_numpy()
    wakers = ev.filter(
        (pl.col("src") == s.SOURCE_SCHED) & (pl.col("ev") == "sched_waking")
        & (pl.col("value") == main) & (pl.col("tid") != 0) & (pl.col("tid") != main)
    )  # fmt: skip
    if wakers.is_empty() or kicks.size == 0:
        return None
    vcpu = int(wakers.group_by("tid").len().sort("len", "tid", descending=[True, False])["tid"][0])
    writes = wakers.filter(pl.col("tid") == vcpu)["ts_ns"].to_numpy()
    # the guest's write of each kick QEMU took: the vCPU's last signal before it
    w = _before(writes, kicks)
    matched = (w >= 0) & (kicks - writes[np.maximum(w, 0)] < MATCH_NS)
    write_of = np.where(matched, writes[np.maximum(w, 0)], -1)
    return KickWrites(main, vcpu, pops_f["ts_ns"].to_numpy(), kicks, writes, write_of)


def qemu_timing(name: str, events: pl.LazyFrame, depth: int) -> QemuTiming | None:
    """The timings of a trace, or None when it has no scheduler events."""
    ev = timing_events(events)
    sched = ev.filter(pl.col("src") == s.SOURCE_SCHED)
    if sched.is_empty():
        return None
    t = QemuTiming(name, depth)

    def times(name: str) -> np.ndarray:
        return ev.filter(pl.col("ev") == name)["ts_ns"].to_numpy()

    k = kick_writes(ev)
    if k is None:
        return t
    main, vcpu, pops, kicks, write_of = k.main, k.vcpu, k.pops, k.kicks, k.write_of
    writes = k.writes
    matched = write_of >= 0
    fills, done = times("virtqueue_fill"), times("virtio_blk_rw_complete")
    wakes_main = sched.filter((pl.col("ev") == "sched_waking") & (pl.col("value") == main))
    # the vCPU thread on and off its CPU: pre-emptions (switched out runnable) and how long
    # each kept it off, against its time on a CPU
    sw = sched.filter(
        (pl.col("ev") == "sched_switch") & ((pl.col("tid") == vcpu) | (pl.col("value") == vcpu))
    )
    sw_ts, sw_in = sw["ts_ns"].to_numpy(), (sw["value"] == vcpu).to_numpy()
    if sw_ts.size > 1:
        span = np.diff(sw_ts)
        t.vcpu_on_ns = float(span[sw_in[:-1]].sum())
        out = ~sw_in[:-1] & (sw["tid"] == vcpu).to_numpy()[:-1] & (sw["flags"] == 0).to_numpy()[:-1]
        t.preempted_ns = span[out].astype(float)
    # a lot's first kick: nothing popped and not yet filled when QEMU took it
    idle = np.searchsorted(pops, kicks) == np.searchsorted(fills, kicks)
    first = matched & idle
    t.wake_ns = (kicks - write_of)[first].astype(float)
    # the main loop's first time on a CPU after the write: switched in from the vCPU thread,
    # still runnable (state R), is the wake-up that pre-empted the guest
    main_in = sched.filter((pl.col("ev") == "sched_switch") & (pl.col("value") == main))
    in_ts = main_in["ts_ns"].to_numpy()
    if in_ts.size:
        j = np.minimum(np.searchsorted(in_ts, write_of[first]), in_ts.size - 1)
        from_vcpu = (main_in["tid"].to_numpy()[j] == vcpu) & (main_in["flags"].to_numpy()[j] == 0)
        t.preempt_wake_ns = t.wake_ns[from_vcpu]
        t.free_wake_ns = t.wake_ns[~from_vcpu]
    else:
        t.free_wake_ns = t.wake_ns
    # pieces: the pops after each kick, before the next
    pieces = np.diff(np.searchsorted(pops, np.append(kicks, np.iinfo(np.int64).max)))
    # the vCPU's next switch off its CPU after the write: a halt (S) when the guest has
    # added the lot and waits; a lot whose vCPU was pre-empted (R) first is left out, its
    # time includes the thread that took the CPU
    outs = sched.filter((pl.col("ev") == "sched_switch") & (pl.col("tid") == vcpu))
    out_ts, out_state = outs["ts_ns"].to_numpy(), outs["flags"].to_numpy()
    whole = first & (pieces == depth)
    if whole.any() and out_ts.size:
        h = np.searchsorted(out_ts, write_of[whole])
        ok = h < out_ts.size
        ok[ok] = out_state[h[ok]] == 1
        to_halt = out_ts[h[ok]] - write_of[whole][ok]
        t.to_halt_ns = to_halt.astype(float)
        t.to_halt_at_ns = write_of[whole][ok].astype(float)
    # QEMU's pace: consecutive pops of one pass (no kick taken between them)
    gaps = np.diff(pops)
    same_pass = (np.diff(np.searchsorted(kicks, pops, side="right")) == 0) & (gaps < PASS_GAP_NS)
    t.pop_gaps_ns = gaps[same_pass].astype(float)
    # a pass's merged I/O: its last pop to the first completion after it
    last = np.append(~same_pass, True)
    ends = pops[last]
    d = np.searchsorted(done, ends)
    ok = d < done.size
    t.merged_io_ns = (done[d[ok]] - ends[ok]).astype(float)
    # a completion: an I/O worker (any other thread) signals the main loop, which then
    # completes (virtio_blk_rw_complete)
    workers = wakes_main.filter(
        (pl.col("tid") != 0) & (pl.col("tid") != main) & (pl.col("tid") != vcpu)
    )
    sig = workers["ts_ns"].to_numpy()
    c = np.searchsorted(done, sig)
    ok = c < done.size
    lag = done[c[ok]] - sig[ok]
    t.completion_wake_ns = lag[lag < MATCH_NS].astype(float)
    # the main loop's work per completion: consecutive completions of one burst
    gaps = np.diff(done)
    between = np.diff(np.searchsorted(pops, done)) == 0
    t.complete_gaps_ns = gaps[between & (gaps < PASS_GAP_NS)].astype(float)
    # its way back to sleep: from its last event to its switch off the CPU asleep (S)
    own = ev.filter((pl.col("src") == s.SOURCE_QEMU) & (pl.col("tid") == main))["ts_ns"]
    own = own.to_numpy()
    asleep = sched.filter(
        (pl.col("ev") == "sched_switch") & (pl.col("tid") == main) & (pl.col("flags") == 1)
    )["ts_ns"].to_numpy()
    k = _before(own, asleep)
    ok = k >= 0
    lag = asleep[ok] - own[k[ok]]
    t.to_sleep_ns = lag[lag < PASS_GAP_NS].astype(float)
    # an interrupt for a halted vCPU: the main loop wakes it, then it runs
    irq = sched.filter(
        (pl.col("ev") == "sched_waking") & (pl.col("tid") == main) & (pl.col("value") == vcpu)
    )["ts_ns"].to_numpy()
    runs = sched.filter((pl.col("ev") == "sched_switch") & (pl.col("value") == vcpu))
    run_ts = runs["ts_ns"].to_numpy()
    r = np.searchsorted(run_ts, irq)
    ok = r < run_ts.size
    t.irq_wake_ns = (run_ts[r[ok]] - irq[ok]).astype(float)
    # then to its next kick write, and the completions that interrupt brought
    run, woke = run_ts[r[ok]], irq[ok]
    w = np.searchsorted(writes, run)
    has = w < writes.size
    t.irq_to_kick_ns = (writes[w[has]] - run[has]).astype(float)
    t.irq_completions = np.diff(np.searchsorted(fills, np.concatenate(([0], woke))))[has]
    return t


def _pooled(timings: list[QemuTiming], name: str) -> np.ndarray:
    """One timing's samples from every trace, in one array."""
    return np.concatenate([getattr(t, name) for t in timings])


def _median_fit(samples: np.ndarray, source: str) -> tuple[float, str] | None:
    """The samples' median (to 0.1 ns) with its source, or None below 10 samples."""
    if samples.size < 10:
        return None
    return round(float(np.median(samples)), 1), source


def densest(samples: np.ndarray, share: float = DENSE_SHARE) -> float:
    """The median of the shortest interval holding ``share`` of the samples: where they
    are densest (a mode that a second, broader slow mode does not pull, as it pulls a
    median)."""
    x = np.sort(samples)
    h = max(1, int(np.ceil(share * x.size)))
    i = int(np.argmin(x[h - 1 :] - x[: x.size - h + 1]))
    return float(np.median(x[i : i + h]))


def two_speeds(samples: np.ndarray) -> float | None:
    """The bound between a fast and a slow mode of ``samples``, or None when they have one.

    The bound is the split of the sorted logarithms that leaves the two groups farthest
    apart for their sizes (the largest between-group variance, Otsu's rule), with at least
    ``MIN_MODE`` samples on each side; the two are modes when the slow group's median, and
    ``MIN_MODE`` of its samples, are at least ``SLOW_RATIO`` times the fast group's median."""
    if samples.size < 2 * MIN_MODE:
        return None
    x = np.sort(samples)
    logs = np.log(np.maximum(x, 1.0))
    n = logs.size
    k = np.arange(MIN_MODE, n - MIN_MODE + 1)  # the fast group: the first k
    sums = np.cumsum(logs)
    low_mean = sums[k - 1] / k
    high_mean = (sums[-1] - sums[k - 1]) / (n - k)
    best = int(k[np.argmax(k * (n - k) * (high_mean - low_mean) ** 2)])
    fast, slow = x[:best], x[best:]
    slow_from = SLOW_RATIO * float(np.median(fast))
    # a slow mode: its median, and at least MIN_MODE samples, that far above the fast one
    if np.median(slow) < slow_from or int((slow >= slow_from).sum()) < MIN_MODE:
        return None
    return float((fast[-1] + slow[0]) / 2)


def _slow_stretches(at: np.ndarray, slow: np.ndarray) -> list[float]:
    """The lengths (ns) of one trace's runs of consecutive slow lots, written at ``at``:
    first to last write, plus the median spacing of its lots."""
    if at.size < 2 or not slow.any():
        return []
    spacing = float(np.median(np.diff(at)))
    edges = np.diff(np.concatenate(([0], slow.astype(np.int8), [0])))
    starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1) - 1
    return list(at[ends] - at[starts] + spacing)


def _fit_guest_speed(
    timings: list[QemuTiming], names: str, exit_ns: float = 0.0
) -> dict[str, tuple[Any, str]]:
    """The guest's time per add, its way into the halt (what a lot of one request leaves
    beside its kick's exit, ``exit_ns``) and its slow stretches, from whole lots' kick
    write to the vCPU's halt at two depths or more.

    Per depth every whole lot of the traces at that depth is pooled (one odd run moves a
    median little) and split into a fast and a slow mode where it has two
    (:func:`two_speeds`): the time per add is the fast modes' slope over depth, and the
    slow mode gives ``vcpu.slow_share``, ``slow_factor`` and ``slow_stretch_ns``."""
    by_depth: dict[int, list[QemuTiming]] = {}
    for t in timings:
        if t.to_halt_ns.size:
            by_depth.setdefault(t.depth, []).append(t)
    if len(by_depth) < 2:
        return {}
    fitted: dict[str, tuple[Any, str]] = {}
    pooled = {d: np.concatenate([t.to_halt_ns for t in ts]) for d, ts in by_depth.items()}
    fast_median: dict[int, float] = {}
    bounds: dict[int, float | None] = {}
    for depth, samples in pooled.items():
        bounds[depth] = bound = two_speeds(samples)
        fast_median[depth] = float(
            np.median(samples if bound is None else samples[samples <= bound])
        )
    d0, d1 = min(by_depth), max(by_depth)
    h0, h1 = fast_median[d0], fast_median[d1]
    slope = (h1 - h0) / (d1 - d0)
    if slope <= 0:
        return {}
    lots = pooled[d0].size + pooled[d1].size
    split = [d for d in (d0, d1) if bounds[d] is not None]
    fitted["vcpu.request_prep_ns"] = (
        round(slope, 1),
        f"{names}: the guest's time per add: whole lots' kick write to the vCPU's halt "
        f"(sched_switch, state S), median {h0 / 1e3:.1f} us at depth {d0} and "
        f"{h1 / 1e3:.1f} us at depth {d1} ({lots} lots"
        f"{', of the fast mode at depth ' + ' and '.join(map(str, split)) if split else ''})"
        ", per request more",
    )
    # what a lot of one request leaves beside its kick's exit: the way into the halt
    one = h0 - slope * (d0 - 1)
    fitted["vcpu.idle_entry_ns"] = (
        round(max(0.0, one - exit_ns), 1),
        f"{names}: the same kick write to halt at one request ({one / 1e3:.1f} us), less the "
        f"kick's exit (kvm.kernel_exit_ns {exit_ns / 1e3:.1f} us): the guest's task blocking "
        "and its idle loop reaching HLT",
    )
    if not split:
        fitted["vcpu.slow_share"] = (
            0.0,
            f"{names}: whole lots' kick write to halt has one mode at each depth",
        )
        return fitted
    slow_lots = 0
    stretches: list[float] = []
    for d in split:
        for t in by_depth[d]:
            slow = t.to_halt_ns > bounds[d]
            slow_lots += int(slow.sum())
            stretches += _slow_stretches(t.to_halt_at_ns, slow)
    deep = max(split)
    factor = float(np.median(pooled[deep][pooled[deep] > bounds[deep]])) / fast_median[deep]
    fitted["vcpu.slow_share"] = (
        round(slow_lots / lots, 4),
        f"{names}: {slow_lots} of the {lots} whole lots in the slow mode of their kick write "
        f"to halt (over {', '.join(f'{bounds[d] / 1e3:.1f} us at depth {d}' for d in split)})",
    )
    fitted["vcpu.slow_factor"] = (
        round(factor, 3),
        f"{names}: at depth {deep}, the slow mode's median kick write to halt over the fast "
        "mode's: the lot's guest work, that many times as long",
    )
    fitted["vcpu.slow_stretch_ns"] = (
        round(float(np.mean(stretches)), 1),
        f"{names}: mean length of the {len(stretches)} runs of consecutive slow lots, first "
        "to last kick write plus the median spacing of the trace's lots",
    )
    return fitted


def _fit_guest_lot(
    timings: list[QemuTiming], names: str, prep: float, handler_ns: float
) -> dict[str, tuple[Any, str]]:
    """The guest's handler work per completion and its way from an interrupt to the next
    lot, from interrupts that woke the halted vCPU at two depths or more.

    At depth D an interrupt that brought D completions (a whole lot's) is followed, from
    the vCPU running, by the handler, the guest's way back to its task, the next read and
    the lot's first add: the densest of those times (:func:`densest`, which a slow stretch
    does not pull) grows with D by the handler's work per completion; what is left at the
    smallest depth beside ``handler_ns``, that work and one add (``prep``) is the way to
    the next lot."""
    by_depth: dict[int, np.ndarray] = {}
    for t in timings:
        whole = t.irq_to_kick_ns[t.irq_completions == t.depth]
        if whole.size:
            by_depth[t.depth] = np.concatenate([by_depth.get(t.depth, np.empty(0)), whole])
    depths = sorted(d for d, s in by_depth.items() if s.size >= MIN_IRQ_LOTS)
    if len(depths) < 2:
        return {}
    d0, d1 = depths[0], depths[-1]
    m0, m1 = densest(by_depth[d0]), densest(by_depth[d1])
    per = max(0.0, (m1 - m0) / (d1 - d0))
    lead = max(0.0, m0 - handler_ns - per * (d0 - 1) - prep)
    fitted: dict[str, tuple[Any, str]] = {}
    fitted["interrupt.per_completion_ns"] = (
        round(per, 1),
        f"{names}: from the vCPU running after an interrupt that woke it (sched_waking by "
        f"the main loop, sched_switch) to its next kick write, where the interrupt brought a "
        f"whole lot: densest {m0 / 1e3:.1f} us at depth {d0} ({by_depth[d0].size}) and "
        f"{m1 / 1e3:.1f} us at depth {d1} ({by_depth[d1].size}), per completion more",
    )
    fitted["workload.think_ns"] = (
        round(lead, 1),
        f"{names}: the same at depth {d0}, less the handler (guest_handler_ns "
        f"{handler_ns / 1e3:.1f} us and its completions) and one add: the guest's way back "
        "to its task and on to the next read",
    )
    return fitted


def fit_timing(
    timings: list[QemuTiming], handler_ns: float = 0.0, exit_ns: float = 0.0
) -> dict[str, tuple[Any, str]]:
    """Values the traces' timings fix, each with its source; empty without any.
    ``handler_ns`` and ``exit_ns`` are the model's interrupt handler and kick exit, which
    the guest's measured times are taken apart with."""
    if not timings:
        return {}
    names = " + ".join(t.name for t in timings)
    fitted: dict[str, tuple[Any, str]] = {}
    wake = _pooled(timings, "wake_ns")
    preempt = _pooled(timings, "preempt_wake_ns")
    free = _pooled(timings, "free_wake_ns")
    apart = preempt.size >= QUANTILES and free.size >= QUANTILES
    if wake.size >= QUANTILES:
        fitted["backend.wakeup_quantiles_ns"] = (
            law(free if apart else wake),
            f"{names}: the first kick of each lot ({free.size if apart else wake.size}"
            f"{', where the main loop ran on another CPU than the vCPU' if apart else ''}), "
            "from the guest's write (its vCPU thread waking QEMU's main loop, sched_waking) "
            "to QEMU taking it (virtio_queue_notify); quantiles at 5 % steps",
        )
        fitted["backend.wakeup_ns"] = (
            round(float(np.median(wake)), 1),
            f"{names}: median of every first kick's wake-up ({wake.size} kicks; unused: the "
            "quantiles are drawn)",
        )
        fitted["backend.stall_probability"] = (0.0, "the measured law has the stalls in it")
    if apart:
        fitted["backend.preempt_wakeup_quantiles_ns"] = (
            law(preempt),
            f"{names}: the {preempt.size} of those first kicks whose main loop ran on the vCPU's "
            "own CPU, switched in from the still runnable vCPU thread (sched_switch, state R): "
            "the wake-up when no host CPU is free",
        )
        fitted["backend.preempt_share"] = (
            round(preempt.size / wake.size, 4),
            f"{names}: {preempt.size} of the {wake.size} first kicks: the host's other work "
            "held the other CPUs, and the main loop took the vCPU's",
        )
    fitted.update(_fit_guest_speed(timings, names, exit_ns))
    if "vcpu.request_prep_ns" in fitted:
        prep = fitted["vcpu.request_prep_ns"][0]
        fitted.update(_fit_guest_lot(timings, names, prep, handler_ns))
    done_wake = _pooled(timings, "completion_wake_ns")
    if done_wake.size >= QUANTILES:
        fitted["backend.completion_wakeup_quantiles_ns"] = (
            law(done_wake),
            f"{names}: from an I/O worker signalling QEMU's main loop (sched_waking) to its "
            f"next virtio_blk_rw_complete ({done_wake.size}); quantiles at 5 % steps",
        )
    gaps = _pooled(timings, "pop_gaps_ns")
    if gaps.size >= QUANTILES:
        fitted["backend.per_request_quantiles_ns"] = (
            law(gaps),
            f"{names}: gaps between two virtqueue_pop of one pass ({gaps.size}); quantiles "
            "at 5 % steps (QEMU's pace is mostly even, now and then much slower)",
        )
        fitted["backend.per_request_ns"] = (
            round(trimmed_mean([gaps]), 1),
            f"{names}: mean of the same below their 99th percentile (unused: the quantiles "
            "are drawn)",
        )
    io = _pooled(timings, "merged_io_ns")
    if io.size >= 10:
        fitted["backend.submit"] = (
            "pass",
            "QEMU virtio-blk submits a pass's requests together at its end, adjacent ones "
            "merged into one I/O (virtio_blk_submit_multireq)",
        )
        fitted["device.service_ns"] = (
            round(float(np.median(io)), 1),
            f"{names}: median from a pass's last virtqueue_pop to its first "
            f"virtio_blk_rw_complete ({io.size} passes)",
        )
        fitted["device.max_outstanding"] = (
            THREAD_POOL,
            "QEMU's thread pool runs a pass's I/O, at most 64 workers (util/thread-pool.c)",
        )
    on = sum(t.vcpu_on_ns for t in timings)
    off = _pooled(timings, "preempted_ns")
    if on > 0 and off.size >= 10:
        fitted["vcpu.stall_per_s"] = (
            round(off.size / (on / 1e9), 1),
            f"{names}: the vCPU thread switched out while runnable (sched_switch, state R) "
            f"{off.size} times in {on / 1e9:.3f} s on a CPU",
        )
        fitted["vcpu.stall_ns"] = (
            round(float(off.mean()), 1),
            f"{names}: mean time until it ran again ({off.size} pre-emptions)",
        )
    irq = _pooled(timings, "irq_wake_ns")
    halted = _median_fit(
        irq,
        f"{names}: median from QEMU's main loop waking the halted vCPU thread (the irqfd, "
        f"sched_waking) to it running (sched_switch), {irq.size} interrupts",
    )
    if halted is not None:
        fitted["interrupt.halted_wake_ns"] = halted
        fitted["backend.lock_wake_ns"] = (
            fitted["interrupt.halted_wake_ns"][0],
            "the same wake-up: the main loop letting go of its lock wakes the vCPU thread "
            "that waits for it",
        )
    complete = _pooled(timings, "complete_gaps_ns")
    if complete.size >= 10:
        fitted["backend.complete_ns"] = (
            round(trimmed_mean([complete]), 1),
            f"{names}: mean gap between two virtio_blk_rw_complete of one burst below their "
            f"99th percentile ({complete.size}): each completion's work, under the lock",
        )
        fitted["backend.publish"] = (
            "per_request",
            "QEMU virtio-blk puts each completion on the used ring and decides on an "
            "interrupt for it (virtio_blk_req_complete)",
        )
    to_sleep = _pooled(timings, "to_sleep_ns")
    idle = _median_fit(
        to_sleep,
        f"{names}: median from the main loop's last event to its switch off the CPU asleep "
        f"(sched_switch, state S), {to_sleep.size} times",
    )
    if idle is not None:
        fitted["backend.idle_ns"] = idle
    if "vcpu.request_prep_ns" in fitted:
        fitted["backend.avail_event"] = (
            "idle",
            "QEMU virtio-blk turns kicks off while its handler pops (virtio_blk_handle_vq), "
            "and virtqueue_pop leaves avail_event alone while they are off "
            "(vring_set_avail_event, hw/virtio/virtio.c): avail_event moves only when the "
            "handler turns them back on, having found the ring empty",
        )
        fitted["virtqueue.batch"] = (
            1,
            f"{names}: one O_DIRECT transfer is not plugged: the guest issues each request "
            "of a lot on its own, with a kick decision after each (EVENT_IDX decides)",
        )
        fitted["virtqueue.batch_policy"] = ("count", "a kick decision per request")
        fitted["workload.dispatch_splits"] = (
            0.0,
            "the pieces come from the timing (guest adds against QEMU's pops and wake-ups)",
        )
    return fitted
