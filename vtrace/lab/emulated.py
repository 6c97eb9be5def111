"""The emulated device: a legacy-style register file the VMM emulates in user space.

The guest programs a request through three PIO writes (buffer address, length, command)
and reads a status register; each access is a ``KVM_EXIT_IO`` handled here, in the vCPU
thread, as QEMU handles an emulated IDE or e1000 register. The command does the request's
work synchronously: it writes ``length`` bytes into guest memory at the address (a device
DMA-ing data in), so the status read that follows always finds the request done.
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
from vtrace.lab.vmm import Vm, guest_program

# Register accesses per request: ADDR, LEN, CMD writes and the STATUS read.
ACCESSES_PER_REQUEST = 4


class RegisterFileDevice:
    """The device model behind PORT_DEV_ADDR/LEN/CMD/STATUS, with its own event record.

    Per request it keeps three CLOCK_MONOTONIC timestamps: the first register access
    (``start_ns``), the command write (``pop_ns``, where the work starts) and the status
    read (``complete_ns``); every ``records.CHUNK_REQUESTS`` requests they are folded into
    the latency statistics and the event log.
    """

    def __init__(self, vm: Vm, pid: int, log: EventLog) -> None:
        self.memory = np.frombuffer(vm.memory, dtype=np.uint8)
        self.addr = 0
        self.length = 0
        self.status = 0
        self.pid = pid
        self.tid = 0  # the vCPU thread, which runs these handlers
        self.log = log
        self.latency = LatencyStats()
        self.chunk = records.CHUNK_REQUESTS
        self.commands = 0  # command writes over the whole run (the lists hold the latest)
        self.folded = 0  # requests folded so far
        self.start_ns: list[int] = []
        self.pop_ns: list[int] = []
        self.pop_addr: list[int] = []
        self.pop_bytes: list[int] = []
        self.complete_ns: list[int] = []
        vm.out_handlers[L.PORT_DEV_ADDR] = self.write_addr
        vm.out_handlers[L.PORT_DEV_LEN] = self.write_len
        vm.out_handlers[L.PORT_DEV_CMD] = self.write_cmd
        vm.in_handlers[L.PORT_DEV_STATUS] = self.read_status

    def write_addr(self, value: int) -> None:
        if len(self.complete_ns) >= self.chunk:  # between requests: fold before timing one
            self.fold()
        if not self.tid:
            self.tid = threading.get_native_id()
        self.start_ns.append(time.monotonic_ns())
        self.addr = value
        self.status = 0

    def write_len(self, value: int) -> None:
        self.length = value

    def write_cmd(self, value: int) -> None:
        self.pop_ns.append(time.monotonic_ns())
        self.commands += 1
        if value != L.DEV_CMD_READ or self.addr + self.length > self.memory.size:
            self.status = 0  # a bad command or buffer: the guest sees a failed status
            self.pop_addr.append(self.addr)
            self.pop_bytes.append(0)
            return
        # The request's work: fill the buffer, tagged with the request's sequence number.
        self.memory[self.addr : self.addr + self.length] = self.commands & 0xFF
        self.pop_addr.append(self.addr)
        self.pop_bytes.append(self.length)
        self.status = L.DEV_STATUS_DONE

    def read_status(self) -> int:
        self.complete_ns.append(time.monotonic_ns())
        return self.status

    def fold(self) -> None:
        """Fold the requests since the last fold into the statistics and the event log."""
        n = len(self.complete_ns)
        start = as_array(self.start_ns[:n])
        complete = as_array(self.complete_ns)
        self.latency.add(complete - start)
        self.log.add(len(self.pop_ns) + n, self._frame)
        self.folded += n
        for records_list in (
            self.start_ns, self.pop_ns, self.pop_addr, self.pop_bytes, self.complete_ns
        ):  # fmt: skip
            records_list.clear()

    def _frame(self) -> pl.DataFrame:
        """The requests since the last fold: a pop and a complete each, in time order."""
        name, seq = DEVICE_NAMES["emulated"], np.arange(self.folded, self.folded + len(self.pop_ns))
        return pl.concat(
            [
                events_frame(
                    event=schema.LAB_POP,
                    ts_ns=as_array(self.pop_ns),
                    pid=self.pid,
                    tid=self.tid,
                    device=name,
                    addr=as_array(self.pop_addr),
                    size=as_array(self.pop_bytes),
                    value=seq,
                ),
                events_frame(
                    event=schema.LAB_COMPLETE,
                    ts_ns=as_array(self.complete_ns),
                    pid=self.pid,
                    tid=self.tid,
                    device=name,
                    count=np.ones(len(self.complete_ns)),
                    value=seq[: len(self.complete_ns)] + 1,
                ),
            ]
        ).sort("ts_ns", maintain_order=True)

    def release(self) -> None:
        """Drop the view of guest memory so the VM can unmap it."""
        del self.memory


def run_emulated(
    requests: int, request_bytes: int, timeout_s: float, log: EventLog | None = None
) -> LabResult:
    """Run the emulated-device guest: one buffer, one request at a time; ``log`` gets the
    events as they are made (default: keep the first ones for the result)."""
    pid = os.getpid()
    log = log if log is not None else EventLog()
    data_addr = L.RING_BASE
    with Vm(data_addr + request_bytes) as vm:
        vm.load(guest_program("emulated"))
        for offset, value in {
            L.P_REQUESTS: requests,
            L.P_REQUEST_BYTES: request_bytes,
            L.P_DATA: data_addr,
        }.items():
            vm.write_u32(L.PARAM_BASE + offset, value)
        device = RegisterFileDevice(vm, pid, log)
        done = vm.stop_on(L.PORT_DONE, L.PORT_STALL)
        c0, t0 = time.process_time_ns(), time.monotonic_ns()
        try:
            vm.run(timeout_s)
        finally:
            device.release()
        t1, c1 = time.monotonic_ns(), time.process_time_ns()
        completed = vm.read_u32(L.PARAM_BASE + L.R_COMPLETED)
        exits, reasons = vm.userspace_exits, dict(vm.exit_reasons)
    if done != [0] or completed != requests:
        raise VtraceError(
            f"emulated guest stopped early: {completed} of {requests} requests completed"
        )
    device.fold()  # the last requests
    duration_s = (t1 - t0) / 1e9
    return LabResult(
        pid=pid,
        device="emulated",
        requests=requests,
        batch=1,
        ring_size=1,
        request_bytes=request_bytes,
        wait="poll",
        duration_s=duration_s,
        requests_per_s=requests / duration_s,
        cpu_s=(c1 - c0) / 1e9,
        userspace_exits=exits,
        kicks=0,
        guest_kicks=0,
        kicks_suppressed=0,
        interrupts=0,
        completed=completed,
        latency_ns=device.latency.summary(),
        exit_reasons=reason_names(reasons),
        events=log.frame(),
        events_total=log.total,
    )
