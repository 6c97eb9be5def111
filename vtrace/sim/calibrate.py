"""Calibration: fit the costs a trace can show and write them into a model config.

What a trace shows, and the parameter each statistic sets (the written file names the
trace and the statistic beside every fitted value):

- exits per request, by register and handler: ``device.accesses`` (emulated), from the
  PIO/MMIO accesses of :func:`vtrace.analyze.accesses`;
- user-space exit round trip: the shortest typical interval from a user-space-handled PIO
  write to the next access on a vCPU thread (median per register, smallest register);
- the emulated device's work: the extra interval after the access that starts it (the
  access just before each ``lab_pop``);
- the guest's own time per request and per batch: the vCPU's run time per batch,
  ``duration / batches = batch * request_prep_ns + batch_prep_ns + kicks per batch *
  kernel_exit_ns``, solved by least squares over traces with different batch sizes;
- a polling guest's look at used.idx (``poll_ns``) and its reap of used buffers
  (``reap_ns``): the base model's values scaled by fitted / base ``request_prep_ns``, since
  they are the same emulated guest instructions (a large ring reaps too rarely to show them);
- the back end's wake-up (from the first kick its eventfd merged, ``lab_kick``'s count, to
  the first pop after the wake-up; rare wake-ups over 10x the median are a preempted
  thread, ``backend.stall_*``), its time per request (between two pops of one pass) and
  per pass (last pop to the used.idx publish), from the lab back end's
  ``lab_kick``/``lab_pop``/``lab_complete`` events.
- a lab run on several vCPUs (``vtrace lab run --vcpus N --queues M``): ``vm.vcpus``,
  ``virtqueue.queues`` and ``backend.threads`` from its meta.json; the guest's time per
  batch from the busiest vCPU thread over its share of the requests, the back end's times
  from the queue that vCPU kicks (its notify port, named per queue in the meta).

A QEMU guest trace (``vtrace qemu-lab run``, TCG) sets the path's structure instead of its
costs: see :mod:`vtrace.sim.qemu_guest`.

Where the trace pairs the vCPU thread's ``kvm_exit`` with its ``kvm_entry`` (hardware
virtualisation), the exits are timed themselves: ``kvm.kernel_exit_ns`` is the median exit
to entry of the exits that carried the kicks (``kvm_pio``, ``kvm_mmio`` or ``kvm_fast_mmio``
handled in the kernel), ``kvm.userspace_exit_ns`` that of the exits handled in user space,
and the source lists the thread's exits by reason with their counts and medians. Without
them (software KVM, as on the development machines) the in-kernel kick round trip cannot
be separated from the guest's own time, so ``kvm.kernel_exit_ns`` stays as the base model
has it (measured with ``vtrace lab exit-cost``: about 1.9 us there, docs/sources.md).
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from vtrace.analyze.kicks import is_kvm_kick
from vtrace.errors import VtraceError
from vtrace.output import check_new_file, write_file
from vtrace.schema import LAB_COMPLETE, LAB_KICK, LAB_POP
from vtrace.sim.config import KIND_TABLES, SCHEMA, Config, load_config, model_path
from vtrace.sim.qemu_guest import QemuFacts, fit_qemu, qemu_facts
from vtrace.sim.qemu_timing import fit_timing, qemu_timing
from vtrace.sim.samples import trimmed_mean

STALL_FACTOR = 10  # a wake-up this many times the median is a preempted back end


@dataclass
class TraceFacts:
    """What one trace says about the path it recorded."""

    name: str
    requests: int
    batch: int
    duration_ns: float
    kicks: int
    userspace_exits: int
    # emulated: median interval after each register access, and accesses per request
    access_gap_ns: dict[tuple[int, bool], float] = field(default_factory=dict)
    access_count: dict[tuple[int, bool], int] = field(default_factory=dict)
    start_port: tuple[int, bool] | None = None
    # virtio back end (pooled samples, ns)
    wake_ns: np.ndarray | None = None
    pop_gap_ns: np.ndarray | None = None
    publish_ns: np.ndarray | None = None
    # that back-end thread's CPU time over the run, its wake-ups, and the requests and passes
    # it served (meta.json lab threads; a trace of an older lab has none: cpu is nan)
    backend_cpu_ns: float = math.nan
    backend_wakeups: int = 0
    backend_requests: int = 0
    backend_passes: int = 0
    # a lab run on several vCPUs: the requests of the vCPU whose accesses were read (0: all),
    # and the run's shape as config values (vm.vcpus, virtqueue.queues, backend.threads)
    vcpu_requests: int = 0
    shape: dict[str, Any] = field(default_factory=dict)
    batch_from: str = "lab meta"  # where ``batch`` came from
    shape_from: dict[str, str] = field(default_factory=dict)  # each shape key's source
    notify: tuple[int, ...] = ()  # the device's notify addresses (--notify); () = every kick
    # hardware virtualisation (kvm_exit paired with kvm_entry): exit to entry of the exits
    # that carried the kicks and of those handled in user space; the vCPU thread's exits by
    # reason (count, median ns)
    kick_exit_ns: np.ndarray | None = None
    kick_exit_reasons: list[str] = field(default_factory=list)
    user_exit_ns: np.ndarray | None = None
    exit_reasons: dict[str, tuple[int, float]] = field(default_factory=dict)


@dataclass
class Calibration:
    """The fitted config and, per fitted key, its value and where it came from.

    ``fitted`` holds the numbers (a list of accesses as its total count); ``notes`` the
    source of every key the calibration set, settings such as ``backend.publish`` included.
    """

    config: Config
    fitted: dict[str, tuple[float, str]]
    facts: list[TraceFacts] | list[QemuFacts]
    notes: dict[str, str] = field(default_factory=dict)


def _vcpu_accesses(acc: pl.DataFrame) -> pl.DataFrame:
    """Of every thread's PIO/MMIO accesses, the busiest vCPU thread's, in time order, with
    the gap to the next. A notify write KVM completes on its fast MMIO path
    (``kvm_fast_mmio``: an ioeventfd with no length, as a modern virtio-pci queue's) is a
    kick handled in the kernel."""
    if acc.height == 0:
        return acc
    # ties (a 2 x 2 run's vCPUs kick as often) go to the lowest thread id: never the order
    # group_by happened to return, so every calibration of one run reads the same thread
    busiest = acc.group_by("tid").len().sort(["len", "tid"], descending=[True, False])
    tid = busiest["tid"][0]
    return (
        acc.filter(pl.col("tid") == tid)
        .sort("ts_ns")
        .with_columns(gap_ns=pl.col("ts_ns").shift(-1) - pl.col("ts_ns"))
    )


# a vCPU thread or notify address with fewer of the kicks than this share is a stray (one
# kick at start-up), not part of the run's shape
SHAPE_SHARE = 0.01


def _kernel_shape(events: pl.LazyFrame, acc: pl.DataFrame, facts: TraceFacts) -> None:
    """Kernel events alone: the run's shape from the kicks (the vCPU threads that wrote them,
    the notify addresses, one per queue), each queue's kicks and each interrupt line's
    injections per second, into ``facts``."""
    from vtrace.analyze.interrupts import interrupts, interrupts_by_line

    kicks = acc.filter(is_kvm_kick())
    if kicks.height == 0:
        return
    floor = SHAPE_SHARE * kicks.height
    threads = kicks.group_by("tid").len().filter(pl.col("len") >= floor).sort("tid")
    queues = (
        kicks.group_by("addr")
        .agg(pl.len(), pio=(pl.col("event").cast(pl.String) == "kvm_pio").all())
        .filter(pl.col("len") >= floor)
        .sort("addr")
    )
    window = max(1.0, float(acc["ts_ns"].max() - acc["ts_ns"].min())) / 1e9
    lines = interrupts_by_line(interrupts(events)).with_columns(
        # a line raised and lowered counts once (raised); an MSI has no level (count)
        n=pl.when(pl.col("raised") > 0).then("raised").otherwise("count")
    )
    irqs = ", ".join(
        f"{'MSI vector ' + format(v, '#x') if v is not None else f'GSI {g}'}: {n} "
        f"({n / window:,.0f}/s)"
        for g, v, n in lines.select("gsi", "vector", "n").iter_rows()
    )
    per_queue = "; ".join(
        f"{'port' if pio else 'MMIO'} {a:#x}: {n} kicks ({n / window:,.0f}/s)"
        for a, n, pio in queues.iter_rows()
    )
    facts.shape = {"vm.vcpus": threads.height, "virtqueue.queues": queues.height}
    facts.shape_from = {
        "vm.vcpus": f"kernel events: {threads.height} vCPU threads wrote kicks ("
        + ", ".join(f"tid {t}: {n}" for t, n in threads.iter_rows())
        + ")",
        "virtqueue.queues": f"kernel events: {queues.height} notify addresses written"
        + (" (--notify: the device's)" if facts.notify else "")
        + f": {per_queue}; interrupts: {irqs or 'none recorded'}",
    }
    if threads.height > 1:  # the busiest vCPU thread's share of the requests
        facts.vcpu_requests = -(-facts.requests // threads.height)


def _exit_costs(
    events: pl.LazyFrame, acc: pl.DataFrame, kicks: pl.DataFrame, facts: TraceFacts
) -> None:
    """Where the trace pairs the vCPU thread's ``kvm_exit`` with its ``kvm_entry`` (hardware
    virtualisation): the exits that carried its ``kicks`` and those handled in user space,
    exit to entry, and the thread's exits by reason, into ``facts``."""
    from vtrace.analyze import exits

    tid = acc["tid"][0]
    ex = exits(events.filter(pl.col("tid") == tid)).drop_nulls("duration_ns").sort("ts_ns")
    if ex.height == 0:
        return
    reasons = (
        ex.group_by(
            name=pl.col("reason_name").cast(pl.String).fill_null(pl.col("reason").cast(pl.String))
        )
        .agg(pl.len().alias("n"), pl.col("duration_ns").median().alias("median"))
        .sort("n", descending=True)
    )
    facts.exit_reasons = {name: (int(n), float(m)) for name, n, m in reasons.iter_rows()}
    carried = (
        kicks.select(access_ts="ts_ns")
        .join_asof(
            ex.select("ts_ns", "entry_ts_ns", "duration_ns", "reason_name"),
            left_on="access_ts",
            right_on="ts_ns",
            strategy="backward",
        )
        .filter(pl.col("access_ts") <= pl.col("entry_ts_ns"))  # inside that exit
    )
    facts.kick_exit_ns = carried["duration_ns"].to_numpy().astype(np.float64)
    facts.kick_exit_reasons = sorted(
        set(carried["reason_name"].cast(pl.String).drop_nulls().to_list())
    )
    user = ex.filter(pl.col("handled").cast(pl.String) == "user")
    facts.user_exit_ns = user["duration_ns"].to_numpy().astype(np.float64)


def _only_notify(path: object, every: pl.DataFrame, notify: Sequence[int]) -> pl.DataFrame:
    """The accesses less the kicks (writes handled in the kernel) at other addresses than
    ``notify``: a VM's other devices' queues. None left at ``notify`` is an error naming
    the addresses the kicks went to."""
    kick = is_kvm_kick()
    at = pl.col("addr").is_in([int(a) for a in notify])
    if every.filter(kick & at).height == 0:
        went = (
            every.filter(kick)
            .group_by("addr")
            .len()
            .sort(["len", "addr"], descending=[True, False])
        )
        listing = ", ".join(f"{a:#x}: {n}" for a, n in went.iter_rows()) or "none"
        wanted = ", ".join(f"{int(a):#x}" for a in notify)
        raise VtraceError(f"{path}: no kicks at {wanted} (--notify); the kicks went to {listing}")
    return every.filter(~(kick & ~at))


def trace_facts(
    path: str | os.PathLike[str],
    requests: int | None = None,
    notify: Sequence[int] | None = None,
) -> TraceFacts:
    """Read one trace (through ``open_trace`` and ``vtrace.analyze``) into what calibration needs.

    The request count comes from the lab back end's ``lab_pop`` events, else from
    ``requests`` (what the guest's iostat or fio said): a production host's trace has the
    kernel's events alone, and then the back end's own timings keep the base model's values.
    ``notify``: the device's notify addresses (ports or guest-physical addresses); the kicks
    the VM's vCPUs wrote to others, its other devices', are not this device's.
    """
    from vtrace import open_trace

    trace = open_trace(path)
    events = trace.events
    lab = trace.meta.get("lab", {})
    pops = (
        events.filter(pl.col("event").cast(pl.String) == LAB_POP)
        .select("ts_ns", "tid", "queue")
        .sort("ts_ns")
        .collect()
    )
    if pops.height == 0 and not requests:
        raise VtraceError(
            f"{path}: no request count: no {LAB_POP} events (vtrace lab run --record), no QEMU "
            "guest events (vtrace qemu-lab run): give --requests N (what the guest's iostat said)"
        )
    from vtrace.analyze import accesses

    every = accesses(events)
    if notify:
        every = _only_notify(path, every, notify)
    acc = _vcpu_accesses(every)
    if acc.height < 2:
        raise VtraceError(
            f"{path}: no kvm_pio/kvm_mmio/kvm_fast_mmio events on a vCPU thread: record kvm events"
        )
    requests = pops.height or int(requests or 0)
    duration = float(acc["ts_ns"][-1] - acc["ts_ns"][0])
    user = acc.filter(pl.col("handled").cast(pl.String) == "user")
    kick_rows = acc.filter(is_kvm_kick())
    kicks = kick_rows.height
    facts = TraceFacts(
        name=Path(path).name,
        requests=requests,
        batch=1,
        duration_ns=duration,
        kicks=kicks,
        userspace_exits=user.height,
        batch_from="no kicks",
        notify=tuple(int(a) for a in notify or ()),
    )
    if pops.height == 0 and kicks and user.height < requests:  # a virtio device's kernel events
        _kernel_shape(events, every, facts)
    # the guest's batch: the lab's own record of it, else the vCPU's requests per kick (each
    # batch kicks once unless the back end suppressed it, which only lowers the kicks)
    if lab.get("batch"):
        facts.batch, facts.batch_from = int(lab["batch"]), "lab meta"
    elif kicks:
        per_kick = (facts.vcpu_requests or requests) / kicks
        facts.batch = max(1, round(per_kick))
        facts.batch_from = f"{per_kick:.2f} requests per kick, rounded"
    _exit_costs(events, acc, kick_rows, facts)
    if user.height >= requests:  # an emulated device: per-register gaps and counts
        per_port = (
            user.drop_nulls("gap_ns")
            .group_by("addr", "write")
            .agg(pl.col("gap_ns").median().alias("gap"), pl.len().alias("n"))
            .filter(pl.col("n") >= requests // 2)  # leave out one-off accesses (the final exit)
        )
        for addr, write, gap, n in per_port.iter_rows():  # a handful of registers, not events
            facts.access_gap_ns[(int(addr), bool(write))] = float(gap)
            facts.access_count[(int(addr), bool(write))] = round(n / requests)
        if pops.height:
            starts = pops.join_asof(
                user.select("ts_ns", "addr", "write"), on="ts_ns", strategy="backward"
            ).group_by("addr", "write").len().sort(
                ["len", "addr", "write"], descending=[True, False, False]
            )  # fmt: skip
            if starts.height:
                facts.start_port = (int(starts["addr"][0]), bool(starts["write"][0]))
        elif facts.access_gap_ns:
            # kernel events alone: the access that starts the device's work is the write
            # followed by the longest interval (the device works before the vCPU re-enters)
            writes = {k: g for k, g in facts.access_gap_ns.items() if k[1]}
            if writes:
                facts.start_port = max(writes, key=writes.__getitem__)
        return facts
    if pops.height == 0:  # kernel events alone: no back-end timings to read
        return facts
    # a virtio device: the back end's own events, of the queue the vCPU read above kicks (a
    # lab run with several queues names each queue's notify port in its meta)
    queue = pops["queue"][0]
    if lab.get("vcpus", 1) > 1:
        facts.vcpu_requests = -(-requests // lab["vcpus"])  # the busiest vCPU: a full share
        facts.shape = {
            "vm.vcpus": lab["vcpus"],
            "virtqueue.queues": lab.get("queues", 1),
            "backend.threads": lab.get("backend_threads", "shared").replace("-", "_"),
        }
        ports = {q["notify_port"]: q["queue"] for q in lab.get("per_queue", [])}
        if kicks and ports:
            queue = ports.get(int(kick_rows["addr"][0]), queue)
    backend_tid = pops.filter(pl.col("queue") == queue)["tid"][0]
    lab_ev = (
        events.filter(
            pl.col("event").cast(pl.String).is_in([LAB_KICK, LAB_POP, LAB_COMPLETE])
            & (pl.col("tid") == backend_tid)
            & (pl.col("queue") == queue)
        )
        .select("ts_ns", pl.col("event").cast(pl.String), "count")
        .sort("ts_ns")
        .collect()
        .with_columns(
            pass_id=(pl.col("event") != LAB_POP).cum_sum(),
            next_ts=pl.col("ts_ns").shift(-1),
            next_event=pl.col("event").shift(-1),
            # the end of the pass before (a kick before it found the thread at work)
            after=pl.when(pl.col("event") == LAB_COMPLETE).then(pl.col("ts_ns")).forward_fill(),
        )
    )
    pop_rows = lab_ev.filter(pl.col("event") == LAB_POP)
    facts.pop_gap_ns = (
        pop_rows.filter(pl.col("next_event") == LAB_POP)
        .select(pl.col("next_ts") - pl.col("ts_ns"))
        .to_series()
        .to_numpy()
    )
    facts.publish_ns = (
        pop_rows.filter(pl.col("next_event") == LAB_COMPLETE)
        .select(pl.col("next_ts") - pl.col("ts_ns"))
        .to_series()
        .to_numpy()
    )
    # A wake-up starts at the first kick that found the thread asleep: its eventfd counts
    # the kicks merged into one wake-up (lab_kick's count), and the guest goes on kicking
    # while a stalled thread waits to run, so the last kick would hide the stall. Never a
    # kick from before the pass that came before (other vCPUs' kicks are not in kick_ts).
    kick_ts = kick_rows["ts_ns"].to_numpy()
    wakes = lab_ev.filter((pl.col("event") == LAB_KICK) & (pl.col("next_event") == LAB_POP))
    last = np.searchsorted(kick_ts, wakes["ts_ns"].to_numpy(), side="right") - 1
    merged = wakes["count"].fill_null(1).clip(lower_bound=1).to_numpy().astype(np.int64)
    since = np.searchsorted(kick_ts, wakes["after"].fill_null(0).to_numpy(), side="right")
    first = np.minimum(np.maximum(last - merged + 1, since), last)
    seen = last >= 0  # a wake-up before the vCPU's first recorded kick: none to count from
    facts.wake_ns = (wakes["next_ts"].to_numpy()[seen] - kick_ts[first[seen]]).astype(np.float64)
    mine = [t for t in lab.get("threads", []) if t.get("tid") == backend_tid]
    if mine and mine[0].get("wakeups"):
        # every queue the thread served: its CPU time covers them all
        served = (
            events.filter((pl.col("tid") == backend_tid) & (pl.col("source") == "lab"))
            .group_by(pl.col("event").cast(pl.String))
            .len()
            .collect()
        )
        counts = dict(served.iter_rows())
        facts.backend_cpu_ns = float(mine[0]["cpu_ns"])
        facts.backend_wakeups = int(mine[0]["wakeups"])
        facts.backend_requests = counts.get(LAB_POP, 0)
        facts.backend_passes = counts.get(LAB_COMPLETE, 0)
    return facts


def _exit_round_trip(f: TraceFacts) -> float:
    writes = [g for (_, w), g in f.access_gap_ns.items() if w and (_, w) != f.start_port]
    return min(writes or f.access_gap_ns.values())


def fit(cfg: Config, facts: list[TraceFacts]) -> tuple[Config, dict[str, tuple[float, str]]]:
    """Fitted values (with their sources) applied to ``cfg``."""
    fitted: dict[str, tuple[float, str]] = {}
    values: dict[str, Any] = {}
    cfg = _fit_exit_costs(cfg, facts, fitted)
    if cfg.kind == "emulated":
        fit_emulated(cfg, facts, fitted, values)
    else:
        fit_virtio(cfg, facts, fitted, values)
    for key, (value, _) in fitted.items():
        if key not in ("device.accesses", "interrupt.accesses"):
            digits = 6 if key.endswith(("probability", "share")) else 1
            values[key] = round(value, digits)
    return cfg.with_overrides(values, where="calibrate"), fitted


def _pooled(arrays: Iterable[np.ndarray | None]) -> np.ndarray:
    """Several traces' samples together (empty when none has any)."""
    kept = [a for a in arrays if a is not None and a.size]
    return np.concatenate(kept) if kept else np.empty(0)


def _exit_table(facts: list[TraceFacts]) -> str:
    """Each trace's exits by reason: ``name: REASON count x median us, ...``."""
    return "; ".join(
        f"{f.name}: "
        + ", ".join(f"{r} {n} x {m / 1000:.1f} us" for r, (n, m) in f.exit_reasons.items())
        for f in facts
        if f.exit_reasons
    )


def _fit_exit_costs(
    cfg: Config, facts: list[TraceFacts], fitted: dict[str, tuple[float, str]]
) -> Config:
    """``kvm.kernel_exit_ns`` from the exits that carried the kicks, exit to entry, where the
    traces pair them (hardware virtualisation); ``cfg`` with it, for the fits that use it."""
    samples = _pooled(f.kick_exit_ns for f in facts)
    if not samples.size:
        return cfg
    names = ", ".join(f.name for f in facts)
    reasons = sorted({r for f in facts for r in f.kick_exit_reasons})
    value = float(np.median(samples))
    fitted["kvm.kernel_exit_ns"] = (
        value,
        f"{names}: median kvm_exit to kvm_entry of the exits that carried the kicks "
        f"({samples.size}, reason {' / '.join(reasons) or 'unnamed'}); the vCPU thread's "
        f"exits by reason: {_exit_table(facts)}",
    )
    return cfg.with_overrides({"kvm.kernel_exit_ns": round(value, 1)}, where="calibrate")


def fit_emulated(
    cfg: Config,
    facts: list[TraceFacts],
    fitted: dict[str, tuple[float, str]],
    values: dict[str, Any],
) -> None:
    """An emulated device: its registers, the user-space exit round trip, the device's work
    and the guest's own time per request, into ``fitted`` (numbers, sources) and ``values``."""
    names = ", ".join(f.name for f in facts)
    f = facts[0]  # registers and their order come from the first trace
    if not f.access_gap_ns:
        raise VtraceError(f"{f.name}: no user-space register accesses: not an emulated device")
    # A PIO read is traced when user space has supplied its value, after the round trip,
    # so only the interval after a write spans one whole exit round trip.
    user = _pooled(x.user_exit_ns for x in facts)
    if user.size:  # hardware virtualisation: the exits themselves, exit to entry
        exit_ns = float(np.median(user))
        fitted["kvm.userspace_exit_ns"] = (
            exit_ns,
            f"{names}: median kvm_exit to kvm_entry of the exits handled in user space "
            f"({user.size}); the vCPU thread's exits by reason: {_exit_table(facts)}",
        )
    else:
        exit_ns = float(np.median([_exit_round_trip(x) for x in facts]))
        fitted["kvm.userspace_exit_ns"] = (
            exit_ns,
            f"{names}: smallest per-register median interval from a user-space PIO write to "
            "the next access (median over traces)",
        )
    accesses = []
    work = 0.0
    for (addr, write), count in sorted(f.access_count.items()):
        emulation = 0.0
        if (addr, write) == f.start_port:
            gaps = [x.access_gap_ns.get((addr, write), math.nan) for x in facts]
            emulation = max(0.0, float(np.nanmedian(gaps)) - exit_ns)
            work = emulation
        accesses.append(
            {
                "register": f"port {addr:#x} {'write' if write else 'read'}",
                "handler": "user",
                "count": count,
                "emulation_ns": round(emulation, 1),
            }
        )
    values["device.accesses"] = accesses
    per_request = sum(x.duration_ns for x in facts) / sum(x.requests for x in facts)
    exits = sum(a["count"] for a in accesses)
    fitted["device.accesses"] = (
        float(exits),
        f"{f.name}: user-space kvm_pio per request by port; the device's work is the extra "
        "interval after the access just before each lab_pop",
    )
    prep = max(0.0, per_request - exits * exit_ns - work)
    fitted["vcpu.request_prep_ns"] = (
        prep,
        f"{names}: vCPU time per request ({per_request:.0f} ns, all traces) minus its exits "
        "and the device work",
    )


def fit_virtio(
    cfg: Config,
    facts: list[TraceFacts],
    fitted: dict[str, tuple[float, str]],
    values: dict[str, Any],
) -> None:
    """A virtio ring: the guest's time per request and per batch, and, where the trace has
    the back end's own events, its wake-up, per-request and per-pass times."""
    names = ", ".join(f.name for f in facts)
    kernel_exit = cfg["kvm.kernel_exit_ns"]
    # The guest's own time per batch, host preemption of the vCPU thread included (a
    # mean: throughput follows it; a split into a typical time plus rare stalls,
    # vcpu.stall_per_s, fits the lab's runs less well).
    b, y = [], []
    for f in facts:
        if not f.kicks:
            raise VtraceError(f"{f.name}: no kicks handled in the kernel: not a virtio trace")
        batches = math.ceil((f.vcpu_requests or f.requests) / f.batch)  # the vCPU read
        b.append(f.batch)
        y.append(f.duration_ns / batches - f.kicks / batches * kernel_exit)
    b_arr, y_arr = np.array(b, dtype=float), np.array(y)
    # The batch each trace ran: the lab records it; from the kernel's events alone it is
    # requests per kick, which kicks the back end suppressed make larger than the guest's.
    batches_from = "; ".join(f"{f.name} batch {f.batch} ({f.batch_from})" for f in facts)
    if any(f.batch_from != "lab meta" for f in facts):
        batches_from += (
            ": requests per kick, where the back end suppressed kicks, is more than the "
            "guest's batch"
        )
    if len(set(b)) >= 2:
        (prep, batch_prep), *_ = np.linalg.lstsq(
            np.column_stack([b_arr, np.ones_like(b_arr)]), y_arr, rcond=None
        )
        source = (
            f"{names}: least squares on batch size of the vCPU's run time per batch "
            f"(duration / batches), less the kicks' kernel_exit_ns; {batches_from}"
        )
        fitted["vcpu.batch_prep_ns"] = (max(0.0, float(batch_prep)), source)
    else:
        batch_prep = cfg["vcpu.batch_prep_ns"]
        prep = float(np.mean((y_arr - batch_prep) / b_arr))
        source = (
            f"{names}: vCPU run time per batch / batch size, one batch size only; {batches_from}"
        )
    fitted["vcpu.request_prep_ns"] = (max(0.0, float(prep)), source)
    # A polling guest's looks at used.idx and its reaps run the same emulated guest
    # instructions as its requests, so they scale with the fitted per-request time (the
    # base model counts them in instructions: see lab-virtio.toml).
    base_prep = cfg["vcpu.request_prep_ns"]
    if base_prep > 0 and prep > 0:
        scale = float(prep) / base_prep
        for key in ("vcpu.poll_ns", "vcpu.reap_ns"):
            if cfg[key] > 0:
                fitted[key] = (
                    cfg[key] * scale,
                    f"{names}: the base model's {cfg[key]:.0f} ns x fitted / base "
                    f"request_prep_ns ({scale:.3f}): the same guest instructions",
                )
    pop_gap = trimmed_mean([f.pop_gap_ns for f in facts])
    publish = trimmed_mean([f.publish_ns for f in facts])
    if not math.isnan(pop_gap):
        fitted["backend.per_request_ns"] = (
            pop_gap,
            f"{names}: mean (below p99) interval between two lab_pop of one pass (pop, the device's "
            "buffer fill, push: the lab's device work is inside the back end's loop)",
        )
        fitted["device.service_ns"] = (0.0, "counted in backend.per_request_ns (see there)")
    w = _pooled(f.wake_ns for f in facts)
    if w.size:
        # Wake-ups are bimodal on a shared host: microseconds, or a preempted thread that
        # runs milliseconds later. Both matter to a guest waiting on a small ring.
        stalled = w > STALL_FACTOR * np.median(w)
        fitted["backend.wakeup_ns"] = (
            float(w[~stalled].mean()),
            f"{names}: mean from the first kick's kvm_pio that the eventfd wake-up merged "
            f"(lab_kick count) to the first lab_pop after it, leaving out stalls (over "
            f"{STALL_FACTOR}x the median)",
        )
        fitted["backend.stall_probability"] = (
            float(stalled.mean()),
            f"{names}: share of those wake-ups over {STALL_FACTOR}x the median ({w.size} in all)",
        )
        fitted["backend.stall_ns"] = (
            float((w[stalled] - np.median(w)).mean()) if stalled.any() else 0.0,
            f"{names}: mean extra delay of those stalled wake-ups",
        )
        timed = [f for f in facts if not math.isnan(f.backend_cpu_ns)]
        if timed and len(timed) == len(facts) and not math.isnan(pop_gap):
            # The back-end thread's CPU that its passes do not account for (pop to publish)
            # is what its wake-ups cost: going to sleep, being woken, finding the work. The
            # model draws wakeup_ns (plus a stall now and then) and holds a CPU for the
            # share of each draw, so its mean CPU per wake-up is the measured one.
            per_pass = 0.0 if math.isnan(publish) else max(0.0, publish - pop_gap)
            outside = sum(
                f.backend_cpu_ns - f.backend_requests * pop_gap - f.backend_passes * per_pass
                for f in timed
            )
            wakeups = sum(f.backend_wakeups for f in timed)
            per_wake = max(0.0, outside / wakeups)
            drawn = fitted["backend.wakeup_ns"][0] + (
                fitted["backend.stall_probability"][0] * fitted["backend.stall_ns"][0]
            )
            share = min(1.0, per_wake / drawn) if drawn > 0 else 1.0
            capped = " (capped at 1: the wake-ups cost more CPU than their latency)"
            fitted["backend.wakeup_cpu_share"] = (
                share,
                f"{names}: meta.json lab threads: the back-end thread's CPU time less its "
                f"passes' work (requests x per_request_ns + passes x per_pass_ns), per "
                f"wake-up ({per_wake:.0f} ns over {wakeups}), over the mean wake-up the model "
                f"draws ({drawn:.0f} ns: wakeup_ns and its stalls)"
                + (capped if per_wake > drawn else ""),
            )
    if not math.isnan(publish) and not math.isnan(pop_gap):
        fitted["backend.per_pass_ns"] = (
            max(0.0, publish - pop_gap),
            f"{names}: mean (below p99) last lab_pop to lab_complete, minus one request's work",
        )
    values["backend.publish"] = "per_pass"


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, str):
        return '"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, list):
        if not v:
            return "[]"
        if not isinstance(v[0], dict):  # quantiles: numbers on one line
            return "[" + ", ".join(_toml_value(x) for x in v) + "]"
        items = ",\n".join(
            "  { " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in a.items()) + " }" for a in v
        )
        return "[\n" + items + ",\n]"
    return str(v)


def render(cfg: Config, notes: dict[str, str], base: str, traces: list[str]) -> str:
    """The config as TOML, each value commented with its origin (a trace, or the base model)."""
    lines = [
        f"# Calibrated from {', '.join(traces)} by `vtrace calibrate`, starting from {base}.",
        "# Fitted values say which trace and statistic they came from; the others are the base",
        "# model's (see its comments for their sources).",
    ]
    for table in KIND_TABLES[cfg.kind]:
        lines.append(f"\n[{table}]")
        for key in SCHEMA[table]:
            dotted = f"{table}.{key}"
            value = cfg.values[table][key]
            note = f"fitted: {notes[dotted]}" if dotted in notes else f"from {base}"
            if key == "description" and table == "model":
                value = f"{value} (calibrated)"
            text = _toml_value(value)
            if "\n" in text:
                lines.append(f"# {key}: {note}")
                lines.append(f"{key} = {text}")
            else:
                lines.append(f"{key} = {text}  # {note}")
    return "\n".join(lines) + "\n"


def calibrate(
    traces: list[str | os.PathLike[str]],
    model: str | os.PathLike[str],
    output: str | os.PathLike[str] | None = None,
    *,
    force: bool = False,
    requests: int | None = None,
    notify: Sequence[int] | None = None,
) -> Calibration:
    """Fit ``model``'s costs to ``traces``; write the config to ``output`` (atomically,
    checked first; an existing file is replaced only with ``force``). ``requests`` is each
    trace's request count where the trace has no request events (kernel events alone);
    ``notify`` the device's notify addresses where the VM's other devices kicked too."""
    if not traces:
        raise VtraceError("calibrate: give at least one trace")
    if output is not None:
        check_new_file(output, force=force)
    cfg = load_config(model)
    if cfg.kind == "queue":
        raise VtraceError(f"{model}: a reference queue has no costs to calibrate")
    from vtrace import open_trace
    from vtrace.store import check_whole

    opened = [open_trace(t) for t in traces]
    for t in opened:
        check_whole(t, "a calibration from what is left would skew every fitted value")
    guests = [t for t, o in zip(traces, opened, strict=True) if o.meta.get("qemu_lab")]
    if guests:
        # a QEMU guest under TCG shows structure, not KVM's timings: the last trace gives the
        # shape, and the guest's dispatch splits are pooled over the batch submissions of all
        if len(guests) != len(traces):
            raise VtraceError(
                f"{guests[0]}: QEMU guest traces calibrate together only with other QEMU guest "
                "traces, not with lab traces"
            )
        qfacts = [qemu_facts(t, o.events, o.meta) for t, o in zip(traces, opened, strict=True)]
        devices = {f.device for f in qfacts}
        if len(devices) > 1:
            raise VtraceError(f"calibrate: QEMU guest traces of one device only, got {devices}")
        values, found = fit_qemu(cfg, qfacts[-1])
        pooled = [f for f in qfacts if f.batch_submission]
        if len(qfacts) > 1 and pooled:
            batches = sum(f.batches for f in pooled)
            extra = sum(max(0, f.kicks - f.batches) for f in pooled)
            values["workload.dispatch_splits"] = round(extra / batches, 4)
            found["workload.dispatch_splits"] = (
                values["workload.dispatch_splits"],
                f"{' + '.join(f.name for f in pooled)}: {extra} virtio_queue_notify beyond one "
                f"per submission over {batches} batch submissions",
            )
            if not qfacts[-1].batch_submission:  # the last was depth 1: batches as pooled
                _, deep = fit_qemu(cfg, pooled[-1])
                for key in ("workload.submit", "virtqueue.batch"):
                    values[key], found[key] = deep[key][0], deep[key]
        if qfacts[-1].device == "virtio-blk" and all(f.vcpus == 1 for f in qfacts):
            # with the host scheduler's events (qemu-lab run as root) the timings come too;
            # one vCPU: its thread is the one whose signals to the main loop are the kicks
            timed = [
                t
                for f, o in zip(qfacts, opened, strict=True)
                if (t := qemu_timing(f.name, o.events, f.queue_depth)) is not None
            ]
            timing = fit_timing(timed, cfg["interrupt.guest_handler_ns"], cfg["kvm.kernel_exit_ns"])
            if timing and all(o.meta.get("accel") == "tcg" for o in opened):
                timing["backend.holds_kicks"] = (
                    True,
                    "meta accel tcg: a TCG vCPU takes QEMU's big lock for its notify write "
                    "(io_writex), which the main loop holds while it dispatches",
                )
            for key, (value, source) in timing.items():
                values[key], found[key] = value, (value, source)
        cfg = cfg.with_overrides(values, where="calibrate")
        facts: list[TraceFacts] | list[QemuFacts] = qfacts
        notes = {k: src for k, (_, src) in found.items()}
        fitted = {
            k: (float(sum(a["count"] for a in v)) if isinstance(v, list) else float(v), src)
            for k, (v, src) in found.items()
            if isinstance(v, list | int | float)
            and not isinstance(v, bool)
            and not k.endswith("_quantiles_ns")  # a law, not one figure
        }
    else:
        facts = [trace_facts(t, requests, notify) for t in traces]
        cfg, fitted = fit(cfg, facts)
        notes = {k: src for k, (_, src) in fitted.items()}
        notes["backend.publish"] = "the lab back end publishes used.idx once per pass"
        shaped = [f for f in facts if f.shape]
        if shaped:  # a run on several vCPUs or queues: the last such trace gives the shape
            last = shaped[-1]
            cfg = cfg.with_overrides(last.shape, where="calibrate")
            for key in last.shape:
                source = last.shape_from.get(key, f"meta.json lab {key.split('.')[1]}")
                notes[key] = f"{last.name}: {source}"
        if cfg.kind != "virtio":
            notes.pop("backend.publish")
    if output is not None:
        out = Path(output)
        text = render(cfg, notes, model_path(model).name, [str(t) for t in traces])
        # What we write must load: checked under its temporary name before it takes out's.
        write_file(out, lambda f: f.write(text.encode()), force=force, verify=load_config)
        cfg = load_config(out)
    return Calibration(cfg, fitted, facts, notes)
