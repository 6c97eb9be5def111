"""The virtio back end: threads that serve the split virtqueues when the guest kicks.

The guest's kick is a PIO write to its queue's notify port that KVM turns into a signal on
that queue's eventfd (ioeventfd): no user-space exit. A back-end thread of one queue sleeps
in ``read`` on its eventfd (one shared by several queues, in ``poll`` on all of them, and
serves one pass of each waiting queue in turn); on each wake-up it sets
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
import select
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
from vtrace.lab.threadclock import ThreadClock
from vtrace.lab.virtqueue import DeviceQueue, RingLayout, ring_layout
from vtrace.lab.vmm import Vm, guest_program, param_block

# Written to the kick eventfd by the VMM to stop the back end: far above any count of
# guest kicks, so what remains after subtracting it is the kicks still pending.
STOP_VALUE = 1 << 40
NOTIFY_BYTES = 2  # the guest writes the 16-bit queue index
# Polls of used.idx without progress before the guest reports a stall (about 10 s here,
# where every guest instruction is emulated).
SPIN_LIMIT = 2_000_000
# What each vCPU's guest counts in its parameter block.
GUEST_COUNTS = ("R_KICKS", "R_SUPPRESSED", "R_COMPLETED", "R_BAD_USED", "R_INTERRUPTS", "R_POLLS")


class QueueServer:
    """The device side of one virtqueue: its ring, its kick eventfd and what serving it
    recorded. The back-end thread that serves it calls :meth:`drain` (a thread of its own)
    or :meth:`serve_pass` (a thread shared with other queues)."""

    def __init__(
        self,
        index: int,
        queue: DeviceQueue,
        kick_fd: int,
        irq_fd: int | None,
        pid: int,
        log: EventLog,
    ) -> None:
        self.index = index
        self.queue = queue
        self.kick_fd = kick_fd
        self.irq_fd = irq_fd
        self.pid = pid
        self.log = log
        self.latency = LatencyStats()
        self.chunk = records.CHUNK_REQUESTS
        self.tid = 0  # the back-end thread serving this queue
        self.kicks = 0
        self.interrupts = 0
        self.passes = 0
        self.popped = 0  # requests taken, over the whole run (the lists hold the latest)
        self.start_ns = 0  # shared thread: when the pass this queue waits for started
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

    def kicked(self, wake_ns: int, value: int) -> bool:
        """Record an eventfd read of ``value``; True when it carried the VMM's stop."""
        stop = value >= STOP_VALUE
        kicks = value - STOP_VALUE if stop else value
        if kicks:
            self.kicks += kicks
            self.kick_ns.append(wake_ns)
            self.kick_count.append(kicks)
        return stop

    def drain(self, wake_ns: int) -> None:
        """Serve the queue until it is empty with kicks back on (a thread of its own)."""
        q = self.queue
        q.set_no_notify(True)
        start_ns = wake_ns
        while True:
            self._pass(start_ns)
            q.set_no_notify(False)
            with self._fence:
                pass
            start_ns = time.monotonic_ns()
            if not q.avail_pending():
                return
            q.set_no_notify(True)

    def serve_pass(self) -> bool:
        """One pass, then kicks back on and a look once more (a thread shared with other
        queues, which get their turn before this one's next pass); True if requests wait."""
        q = self.queue
        q.set_no_notify(True)
        self._pass(self.start_ns)
        q.set_no_notify(False)
        with self._fence:
            pass
        self.start_ns = time.monotonic_ns()
        return q.avail_pending() != 0

    def _pass(self, start_ns: int) -> None:
        """Take every available descriptor, do its work, publish used.idx once."""
        q = self.queue
        memory_bytes = len(q.memory)
        pending = q.avail_pending()
        if not pending:
            return
        pass_index = len(self.complete_ns)
        self.pass_start_ns.append(start_ns)
        for _ in range(pending):
            pop_ns = time.monotonic_ns()
            head, addr, length = q.pop()
            if addr + length <= memory_bytes:
                # The request's work: fill the buffer, tagged with its number, keeping the
                # interpreter lock (another queue's thread must not run inside this pass)
                q.fill(addr, length, (q.last_avail - 1) & 0xFF)
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
        self.passes += 1
        if self.irq_fd is not None and q.interrupts_wanted():
            os.eventfd_write(self.irq_fd, 1)
            self.interrupts += 1
        # Between passes, while NO_NOTIFY is still set: the guest adds without kicking,
        # and the next pass's latency starts after the fold.
        if len(self.pop_ns) >= self.chunk:
            self.fold()

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
        common = {
            "pid": self.pid,
            "tid": self.tid,
            "device": DEVICE_NAMES["virtio"],
            "queue": self.index,
        }
        pops = len(self.pop_ns)
        return pl.concat(
            [
                events_frame(
                    event=schema.LAB_KICK,
                    ts_ns=as_array(self.kick_ns),
                    count=as_array(self.kick_count),
                    **common,
                ),
                events_frame(
                    event=schema.LAB_POP,
                    ts_ns=as_array(self.pop_ns),
                    addr=as_array(self.pop_head),
                    size=as_array(self.pop_bytes),
                    value=np.arange(self.popped, self.popped + pops),
                    **common,
                ),
                events_frame(
                    event=schema.LAB_COMPLETE,
                    ts_ns=as_array(self.complete_ns),
                    count=as_array(self.complete_count),
                    value=as_array(self.complete_used),
                    **common,
                ),
            ]
        ).sort("ts_ns", maintain_order=True)


class Backend(threading.Thread):
    """A back-end thread serving one virtqueue, or several in turn (``--backend-threads
    shared``): after each pass of a queue the next queue with work gets its turn."""

    def __init__(
        self, servers: list[QueueServer], name: str = "vtrace-lab-backend", index: int = 0
    ) -> None:
        super().__init__(name=name, daemon=True)
        self.servers = servers
        self.error: BaseException | None = None
        self.clock = ThreadClock("backend", index)

    def run(self) -> None:
        self.clock.start()
        for server in self.servers:
            server.tid = self.clock.tid
        try:
            if len(self.servers) == 1:
                self._serve_one(self.servers[0])
            else:
                self._serve_many()
        except BaseException as e:  # reported by the VMM after the guest stops
            self.error = e
        finally:
            self.clock.stop()

    def _serve_one(self, server: QueueServer) -> None:
        # Sleeps in read on the queue's eventfd: the cheapest wake-up, as a vhost worker.
        clock = self.clock
        while True:
            if len(server.kick_ns) >= server.chunk:  # wake-ups that found nothing to take
                server.fold()  # here, before the wake-up's time is taken: outside any latency
            value = os.eventfd_read(server.kick_fd)
            wake_ns = time.monotonic_ns()
            if server.kicked(wake_ns, value):
                return
            clock.wakeups += 1
            server.drain(wake_ns)

    def _serve_many(self) -> None:
        # Sleeps in poll on every queue's eventfd (QEMU's main loop, an iothread's AioContext)
        # while no queue has work left; otherwise serves one pass of each waiting queue in
        # turn, and reads the eventfds that became readable between rounds.
        by_fd = {s.kick_fd: s for s in self.servers}
        poller = select.poll()
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        waiting: list[QueueServer] = []  # queues with requests left after their last pass
        stopped: set[int] = set()
        while True:
            for s in self.servers:
                if len(s.kick_ns) >= s.chunk:
                    s.fold()
            slept = not waiting  # a sleep in poll that ends with work is a wake-up
            ready = poller.poll(0 if waiting else None)
            wake_ns = time.monotonic_ns()
            for fd, _ in ready:
                s = by_fd[fd]
                if s.kicked(wake_ns, os.eventfd_read(fd)):
                    stopped.add(fd)
                    poller.unregister(fd)
                elif s not in waiting:
                    s.start_ns = wake_ns
                    waiting.append(s)
            if len(stopped) == len(by_fd):
                return
            if slept and waiting:
                self.clock.wakeups += 1
            for s in list(waiting):
                if not s.serve_pass():
                    waiting.remove(s)


def split_requests(requests: int, vcpus: int) -> list[int]:
    """Requests per vCPU: as even as can be, the first ones one more (the model's backlog
    gives request i to vCPU i mod vcpus: the same counts)."""
    return [requests // vcpus + (v < requests % vcpus) for v in range(vcpus)]


def run_virtio(
    requests: int,
    batch: int,
    ring_size: int,
    request_bytes: int,
    wait: str,
    timeout_s: float,
    log: EventLog | None = None,
    *,
    vcpus: int = 1,
    queues: int = 1,
    backend_threads: str = "shared",
) -> LabResult:
    """Run the virtio guest on ``vcpus`` vCPUs against ``queues`` virtqueues (vCPU v submits
    to queue v mod queues) and the back end, and return what was measured; ``log`` gets the
    events as they are made (default: keep the first ones for the result)."""
    pid = os.getpid()
    log = log if log is not None else EventLog()
    rings: list[RingLayout] = []
    base = L.RING_BASE
    for _ in range(queues):  # each queue's rings and buffers after the previous queue's
        rings.append(ring_layout(ring_size, request_bytes, base))
        base = -(-rings[-1].end // 4096) * 4096
    irq = wait == "irq"
    shares = split_requests(requests, vcpus)
    queue_of = [v % queues for v in range(vcpus)]
    # Several vCPUs on one queue add and take back under the queue's lock (virtio_shared).
    program = "virtio_shared" if vcpus > queues else "virtio"
    fds: list[int] = []
    servers: list[QueueServer] = []
    try:
        with Vm(base, irqchip=irq, vcpus=vcpus) as vm:
            vm.load(guest_program(program))
            for v in range(vcpus):
                q, ring = queue_of[v], rings[queue_of[v]]
                for offset, value in {
                    L.P_REQUESTS: shares[v],
                    L.P_BATCH: batch,
                    L.P_RING_SIZE: ring_size,
                    L.P_REQUEST_BYTES: request_bytes,
                    L.P_DESC: ring.desc,
                    L.P_AVAIL: ring.avail,
                    L.P_USED: ring.used,
                    L.P_DATA: ring.data,
                    L.P_WAIT_IRQ: int(irq),
                    L.P_SPIN_LIMIT: SPIN_LIMIT,
                    L.P_QUEUE: q,
                    L.P_NOTIFY_PORT: notify_port(q),
                    L.P_QBLOCK: L.QUEUE_BASE + q * L.QUEUE_STRIDE,
                }.items():
                    vm.write_u32(param_block(v) + offset, value)
            irq_fd = None
            if irq:  # one vCPU only (validated): the 8259 delivers to vCPU 0
                irq_fd = os.eventfd(0, os.EFD_CLOEXEC)
                fds.append(irq_fd)
                vm.add_irqfd(irq_fd, L.LAB_IRQ)
            for q in range(queues):
                kick_fd = os.eventfd(0, os.EFD_CLOEXEC)
                fds.append(kick_fd)
                vm.add_ioeventfd(notify_port(q), NOTIFY_BYTES, kick_fd)
                queue = DeviceQueue(vm.memory, rings[q])
                servers.append(QueueServer(q, queue, kick_fd, irq_fd, pid, log))
            if backend_threads == "per-queue":
                backends = [Backend([s], f"vtrace-lab-backend{s.index}", s.index) for s in servers]
            else:
                backends = [Backend(servers)]
            done = vm.stop_on(L.PORT_DONE, L.PORT_STALL)
            for b in backends:
                b.start()
            run_error: VtraceError | None = None
            c0, t0 = time.process_time_ns(), time.monotonic_ns()
            try:
                vm.run(timeout_s)
            except VtraceError as e:
                run_error = e
            finally:
                t1, c1 = time.monotonic_ns(), time.process_time_ns()
                for s in servers:
                    os.eventfd_write(s.kick_fd, STOP_VALUE)
                for b in backends:
                    b.join()
                ring_state = [
                    (s.queue.used_idx(), s.queue.avail_idx(), s.queue.used_flags()) for s in servers
                ]
                for s in servers:
                    s.queue.release()
            per_vcpu = [
                {name: vm.read_u32(param_block(v) + getattr(L, name)) for name in GUEST_COUNTS}
                for v in range(vcpus)
            ]
            exits, reasons = vm.userspace_exits, dict(vm.exit_reasons)
            threads = [v.clock.to_json() for v in vm.vcpus] + [b.clock.to_json() for b in backends]
    finally:
        for fd in fds:
            os.close(fd)
    guest = {k: sum(g[k] for g in per_vcpu) for k in per_vcpu[0]}
    errors = [b.error for b in backends if b.error is not None]
    if (
        run_error is not None
        or errors
        or done != [0] * vcpus
        or guest["R_COMPLETED"] != requests
        or guest["R_BAD_USED"]
    ):
        if run_error is not None:
            why = str(run_error)
        elif errors:
            why = f"the back end failed ({errors[0]!r})"
        elif any(d & 0x100 for d in done):
            why = "the guest gave up waiting for the back end"
        else:
            why = "the guest stopped early"
        rings_text = "; ".join(
            f"avail.idx {a}, used.idx {u}, used.flags {f}" for u, a, f in ring_state
        )
        raise VtraceError(
            f"virtio run failed: {why}; guest: {guest['R_COMPLETED']} of {requests} "
            f"completed, {guest['R_KICKS']} kicks, {guest['R_SUPPRESSED']} skipped, "
            f"{guest['R_BAD_USED']} bad used elements; ring: {rings_text}; back end: took "
            f"{sum(s.popped + len(s.pop_ns) for s in servers)}, consumed "
            f"{sum(s.kicks for s in servers)} kicks"
        )
    for s in servers:
        s.fold()  # the last records (the back end has stopped: every pass is whole)
    per_queue = []
    for s in servers:
        mine = [v for v in range(vcpus) if queue_of[v] == s.index]
        per_queue.append(
            {
                "queue": s.index,
                "vcpus": mine,
                "notify_port": notify_port(s.index),
                "requests": sum(shares[v] for v in mine),
                "kicks": s.kicks,
                "guest_kicks": sum(per_vcpu[v]["R_KICKS"] for v in mine),
                "kicks_suppressed": sum(per_vcpu[v]["R_SUPPRESSED"] for v in mine),
                "completed": sum(per_vcpu[v]["R_COMPLETED"] for v in mine),
                "passes": s.passes,
                "interrupts_sent": s.interrupts,
                "used_idx": ring_state[s.index][0],
                "backend_tid": s.tid,
                "latency_ns": s.latency.summary(),
            }
        )
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
        kicks=sum(s.kicks for s in servers),
        guest_kicks=guest["R_KICKS"],
        kicks_suppressed=guest["R_SUPPRESSED"],
        interrupts=guest["R_INTERRUPTS"],
        completed=guest["R_COMPLETED"],
        latency_ns=LatencyStats.merged(s.latency for s in servers).summary(),
        exit_reasons=reason_names(reasons),
        events=log.frame(),
        events_total=log.total,
        interrupts_sent=sum(s.interrupts for s in servers),
        polls=guest["R_POLLS"],
        used_idx=sum(u for u, _, _ in ring_state) & 0xFFFF,
        vcpus=vcpus,
        queues=queues,
        backend_threads=backend_threads,
        per_queue=per_queue,
        threads=threads,
    )


def notify_port(queue: int) -> int:
    """The port whose writes kick ``queue`` (one ioeventfd each)."""
    return L.PORT_NOTIFY + L.NOTIFY_STRIDE * queue
