"""The virtio back end: a thread that serves the split virtqueue when the guest kicks.

The guest's kick is a PIO write that KVM turns into an eventfd signal (ioeventfd): no
user-space exit. The back end sleeps in ``read`` on that eventfd; on each wake-up it sets
``VRING_USED_F_NO_NOTIFY``, drains every available descriptor (pop, do the work, push a
used element), publishes used.idx once per pass, raises the irqfd interrupt unless the
guest set ``VRING_AVAIL_F_NO_INTERRUPT``, then clears NO_NOTIFY and looks once more for
descriptors added meanwhile, as a vhost worker or QEMU iothread does.

Every step is recorded with CLOCK_MONOTONIC timestamps in plain lists, folded every
``records.CHUNK_REQUESTS`` requests into the latency statistics and the event log, so memory
stays the same however many requests a run takes (vtrace/lab/records.py).
"""

from __future__ import annotations

import os
import threading
import time

import numpy as np
import polars as pl

from vtrace import schema
from vtrace.errors import VtraceError
from vtrace.lab import layout as L
from vtrace.lab import records
from vtrace.lab.records import EventLog, LatencyStats, as_array
from vtrace.lab.result import DEVICE_NAMES, LabResult, events_frame, reason_names
from vtrace.lab.virtqueue import DeviceQueue, ring_layout
from vtrace.lab.vmm import Vm, guest_program

# Written to the kick eventfd by the VMM to stop the back end: far above any count of
# guest kicks, so what remains after subtracting it is the kicks still pending.
STOP_VALUE = 1 << 40
NOTIFY_BYTES = 2  # the guest writes the 16-bit queue index
# Polls of used.idx without progress before the guest reports a stall (about 10 s here,
# where every guest instruction is emulated).
SPIN_LIMIT = 2_000_000


class Backend(threading.Thread):
    """The back-end thread of one virtqueue."""

    def __init__(
        self, queue: DeviceQueue, kick_fd: int, irq_fd: int | None, pid: int, log: EventLog
    ) -> None:
        super().__init__(name="vtrace-lab-backend", daemon=True)
        self.queue = queue
        self.kick_fd = kick_fd
        self.irq_fd = irq_fd
        self.pid = pid
        self.log = log
        self.latency = LatencyStats()
        self.chunk = records.CHUNK_REQUESTS
        self.tid = 0
        self.kicks = 0
        self.interrupts = 0
        self.popped = 0  # requests taken, over the whole run (the lists hold the latest)
        self.error: BaseException | None = None
        # A locked read-modify-write (taking a lock) is a full barrier on x86: it keeps the
        # store that clears NO_NOTIFY ahead of the load that re-reads avail.idx.
        self._fence = threading.Lock()
        # Event record since the last fold: kicks (wake-ups), pops (one per request),
        # completes (one per pass); pop_pass indexes this fold's passes.
        self.kick_ns: list[int] = []
        self.kick_count: list[int] = []
        self.pop_ns: list[int] = []
        self.pop_head: list[int] = []
        self.pop_bytes: list[int] = []
        self.pop_pass: list[int] = []
        self.pass_start_ns: list[int] = []
        self.complete_ns: list[int] = []
        self.complete_count: list[int] = []
        self.complete_used: list[int] = []

    def run(self) -> None:
        self.tid = threading.get_native_id()
        try:
            self._serve()
        except BaseException as e:  # reported by the VMM after the guest stops
            self.error = e

    def _serve(self) -> None:
        while True:
            if len(self.kick_ns) >= self.chunk:  # wake-ups that found nothing to take
                self.fold()  # here, before the wake-up's time is taken: outside any latency
            value = os.eventfd_read(self.kick_fd)
            wake_ns = time.monotonic_ns()
            stop = value >= STOP_VALUE
            kicks = value - STOP_VALUE if stop else value
            if kicks:
                self.kicks += kicks
                self.kick_ns.append(wake_ns)
                self.kick_count.append(kicks)
            if stop:
                return
            self._drain(wake_ns)

    def _drain(self, wake_ns: int) -> None:
        q = self.queue
        memory = q.bytes
        q.set_no_notify(True)
        start_ns = wake_ns
        while True:
            pending = q.avail_pending()
            if pending:
                pass_index = len(self.complete_ns)
                self.pass_start_ns.append(start_ns)
                for _ in range(pending):
                    pop_ns = time.monotonic_ns()
                    head, addr, length = q.pop()
                    if addr + length <= memory.size:
                        # The request's work: fill the buffer, tagged with its number.
                        memory[addr : addr + length] = (q.last_avail - 1) & 0xFF
                    else:
                        length = 0  # outside guest memory: complete it with nothing written
                    q.push(head, length)
                    self.pop_ns.append(pop_ns)
                    self.pop_head.append(head)
                    self.pop_bytes.append(length)
                    self.pop_pass.append(pass_index)
                q.flush()
                self.complete_ns.append(time.monotonic_ns())
                self.complete_count.append(pending)
                self.complete_used.append(q.used_count)
                if self.irq_fd is not None and q.interrupts_wanted():
                    os.eventfd_write(self.irq_fd, 1)
                    self.interrupts += 1
                # Between passes, while NO_NOTIFY is still set: the guest adds without
                # kicking, and the next pass's latency starts after the fold.
                if len(self.pop_ns) >= self.chunk:
                    self.fold()
            q.set_no_notify(False)
            with self._fence:
                pass
            start_ns = time.monotonic_ns()
            if not q.avail_pending():
                return
            q.set_no_notify(True)

    def fold(self) -> None:
        """Fold the records since the last fold (whole passes only) into the latency
        statistics and the event log, and empty the lists."""
        # Per request: from the start of the pass that took it to that pass's used.idx
        # publish. The first pass of a drain starts at the eventfd wake-up; a later one at
        # the re-read of avail.idx that found the request (added while NO_NOTIFY was set).
        per_pass = as_array(self.complete_ns) - as_array(self.pass_start_ns)
        self.latency.add(per_pass[as_array(self.pop_pass)])
        rows = len(self.kick_ns) + len(self.pop_ns) + len(self.complete_ns)
        self.log.add(rows, self._frame)
        self.popped += len(self.pop_ns)
        for records_list in (
            self.kick_ns, self.kick_count, self.pop_ns, self.pop_head, self.pop_bytes,
            self.pop_pass, self.pass_start_ns, self.complete_ns, self.complete_count,
            self.complete_used,
        ):  # fmt: skip
            records_list.clear()

    def _frame(self) -> pl.DataFrame:
        """The kicks, pops and completes since the last fold as one events frame."""
        name, pid, tid = DEVICE_NAMES["virtio"], self.pid, self.tid
        pops = len(self.pop_ns)
        return pl.concat(
            [
                events_frame(
                    event=schema.LAB_KICK,
                    ts_ns=as_array(self.kick_ns),
                    pid=pid,
                    tid=tid,
                    device=name,
                    count=as_array(self.kick_count),
                ),
                events_frame(
                    event=schema.LAB_POP,
                    ts_ns=as_array(self.pop_ns),
                    pid=pid,
                    tid=tid,
                    device=name,
                    addr=as_array(self.pop_head),
                    size=as_array(self.pop_bytes),
                    value=np.arange(self.popped, self.popped + pops),
                ),
                events_frame(
                    event=schema.LAB_COMPLETE,
                    ts_ns=as_array(self.complete_ns),
                    pid=pid,
                    tid=tid,
                    device=name,
                    count=as_array(self.complete_count),
                    value=as_array(self.complete_used),
                ),
            ]
        ).sort("ts_ns", maintain_order=True)


def run_virtio(
    requests: int,
    batch: int,
    ring_size: int,
    request_bytes: int,
    wait: str,
    timeout_s: float,
    log: EventLog | None = None,
) -> LabResult:
    """Run the virtio guest against the back end and return what was measured; ``log``
    gets the events as they are made (default: keep the first ones for the result)."""
    pid = os.getpid()
    log = log if log is not None else EventLog()
    ring = ring_layout(ring_size, request_bytes)
    irq = wait == "irq"
    fds: list[int] = []
    try:
        with Vm(ring.end, irqchip=irq) as vm:
            vm.load(guest_program("virtio"))
            for offset, value in {
                L.P_REQUESTS: requests,
                L.P_BATCH: batch,
                L.P_RING_SIZE: ring_size,
                L.P_REQUEST_BYTES: request_bytes,
                L.P_DESC: ring.desc,
                L.P_AVAIL: ring.avail,
                L.P_USED: ring.used,
                L.P_DATA: ring.data,
                L.P_WAIT_IRQ: int(irq),
                L.P_SPIN_LIMIT: SPIN_LIMIT,
            }.items():
                vm.write_u32(L.PARAM_BASE + offset, value)
            kick_fd = os.eventfd(0, os.EFD_CLOEXEC)
            fds.append(kick_fd)
            vm.add_ioeventfd(L.PORT_NOTIFY, NOTIFY_BYTES, kick_fd)
            irq_fd = None
            if irq:
                irq_fd = os.eventfd(0, os.EFD_CLOEXEC)
                fds.append(irq_fd)
                vm.add_irqfd(irq_fd, L.LAB_IRQ)
            queue = DeviceQueue(vm.memory, ring)
            backend = Backend(queue, kick_fd, irq_fd, pid, log)
            done = vm.stop_on(L.PORT_DONE, L.PORT_STALL)
            backend.start()
            run_error: VtraceError | None = None
            c0, t0 = time.process_time_ns(), time.monotonic_ns()
            try:
                vm.run(timeout_s)
            except VtraceError as e:
                run_error = e
            finally:
                t1, c1 = time.monotonic_ns(), time.process_time_ns()
                os.eventfd_write(kick_fd, STOP_VALUE)
                backend.join()
                used_idx, avail_idx = queue.used_idx(), queue.avail_idx()
                used_flags = queue.used_flags()
                queue.release()
            guest = {
                name: vm.read_u32(L.PARAM_BASE + getattr(L, name))
                for name in ("R_KICKS", "R_SUPPRESSED", "R_COMPLETED", "R_BAD_USED",
                             "R_INTERRUPTS", "R_POLLS")
            }  # fmt: skip
            exits, reasons = vm.userspace_exits, dict(vm.exit_reasons)
    finally:
        for fd in fds:
            os.close(fd)
    if (
        run_error is not None
        or backend.error is not None
        or done != [0]
        or guest["R_COMPLETED"] != requests
        or guest["R_BAD_USED"]
    ):
        if run_error is not None:
            why = str(run_error)
        elif backend.error is not None:
            why = f"the back end failed ({backend.error!r})"
        elif done and done[0] & 0x100:
            why = "the guest gave up waiting for the back end"
        else:
            why = "the guest stopped early"
        raise VtraceError(
            f"virtio run failed: {why}; guest: {guest['R_COMPLETED']} of {requests} "
            f"completed, {guest['R_KICKS']} kicks, {guest['R_SUPPRESSED']} skipped, "
            f"{guest['R_BAD_USED']} bad used elements; ring: avail.idx {avail_idx}, "
            f"used.idx {used_idx}, used.flags {used_flags}; back end: took "
            f"{backend.popped + len(backend.pop_ns)}, consumed {backend.kicks} kicks"
        )
    backend.fold()  # the last records (the back end has stopped: every pass is whole)
    duration_s = (t1 - t0) / 1e9
    return LabResult(
        pid=pid,
        device="virtio",
        requests=requests,
        batch=batch,
        ring_size=ring_size,
        request_bytes=request_bytes,
        wait=wait,
        duration_s=duration_s,
        requests_per_s=requests / duration_s,
        cpu_s=(c1 - c0) / 1e9,
        userspace_exits=exits,
        kicks=backend.kicks,
        guest_kicks=guest["R_KICKS"],
        kicks_suppressed=guest["R_SUPPRESSED"],
        interrupts=guest["R_INTERRUPTS"],
        completed=guest["R_COMPLETED"],
        latency_ns=backend.latency.summary(),
        exit_reasons=reason_names(reasons),
        events=log.frame(),
        events_total=log.total,
        interrupts_sent=backend.interrupts,
        polls=guest["R_POLLS"],
        used_idx=used_idx,
    )
