"""One lab run: build the VM, run a guest program against a device, measure, record.

:func:`run_lab` is the API the CLI (`vtrace lab run`), the benchmarks and the model's
calibration use. It returns a :class:`LabResult` with the VMM's own counters, latency
percentiles and the device's first events as one events frame (``source="lab"``); a
recording gets every event as it is made. Memory stays the same at any ``requests``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from vtrace.errors import VtraceError
from vtrace.lab import layout as L
from vtrace.lab.backend import run_virtio
from vtrace.lab.emulated import ACCESSES_PER_REQUEST, run_emulated
from vtrace.lab.records import EventLog
from vtrace.lab.result import LabResult

DEVICES = ("emulated", "virtio")
WAITS = ("poll", "irq")
BACKEND_THREADS = ("shared", "per-queue")
MAX_RING_SIZE = 32768  # virtio 1.x: Queue Size is at most 32768
MAX_REQUESTS = 1 << 31
MAX_REQUEST_BYTES = 1 << 20
MAX_DATA_BYTES = 256 << 20
# A run that takes longer than this is stuck (here a request takes 20-60 us).
BASE_TIMEOUT_S = 10.0
TIMEOUT_PER_REQUEST_S = 1e-3
# The final exits every run makes besides the per-request ones: the write to PORT_DONE.
FINAL_EXITS = 1


def validate_options(
    device: str,
    requests: int,
    batch: int,
    ring_size: int,
    request_bytes: int,
    wait: str,
    vcpus: int = 1,
    queues: int = 1,
    backend_threads: str = "shared",
) -> None:
    """Raise :class:`VtraceError` naming the first bad option."""
    if device not in DEVICES:
        raise VtraceError(f"--device: {device!r} is not one of {', '.join(DEVICES)}")
    if not 1 <= requests <= MAX_REQUESTS:
        raise VtraceError(f"--requests: {requests} is not between 1 and {MAX_REQUESTS}")
    if not 1 <= ring_size <= MAX_RING_SIZE or ring_size & (ring_size - 1):
        raise VtraceError(
            f"--ring-size: {ring_size} is not a power of two between 1 and {MAX_RING_SIZE}"
        )
    if not 1 <= batch <= ring_size:
        raise VtraceError(f"--batch: {batch} is not between 1 and the ring size ({ring_size})")
    if not 1 <= request_bytes <= MAX_REQUEST_BYTES:
        raise VtraceError(
            f"--request-bytes: {request_bytes} is not between 1 and {MAX_REQUEST_BYTES}"
        )
    if not 1 <= vcpus <= L.MAX_VCPUS:
        raise VtraceError(f"--vcpus: {vcpus} is not between 1 and {L.MAX_VCPUS}")
    if not 1 <= queues <= vcpus:
        raise VtraceError(
            f"--queues: {queues} is not between 1 and --vcpus ({vcpus}): vCPU v submits to "
            "queue v mod queues, so a queue beyond the vCPUs would stay empty"
        )
    if backend_threads not in BACKEND_THREADS:
        raise VtraceError(
            f"--backend-threads: {backend_threads!r} is not one of {', '.join(BACKEND_THREADS)}"
        )
    if device == "virtio" and queues * ring_size * request_bytes > MAX_DATA_BYTES:
        what = "--ring-size x --request-bytes" + (" x --queues" if queues > 1 else "")
        raise VtraceError(
            f"{what}: {queues * ring_size * request_bytes} bytes of buffers exceed {MAX_DATA_BYTES}"
        )
    if wait not in WAITS:
        raise VtraceError(f"--wait: {wait!r} is not one of {', '.join(WAITS)}")
    if device == "emulated" and batch != 1:
        raise VtraceError("--batch: the emulated device takes one request at a time (use 1)")
    if wait == "irq" and device != "virtio":
        raise VtraceError(
            "--wait: irq needs --device virtio (the emulated device has no interrupt)"
        )
    if device == "emulated" and (vcpus, queues) != (1, 1):
        raise VtraceError("--vcpus: the emulated device runs on one vCPU (use 1, and 1 queue)")
    if wait == "irq" and vcpus != 1:
        raise VtraceError(
            "--wait: irq needs --vcpus 1 (the guest's 8259 interrupts reach vCPU 0 only)"
        )


def expected_userspace_exits(device: str, requests: int, vcpus: int = 1) -> int:
    """User-space exits a run must make: per-request register accesses plus each vCPU's
    final exit."""
    per_request = ACCESSES_PER_REQUEST if device == "emulated" else 0
    return per_request * requests + FINAL_EXITS * vcpus


def run_lab(
    device: str = "virtio",
    requests: int = 1000,
    batch: int = 1,
    ring_size: int = 256,
    request_bytes: int = 4096,
    *,
    wait: str = "poll",
    record: str | os.PathLike[str] | None = None,
    timeout_s: float | None = None,
    vcpus: int = 1,
    queues: int = 1,
    backend_threads: str = "shared",
) -> LabResult:
    """Run ``requests`` requests through the chosen device and return what was measured.

    virtio: ``vcpus`` vCPU threads share the requests (vCPU v takes every ``vcpus``-th),
    vCPU v submits to queue v mod ``queues``, and the back end serves the queues from one
    thread (``backend_threads="shared"``) or one thread each (``"per-queue"``).

    ``record`` names a trace directory: the collector records the host's kvm events for
    this process during the run and the lab's own events are added to the same trace.
    A guest still running after ``timeout_s`` (default: 10 s plus 1 ms per request) is
    reported as a :class:`VtraceError`.
    """
    validate_options(
        device, requests, batch, ring_size, request_bytes, wait, vcpus, queues, backend_threads
    )
    if device == "emulated":
        batch = ring_size = 1  # one request at a time through the register file
    if timeout_s is None:
        timeout_s = BASE_TIMEOUT_S + TIMEOUT_PER_REQUEST_S * requests
    shape = Shape(vcpus, queues, backend_threads)
    args = (device, requests, batch, ring_size, request_bytes, wait, timeout_s, shape)
    if record is not None:
        return _recorded(*args, Path(record))
    return _run(*args)


@dataclass(frozen=True)
class Shape:
    """A virtio run's vCPUs, queues and back-end threads."""

    vcpus: int = 1
    queues: int = 1
    backend_threads: str = "shared"


def _run(
    device: str,
    requests: int,
    batch: int,
    ring_size: int,
    request_bytes: int,
    wait: str,
    timeout_s: float,
    shape: Shape,
    log: EventLog | None = None,
) -> LabResult:
    if device == "emulated":
        return run_emulated(requests, request_bytes, timeout_s, log)
    return run_virtio(
        requests, batch, ring_size, request_bytes, wait, timeout_s, log,
        vcpus=shape.vcpus, queues=shape.queues, backend_threads=shape.backend_threads,
    )  # fmt: skip


def _recorded(
    device: str,
    requests: int,
    batch: int,
    ring_size: int,
    request_bytes: int,
    wait: str,
    timeout_s: float,
    shape: Shape,
    out_dir: Path,
) -> LabResult:
    try:
        from vtrace.collect import Recording
    except ImportError as e:
        raise VtraceError(f"--record: the collector is not available ({e})") from None
    meta_extra: dict[str, Any] = {
        "lab": {
            "device": device,
            "requests": requests,
            "batch": batch,
            "ring_size": ring_size,
            "request_bytes": request_bytes,
            "wait": wait,
            "vcpus": shape.vcpus,
            "queues": shape.queues,
            "backend_threads": shape.backend_threads,
        }
    }
    with Recording(out_dir, pids=[os.getpid()], meta_extra=meta_extra) as rec:

        def to_trace(frame: pl.DataFrame) -> None:
            if rec.failure is not None:  # a failed write stopped the recording: stop too
                raise rec.failure
            rec.add_events(frame)

        log = EventLog(sink=to_trace)  # every event goes to the trace as it is made
        result = _run(
            device, requests, batch, ring_size, request_bytes, wait, timeout_s, shape, log
        )
        # The counters exist only now. The collector keeps meta_extra's values (this
        # "lab" dict itself) and writes meta.json when the block ends, so they land there;
        # a test reads them back from the trace.
        meta_extra["lab"].update(
            userspace_exits=result.userspace_exits,
            kicks=result.kicks,
            guest_kicks=result.guest_kicks,
            completed=result.completed,
            interrupts=result.interrupts,
            threads=result.threads,
            per_queue=[
                {
                    k: q[k]
                    for k in ("queue", "vcpus", "notify_port", "requests", "kicks", "guest_kicks")
                }
                for q in result.per_queue
            ],
        )
    result.trace = str(out_dir)
    result.recording = rec.summary
    return result
