"""What a QEMU guest trace (``vtrace qemu-lab run``) shows about a device, for calibration.

The guest runs under TCG there, so its timings are not KVM's: only the structure of the
I/O path is taken from such a trace. Per request: the device register accesses that
reached QEMU's device model (each an exit to user space under KVM), the kicks, the
interrupts; per kick: the requests QEMU popped (the batch the guest submitted); the
descriptors of a popped element; the most requests in flight at the device (the queue
depth seen); the completions QEMU flushed per interrupt (several: it announces them
together). Everything else keeps the base model's value.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from vtrace.errors import VtraceError
from vtrace.schema import VIRTIO_NOTIFY, VIRTIO_NOTIFY_IRQFD, VIRTIO_QUEUE_NOTIFY, VIRTQUEUE_POP
from vtrace.sim.config import Config

VIRTQUEUE_FILL = "virtqueue_fill"
VIRTQUEUE_FLUSH = "virtqueue_flush"
IDE_EXEC_CMD = "ide_exec_cmd"
IOAPIC_SET_IRQ = "ioapic_set_irq"
E1000_TDT_WRITE = "e1000 TDT write"  # the name an arrival made of TDT writes goes by
E1000_MMIO_SIZE = 0x20000  # the e1000 register BAR is 128 KiB (naturally aligned)

# Register names for the accesses a calibrated config lists (Intel 8254x manual, ATA).
E1000_REGISTERS = {0x8: "STATUS", 0xC0: "ICR", 0xD0: "IMS", 0xD8: "IMC", 0x2818: "RDT",
                   0x3818: "TDT"}  # fmt: skip
IDE_PORTS = {0x1F0: "data", 0x1F1: "features", 0x1F2: "sector count", 0x1F3: "LBA low",
             0x1F4: "LBA mid", 0x1F5: "LBA high", 0x1F6: "device", 0x1F7: "command/status",
             0x3F6: "alt status"}  # fmt: skip
BMDMA_OFFSETS = {0: "BM command", 2: "BM status", 4: "BM PRD address"}


def _event(name: str | list[str]) -> pl.Expr:
    names = [name] if isinstance(name, str) else name
    return pl.col("event").cast(pl.String).is_in(names)


def tdt_writes(events: pl.LazyFrame) -> pl.LazyFrame:
    """e1000 transmit doorbells: writes to TDT (offset 0x3818 of the e1000 MMIO BAR)."""
    return events.filter(
        _event("memory_region_ops_write")
        & (pl.col("device").cast(pl.String) == "e1000-mmio")
        & ((pl.col("addr") % E1000_MMIO_SIZE) == 0x3818)
    )


def request_queues(events: pl.LazyFrame) -> list[int]:
    """The virtqueues requests go through: those the guest kicked (for virtio-net, the
    transmit queue; the receive queue is never kicked while it has buffers)."""
    kicked = events.filter(_event(VIRTIO_QUEUE_NOTIFY)).select(pl.col("queue").unique()).collect()
    queues = kicked["queue"].drop_nulls().to_list()
    if not queues:
        popped = events.filter(_event(VIRTQUEUE_POP)).select(pl.col("queue").unique()).collect()
        queues = popped["queue"].drop_nulls().to_list()
    return sorted(int(q) for q in queues)


@dataclass
class QemuFacts:
    """The structure one QEMU guest trace shows (counts, not timings)."""

    name: str
    device: str
    requests: int
    queue_depth: int  # the capture's --queue-depth (meta config)
    request_bytes: int  # the capture's --request-bytes (meta config)
    submit: str = "streams"  # the capture's --submit: batch (queue_depth under one plug)
    vcpus: int = 1  # the capture's --vcpus: one stream per vCPU (block)
    pop_threads: int = 0  # host threads that popped requests (QEMU's main loop: one)
    accesses: dict[tuple[str, int, bool], int] = field(default_factory=dict)  # all, by register
    interrupts: int = 0  # on the request queues (virtio) or rising edges (emulated)
    other_interrupts: int = 0  # virtio: on queues the guest never kicks (virtio-net receive)
    kicks: int = 0
    queues: list[int] = field(default_factory=list)
    pops: int = 0
    flushes: int = 0
    descs_per_request: int = 0  # median in_num + out_num of a popped element
    max_per_kick: int = 0
    mean_per_kick: float = 0.0
    max_in_flight: int = 0  # most popped and not yet filled at once

    @property
    def virtio(self) -> bool:
        return self.pops > 0

    @property
    def batch_submission(self) -> bool:
        return self.submit == "batch" and self.queue_depth > 1

    @property
    def batches(self) -> int:
        """Submissions of ``queue_depth`` requests (batch submission)."""
        return max(1, self.pops // self.queue_depth)

    @property
    def dispatch_splits(self) -> float:
        """Early ends of a submission's dispatch: kicks beyond one per submission."""
        return round(max(0.0, self.kicks / self.batches - 1.0), 4)


def qemu_facts(
    path: str | os.PathLike[str], events: pl.LazyFrame, meta: dict[str, Any]
) -> QemuFacts:
    """Read a QEMU guest trace into :class:`QemuFacts` (whole-column polars work)."""
    lab = meta.get("qemu_lab") or {}
    config = meta.get("config") or {}
    requests = int(lab.get("requests") or config.get("requests") or 0)
    if requests <= 0:
        raise VtraceError(f"{path}: meta.json: qemu_lab.requests: missing, not a QEMU guest trace")
    facts = QemuFacts(
        name=Path(path).name,
        device=str(lab.get("device") or config.get("device") or ""),
        requests=requests,
        queue_depth=int(config.get("queue_depth") or 1),
        request_bytes=int(config.get("request_bytes") or 0),
        submit=str(config.get("submit") or "streams"),
        vcpus=int(config.get("vcpus") or 1),
    )
    from vtrace.analyze import accesses

    acc = accesses(events).filter(pl.col("source").cast(pl.String) == "qemu")
    per_register = acc.group_by(pl.col("device").cast(pl.String), "addr", "write").len()
    for device, addr, write, n in per_register.iter_rows():  # a few registers, not events
        facts.accesses[(str(device), int(addr), bool(write))] = int(n)
    queues = request_queues(events)
    facts.queues = queues
    on_queue = pl.col("queue").is_in(queues)
    counts = dict(
        events.filter(_event([VIRTQUEUE_POP, VIRTQUEUE_FLUSH, VIRTIO_QUEUE_NOTIFY]) & on_queue)
        .group_by(pl.col("event").cast(pl.String))
        .len()
        .collect()
        .iter_rows()
    )
    facts.pops = int(counts.get(VIRTQUEUE_POP, 0))
    facts.flushes = int(counts.get(VIRTQUEUE_FLUSH, 0))
    facts.kicks = int(counts.get(VIRTIO_QUEUE_NOTIFY, 0))
    if facts.virtio:
        notify = events.filter(_event([VIRTIO_NOTIFY, VIRTIO_NOTIFY_IRQFD]))
        facts.interrupts = notify.filter(on_queue).select(pl.len()).collect().item()
        facts.other_interrupts = notify.filter(~on_queue).select(pl.len()).collect().item()
        flow = (
            events.filter(_event([VIRTQUEUE_POP, VIRTQUEUE_FILL, VIRTIO_QUEUE_NOTIFY]) & on_queue)
            .select("ts_ns", "queue", "count", ev=pl.col("event").cast(pl.String))
            .sort("ts_ns", maintain_order=True)
            .with_columns(
                kick_id=(pl.col("ev") == VIRTIO_QUEUE_NOTIFY).cum_sum().over("queue"),
                in_flight=(
                    (pl.col("ev") == VIRTQUEUE_POP).cast(pl.Int32)
                    - (pl.col("ev") == VIRTQUEUE_FILL).cast(pl.Int32)
                )
                .cum_sum()
                .over("queue"),
            )
            .collect()
        )
        pops = flow.filter(pl.col("ev") == VIRTQUEUE_POP)
        facts.pop_threads = (
            events.filter(_event(VIRTQUEUE_POP) & on_queue)
            .select(pl.col("tid").n_unique())
            .collect()
            .item()
        )
        facts.descs_per_request = int(pops["count"].median() or 1)
        # pops before the window's first kick belong to a kick the window did not see
        per_kick = pops.filter(pl.col("kick_id") > 0).group_by("queue", "kick_id").len()["len"]
        facts.max_per_kick = int(per_kick.max() or 0)
        facts.mean_per_kick = float(per_kick.mean() or 0.0)
        facts.max_in_flight = int(flow["in_flight"].max() or 0)
    else:
        # rising edges of the device's interrupt line (level 1 after level 0), per pin
        facts.interrupts = (
            events.filter(_event(IOAPIC_SET_IRQ))
            .sort("ts_ns", maintain_order=True)
            .with_columns(prev=pl.col("value").shift(1).over("addr"))
            .filter((pl.col("value") == 1) & (pl.col("prev").fill_null(0) == 0))
            .select(pl.len())
            .collect()
            .item()
        )
    return facts


def register_name(device: str, addr: int, write: bool) -> str:
    """A readable name for an access in a calibrated config."""
    if device.startswith("e1000-mmio"):
        offset = addr % E1000_MMIO_SIZE
        reg = E1000_REGISTERS.get(offset, f"offset {offset:#x}")
    elif device == "ide":
        reg = f"{IDE_PORTS.get(addr, 'port')} {addr:#x}"
    elif "bmdma" in device:
        offset = addr % 8
        reg = f"{BMDMA_OFFSETS.get(offset if offset < 4 else 4, 'BM')} {addr:#x}"
    else:
        reg = f"{device} {addr:#x}"
    return f"{reg} {'write' if write else 'read'}"


def fit_qemu(cfg: Config, f: QemuFacts) -> tuple[dict[str, Any], dict[str, tuple[Any, str]]]:
    """Values a QEMU guest trace fixes in ``cfg`` and, per key, the value and its source."""
    fitted: dict[str, tuple[Any, str]] = {}
    n = f.requests
    meta_src = f"{f.name}: meta.json config"
    fitted["workload.arrivals"] = (
        "closed",
        f"{f.name}: the guest issues a request when one completes (dd / ping -A), "
        "queue_depth at a time",
    )
    fitted["workload.requests"] = (n, f"{f.name}: meta.json qemu_lab.requests")
    if f.request_bytes:
        fitted["workload.request_bytes"] = (f.request_bytes, f"{meta_src} request_bytes")
    fitted["workload.warmup_requests"] = (
        min(cfg["workload.warmup_requests"], n // 5),
        "the base model's, at most a fifth of the requests",
    )
    total = sum(f.accesses.values())
    if cfg.kind == "emulated":
        if f.virtio:
            raise VtraceError(f"{f.name}: a virtio trace (virtqueue_pop): not an emulated device")
        if not total:
            raise VtraceError(
                f"{f.name}: no QEMU device register accesses (memory_region_ops_*): "
                "not an emulated device"
            )
        fitted["workload.queue_depth"] = (f.queue_depth, f"{meta_src} queue_depth")
        listed = [
            {"register": register_name(dev, addr, write), "handler": "user",
             "count": round(c / n), "emulation_ns": 0.0}
            for (dev, addr, write), c in sorted(f.accesses.items())
            if round(c / n) > 0
        ]  # fmt: skip
        fitted["device.accesses"] = (
            listed,
            f"{f.name}: memory_region_ops_read/write per request by register ({total / n:.2f} "
            "in all, the interrupt handler's included: one interrupt per request), each an exit "
            "to user space under KVM",
        )
        fitted["interrupt.accesses"] = ([], "counted in device.accesses (see there)")
        if f.interrupts:
            fitted["interrupt.completion"] = (
                "interrupt",
                f"{f.name}: {f.interrupts / n:.3f} rising edges of the IOAPIC pin per request",
            )
        return {k: v for k, (v, _) in fitted.items()}, fitted
    if not f.virtio:
        raise VtraceError(f"{f.name}: no virtqueue_pop events: not a virtio trace")
    fitted["workload.requests"] = (
        f.pops,
        f"{f.name}: virtqueue_pop on the kicked queue {','.join(map(str, f.queues))} "
        f"(meta qemu_lab.requests {n})",
    )
    fitted["workload.queue_depth"] = (
        max(1, f.max_in_flight),
        f"{f.name}: most requests popped and not yet filled at once (meta config "
        f"queue_depth {f.queue_depth})",
    )
    fitted["virtqueue.descs_per_request"] = (
        max(1, f.descs_per_request),
        f"{f.name}: median in_num + out_num of virtqueue_pop",
    )
    per_kick = (
        f"most virtqueue_pop after one virtio_queue_notify {f.max_per_kick} (mean "
        f"{f.mean_per_kick:.2f}, {f.kicks / f.pops:.3f} kicks per request)"
    )
    if f.batch_submission:
        ring = cfg["virtqueue.ring_size"] // max(1, f.descs_per_request)
        fitted["virtqueue.batch"] = (
            ring,
            f"{f.name}: no count: the guest kicks at the end of each dispatch (drain); {per_kick}",
        )
        fitted["workload.submit"] = (
            "batch",
            f"{f.name}: meta.json config submit batch: queue_depth requests under one plug",
        )
        fitted["workload.dispatch_splits"] = (
            f.dispatch_splits,
            f"{f.name}: {f.kicks} virtio_queue_notify for {f.batches} submissions of "
            f"{f.queue_depth}: each dispatched in {f.kicks / f.batches:.2f} pieces on average",
        )
    else:
        fitted["virtqueue.batch"] = (max(1, f.max_per_kick), f"{f.name}: {per_kick}")
    if len(f.queues) > 1 or f.vcpus > 1:
        # a multi-queue guest: one stream per vCPU, blk-mq maps vCPU v to queue v mod queues
        fitted["vm.vcpus"] = (f.vcpus, f"{meta_src} vcpus")
        fitted["virtqueue.queues"] = (
            max(1, len(f.queues)),
            f"{f.name}: virtqueues with virtio_queue_notify: {','.join(map(str, f.queues))}",
        )
        if f.device in ("ide", "virtio-blk"):
            fitted["workload.jobs"] = (f.vcpus, f"{meta_src} vcpus: one stream per vCPU")
        elif len(f.queues) > 1:  # multi-queue virtio-net: a ping stream per queue pair
            fitted["workload.jobs"] = (
                len(f.queues),
                f"{f.name}: one ping stream per kicked transmit queue, on vCPU i",
            )
        if f.pop_threads == 1 and len(f.queues) > 1:
            fitted["backend.threads"] = (
                "shared",
                f"{f.name}: every virtqueue_pop of queues {','.join(map(str, f.queues))} in "
                "one host thread (QEMU's main loop)",
            )
    if f.kicks and not total:
        fitted["virtqueue.kick_handler"] = (
            "kernel",
            f"{f.name}: {f.kicks} virtio_queue_notify and no memory_region_ops write: the "
            "notify write is taken by an ioeventfd",
        )
    if not total:
        kept = [a for a in cfg["interrupt.accesses"] if a["handler"] == "kernel"]
        fitted["interrupt.accesses"] = (
            kept,
            f"{f.name}: 0 device register accesses (the MSI-X handler reads none); the "
            "in-kernel APIC EOI is the base model's (the trace leaves the local APIC out)",
        )
    if f.interrupts:
        fitted["interrupt.completion"] = (
            "interrupt",
            f"{f.name}: {f.interrupts / f.pops:.3f} virtio_notify(_irqfd) per request",
        )
        if f.flushes > 1.5 * f.interrupts:
            fitted["backend.publish"] = (
                "per_pass",
                f"{f.name}: {f.flushes / f.interrupts:.1f} virtqueue_flush per interrupt: QEMU "
                "announces the completions of a pass together",
            )
    return {k: v for k, (v, _) in fitted.items()}, fitted
