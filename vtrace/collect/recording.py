"""A recording: the BPF program attached, a consumer draining its ring buffer in batches, and
a writer appending parts to a trace directory at least every second.

    with Recording(out_dir, pids=[pid]) as rec:
        ...workload...
        rec.add_events(frame)      # extra events (e.g. source=lab) in the same trace
    rec.summary                    # counts, lost, rate, probes

Leaving the block detaches every probe, drains what is left, writes the final part and
finalises meta.json (start/end, lost per CPU, probes, filters, host facts).

A write that fails (a full disk) stops the recording: the events not written are counted as
lost in meta.json, which is rewritten to match the parts on disk, and ``stop`` raises an
:class:`~vtrace.output.OutputError` that says so in one line.

``max_bytes`` bounds the parts on disk for recordings that run for hours: ``on_full="ring"``
drops the oldest parts and records on (meta's ``dropped`` counts them), ``"stop"`` detaches
the probes once the parts reach it (``full``), writes what was delivered and lets the caller
stop (the CLI does at once, like --duration).
"""

from __future__ import annotations

import ctypes as ct
import os
import queue
import re
import select
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from vtrace import __version__
from vtrace import schema as s
from vtrace.collect import bccload, doctor, program
from vtrace.collect.decode import (
    EVENT_IDS,
    RECORD_DTYPE,
    RECORD_WORDS,
    decode_words,
    signed_fields,
)
from vtrace.collect.host import host_facts
from vtrace.collect.ringbuf import RingReader
from vtrace.errors import VtraceError
from vtrace.output import OutputError, check_new_dir
from vtrace.store import META_RESERVE_BYTES, ON_FULL, TraceWriter

CLOCK = "CLOCK_MONOTONIC (bpf_ktime_get_ns)"
IRQ_RULE = (
    "kvm_set_irq, kvm_msi_set_irq and kvm_inj_virq are kept from the recorded processes and "
    "from kernel worker threads (comm kworker*): an injection through an irqfd runs in a "
    "kworker, not in the VM's process, and these tracepoints carry no VM identity, so "
    "kworker interrupts of other VMs on the host are recorded too"
)


# 500M, 2G, 1.5g, 64KiB, 4096: binary units (K = 1024).
_SIZE = re.compile(r"(\d+(?:\.\d+)?)\s*(?:([kmgt])(?:i?b)?|b)?", re.IGNORECASE)
# Why a recording in stop mode ended (meta's stopped_by).
MAX_SIZE_REASON = "max-size"


def parse_size(text: str, option: str = "--max-size") -> int:
    """Bytes from a size such as ``500M`` or ``2G`` (K, M, G, T are powers of 1024); a
    one-line :class:`VtraceError` for anything else."""
    m = _SIZE.fullmatch(text.strip())
    if m is None:
        raise VtraceError(
            f"{option} {text}: not a size (bytes, or a number with K, M, G or T: 500M, 2G)"
        )
    unit = 1024 ** (" kmgt".index(m.group(2).lower()) if m.group(2) else 0)
    size = int(float(m.group(1)) * unit)
    if size <= 0:
        raise VtraceError(f"{option} {text}: must be more than 0 bytes")
    return size


def check_on_full(on_full: str | None, max_bytes: int | None) -> str:
    """``on_full`` checked against ``max_bytes`` (one-line errors); "ring" by default."""
    if on_full is None:
        return "ring"
    if on_full not in ON_FULL:
        raise VtraceError(f"--on-full {on_full}: choose ring or stop")
    if max_bytes is None:
        raise VtraceError(f"--on-full {on_full}: needs --max-size SIZE")
    return on_full


def monotonic_ns() -> int:
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC)


def preflight(tracefs: Path = doctor.TRACEFS) -> None:
    """Run the checks recording needs, in order; a :class:`VtraceError` with the fix of the
    first that fails (later checks may not even be possible without the earlier ones)."""
    checks = (
        doctor.check_privileges,
        lambda: doctor.check_tracefs(tracefs),
        doctor.check_bcc,
        doctor.check_headers,
        lambda: doctor.check_tracepoints(tracefs),
    )
    for check in checks:
        problem = doctor.record_problem([check()])
        if problem:
            raise VtraceError(f"cannot record: {problem}")


def reason_tables_meta(tables: s.ReasonTables) -> dict[str, Any]:
    return {
        "origin": tables.origin,
        "vmx": {str(k): v for k, v in sorted(tables.vmx.items())},
        "svm": {str(k): v for k, v in sorted(tables.svm.items())},
        "userspace": {str(k): v for k, v in sorted(tables.userspace.items())},
    }


# Parquet compression of the collector's parts (see TraceWriter in _start).
PART_COMPRESSION = "lz4"
# Drained records waiting for the writer, in ring buffers' worth (see Recording.__init__).
MAX_PENDING_BUFFERS = 4


def watch_processes(pids: list[int]) -> dict[int, int]:
    """A pidfd per process (exit shows as readable, whoever its parent is, with no pid reuse
    race); a :class:`VtraceError` naming the first that does not exist or has exited."""
    fds: dict[int, int] = {}
    try:
        for pid in pids:
            try:
                fd = os.pidfd_open(pid)
            except ProcessLookupError:
                raise VtraceError(f"--pid {pid}: no such process") from None
            except OSError as e:
                raise VtraceError(f"--pid {pid}: cannot watch it: {e.strerror}") from None
            fds[pid] = fd
            if _exited(fd):  # a zombie: gone, only not yet reaped
                raise VtraceError(f"--pid {pid}: no such process (it has exited)")
    except BaseException:
        for fd in fds.values():
            os.close(fd)
        raise
    return fds


def _exited(pidfd: int) -> bool:
    poller = select.poll()
    poller.register(pidfd, select.POLLIN)
    return bool(poller.poll(0))


class Recording:
    """Record KVM events of the given VM processes (all when ``pids`` is empty) into ``out_dir``."""

    def __init__(
        self,
        out_dir: str | os.PathLike[str],
        pids: list[int] | None = None,
        events: list[str] | None = None,
        buffer_mb: int | None = None,
        meta_extra: dict[str, Any] | None = None,
        *,
        classic: bool = False,
        flush_interval_s: float = 1.0,
        poll_interval_s: float = 0.02,
        max_bytes: int | None = None,
        on_full: str = "ring",
    ) -> None:
        self.out_dir = Path(out_dir)
        self.pids = program.validate_pids(pids)
        self.events = program.parse_events(",".join(events)) if events else None
        self.pages = program.buffer_pages(buffer_mb)
        check_new_dir(self.out_dir)  # made for real once the probes are attached
        # Watched from here: a --pid that names nothing is refused before anything runs.
        self._pidfds = watch_processes(self.pids)
        self.classic = classic  # read every tracepoint classic (formatted records)
        # Kept by reference: values the caller adds or changes while recording (counters
        # known only at the end) are written when the recording stops.
        self.meta_extra = meta_extra if meta_extra is not None else {}
        self.flush_interval_s = flush_interval_s
        self.poll_interval_s = poll_interval_s
        self.max_bytes = max_bytes
        if on_full not in ON_FULL:
            raise VtraceError(f"on_full {on_full!r}: choose ring or stop")
        self.on_full = on_full
        # Set (stop mode) once the parts reached max_bytes and the probes were detached.
        self._full = threading.Event()
        # detach/reattach from the writer thread (stop mode) and the caller's.
        self._probe_lock = threading.Lock()
        self.summary: dict[str, Any] = {}
        # Why the recording ended (set by whoever stops it; the CLI: signal, duration, ...).
        self.stop_reason: str | None = None
        self._failure: OutputError | None = None
        self._extra_rows = 0  # events added with add_events
        self._bpf: Any = None
        self._writer: TraceWriter | None = None
        self._reader: RingReader | None = None
        self._frames: queue.SimpleQueue[pl.DataFrame] = queue.SimpleQueue()
        # Drained records wait for the writer as word rows (decode.record_words layout) in
        # ``_stage``, the first ``_staged`` columns. The writer swaps in ``_spare`` and hands
        # the buffer back once its part is written: after the first second no new memory is
        # touched (fresh pages cost the consumer more than copying into warm ones).
        # Memory stays bounded: above MAX_PENDING_BUFFERS ring buffers' worth the drain
        # pauses, the ring buffer fills and the kernel counts what it cannot reserve as lost,
        # so nothing is dropped silently.
        self._stage = np.empty((RECORD_WORDS, 0), np.uint64)
        self._spare = self._stage
        self._staged = 0
        self._stage_lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._errors: list[BaseException] = []
        self._counts = np.zeros(256, np.int64)
        self._write_lock = threading.Lock()
        self._started_ns = 0
        self._plan: program.ProbePlan | None = None
        self._attached: dict[str, str] = {}
        self._probes_on = False
        # bcc's USDT contexts: each holds its probes' semaphores raised in the traced process
        # and lowers them when freed, so they must live as long as the probes stay attached.
        self._usdt: list[Any] = []

    # -- set up --------------------------------------------------------------------------------
    def start(self) -> Recording:
        """Check the host, compile, attach, open the trace and start consuming."""
        try:
            return self._start()
        except BaseException:
            if self._bpf is not None:
                self._bpf.cleanup()
                self._bpf = None
            self._usdt = []
            self._close_pidfds()
            raise

    def _start(self) -> Recording:
        preflight()
        bcc = bccload.load_bcc()
        plan = program.plan_probes(self.events, raw=not self.classic)
        if not plan.events:
            why = "; ".join(f"{k}: {v}" for k, v in plan.unavailable.items())
            raise VtraceError(f"none of the requested events can be recorded here ({why})")
        # May move probes to unavailable.
        self._usdt = program.usdt_contexts(plan, self.pids, bcc)
        values = program.defines(plan, self.pages, bool(self.pids))
        try:
            self._bpf = bcc.BPF(
                src_file=str(program.SOURCE).encode(),
                cflags=program.cflags(values),
                usdt_contexts=self._usdt,
            )
        except Exception as e:  # bcc raises Exception with the compiler's message on stderr
            raise VtraceError(
                f"the BPF program did not load ({e}); run `vtrace doctor` for the fix"
            ) from None
        if self.pids:
            pids_map = self._bpf[b"pids"]
            for p in self.pids:
                pids_map[ct.c_uint32(p)] = ct.c_uint8(1)
        self._tables = s.load_reason_tables(prefer_host=True)
        self._signed = signed_fields(plan.tracepoints)
        self._reader = RingReader(
            self._bpf[b"events"].map_fd, self.pages * os.sysconf("SC_PAGE_SIZE")
        )
        self._plan = plan
        self._started_ns = monotonic_ns()  # before attaching: no event is older than start
        self._attached = program.attach(self._bpf, plan)
        self._probes_on = True
        for ev in plan.usdt:
            self._attached[ev] = f"usdt:{plan.usdt[ev]}:{ev}"
        if not self._attached:
            # One clause per distinct reason: one cause (no --pid, no kprobes) covers several.
            why = "; ".join(dict.fromkeys(plan.unavailable.values()))
            raise VtraceError(f"no probe could be attached: {why}")
        meta = {
            **host_facts(),
            "source": "vtrace record",
            "collector": {
                "version": __version__,
                "program": program.SOURCE.name,
                "record_bytes": RECORD_DTYPE.itemsize,
                "buffer_bytes": self.pages * os.sysconf("SC_PAGE_SIZE"),
                "delivery": "BPF ring buffer, drained in batches from its memory mapping",
            },
            "clock": CLOCK,
            "reason_tables": reason_tables_meta(self._tables),
            "probes": {
                "attached": self._attached,
                "unavailable": dict(plan.unavailable),
                # Tracepoints read from the formatted record rather than raw, and why.
                "classic": {ev: plan.classic_why[ev] for ev in sorted(plan.classic_why)},
            },
            "filters": {
                "pids": self.pids,
                "events": self.events or "all",
                "irq_events": IRQ_RULE if self.pids else "all processes",
            },
            "start": {"unix": time.time(), "monotonic_ns": self._started_ns},
            **self.meta_extra,
        }
        # Both stage buffers, written once now: a page touched for the first time costs a
        # fault and zeroing while recording, on the cores the VMs need.
        ring_records = self._reader.data_bytes // RECORD_DTYPE.itemsize
        self._stage = np.ones((RECORD_WORDS, ring_records), np.uint64)
        self._spare = np.ones((RECORD_WORDS, ring_records), np.uint64)
        # Dictionary and delta encodings with lz4: as small as zstd over them, for less CPU
        # per event than either zstd or plain pages.
        self._writer = TraceWriter(
            self.out_dir,
            meta,
            keep_on_error=True,
            compression=PART_COMPRESSION,
            column_encodings=True,
            reserve_bytes=META_RESERVE_BYTES,
            max_bytes=self.max_bytes,
            on_full=self.on_full,
        )
        self._threads = [
            threading.Thread(target=self._drain_loop, name="vtrace-drain", daemon=True),
            threading.Thread(target=self._write_loop, name="vtrace-write", daemon=True),
        ]
        for t in self._threads:
            t.start()
        return self

    # -- consumer ------------------------------------------------------------------------------
    def _drain_once(self) -> int:
        assert self._reader is not None
        limit = MAX_PENDING_BUFFERS * self._reader.data_bytes // RECORD_DTYPE.itemsize
        drained = 0
        with self._stage_lock:
            while self._staged < limit:  # else the writer is behind: records wait in the ring
                if self._staged == self._stage.shape[1]:
                    self._grow_stage(limit)
                at = self._staged
                n = self._reader.drain_words(self._stage, at)
                if n:
                    # The event id is byte 2 of the third word (decode.RECORD_WORDS).
                    ev = self._stage[2, at : at + n].view(np.uint8)[2::8]
                    self._counts += np.bincount(ev, minlength=256)
                self._staged += n
                drained += n
                if self._staged < self._stage.shape[1]:
                    break  # the ring is empty (else the stage was full: grow it and go on)
        return drained

    def _grow_stage(self, limit: int) -> None:
        assert self._reader is not None
        ring_records = self._reader.data_bytes // RECORD_DTYPE.itemsize
        size = min(max(2 * self._stage.shape[1], ring_records), limit)
        grown = np.empty((RECORD_WORDS, size), np.uint64)
        grown[:, : self._staged] = self._stage[:, : self._staged]
        self._stage = grown

    def _drain_loop(self) -> None:
        assert self._reader is not None
        # Sleep between drains even when there was data: large batches cost far less CPU per
        # record than many small ones, and the buffer holds a second or more at full rate.
        # Only a buffer more than a quarter full is drained again at once.
        hurry = self._reader.data_bytes // 4
        try:
            while not self._stop.is_set():
                self._drain_once()
                if self._reader.pending_bytes() < hurry:
                    time.sleep(self.poll_interval_s)
        except BaseException as e:
            self._errors.append(e)

    def _write_pending(self) -> None:
        frames: list[pl.DataFrame] = []
        while True:
            try:
                frames.append(self._frames.get_nowait())
            except queue.Empty:
                break
        with self._stage_lock:
            words, n = self._stage, self._staged
            spare = self._spare
            if spare.shape[1] < words.shape[1]:
                spare = np.empty_like(words)
            self._stage, self._staged = spare, 0
        assert self._writer is not None
        with self._write_lock:
            if n:
                self._writer.append(decode_words(words[:, :n], self._tables, self._signed))
            for f in frames:
                self._writer.append(f)
            if n or frames:
                self._writer.flush()
                self._writer.meta["lost_per_cpu"] = self.lost_per_cpu()
                self._writer.write_meta()
            if self._writer.full and not self._full.is_set():
                # Stop mode: no event after this one is recorded; what the ring buffer
                # already holds is written by the next flushes and at the stop.
                self.detach_probes()
                self._writer.meta["max_size"]["reached_monotonic_ns"] = monotonic_ns()
                self._full.set()
        # The written part no longer refers to the words (flush dropped the tables that
        # shared its memory): the buffer can take the next records.
        self._spare = words

    def _write_loop(self) -> None:
        try:
            while not self._stop.wait(self.flush_interval_s):
                self._write_pending()
        except OutputError as e:
            # The first failed write stops the recording (the drain too: what the ring
            # buffer still holds is counted when the recording stops).
            self._failure = e
            self._stop.set()
        except BaseException as e:
            self._errors.append(e)
            self._stop.set()

    def _discard_pending(self) -> None:
        """After a failed write: drain what is left without writing it (counted as
        delivered, so as not written)."""
        while True:
            try:
                self._frames.get_nowait()
            except queue.Empty:
                break
        with self._stage_lock:
            self._staged = 0
        while self._drain_once():
            with self._stage_lock:
                self._staged = 0

    # -- while running -------------------------------------------------------------------------
    def add_events(self, frame: pl.DataFrame) -> None:
        """Store extra events (e.g. the lab's own, ``source=lab``) in the same trace."""
        self._extra_rows += frame.height
        self._frames.put(s.conform(frame))  # type: ignore[arg-type]

    @property
    def full(self) -> bool:
        """Stop mode: the parts reached ``max_bytes`` and the probes are detached."""
        return self._full.is_set()

    @property
    def failure(self) -> OutputError | None:
        """The failed write that stopped the recording, if one did."""
        return self._failure

    def exited_pids(self) -> list[int]:
        """The recorded processes (``pids``) that have exited so far."""
        return [pid for pid, fd in self._pidfds.items() if _exited(fd)]

    def lost_per_cpu(self) -> list[int]:
        """Records the kernel could not reserve in the ring buffer, per CPU, so far."""
        if self._bpf is None:
            return []
        return [int(v) for v in self._bpf[b"lost"][ct.c_int(0)]]

    def seen(self) -> int:
        """Events the BPF program saw after the pid filter (delivered + lost), so far: the
        records the ring buffer took (producer position) and the reservations it refused."""
        if self._bpf is None or self._reader is None:
            return 0
        return self._reader.produced_records() + sum(self.lost_per_cpu())

    def program_run_ns(self) -> dict[str, dict[str, int]]:
        """Kernel-measured run time of each attached BPF function (``run_time_ns``,
        ``run_cnt`` from its fdinfo); only counted while sysctl kernel.bpf_stats_enabled=1."""
        out: dict[str, dict[str, int]] = {}
        for name, fn in self._bpf.funcs.items() if self._bpf is not None else ():
            try:
                text = Path(f"/proc/self/fdinfo/{fn.fd}").read_text()
            except OSError:
                continue
            info = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
            if "run_cnt" in info:
                key = name.decode() if isinstance(name, bytes) else str(name)
                out[key] = {
                    "run_time_ns": int(info["run_time_ns"]),
                    "run_cnt": int(info["run_cnt"]),
                }
        return out

    @property
    def delivered(self) -> int:
        return int(self._counts.sum())

    def counts(self) -> dict[str, int]:
        """Events delivered so far, by event name."""
        return {name: int(self._counts[i]) for name, i in EVENT_IDS.items() if self._counts[i]}

    def detach_probes(self) -> None:
        """Stop event delivery without ending the recording (``reattach_probes`` resumes)."""
        with self._probe_lock:
            if self._probes_on:
                program.detach(self._bpf, self._attached)
                self._probes_on = False

    def reattach_probes(self) -> None:
        """Attach again what ``start`` attached (kernel probes; USDT probes stay attached)."""
        assert self._plan is not None
        with self._probe_lock:
            if not self._probes_on and not self.full:
                self._attached.update(program.attach(self._bpf, self._plan))
                self._probes_on = True

    def elapsed_s(self) -> float:
        return (monotonic_ns() - self._started_ns) / 1e9 if self._started_ns else 0.0

    # -- tear down -----------------------------------------------------------------------------
    def stop(self, error: BaseException | None = None) -> dict[str, Any]:
        """Detach, drain the rest, write the last part, finalise meta; returns the summary."""
        if self._bpf is None or self._writer is None:
            self._close_pidfds()
            return self.summary
        self.detach_probes()
        end_ns = monotonic_ns()
        self._stop.set()
        for t in self._threads:
            t.join()
        try:
            if self._failure is None:
                try:
                    # Write between drains so the pending-bytes bound never leaves records
                    # behind.
                    self._write_pending()
                    while self._drain_once():
                        self._write_pending()
                except OutputError as e:
                    self._failure = e
            if self._failure is not None:
                self._discard_pending()
            lost = self.lost_per_cpu()
            seen = self.seen()
            run = self.program_run_ns()
        finally:
            if self._reader is not None:
                self._reader.close()
            self._bpf.cleanup()
            self._bpf = None
            self._usdt = []  # after the uprobes are gone: lowers the semaphores
            self._close_pidfds()
        assert self._writer is not None
        # Every event delivered or added is in a part on disk, or counted here (a failed
        # write): nothing is dropped without a number.
        not_written = self.delivered + self._extra_rows - self._writer.rows
        if self._failure is not None:
            self.stop_reason = "error"
        elif self.full:
            self.stop_reason = MAX_SIZE_REASON
        duration_s = (end_ns - self._started_ns) / 1e9
        delivered = self.delivered
        errors = [f"{type(e).__name__}: {e}" for e in self._errors]
        if error is not None:
            errors.append(f"{type(error).__name__}: {error}")
        self.summary = {
            "path": str(self.out_dir),
            "duration_s": duration_s,
            "events": delivered,
            "events_per_s": delivered / duration_s if duration_s > 0 else 0.0,
            "by_event": self.counts(),
            "lost": sum(lost) + not_written,
            "lost_per_cpu": lost,
            "not_written": not_written,
            "stopped_by": self.stop_reason,
            "seen": seen,
            "peak_buffer_fill": self._reader.peak_pending_bytes / self._reader.data_bytes
            if self._reader
            else 0.0,
            "parts": self._writer.parts,
            "max_bytes": self.max_bytes,
            "on_full": self.on_full,
            "part_bytes": self._writer.part_bytes,
            "dropped": dict(self._writer.dropped) if self._writer.dropped["parts"] else None,
            "probes": {
                "attached": self._attached,
                "unavailable": self._plan.unavailable if self._plan else {},
            },
            "pids": self.pids,
        }
        runs = sum(v["run_cnt"] for v in run.values())
        if runs:
            self.summary["bpf_ns_per_event"] = sum(v["run_time_ns"] for v in run.values()) / runs
        extra: dict[str, Any] = {
            "end": {"unix": time.time(), "monotonic_ns": end_ns},
            # lost: what the kernel could not put in the ring buffer (per CPU) plus what
            # was delivered but not written (a failed write).
            "lost_per_cpu": lost,
            "lost": sum(lost) + not_written,
            "events_not_written": not_written,
            "seen": seen,
            "by_event": self.counts(),
            "stopped_by": self.stop_reason,
        }
        if runs:
            extra["bpf_ns_per_event"] = self.summary["bpf_ns_per_event"]
        extra = {**self.meta_extra, **extra}  # the collector's own keys win
        failed: OutputError | None = None
        if self._failure is not None:
            written = self._writer.rows
            failed = OutputError(
                f"{self._failure}; recording stopped: {written:,} events kept in "
                f"{self._writer.parts} parts, {not_written:,} not written (counted as lost)",
                self._failure.errno,
            )
            errors.insert(0, str(failed))
        if errors:
            extra["error"] = "; ".join(errors)
        try:
            self._writer.close(**extra)
        except OutputError as e:
            if failed is None:
                failed = e  # the last meta could not be written
            elif e is not self._failure:
                failed = OutputError(f"{failed}; meta.json not rewritten: {e}", failed.errno)
        self.summary["parts"] = self._writer.parts
        if self._writer.dropped["parts"]:
            self.summary["dropped"] = dict(self._writer.dropped)
        if failed is not None:
            raise failed
        if self._errors:
            raise self._errors[0]
        return self.summary

    def _close_pidfds(self) -> None:
        for fd in self._pidfds.values():
            os.close(fd)
        self._pidfds = {}

    def __enter__(self) -> Recording:
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        # Cleanup detaches probes and writes the last part: a Ctrl-C must not cut it short.
        old = signal.signal(signal.SIGINT, signal.SIG_IGN) if _main_thread() else None
        try:
            self.stop(exc)
        finally:
            if old is not None:
                signal.signal(signal.SIGINT, old)


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()
