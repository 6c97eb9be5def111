"""`vtrace stat`: live per-VM, per-reason event rates and log2 histograms of exit handling
time, aggregated in the kernel (stat.c): only the aggregates cross into user space.

Handling time is kvm_exit -> kvm_entry on the same thread where the CPU has vmx/svm (the
whole exit), and kvm_userspace_exit -> the thread's next KVM_RUN everywhere (the time the
VMM spent in user space on the exit, the part a user-space device model adds). The next
KVM_RUN is seen by kvm_fpu (load), traced once at the start of every KVM_RUN; where a kernel
lacks it, by syscalls:sys_enter_ioctl, which costs more (USERSPACE_ENDS).

Kicks (device writes KVM handled in the kernel, an ioeventfd's) are counted as writes minus
the writes a user-space exit claimed, from counters the program keeps (stat.c, "Kicks").
``--prometheus`` serves the same aggregates as OpenMetrics (:class:`MetricsCollector`): the
maps are read when a scraper asks, nothing is done per event in user space.
"""

from __future__ import annotations

import ctypes as ct
import os
import re
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from rich.console import Console, Group
from rich.table import Table
from rich.text import Text

from vtrace import schema as s
from vtrace.analyze.kicks import IN_KERNEL_DEVICE_PORTS  # their writes are not kicks
from vtrace.collect import bccload, doctor, program
from vtrace.collect.decode import EVENT_IDS
from vtrace.collect.formats import read_format
from vtrace.collect.host import host_facts, vm_name
from vtrace.collect.raw_tracepoints import raw_problem
from vtrace.collect.recording import preflight, watch_processes
from vtrace.errors import VtraceError
from vtrace.kvm_api import KVM_RUN

SOURCE = Path(__file__).with_name("stat.c")
KIND_EXIT, KIND_USERSPACE = 0, 1
KIND_NAMES = {KIND_EXIT: "exit->entry", KIND_USERSPACE: "user space"}
HOT_SLOTS = 256  # per-CPU direct-mapped counters in front of the counts hash (stat.c)
# --interval: below 0.1 s the refresh costs more than it shows; above a day nothing is live
# (and an infinite or NaN wait is an OverflowError in threading).
MIN_INTERVAL_S, MAX_INTERVAL_S = 0.1, 86_400.0
STAT_EVENTS = (
    s.KVM_EXIT,
    s.KVM_ENTRY,
    s.KVM_USERSPACE_EXIT,
    s.KVM_PIO,
    s.KVM_MMIO,
    s.KVM_FAST_MMIO,
    s.KVM_SET_IRQ,
    s.KVM_MSI_SET_IRQ,
    s.KVM_INJ_VIRQ,
)
# (define prefix, tracepoint system, event, field)
_FIELDS = (
    ("EXIT_REASON", "kvm", s.KVM_EXIT, "exit_reason"),
    ("EXIT_ISA", "kvm", s.KVM_EXIT, "isa"),
    ("USER_REASON", "kvm", s.KVM_USERSPACE_EXIT, "reason"),
    ("PIO_PORT", "kvm", s.KVM_PIO, "port"),
    ("PIO_RW", "kvm", s.KVM_PIO, "rw"),
    ("MMIO_TYPE", "kvm", s.KVM_MMIO, "type"),
    ("MMIO_GPA", "kvm", s.KVM_MMIO, "gpa"),
    ("INJ_VECTOR", "kvm", s.KVM_INJ_VIRQ, "vector"),
    ("IOCTL_CMD", "syscalls", "sys_enter_ioctl", "cmd"),
    ("FPU_LOAD", "kvm", "kvm_fpu", "load"),
)
# What marks the VMM's return to KVM_RUN, best first: kvm_fpu is a KVM tracepoint on the
# KVM_RUN path only; a syscall tracepoint puts every syscall on the host on the slow path.
USERSPACE_ENDS = ("kvm_fpu", "sys_enter_ioctl")
# Where each thread's open intervals live, best first (stat.c: TASK_STORAGE).
PENDING_STORES = ("task_storage", "lru_hash")
COUNT_KEYS = ["pid", "event", "reason"]
HIST_KEYS = ["pid", "kind", "reason"]
# The program's own counters for kicks (stat.c, "Kicks"), as event ids above the tracepoints'
# (the packed hot-slot key has 5 bits for the event): PIO reads per port, PIO writes a
# user-space exit claimed (per port), MMIO writes one claimed, and claims a PIO read's
# completion gave back (per port).
EV_PIO_READ, EV_USER_PIO_WRITE, EV_USER_MMIO_WRITE, EV_READ_CLAIM = 28, 29, 30, 31
BOOKKEEPING = (EV_PIO_READ, EV_USER_PIO_WRITE, EV_USER_MMIO_WRITE, EV_READ_CLAIM)
# kvm_mmio's reason: the access type (KVM_TRACE_MMIO_*), and stat.c's own for writes to the
# devices inside KVM.
MMIO_TYPES = {0: "unsatisfied read", 1: "read", 2: "write", 3: "write to local APIC/IOAPIC"}
MMIO_WRITE = 2


class Stat:
    """The aggregating BPF program: attach, read cumulative counts and histograms, detach."""

    def __init__(
        self,
        pids: list[int] | None = None,
        tracefs: Path = doctor.TRACEFS,
        classic: bool = False,
        hot_slots: int = HOT_SLOTS,
        userspace_end: str | None = None,
        pending_store: str | None = None,
    ) -> None:
        """``userspace_end``: one of USERSPACE_ENDS, or None for the first the host has;
        ``pending_store``: one of PENDING_STORES, or None for the first the kernel accepts."""
        if hot_slots < 1 or hot_slots & (hot_slots - 1) or hot_slots > 1 << 16:
            raise VtraceError(f"hot_slots must be a power of two up to 65536, got {hot_slots}")
        self.hot_slots = hot_slots
        if userspace_end not in (None, *USERSPACE_ENDS):
            raise VtraceError(
                f"userspace_end must be one of {', '.join(USERSPACE_ENDS)}, got {userspace_end}"
            )
        self.userspace_end = userspace_end  # after defines(): the one used, or None
        if pending_store not in (None, *PENDING_STORES):
            raise VtraceError(
                f"pending_store must be one of {', '.join(PENDING_STORES)}, got {pending_store}"
            )
        self.pending_store = pending_store  # after start(): the one used
        self.pids = program.validate_pids(pids)
        # a --pid that names no process would show an empty table forever: say so now
        for fd in watch_processes(self.pids).values():
            os.close(fd)
        self.tracefs = tracefs
        self.attached: list[str] = []
        self.unavailable: dict[str, str] = {}
        self.classic = classic  # read every tracepoint classic (formatted records)
        self.raw: set[str] = set()  # the events read as raw tracepoints
        self.classic_why: dict[str, str] = {}
        self._bpf: Any = None

    def defines(self) -> dict[str, int]:
        events = self.tracefs / "events"
        values = {
            "FILTER_PIDS": int(bool(self.pids)),
            "HOT_SLOTS": self.hot_slots,
            "KVM_RUN": KVM_RUN,
            "HAVE_EXIT": int(read_format(events, "kvm", s.KVM_EXIT) is not None),
        }
        have = {
            "kvm_fpu": read_format(events, "kvm", "kvm_fpu") is not None,
            "sys_enter_ioctl": read_format(events, "syscalls", "sys_enter_ioctl") is not None,
        }
        wanted = [self.userspace_end] if self.userspace_end else list(USERSPACE_ENDS)
        self.userspace_end = next((e for e in wanted if have[e]), None)
        values["END_FPU"] = int(self.userspace_end == "kvm_fpu")
        values["END_IOCTL"] = int(self.userspace_end == "sys_enter_ioctl")
        values.update(
            {f"EV_{name.upper()}": i for name, i in EVENT_IDS.items() if name in STAT_EVENTS}
        )
        values.update(
            EV_PIO_READ=EV_PIO_READ,
            EV_USER_PIO_WRITE=EV_USER_PIO_WRITE,
            EV_USER_MMIO_WRITE=EV_USER_MMIO_WRITE,
            EV_READ_CLAIM=EV_READ_CLAIM,
        )
        for prefix, system, event, name in _FIELDS:
            fields = read_format(events, system, event) or {}
            f = fields.get(name)
            values[f"{prefix}_OFF"] = f.offset if f else -1
            values[f"{prefix}_SIZE"] = f.size if f else 0
        self.raw, self.classic_why = set(), {}
        # kvm_fpu is read only as the end of user-space time, so only when it is that marker.
        fpu = ("kvm_fpu",) if self.userspace_end == "kvm_fpu" else ()
        for ev in (*STAT_EVENTS, *fpu):
            fields = read_format(events, "kvm", ev)
            if fields is None:
                continue
            why = "classic tracepoints asked for" if self.classic else raw_problem(ev, fields)
            if why is None:
                self.raw.add(ev)
            else:
                self.classic_why[ev] = why
        values["RAW_MASK"] = sum(1 << EVENT_IDS[ev] for ev in self.raw if ev in EVENT_IDS)
        values["RAW_FPU"] = int("kvm_fpu" in self.raw)
        return values

    def start(self) -> Stat:
        preflight(self.tracefs)
        bcc = bccload.load_bcc()
        values = self.defines()
        stores = [self.pending_store] if self.pending_store else list(PENDING_STORES)
        for store in stores:
            values["TASK_STORAGE"] = int(store == "task_storage")
            try:
                self._bpf = bcc.BPF(src_file=str(SOURCE).encode(), cflags=program.cflags(values))
                # bcc loads a function when it is attached: load the one that opens an
                # interval now, so a kernel that refuses task storage to tracepoint programs
                # is found here, and the LRU map takes over.
                raw = s.KVM_USERSPACE_EXIT in self.raw
                self._bpf.load_func(
                    f"{'raw_' if raw else ''}on_{s.KVM_USERSPACE_EXIT}".encode(),
                    self._bpf.RAW_TRACEPOINT if raw else self._bpf.TRACEPOINT,
                )
                self.pending_store = store
                break
            except Exception as e:
                if self._bpf is not None:
                    self._bpf.cleanup()
                    self._bpf = None
                if store == stores[-1]:
                    raise VtraceError(
                        f"the stat BPF program did not load ({e}); run `vtrace doctor`"
                    ) from None
                self.unavailable[store] = (
                    f"the kernel refused it ({(str(e).splitlines() or [repr(e)])[0]})"
                )
        for p in self.pids:
            self._bpf[b"pids"][ct.c_uint32(p)] = ct.c_uint8(1)
        probes = [("kvm", ev) for ev in STAT_EVENTS]
        if self.userspace_end == "kvm_fpu":
            probes.append(("kvm", "kvm_fpu"))
        elif self.userspace_end == "sys_enter_ioctl":
            probes.append(("syscalls", "sys_enter_ioctl"))
        else:
            self.unavailable["user-space handling time"] = (
                "no kvm:kvm_fpu or syscalls:sys_enter_ioctl tracepoint"
            )
        for system, ev in probes:
            if read_format(self.tracefs / "events", system, ev) is None:
                self.unavailable[ev] = f"no {system}:{ev} in {self.tracefs}/events"
                continue
            if ev == s.KVM_ENTRY and not values["HAVE_EXIT"]:
                continue
            if ev in self.raw:
                try:
                    self._bpf.attach_raw_tracepoint(tp=ev.encode(), fn_name=f"raw_on_{ev}".encode())
                    self.attached.append(f"raw:{ev}")
                    continue
                except Exception as e:  # the classic handler below counts it instead
                    self.raw.discard(ev)
                    self.classic_why[ev] = f"raw attach failed: {e}"
            try:
                self._bpf.attach_tracepoint(
                    tp=f"{system}:{ev}".encode(), fn_name=f"on_{ev}".encode()
                )
                self.attached.append(f"{system}:{ev}")
            except Exception as e:
                self.unavailable[ev] = f"attach failed: {e}"
        return self

    def detach(self) -> None:
        """Stop counting without unloading (``reattach`` resumes; the maps keep their counts)."""
        for where in self.attached:
            kind, _, ev = where.partition(":")
            if kind == "raw":
                self._bpf.detach_raw_tracepoint(tp=ev.encode())
            else:
                self._bpf.detach_tracepoint(tp=where.encode())

    def reattach(self) -> None:
        """Attach again what ``start`` attached and ``detach`` detached."""
        for where in self.attached:
            kind, _, ev = where.partition(":")
            if kind == "raw":
                self._bpf.attach_raw_tracepoint(tp=ev.encode(), fn_name=f"raw_on_{ev}".encode())
            else:
                self._bpf.attach_tracepoint(tp=where.encode(), fn_name=f"on_{ev}".encode())

    def snapshot(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """Cumulative (counts, histogram) frames, summed over CPUs: counts of the
        tracepoints' events; the histogram's ``total`` events and their summed ``ns``."""
        counts, hist = self.snapshot_all()
        return counts.filter(~pl.col("event").is_in(BOOKKEEPING)), hist

    def snapshot_all(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        """:meth:`snapshot` with the program's kick counters (BOOKKEEPING) in the counts."""
        c_rows = [
            (k.pid, k.event, k.reason, sum(v)) for k, v in self._bpf[b"counts"].items()
        ]  # one row per (pid, event, reason) key, not per event
        # The hot table: per slot, per CPU, a packed key (0: never claimed) and its count.
        hot = np.array(
            [(c.key, c.n) for _, per_cpu in self._bpf[b"hot"].items() for c in per_cpu],
            dtype=np.uint64,
        ).reshape(-1, 2)
        hot = hot[(hot[:, 0] != 0) & (hot[:, 1] != 0)]
        key = hot[:, 0]
        c_rows += zip(
            ((key >> 5) & 0x3FFFFF).tolist(),
            (key & 0x1F).tolist(),
            ((key >> 27) & 0xFFFFFFFF).tolist(),
            hot[:, 1].tolist(),
            strict=True,
        )
        h_rows = [
            (k.pid, k.kind, k.reason, k.slot, sum(c.n for c in v), sum(c.ns for c in v))
            for k, v in self._bpf[b"hist"].items()
        ]  # one row per (pid, kind, reason, slot) key
        counts = (
            pl.DataFrame(
                c_rows, schema=dict.fromkeys([*COUNT_KEYS, "total"], pl.Int64), orient="row"
            )
            .group_by(COUNT_KEYS)
            .agg(pl.col("total").sum())
        )
        hist = pl.DataFrame(
            h_rows,
            schema=dict.fromkeys([*HIST_KEYS, "slot", "total", "ns"], pl.Int64),
            orient="row",
        )
        return counts, hist

    def stop(self) -> None:
        if self._bpf is not None:
            self._bpf.cleanup()
            self._bpf = None

    def __enter__(self) -> Stat:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def interval_view(
    prev: tuple[pl.DataFrame, pl.DataFrame],
    cur: tuple[pl.DataFrame, pl.DataFrame],
    interval_s: float,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Per-interval rows: counts with per_s and p50/p99 handling time; the interval's histograms."""
    counts = (
        cur[0]
        .join(prev[0], on=COUNT_KEYS, how="left", suffix="_prev")
        .with_columns(count=pl.col("total") - pl.col("total_prev").fill_null(0))
        .with_columns(per_s=pl.col("count") / interval_s)
    )
    hist = (
        cur[1]
        .join(prev[1], on=[*HIST_KEYS, "slot"], how="left", suffix="_prev")
        .with_columns(count=pl.col("total") - pl.col("total_prev").fill_null(0))
        .filter(pl.col("count") > 0)
        .sort([*HIST_KEYS, "slot"])
    )
    # Percentiles from log2 buckets: the bucket's upper bound (2^(slot+1) ns) where the
    # cumulative count crosses the fraction.
    quant = (
        hist.with_columns(
            cum=pl.col("count").cum_sum().over(HIST_KEYS), n=pl.col("count").sum().over(HIST_KEYS)
        )
        .group_by(HIST_KEYS)
        .agg(
            p50_ns=(2 ** (pl.col("slot").filter(pl.col("cum") >= 0.5 * pl.col("n")).first() + 1)),
            p99_ns=(2 ** (pl.col("slot").filter(pl.col("cum") >= 0.99 * pl.col("n")).first() + 1)),
            timed=pl.col("count").sum(),
        )
        .with_columns(
            event=pl.when(pl.col("kind") == KIND_EXIT)
            .then(EVENT_IDS[s.KVM_EXIT])
            .otherwise(EVENT_IDS[s.KVM_USERSPACE_EXIT])
        )
    )
    counts = counts.join(
        quant.select("pid", "event", "reason", "p50_ns", "p99_ns"),
        on=COUNT_KEYS,
        how="left",
    ).sort(["per_s", "pid"], descending=[True, False])
    return counts, hist


def _names(counts: pl.DataFrame, tables: s.ReasonTables, isa: str) -> pl.DataFrame:
    exit_table = tables.svm if isa == "svm" else tables.vmx
    ids = {v: k for k, v in EVENT_IDS.items()}
    names = {pid: vm_name(pid) for pid in counts["pid"].unique().to_list()}
    ev = pl.col("event")
    return counts.with_columns(
        vm=pl.col("pid").replace_strict(names, return_dtype=pl.String),
        event_name=ev.replace_strict(ids, return_dtype=pl.String),
        reason_name=pl.when(ev == EVENT_IDS[s.KVM_EXIT])
        .then(pl.col("reason").replace_strict(exit_table, default=None, return_dtype=pl.String))
        .when(ev == EVENT_IDS[s.KVM_USERSPACE_EXIT])
        .then(
            pl.col("reason").replace_strict(tables.userspace, default=None, return_dtype=pl.String)
        )
        .when(ev == EVENT_IDS[s.KVM_PIO])
        .then(pl.format("port 0x{}", pl.col("reason").map_batches(_hex, return_dtype=pl.String)))
        .when(ev == EVENT_IDS[s.KVM_MMIO])
        .then(pl.col("reason").replace_strict(MMIO_TYPES, default=None, return_dtype=pl.String))
        .when(ev == EVENT_IDS[s.KVM_INJ_VIRQ])
        .then(pl.format("vector 0x{}", pl.col("reason").map_batches(_hex, return_dtype=pl.String)))
        .otherwise(pl.lit("")),
    )


def _hex(col: pl.Series) -> pl.Series:
    return pl.Series(np.char.mod("%x", col.to_numpy()), dtype=pl.String)


def _us(ns: int | None) -> str:
    return "" if ns is None else f"{ns / 1000:,.1f}"


def table_view(
    counts: pl.DataFrame,
    hist: pl.DataFrame,
    interval_s: float,
    elapsed_s: float,
    reason_names: dict[tuple[int, int], str],
) -> Group:
    t = Table(title=f"vtrace stat: last {interval_s:g} s ({elapsed_s:.0f} s in)", show_edge=False)
    for col, justify in (
        ("VM", "left"), ("pid", "right"), ("event", "left"), ("reason", "left"),
        ("per s", "right"), ("total", "right"), ("p50≤µs", "right"), ("p99≤µs", "right"),
    ):  # fmt: skip
        t.add_column(col, justify=justify, no_wrap=True, min_width=8 if col == "VM" else None)  # type: ignore[arg-type]
    # Rows are rendered one by one: at most 40 table rows and 3 histograms, display only.
    for r in counts.filter(pl.col("total") > 0).head(40).iter_rows(named=True):
        t.add_row(
            r["vm"][:16], str(r["pid"]), r["event_name"].removeprefix("kvm_"),
            (r["reason_name"] or str(r["reason"])).removeprefix("KVM_EXIT_"),
            f"{r['per_s']:,.0f}", f"{r['total']:,}", _us(r["p50_ns"]), _us(r["p99_ns"]),
        )  # fmt: skip
    parts: list[Any] = [t]
    # The busiest timed reasons as log2 histograms, like bcc's print_log2_hist.
    groups = (
        hist.group_by(HIST_KEYS).agg(pl.col("count").sum()).sort("count", descending=True).head(3)
    )
    for g in groups.iter_rows(named=True):
        rows = hist.filter(
            (pl.col("pid") == g["pid"])
            & (pl.col("kind") == g["kind"])
            & (pl.col("reason") == g["reason"])
        )
        peak = max(rows["count"].max() or 1, 1)
        parts.append(
            Text(
                f"\n{KIND_NAMES[g['kind']]} time, pid {g['pid']}, "
                f"{reason_names.get((g['kind'], g['reason']), g['reason'])} ({g['count']:,} timed):"
            )
        )
        for slot, n in rows.select("slot", "count").iter_rows():
            lo, hi = (1 << slot), (1 << (slot + 1))
            bar = "█" * max(1, round(30 * n / peak))
            parts.append(Text(f"  {lo:>10,} -> {hi:<10,} ns {n:>10,} {bar}"))
    return Group(*parts)


CSV_COLUMNS = [
    "time_s",
    "pid",
    "vm",
    "event_name",
    "reason",
    "reason_name",
    "count",
    "per_s",
    "p50_ns",
    "p99_ns",
]


def check_interval(interval_s: float) -> None:
    """A refresh interval ``run`` can wait, else one line naming --interval."""
    if not MIN_INTERVAL_S <= interval_s <= MAX_INTERVAL_S:  # NaN fails this too
        raise VtraceError(
            f"--interval: {interval_s:g} is not between {MIN_INTERVAL_S:g} and "
            f"{MAX_INTERVAL_S:g} seconds"
        )


def kicks(counts: pl.DataFrame) -> pl.DataFrame:
    """Cumulative kicks per VM and where they went, from :meth:`Stat.snapshot_all` counts:
    columns ``pid``, ``target`` (``port 0x..``, ``mmio`` or ``fast_mmio``) and ``total``.

    A port's kicks are its PIO writes (kvm_pio - reads) less the writes a user-space exit
    claimed, plus the claims a read's completion gave back; the ports of the devices inside
    KVM (PIC, PIT, ELCR) are not kicks. MMIO: writes (not to the local APIC or IOAPIC) less
    claimed ones, and every kvm_fast_mmio."""
    ev, n = pl.col("event"), pl.col("total")
    in_kernel = pl.lit(False)
    for lo, hi in IN_KERNEL_DEVICE_PORTS:
        in_kernel = in_kernel | pl.col("reason").is_between(lo, hi)
    pio = (
        counts.filter(
            ev.is_in([EVENT_IDS[s.KVM_PIO], EV_PIO_READ, EV_USER_PIO_WRITE, EV_READ_CLAIM])
            & ~in_kernel
        )
        .group_by("pid", "reason")
        .agg(total=pl.when(ev.is_in([EV_PIO_READ, EV_USER_PIO_WRITE])).then(-n).otherwise(n).sum())
        .select(
            "pid",
            target=pl.format("port 0x{}", pl.col("reason").map_batches(_hex, pl.String)),
            total="total",
        )
    )
    mmio = (
        counts.filter(
            ((ev == EVENT_IDS[s.KVM_MMIO]) & (pl.col("reason") == MMIO_WRITE))
            | (ev == EV_USER_MMIO_WRITE)
        )
        .group_by("pid")
        .agg(total=pl.when(ev == EV_USER_MMIO_WRITE).then(-n).otherwise(n).sum())
        .select("pid", target=pl.lit("mmio"), total="total")
    )
    fast = (
        counts.filter(ev == EVENT_IDS[s.KVM_FAST_MMIO])
        .group_by("pid")
        .agg(pl.col("total").sum())
        .select("pid", target=pl.lit("fast_mmio"), total="total")
    )
    return (
        pl.concat([pio, mmio, fast])
        .filter(pl.col("total") > 0)
        .sort("pid", "target")
        .with_columns(pl.col("total").cast(pl.Int64))
    )


# --- Prometheus ----------------------------------------------------------------------------

# Histogram bucket upper bounds: the in-kernel log2 buckets' own bounds, 2^10 ns (about 1 µs)
# to 2^30 ns (about 1.07 s), so every bucket is exact; faster events fall in the first.
BUCKET_SLOTS = range(9, 30)  # log2 slot k holds [2^k, 2^(k+1)) ns: bound 2^(k+1)
BUCKET_BOUNDS_S = [2 ** (k + 1) / 1e9 for k in BUCKET_SLOTS]
DEFAULT_BIND = "127.0.0.1"
_ADDRESS = re.compile(r"^(?:(?:\[(?P<v6>[^\]]*)\]|(?P<host>[^:\[\]]*)):)?(?P<port>[^:]*)$")


def parse_listen(spec: str) -> tuple[str, int]:
    """``[HOST:]PORT`` (``[ADDR]:PORT`` for IPv6) -> (host, port); host defaults to
    127.0.0.1 (scrapes from this host only) and PORT must be 1 to 65535."""
    m = _ADDRESS.match(spec.strip())
    if m is None:
        raise VtraceError(f"--prometheus: {spec!r} is not [HOST:]PORT (e.g. 9464 or 0.0.0.0:9464)")
    host = m["v6"] if m["v6"] is not None else m["host"]
    if host is not None and not host:
        raise VtraceError(f"--prometheus: {spec!r} has an empty HOST before the colon")
    port = m["port"]
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise VtraceError(f"--prometheus: port {port!r} is not a number from 1 to 65535")
    return host or DEFAULT_BIND, int(port)


def serve(host: str, port: int, registry: Any) -> Any:
    """The OpenMetrics HTTP server on (host, port), serving ``registry``: bound here, so a
    port in use or a host this machine does not have is one line before anything attaches."""
    from prometheus_client import start_http_server

    try:
        server, _ = start_http_server(port, addr=host, registry=registry)
    except OSError as e:
        raise VtraceError(
            f"--prometheus: cannot listen on {host}:{port}: {e.strerror or e}"
        ) from None
    return server


class MetricsCollector:
    """A prometheus_client collector over a :class:`Stat`: each scrape reads the in-kernel
    maps once (:meth:`Stat.snapshot_all`) and turns them into counter and histogram families
    per VM (``pid``, ``vm``) and ``reason``."""

    def __init__(self, tables: s.ReasonTables, isa: str) -> None:
        self.tables, self.isa = tables, isa
        self.stat: Stat | None = None  # set once the probes are attached
        self.created = time.time()
        self._lock = threading.Lock()  # the map reads and the counters' high-water marks
        self._high: dict[tuple[str, tuple[str, ...]], int] = {}
        # A VM's name, learnt while its process lives (a label must not change when it ends).
        self._vm: dict[int, str] = {}
        self.names = {KIND_EXIT: "exit_handling", KIND_USERSPACE: "userspace_handling"}

    def vm(self, pid: int) -> str:
        if pid not in self._vm:
            self._vm[pid] = vm_name(pid)
        return self._vm[pid]

    def learn_names(self) -> None:
        """Name the pids the maps hold now (run every interval: a short-lived VM is named
        while it lives, even when no scrape comes before it ends)."""
        with self._lock:
            if self.stat is not None:
                counts, _ = self.stat.snapshot()
                for pid in counts["pid"].unique().to_list():  # one per VM, not per event
                    self.vm(pid)

    def _monotonic(self, name: str, labels: tuple[str, ...], value: int) -> int:
        # A write and the exit that claims it are two events: a scrape between them sees the
        # write as a kick for a moment. A counter never goes down (Prometheus would read a
        # reset): hold the high-water mark until the true count reaches it again.
        key = (name, labels)
        value = max(value, self._high.get(key, 0))
        self._high[key] = value
        return value

    def collect(self) -> Any:
        from prometheus_client.metrics_core import CounterMetricFamily, HistogramMetricFamily
        from prometheus_client.utils import floatToGoString

        with self._lock:
            if self.stat is None:
                return
            counts, hist = self.stat.snapshot_all()
            named = _names(
                counts.filter(~pl.col("event").is_in(BOOKKEEPING)), self.tables, self.isa
            )
            kick_rows = kicks(counts)
            pids = set(named["pid"].to_list()) | set(kick_rows["pid"].to_list())
            pids |= set(hist["pid"].to_list())
            vm = {pid: self.vm(pid) for pid in pids}
            labels = ["pid", "vm", "reason"]
            ev = pl.col("event")
            reason = pl.coalesce(pl.col("reason_name"), pl.col("reason").cast(pl.String))
            families = (
                ("exits", "KVM exits (kvm_exit), by exit reason", ev == EVENT_IDS[s.KVM_EXIT]),
                (
                    "userspace_exits",
                    "Returns of KVM_RUN to the VMM (kvm_userspace_exit), by KVM_EXIT_* reason",
                    ev == EVENT_IDS[s.KVM_USERSPACE_EXIT],
                ),
                (
                    "interrupts",
                    "Interrupts injected into the VM's vCPUs (kvm_inj_virq), by vector",
                    ev == EVENT_IDS[s.KVM_INJ_VIRQ],
                ),
                (
                    "irq_raised",
                    "Interrupt lines and MSIs raised (kvm_set_irq, kvm_msi_set_irq), by the "
                    "raising process (a kernel worker for an irqfd's injection)",
                    ev.is_in([EVENT_IDS[s.KVM_SET_IRQ], EVENT_IDS[s.KVM_MSI_SET_IRQ]]),
                ),
            )
            out = []
            for name, doc, which in families:
                fam = CounterMetricFamily(f"vtrace_{name}", doc, labels=labels)
                rows = named.filter(which)
                if name == "irq_raised":
                    rows = rows.with_columns(reason_name=pl.col("event_name"))
                rows = (
                    rows.group_by("pid", reason.alias("r"))
                    .agg(pl.col("total").sum())
                    .sort("pid", "r")
                )
                for pid, r, total in rows.iter_rows():  # one row per series, not per event
                    lv = (str(pid), vm[pid], r)
                    fam.add_metric(lv, self._monotonic(name, lv, total), created=self.created)
                out.append(fam)
            fam = CounterMetricFamily(
                "vtrace_kicks",
                "Device notifications KVM handled in the kernel (an ioeventfd): writes with no "
                "user-space exit for them, by port, mmio or fast_mmio",
                labels=labels,
            )
            for pid, target, total in kick_rows.iter_rows():  # one row per series
                lv = (str(pid), vm[pid], target)
                fam.add_metric(lv, self._monotonic("kicks", lv, total), created=self.created)
            out.append(fam)
            out += self._histograms(hist, vm, HistogramMetricFamily, floatToGoString)
        yield from out

    def _histograms(self, hist: pl.DataFrame, vm: dict[int, str], family: Any, fmt: Any) -> list:
        """The handling-time histograms: cumulative buckets at BUCKET_BOUNDS_S, +Inf, and the
        summed seconds, per (pid, reason)."""
        docs = {
            KIND_EXIT: "Time from kvm_exit to the thread's next kvm_entry (the whole exit; "
            "needs vmx/svm), by exit reason",
            KIND_USERSPACE: "Time the VMM spent in user space on an exit (kvm_userspace_exit "
            "to the thread's next KVM_RUN), by KVM_EXIT_* reason",
        }
        bounds = pl.DataFrame({"bound_slot": list(BUCKET_SLOTS)}, schema={"bound_slot": pl.Int64})
        cum = (
            hist.join(bounds, how="cross")
            .filter(pl.col("slot") <= pl.col("bound_slot"))
            .group_by(*HIST_KEYS, "bound_slot")
            .agg(pl.col("total").sum())
        )
        totals = hist.group_by(HIST_KEYS).agg(pl.col("total").sum(), pl.col("ns").sum())
        # Every (series, bound) pair, 0 where no event is that fast.
        grid = (
            totals.select(HIST_KEYS)
            .join(bounds, how="cross")
            .join(cum, on=[*HIST_KEYS, "bound_slot"], how="left")
            .with_columns(pl.col("total").fill_null(0))
            .sort([*HIST_KEYS, "bound_slot"])
            .group_by(HIST_KEYS, maintain_order=True)
            .agg(pl.col("total").alias("cum"))
        )
        series = totals.join(grid, on=HIST_KEYS).sort(HIST_KEYS)
        tables = {
            KIND_EXIT: self.tables.svm if self.isa == "svm" else self.tables.vmx,
            KIND_USERSPACE: self.tables.userspace,
        }
        les = [fmt(b) for b in BUCKET_BOUNDS_S]
        out = []
        for kind in (KIND_EXIT, KIND_USERSPACE):
            fam = family(
                f"vtrace_{self.names[kind]}_seconds", docs[kind], labels=["pid", "vm", "reason"]
            )
            rows = series.filter(pl.col("kind") == kind)
            for r in rows.iter_rows(named=True):  # one row per series
                reason = tables[kind].get(r["reason"], str(r["reason"]))
                buckets = [*zip(les, r["cum"], strict=True), ("+Inf", r["total"])]
                fam.add_metric([str(r["pid"]), vm[r["pid"]], reason], buckets, r["ns"] / 1e9)
            out.append(fam)
        return out


def run(
    console: Console,
    *,
    interval_s: float = 1.0,
    csv: bool = False,
    once: bool = False,
    pids: list[int] | None = None,
    classic: bool = False,
    prometheus: str | None = None,
    duration_s: float | None = None,
) -> None:
    """The live loop: refresh every ``interval_s`` until Ctrl-C / SIGTERM / ``duration_s``
    (or once). With ``prometheus`` ([HOST:]PORT) it serves OpenMetrics there instead."""
    check_interval(interval_s)
    if duration_s is not None and not 0 < duration_s <= MAX_INTERVAL_S * 365:
        raise VtraceError(f"--duration: {duration_s:g} is not a positive number of seconds")
    listen = parse_listen(prometheus) if prometheus is not None else None
    if listen and (csv or once):
        raise VtraceError("--prometheus serves metrics until stopped: not with --csv or --once")
    stop = threading.Event()
    old_term = signal.signal(signal.SIGTERM, lambda *_: stop.set())
    tables = s.load_reason_tables(prefer_host=True)
    isa = host_facts()["isa"]
    started = time.monotonic()
    deadline = None if duration_s is None else started + duration_s
    header_done = False
    server = None
    try:
        st = Stat(pids, classic=classic)  # checks --pid before the port is taken
        if listen:
            from prometheus_client import CollectorRegistry

            collector = MetricsCollector(tables, isa)
            registry = CollectorRegistry(auto_describe=False)
            registry.register(collector)  # type: ignore[arg-type]
            server = serve(*listen, registry)
        with st:
            prev = st.snapshot()
            # On stderr, so CSV on stdout stays clean; scripts can wait for this line.
            print(
                f"vtrace stat: attached {len(st.attached)} tracepoints ({len(st.raw)} raw); "
                f"first refresh in {interval_s:g} s",
                file=sys.stderr,
                flush=True,
            )
            if st.unavailable:  # said once, never silently: what this host could not give
                print(
                    "vtrace stat: not used: "
                    + "; ".join(f"{k} ({why})" for k, why in st.unavailable.items()),
                    file=sys.stderr,
                    flush=True,
                )
            if listen:
                collector.stat = st
                host, port = listen
                shown = f"[{host}]" if ":" in host else host
                print(
                    f"vtrace stat: serving OpenMetrics on http://{shown}:{port}/metrics",
                    file=sys.stderr,
                    flush=True,
                )
                while not _wait(stop, interval_s, deadline):
                    collector.learn_names()
                with collector._lock:  # no scrape is reading the maps while they go
                    collector.stat = None
                return
            while True:
                wait_s = interval_s
                if deadline is not None:
                    wait_s = min(wait_s, max(deadline - time.monotonic(), 0.0))
                try:
                    if stop.wait(wait_s):
                        break
                except KeyboardInterrupt:
                    break
                cur = st.snapshot()
                counts, hist = interval_view(prev, cur, interval_s)
                prev = cur
                counts = _names(counts, tables, isa)
                elapsed = time.monotonic() - started
                if csv:
                    rows = counts.with_columns(time_s=pl.lit(round(elapsed, 3))).select(CSV_COLUMNS)
                    sys.stdout.write(rows.write_csv(include_header=not header_done))
                    sys.stdout.flush()
                    header_done = True
                else:
                    if not once:
                        console.clear()
                    names = {
                        (KIND_EXIT if ev == EVENT_IDS[s.KVM_EXIT] else KIND_USERSPACE, r): n
                        for ev, r, n in counts.select("event", "reason", "reason_name")
                        .unique()
                        .iter_rows()
                    }
                    console.print(table_view(counts, hist, interval_s, elapsed, names))
                if once or (deadline is not None and time.monotonic() >= deadline):
                    break
    finally:
        if server is not None:
            server.shutdown()
            server.server_close()
        signal.signal(signal.SIGTERM, old_term)


def _wait(stop: threading.Event, interval_s: float, deadline: float | None) -> bool:
    """Wait up to ``interval_s``: True once it is time to stop (SIGTERM sets ``stop``,
    Ctrl-C, the deadline)."""
    wait_s = interval_s if deadline is None else min(interval_s, deadline - time.monotonic())
    try:
        return stop.wait(max(wait_s, 0.0)) or (
            deadline is not None and time.monotonic() >= deadline
        )
    except KeyboardInterrupt:
        return True
