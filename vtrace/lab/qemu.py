"""Real Linux guests under QEMU: emulated vs virtio devices, traced with QEMU's own events.

:func:`run_qemu_lab` boots the distribution's kernel with an initramfs built by
:mod:`vtrace.lab.initramfs`, attaches one device (``ide``, ``virtio-blk``, ``e1000`` or
``virtio-net``) and runs one workload in the guest: direct-I/O block reads or writes at a
queue depth, or echo requests to the gateway of QEMU's user network. With several vCPUs
(``-smp``) the block workload runs one stream per vCPU, each pinned to its vCPU, and
virtio-blk gets ``num-queues`` hardware queues (blk-mq maps each vCPU to one). QEMU's ``log`` trace
backend writes the events (``-D file``, ``-msg timestamp=on``); they are switched on over
QMP only between the guest's ``start`` and ``end`` console markers, so every counted event
belongs to the workload. The log is imported into a trace directory and summarised per
request (:func:`summarize`).

Under TCG every guest access to a device register reaches QEMU as a
``memory_region_ops_read``/``write`` on that device's region: under KVM each of those is an
exit. The summary reports them as *trapping accesses per request*: accesses that would
exit under KVM, counted under TCG.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from vtrace import schema as s
from vtrace.errors import VtraceError
from vtrace.lab import sched, tap
from vtrace.lab.guest_trace import guest_events
from vtrace.lab.initramfs import DEVICE_MODULES, GuestKernel, build_initramfs, find_kernel
from vtrace.output import check_new_dir
from vtrace.qmp import QemuExited, Qmp
from vtrace.store import Trace, write_trace

QEMU_BINARY = "qemu-system-x86_64"
DEVICES = tuple(DEVICE_MODULES)
BLOCK_DEVICES = ("ide", "virtio-blk")
NET_DEVICES = ("e1000", "virtio-net")

# Region names QEMU gives each device's register banks (seen in memory_region_ops_* events).
# The MSI-X table and PBA are shared names; they belong to the device under test because it
# is the only MSI-X capable device in the guest.
DEVICE_REGIONS: dict[str, tuple[str, ...]] = {
    "ide": ("ide", "piix-bmdma", "bmdma"),
    "virtio-blk": (
        "virtio-pci-common-virtio-blk",
        "virtio-pci-isr-virtio-blk",
        "virtio-pci-device-virtio-blk",
        "virtio-pci-notify-virtio-blk",
        "virtio-pci-notify-pio-virtio-blk",
        "msix-table",
        "msix-pba",
    ),
    "e1000": ("e1000-mmio", "e1000-io"),
    "virtio-net": (
        "virtio-pci-common-virtio-net",
        "virtio-pci-isr-virtio-net",
        "virtio-pci-device-virtio-net",
        "virtio-pci-notify-virtio-net",
        "virtio-pci-notify-pio-virtio-net",
        "msix-table",
        "msix-pba",
    ),
}

# Events switched on for the workload window. memory_region_ops_* cover every region of
# the machine (timer, serial console, ...); the import keeps the device's regions only.
COMMON_EVENTS = ("memory_region_ops_read", "memory_region_ops_write", "ioapic_set_irq")
VIRTIO_EVENTS = (
    "virtio_queue_notify",
    "virtqueue_pop",
    "virtqueue_fill",
    "virtqueue_flush",
    "virtio_notify",
    "virtio_notify_irqfd",
)
DEVICE_EVENTS: dict[str, tuple[str, ...]] = {
    "ide": ("ide_exec_cmd", "ide_dma_cb", "ide_sector_read", "ide_sector_write"),
    "virtio-blk": (
        *VIRTIO_EVENTS,
        "virtio_blk_handle_read",
        "virtio_blk_handle_write",
        "virtio_blk_rw_complete",
        "virtio_blk_req_complete",
    ),
    "e1000": (),
    "virtio-net": VIRTIO_EVENTS,
}

MAX_VCPUS = 64  # TCG runs them all on the host's cores; more only slows the boot
_MARK = "vtrace-guest: "
GUEST_TRACE_BYTES = 256  # the guest's tracefs buffer per request and CPU (guest_init.sh)
_GUEST_TRACE = _MARK + "gt "  # one event of the guest's block trace (lab.guest_trace)
_CONSOLE_TAIL = 15


@dataclass(frozen=True)
class QemuLabConfig:
    """One guest run: which device, which workload, how long it may take."""

    device: str = "virtio-blk"
    requests: int = 64
    request_bytes: int = 4096
    queue_depth: int = 1
    write: bool = False
    submit: str = "batch"  # batch: queue_depth requests per plug; streams: concurrent dd
    accel: str = "auto"  # auto | kvm | tcg
    kernel: str | None = None  # path to a vmlinuz; default: the newest in /boot
    vhost: bool = False  # virtio-net with vhost-net (needs /dev/vhost-net and KVM)
    memory_mib: int = 256
    timeout_s: float = 180.0  # hard limit for the whole run, boot included
    qemu: str = QEMU_BINARY
    vcpus: int = 1  # -smp; block workloads run one stream per vCPU
    queues: int = 1  # virtio-blk num-queues (blk-mq hardware queues); virtio-net queue pairs
    sched: bool = True  # record the host scheduler over the window when root (lab.sched)
    guest_trace: bool = False  # the guest's block-layer issue/complete (lab.guest_trace)

    def check(self) -> None:
        """Raise :class:`VtraceError` naming the first bad option."""
        if self.device not in DEVICES:
            raise VtraceError(f"--device {self.device!r}: one of {', '.join(DEVICES)}")
        if self.requests < 1 or self.requests > 1_000_000:
            raise VtraceError(f"--requests {self.requests}: between 1 and 1000000")
        if not 1 <= self.vcpus <= MAX_VCPUS:
            raise VtraceError(f"--vcpus {self.vcpus}: between 1 and {MAX_VCPUS}")
        if not 1 <= self.queues <= self.vcpus:
            # Linux's virtio drivers use at most one queue (pair) per possible CPU.
            raise VtraceError(
                f"--queues {self.queues}: between 1 and --vcpus {self.vcpus} (the guest's "
                "driver uses at most one queue per vCPU)"
            )
        if self.queues > 1 and self.device in ("ide", "e1000"):
            raise VtraceError(f"--queues applies to virtio-blk only ({self.device} has one)")
        if self.queues > 1 and self.device == "virtio-net":
            # virtio-net takes its queue pairs from the back end's queues; QEMU's user
            # network has one (-netdev user takes no queues=): more need a tap interface
            if self.requests % self.queues:
                raise VtraceError(
                    f"--requests {self.requests}: a multiple of --queues {self.queues} "
                    "(one ping stream per queue pair)"
                )
            reason = tap.unavailable_reason()
            if reason is not None:
                raise VtraceError(f"--queues {self.queues} with virtio-net: {reason}")
        if self.guest_trace and self.device != "virtio-blk":
            # its events are placed on the host's clock by QEMU's virtio-blk reads and writes
            raise VtraceError(f"--guest-trace applies to virtio-blk only, not {self.device}")
        if (
            self.guest_trace
            and self.requests * GUEST_TRACE_BYTES * self.vcpus > (self.memory_mib << 20) // 4
        ):
            most = ((self.memory_mib << 20) // 4) // (GUEST_TRACE_BYTES * self.vcpus)
            raise VtraceError(
                f"--guest-trace with --requests {self.requests}: the guest's ring buffers "
                f"({GUEST_TRACE_BYTES} bytes a request on each of {self.vcpus} CPUs) would take "
                f"more than a quarter of its {self.memory_mib} MiB; at most {most} requests"
            )
        if self.device in BLOCK_DEVICES:
            if self.request_bytes < 512 or self.request_bytes % 512:
                raise VtraceError(
                    f"--request-bytes {self.request_bytes}: a multiple of 512 (direct I/O)"
                )
            if self.request_bytes > 1 << 20:
                raise VtraceError(f"--request-bytes {self.request_bytes}: at most 1048576")
            if not 1 <= self.queue_depth <= 256:
                raise VtraceError(f"--queue-depth {self.queue_depth}: between 1 and 256")
            if self.vcpus > 1 and self.requests % self.vcpus:
                raise VtraceError(
                    f"--requests {self.requests}: a multiple of --vcpus {self.vcpus} "
                    "(one stream per vCPU)"
                )
            per_stream = self.requests // self.vcpus
            if self.queue_depth > per_stream:
                raise VtraceError(
                    f"--queue-depth {self.queue_depth}: more than --requests {self.requests}"
                    + (f" / --vcpus {self.vcpus}" if self.vcpus > 1 else "")
                )
            if self.submit not in ("batch", "streams"):
                raise VtraceError(f"--submit {self.submit!r}: one of batch, streams")
            if self.submit == "batch" and self.queue_depth > 1:
                # The guest splits each transfer into requests of max_sectors_kb (>= 4 KiB).
                if self.request_bytes % 4096:
                    raise VtraceError(
                        f"--request-bytes {self.request_bytes}: a multiple of 4096 with "
                        "--submit batch and --queue-depth above 1"
                    )
                if per_stream % self.queue_depth:
                    per_vcpu = f" x --vcpus {self.vcpus}" if self.vcpus > 1 else ""
                    raise VtraceError(
                        f"--requests {self.requests}: a multiple of --queue-depth "
                        f"{self.queue_depth}{per_vcpu} with --submit batch"
                    )
        else:
            if not 1 <= self.request_bytes <= 65000:
                raise VtraceError(
                    f"--request-bytes {self.request_bytes}: echo payload between 1 and 65000"
                )
            if self.queue_depth != 1:
                raise VtraceError("--queue-depth applies to block devices only")
            if self.write:
                raise VtraceError("--write applies to block devices only")
        if self.vhost and self.device != "virtio-net":
            raise VtraceError("--vhost applies to --device virtio-net only")
        if self.vhost:
            if not os.path.exists("/dev/vhost-net"):
                raise VtraceError("--vhost: no /dev/vhost-net on this host (modprobe vhost_net)")
            # vhost-net serves only a tap back end, which needs a host interface.
            raise VtraceError("--vhost: needs a tap back end, which this lab does not set up")
        if self.accel not in ("auto", "kvm", "tcg"):
            raise VtraceError(f"--accel {self.accel!r}: one of auto, kvm, tcg")
        if not 1 <= self.timeout_s <= 3600:
            raise VtraceError(f"--timeout {self.timeout_s}: between 1 and 3600 seconds")


@dataclass
class GuestRun:
    """What one QEMU run produced besides its trace log."""

    accel: str
    accel_reason: str
    qemu_version: str
    kernel: str
    command: list[str]
    guest_info: dict[str, str] = field(default_factory=dict)
    window_wall_s: float = 0.0  # host time between switching events on and off
    boot_s: float = 0.0  # QEMU start to the guest's ready marker
    console_tail: list[str] = field(default_factory=list)
    qemu_pid: int | None = None
    # the host scheduler over the window (vtrace.lab.sched): tracefs text, clock offset,
    # QEMU's threads, events lost; or why it was not recorded
    sched_text: str | None = None
    sched_offset_ns: int = 0
    sched_tids: set[int] = field(default_factory=set)
    sched_lost: int = 0
    sched_reason: str | None = None
    guest_trace: list[str] = field(default_factory=list)  # the guest's "gt" lines


def choose_accel(requested: str = "auto") -> tuple[str, str]:
    """``(accel, reason)``: KVM when it can run a Linux guest at speed, TCG otherwise.

    KVM needs a read-write ``/dev/kvm`` and hardware virtualisation (``vmx`` or ``svm`` in
    /proc/cpuinfo). A KVM without them (a software KVM that emulates every guest
    instruction) works but is far too slow to boot Linux, so ``auto`` picks TCG there.
    """
    kvm_problem = None
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        kvm_problem = "no read-write /dev/kvm"
    else:
        try:
            flags = Path("/proc/cpuinfo").read_text()
        except OSError:
            flags = ""
        if not re.search(r"^flags\s*:.*\b(vmx|svm)\b", flags, re.M):
            kvm_problem = "/dev/kvm without hardware virtualisation (no vmx/svm CPU flag)"
    if requested == "tcg":
        return "tcg", "requested"
    if requested == "kvm":
        if kvm_problem and "no read-write" in kvm_problem:
            raise VtraceError(f"--accel kvm: {kvm_problem} (load kvm_intel/kvm_amd, run as root)")
        return "kvm", "requested"
    if kvm_problem:
        return "tcg", kvm_problem
    return "kvm", "/dev/kvm with hardware virtualisation"


def find_qemu(binary: str = QEMU_BINARY) -> str:
    """The QEMU binary's path, or a :class:`VtraceError` naming the package."""
    path = shutil.which(binary)
    if path is None:
        raise VtraceError(f"{binary} not found on PATH (apt-get install qemu-system-x86)")
    return path


def qemu_version(qemu: str) -> str:
    out = subprocess.run([qemu, "--version"], capture_output=True, text=True, timeout=30)
    first = out.stdout.splitlines()[0] if out.stdout else ""
    m = re.search(r"version (\S+)", first)
    return m.group(1) if m else first.strip()


def uses_tap(config: QemuLabConfig) -> bool:
    """Multi-queue virtio-net: a tap interface on the host instead of QEMU's user network."""
    return config.device == "virtio-net" and config.queues > 1


def kernel_command_line(config: QemuLabConfig) -> str:
    op = "ping" if config.device in NET_DEVICES else ("write" if config.write else "read")
    # block: a stream per vCPU; ping: a stream per queue pair (one on the user network)
    streams = config.queues if config.device in NET_DEVICES else config.vcpus
    return (
        "console=ttyS0 panic=-1 quiet loglevel=3 "
        f"vtrace_op={op} vtrace_requests={config.requests} "
        f"vtrace_bytes={config.request_bytes} vtrace_qd={config.queue_depth} "
        f"vtrace_submit={config.submit} vtrace_streams={streams}"
        + (" vtrace_gtrace=1" if config.guest_trace else "")
        + (" vtrace_net=tap" if uses_tap(config) else "")
    )


def disk_bytes(config: QemuLabConfig) -> int:
    """A disk large enough for the workload's ranges (after the warm-up's first block)."""
    need = (config.requests + config.queue_depth * config.vcpus) * config.request_bytes
    return max(64 << 20, -(-need // (1 << 20)) * (1 << 20))


def make_disk(config: QemuLabConfig, workdir: Path) -> Path | None:
    """The block device's backing file in ``workdir``, sparse (reads return zeros, no host
    I/O); None for a network device."""
    if config.device not in BLOCK_DEVICES:
        return None
    disk = workdir / "disk.raw"
    with disk.open("wb") as f:
        f.truncate(disk_bytes(config))
    return disk


def qemu_command(
    config: QemuLabConfig,
    *,
    qemu: str,
    accel: str,
    kernel: GuestKernel,
    initrd: Path,
    log_path: Path,
    qmp_path: Path,
    disk_path: Path | None,
    timestamps: bool = True,
    tap_name: str | None = None,
) -> list[str]:
    """The QEMU command line (no default devices; the one device under test); a
    multi-queue virtio-net uses the host's tap interface ``tap_name``."""
    cmd = [
        qemu,
        "-nodefaults",
        "-no-user-config",
        "-machine",
        "pc",
        "-accel",
        accel,
        "-cpu",
        "host" if accel == "kvm" else "qemu64",
        "-smp",
        str(config.vcpus),
        "-m",
        str(config.memory_mib),
        "-display",
        "none",
        "-vga",
        "none",
        "-serial",
        "stdio",
        "-monitor",
        "none",
        "-qmp",
        f"unix:{qmp_path},server=on,wait=off",
        "-no-reboot",
        "-kernel",
        str(kernel.image),
        "-initrd",
        str(initrd),
        "-append",
        kernel_command_line(config),
        "-D",
        str(log_path),
        "-msg",
        f"timestamp={'on' if timestamps else 'off'}",
    ]
    if config.device in BLOCK_DEVICES:
        assert disk_path is not None
        cmd += ["-drive", f"if=none,id=disk0,file={disk_path},format=raw,cache=writeback"]
        if config.device == "ide":
            cmd += ["-device", "ide-hd,drive=disk0,bus=ide.0"]
        else:
            blk = "virtio-blk-pci,drive=disk0"
            if config.vcpus > 1 or config.queues > 1:
                # QEMU's default is one queue per vCPU: say how many. The vectors follow
                # (one per queue and one for configuration changes).
                blk += f",num-queues={config.queues}"
            cmd += ["-device", blk]
    elif uses_tap(config):
        if tap_name is None:
            raise VtraceError("multi-queue virtio-net: no tap interface given")
        # one tap queue per queue pair; vhost=off: QEMU's own virtio-net code serves them,
        # so its trace events see every kick and pop. The vectors: one per queue, one for
        # the control queue and one for configuration changes.
        netdev = (
            f"tap,id=net0,ifname={tap_name},script=no,downscript=no,"
            f"queues={config.queues},vhost=off"
        )
        nic = f"virtio-net-pci,netdev=net0,mq=on,vectors={2 * config.queues + 2},romfile="
        cmd += ["-netdev", netdev, "-device", nic]
    else:
        # restrict=on: the guest reaches nothing outside QEMU; echo requests to the gateway
        # are answered by QEMU's user network itself.
        netdev = "user,id=net0,restrict=on"
        model = "e1000" if config.device == "e1000" else "virtio-net-pci"
        # romfile=: the guest boots from -kernel, so the NIC needs no PXE option ROM (and
        # QEMU does not need Debian's ipxe-qemu to start).
        cmd += ["-netdev", netdev, "-device", f"{model},netdev=net0,romfile="]
    return cmd


# The QMP client lives in vtrace.qmp (the recorder uses it too); the old names stay.
_QemuExited = QemuExited
_Qmp = Qmp


def _pump(stream: Any, lines: queue.Queue[str | None]) -> None:
    for raw in iter(stream.readline, b""):
        lines.put(raw.decode(errors="replace").rstrip("\r\n"))
    lines.put(None)


class GuestSession:
    """One running QEMU guest: its process, console, QMP connection and what it said.

    The console is read by a thread into a queue; :meth:`wait_for` takes lines until the
    guest prints a marker, keeping the last ones to explain a failure (:meth:`fail`).
    """

    def __init__(self, cmd: list[str], qmp_path: Path, run: GuestRun, deadline: float) -> None:
        self.start = time.monotonic()
        self.deadline = deadline
        self.run = run
        self.qmp_path = qmp_path
        self.tail: deque[str] = deque(maxlen=_CONSOLE_TAIL)
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        run.qemu_pid = self.proc.pid
        self.reader = threading.Thread(
            target=_pump, args=(self.proc.stdout, self.lines), daemon=True
        )
        self.reader.start()
        self.qmp: _Qmp | None = None

    def fail(self, what: str) -> VtraceError:
        shown = " | ".join(line for line in self.tail if line.strip()) or "(no console output)"
        return VtraceError(f"{what}; last console lines: {shown}")

    def heard(self, line: str) -> None:
        if line.startswith(_GUEST_TRACE):  # thousands of them: kept apart, not in the tail
            self.run.guest_trace.append(line[len(_GUEST_TRACE) :])
            return
        self.tail.append(line)
        if line.startswith(_MARK + "info "):  # "vtrace-guest: info key=value"
            key, _, value = line[len(_MARK + "info ") :].partition("=")
            self.run.guest_info[key.strip()] = value.strip()

    def wait_for(self, marker: str, until: float, what: str) -> str:
        """The console line that starts with ``marker``; an error if the guest reports one,
        QEMU exits, or ``until`` passes first."""
        while True:
            left = until - time.monotonic()
            if left <= 0:
                raise self.fail(f"{what}: no '{_MARK}{marker}' within {until - self.start:.0f} s")
            try:
                line = self.lines.get(timeout=min(left, 1.0))
            except queue.Empty:
                continue
            if line is None:
                raise self.fail(f"{what}: QEMU exited with status {self.proc.wait()}")
            self.heard(line)
            if line.startswith(_MARK + "error"):
                raise self.fail(f"guest failed: {line[len(_MARK) :]}")
            elif line.startswith(_MARK + marker):
                return line

    def send(self, text: str) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode())
        self.proc.stdin.flush()

    def connect(self) -> None:
        """Connect to QMP; if QEMU exits first, its last words (on stdout) say why."""
        try:
            self.qmp = _Qmp(
                self.qmp_path, min(self.deadline, self.start + 30), lambda: self.proc.poll() is None
            )
        except _QemuExited:
            self.wait_for("ready", time.monotonic() + 5, "guest did not come up")
            raise self.fail(
                f"guest did not come up: QEMU exited with status {self.proc.wait()}"
            ) from None

    def set_events(self, names: tuple[str, ...], enable: bool) -> None:
        assert self.qmp is not None
        for name in names:
            self.qmp.execute("trace-event-set-state", name=name, enable=enable)

    def power_off(self) -> None:
        """Let the guest power off (QMP quit if it does not), then read its last lines."""
        self.send("done\n")
        try:
            self.proc.wait(timeout=max(1.0, min(20.0, self.deadline - time.monotonic())))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(VtraceError, OSError):
                assert self.qmp is not None
                self.qmp.execute("quit")
            self.proc.wait(timeout=10)
        while True:
            try:
                line = self.lines.get(timeout=2)
            except queue.Empty:
                break
            if line is None:
                break
            self.heard(line)

    def close(self) -> None:
        """Release QMP, the process and the console reader, whatever state they are in."""
        if self.qmp is not None:
            self.qmp.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()
        self.reader.join(timeout=5)
        self.run.console_tail = list(self.tail)


def run_guest(
    config: QemuLabConfig,
    log_path: Path,
    *,
    workdir: Path,
    boot_timeout_s: float = 90.0,
    timestamps: bool = True,
) -> GuestRun:
    """Boot the guest, trace its workload window into ``log_path``, wait for power-off."""
    config.check()
    qemu = find_qemu(config.qemu)
    kernel = find_kernel(config.kernel)
    accel, reason = choose_accel(config.accel)
    initrd = build_initramfs(kernel, config.device)
    disk = make_disk(config, workdir)
    qmp_path = workdir / "qmp.sock"
    with contextlib.ExitStack() as net:
        tap_name = (
            net.enter_context(tap.multiqueue_tap(config.queues)) if uses_tap(config) else None
        )
        cmd = qemu_command(
            config,
            qemu=qemu,
            accel=accel,
            kernel=kernel,
            initrd=initrd,
            log_path=log_path,
            qmp_path=qmp_path,
            disk_path=disk,
            timestamps=timestamps,
            tap_name=tap_name,
        )
        return _run_booted(config, cmd, qemu, kernel, accel, reason, qmp_path, boot_timeout_s)


def _run_booted(
    config: QemuLabConfig,
    cmd: list[str],
    qemu: str,
    kernel: GuestKernel,
    accel: str,
    reason: str,
    qmp_path: Path,
    boot_timeout_s: float,
) -> GuestRun:
    """Run QEMU's ``cmd``: boot, the traced window, power-off."""
    run = GuestRun(accel, reason, qemu_version(qemu), kernel.version, cmd)
    events = (*COMMON_EVENTS, *DEVICE_EVENTS[config.device])
    guest = GuestSession(cmd, qmp_path, run, time.monotonic() + config.timeout_s)
    try:
        guest.connect()
        guest.wait_for(
            "ready", min(guest.deadline, guest.start + boot_timeout_s), "guest did not come up"
        )
        run.boot_s = time.monotonic() - guest.start
        with contextlib.ExitStack() as stack:
            recorder = _sched_recorder(config, run, stack)
            if recorder is not None:
                run.sched_tids = sched.process_threads(guest.proc.pid)
                recorder.start()
            guest.set_events(events, True)
            on = time.monotonic()
            guest.send("go\n")
            guest.wait_for("start", guest.deadline, "guest did not start its workload")
            end = guest.wait_for("end", guest.deadline, "guest workload did not finish")
            guest.set_events(events, False)
            run.window_wall_s = time.monotonic() - on
            if recorder is not None:
                run.sched_text = recorder.stop()
                run.sched_offset_ns = recorder.offset_ns
                run.sched_lost = recorder.lost()
                run.sched_tids |= sched.process_threads(guest.proc.pid)
        status = end.rsplit("status=", 1)[-1]
        if status != "0":
            raise guest.fail(f"guest workload failed (status {status})")
        if config.guest_trace:  # printed after the window: its console lines are not traced
            guest.send("dump\n")
            guest.wait_for("dumped", guest.deadline, "guest did not print its block trace")
        guest.power_off()
    except (OSError, json.JSONDecodeError) as e:
        # A broken pipe or a garbled QMP answer: QEMU went away under us.
        raise guest.fail(f"lost contact with QEMU: {e}") from None
    finally:
        guest.close()
    return run


def _sched_recorder(
    config: QemuLabConfig, run: GuestRun, stack: contextlib.ExitStack
) -> sched.SchedRecorder | None:
    """The host scheduler's recorder for the window, or None (and why, in ``run``)."""
    if not config.sched:
        run.sched_reason = "not asked for (--no-sched)"
        return None
    run.sched_reason = sched.unavailable_reason()
    if run.sched_reason is not None:
        return None
    try:
        return stack.enter_context(sched.SchedRecorder())
    except OSError as e:
        run.sched_reason = f"tracefs instance: {e.strerror or e}"
        return None


def capture_log(config: QemuLabConfig, log_path: Path, *, timestamps: bool = True) -> GuestRun:
    """Run the guest and leave QEMU's raw trace log at ``log_path`` (no import)."""
    log_path = Path(log_path)
    with tempfile.TemporaryDirectory(prefix="vtrace-qemu-") as tmp:
        return run_guest(config, log_path, workdir=Path(tmp), timestamps=timestamps)


def run_meta(config: QemuLabConfig, run: GuestRun) -> dict[str, Any]:
    return {
        "lab": "qemu",
        "config": asdict(config),
        "accel": run.accel,
        "accel_reason": run.accel_reason,
        "qemu_version": run.qemu_version,
        "guest_kernel": run.kernel,
        "qemu_command": run.command,
        "guest_info": run.guest_info,
        "window_wall_s": run.window_wall_s,
        "boot_s": run.boot_s,
        "qemu_pid": run.qemu_pid,
        "device_regions": list(DEVICE_REGIONS[config.device]),
        "sched": {
            "recorded": run.sched_text is not None,
            "reason": run.sched_reason,
            "threads": len(run.sched_tids),
            "lost": run.sched_lost,
        },
    }


# --- import and per-request figures ----------------------------------------------------------

IOAPIC_SET_IRQ = "ioapic_set_irq"
_ACCESS_EVENTS = (s.MEMORY_REGION_OPS_READ, s.MEMORY_REGION_OPS_WRITE)
_VIRTIO_INTERRUPTS = (s.VIRTIO_NOTIFY, s.VIRTIO_NOTIFY_IRQFD)
TRAPPING_NOTE = (
    "device_accesses_per_request counts the guest driver's accesses to the device's "
    "registers that reached QEMU's device model (memory_region_ops_*); measured under TCG, "
    "each would be a VM exit to user space under KVM. Kicks go through an ioeventfd: an exit "
    "handled inside KVM, not counted as an access."
)


def ioapic_pins(run_info: dict[str, str]) -> tuple[int, ...]:
    """The device's IOAPIC pins as the guest reported them (``info ioapic_pins=14,15``)."""
    text = run_info.get("ioapic_pins", "")
    return tuple(int(p) for p in re.findall(r"\d+", text))


def device_events(
    events: pl.DataFrame, device: str, pins: tuple[int, ...]
) -> tuple[pl.DataFrame, dict[str, int]]:
    """The device's own events, and how many of the others were left out (by event/region).

    Keeps ``memory_region_ops_*`` on the device's regions, ``ioapic_set_irq`` on its pins
    (pin in ``addr``, level in ``value``, like ``kvm_set_irq``) and every other event
    (the virtio, block and IDE events name only this device: it is the only one).
    Virtio events get ``device`` = the lab's device name.
    """
    ev = pl.col("event")
    is_access = ev.is_in(_ACCESS_EVENTS)
    is_ioapic = ev == IOAPIC_SET_IRQ
    pin = pl.col("raw").str.extract(r"vector: (\d+)", 1).cast(pl.UInt64)
    level = pl.col("raw").str.extract(r"level: (\d+)", 1).cast(pl.UInt64)
    regions = list(DEVICE_REGIONS[device])
    keep = (
        (is_access & pl.col("device").cast(pl.String).is_in(regions))
        | (is_ioapic & pin.is_in(list(pins)))
        | ~(is_access | is_ioapic)
    )
    marked = events.with_columns(_keep=keep.fill_null(False))
    dropped = (
        marked.filter(~pl.col("_keep"))
        .group_by(
            label=pl.concat_str(
                pl.col("event").cast(pl.String),
                pl.col("device").cast(pl.String).fill_null(""),
                separator=":",
            ).str.strip_chars_end(":")
        )
        .len()
        .sort("label")
    )
    virtio = ev.cast(pl.String).str.contains(r"^virt(io|queue)_")
    kept = marked.filter(pl.col("_keep")).with_columns(
        addr=pl.when(is_ioapic).then(pin).otherwise(pl.col("addr")),
        value=pl.when(is_ioapic).then(level).otherwise(pl.col("value")),
        device=pl.when(virtio | is_ioapic)
        .then(pl.lit(device))
        .otherwise(pl.col("device").cast(pl.String)),
    )
    if device == "virtio-net":
        kept = _name_receive_queue(kept)
    kept = s.conform(kept.drop("_keep"))
    return kept, dict(zip(dropped["label"].to_list(), dropped["len"].to_list(), strict=True))


def _name_receive_queue(events: pl.DataFrame) -> pl.DataFrame:
    """virtio-net: give the receive queues (0, 2, ...) their indices.

    The importer names a queue by the ``virtio_queue_notify`` events that carry its
    ``VirtQueue`` pointer, and the guest never kicks a receive queue while it has
    buffers. QEMU keeps a device's VirtQueues in one array in index order, so with one
    transmit queue (1) a queue whose pointer lies below it can only be queue 0; with
    several (1, 3, ...: multi-queue pairs) the array's stride between two of them names
    every other pointer (index = 1 + its distance from queue 1 / the stride).
    """
    vq = (
        pl.col("raw")
        .str.extract(r"\bvq 0x([0-9a-fA-F]+)", 1)
        .str.to_integer(base=16, dtype=pl.UInt64, strict=False)
    )
    frame = events.with_columns(_vq=vq)
    known = (
        frame.filter(pl.col("queue").is_not_null() & pl.col("_vq").is_not_null())
        .group_by("queue")
        .agg(pl.col("_vq").unique())
        .sort("queue")
    )
    if known.is_empty() or any(len(v) != 1 for v in known["_vq"]):
        return frame.drop("_vq")
    pointers = {int(q): int(v[0]) for q, v in known.iter_rows()}
    if 1 not in pointers:
        return frame.drop("_vq")
    one = pointers[1]
    unnamed = pl.col("queue").is_null() & pl.col("_vq").is_not_null()
    others = [(q, p) for q, p in pointers.items() if q != 1]
    if others:
        q, p = others[0]
        stride, rest = divmod(p - one, q - 1)
        consistent = (
            stride > 0 and not rest and all(pp - one == (qq - 1) * stride for qq, pp in others)
        )
        if not consistent:
            return frame.drop("_vq")
        offset = pl.col("_vq").cast(pl.Int64) - one
        index = 1 + offset // stride
        named = unnamed & (offset % stride == 0) & (index >= 0)
        frame = frame.with_columns(
            queue=pl.when(named).then(index.cast(pl.Int32)).otherwise(pl.col("queue"))
        ).drop("_vq")
    else:
        below = unnamed & (pl.col("_vq") < one)
        frame = frame.with_columns(
            queue=pl.when(below).then(pl.lit(0, pl.Int32)).otherwise(pl.col("queue"))
        ).drop("_vq")
    # virtqueue_flush lines carry no pointer the import keeps; QEMU flushes right after
    # filling the same queue in the same thread, so a flush takes that fill's queue.
    ev = pl.col("event")
    last_fill = (
        pl.when(ev == s.VIRTQUEUE_FILL)
        .then(pl.col("queue"))
        .forward_fill()
        .over(pl.col("tid"), order_by=pl.int_range(pl.len()))
    )
    return frame.with_columns(
        queue=pl.when((ev == s.VIRTQUEUE_FLUSH) & pl.col("queue").is_null())
        .then(last_fill)
        .otherwise(pl.col("queue"))
    )


def summarize(
    events: pl.DataFrame | pl.LazyFrame,
    device: str,
    requests: int,
    *,
    timed: bool = True,
) -> dict[str, Any]:
    """Per-request figures of one run from its device events (see :func:`device_events`).

    ``requests`` is what the guest issued (block requests or echo round trips). Kicks are
    ``virtio_queue_notify``; interrupts are ``virtio_notify``/``_irqfd`` for virtio devices
    and rising edges of the device's IOAPIC pins for emulated ones. ``per_queue`` lists, for
    each virtqueue the events name, its requests (``virtqueue_pop``), kicks and interrupts
    (empty for emulated devices).
    """
    frame = events.lazy().with_row_index("_order").collect()
    ev = pl.col("event")
    is_virtio = device not in ("ide", "e1000")
    # An interrupt on a legacy line is a rising edge of its pin (level 0 -> 1).
    level = pl.col("value")
    rising = (level == 1) & (level.shift(1, fill_value=0).over("addr", order_by="_order") == 0)
    irq_ioapic = frame.filter(ev == IOAPIC_SET_IRQ).select(rising.sum()).item()
    counts = frame.select(
        accesses=ev.is_in(_ACCESS_EVENTS).sum(),
        kicks=(ev == s.VIRTIO_QUEUE_NOTIFY).sum(),
        notifies=ev.is_in(_VIRTIO_INTERRUPTS).sum(),
        pops=(ev == s.VIRTQUEUE_POP).sum(),
        ide_commands=(ev == "ide_exec_cmd").sum(),
        first_ns=pl.col("ts_ns").min(),
        last_ns=pl.col("ts_ns").max(),
    ).row(0, named=True)
    accesses = int(counts["accesses"])
    kicks = int(counts["kicks"]) if is_virtio else None
    interrupts = int(counts["notifies"]) if is_virtio else int(irq_ioapic)

    # Requests popped per kick: pops of a queue since that queue's latest kick, in log
    # order (QEMU writes the log under one lock, so its order is the order of events).
    per_kick = (
        frame.filter(
            ev.is_in([s.VIRTIO_QUEUE_NOTIFY, s.VIRTQUEUE_POP]) & pl.col("queue").is_not_null()
        )
        .sort("_order")
        .with_columns(
            kick_no=(ev == s.VIRTIO_QUEUE_NOTIFY).cum_sum().over("queue", order_by="_order")
        )
        .filter((ev == s.VIRTQUEUE_POP) & (pl.col("kick_no") > 0))
        .group_by("queue", "kick_no")
        .len()
    )
    max_per_kick = int(per_kick["len"].max()) if per_kick.height else None
    per_queue = per_queue_counts(frame) if is_virtio else []

    def per_request(n: int | None) -> float | None:
        return None if n is None else n / requests

    span_ns = (counts["last_ns"] or 0) - (counts["first_ns"] or 0)
    return {
        "device": device,
        "requests": requests,
        "duration_s": span_ns / 1e9 if timed and counts["first_ns"] is not None else None,
        "device_accesses_per_request": per_request(accesses),
        "kicks_per_request": per_request(kicks),
        "interrupts_per_request": per_request(interrupts),
        "requests_per_kick": (requests / kicks) if kicks else None,
        "would_exit_per_request": per_request(accesses + (kicks or 0)),
        "max_requests_per_kick": max_per_kick,
        "device_accesses": accesses,
        "kicks": kicks,
        "interrupts": interrupts,
        "virtqueue_pops": int(counts["pops"]) if is_virtio else None,
        "ide_commands": int(counts["ide_commands"]) if device == "ide" else None,
        "per_queue": per_queue,
        "note": TRAPPING_NOTE,
    }


def per_queue_counts(events: pl.DataFrame) -> list[dict[str, Any]]:
    """Requests (``virtqueue_pop``), kicks and interrupts of each virtqueue, by index.

    QEMU names the queue of every one of these events (the importer turns its
    ``VirtQueue`` pointer into the index), so the counts add up to the device's totals.
    """
    ev = pl.col("event")
    rows = (
        events.filter(pl.col("queue").is_not_null())
        .group_by("queue")
        .agg(
            requests=(ev == s.VIRTQUEUE_POP).sum(),
            kicks=(ev == s.VIRTIO_QUEUE_NOTIFY).sum(),
            interrupts=ev.is_in(_VIRTIO_INTERRUPTS).sum(),
        )
        .filter((pl.col("requests") + pl.col("kicks") + pl.col("interrupts")) > 0)
        .sort("queue")
    )
    return [
        {
            "queue": int(q),
            "requests": int(n),
            "kicks": int(k),
            "interrupts": int(i),
            "kicks_per_request": k / n if n else None,
            "interrupts_per_request": i / n if n else None,
        }
        for q, n, k, i in rows.select("queue", "requests", "kicks", "interrupts").iter_rows()
    ]  # one row per queue: a handful


def check_guest_shape(config: QemuLabConfig, guest_info: dict[str, str]) -> None:
    """The guest saw the vCPUs and the hardware queues (virtio-blk) or queue pairs
    (multi-queue virtio-net) it was given.

    A guest kernel that brings up fewer CPUs (``nr_cpus=``, a CPU that failed to start) or
    maps fewer blk-mq queues would make a run that is not the one asked for.
    """
    cpus = guest_info.get("cpus", "")
    if cpus.isdigit() and int(cpus) != config.vcpus:
        raise VtraceError(f"--vcpus {config.vcpus}: the guest brought up {cpus} CPUs")
    hw_queues = guest_info.get("hw_queues", "")
    if config.device == "virtio-blk" and hw_queues.isdigit() and int(hw_queues) != config.queues:
        raise VtraceError(
            f"--queues {config.queues}: the guest's virtio-blk has {hw_queues} hardware queues"
        )
    pairs = guest_info.get("queue_pairs", "")
    if uses_tap(config) and pairs.isdigit() and int(pairs) != config.queues:
        raise VtraceError(
            f"--queues {config.queues}: the guest's virtio-net uses {pairs} queue pairs"
        )


def run_qemu_lab(
    config: QemuLabConfig,
    out: str | os.PathLike[str],
    *,
    raw_log: str | os.PathLike[str] | None = None,
) -> tuple[Trace, dict[str, Any]]:
    """Boot the guest, run the workload, import its device events into the trace ``out``.

    Returns the trace and the per-request summary (also stored in the trace's meta under
    ``qemu_lab``). ``raw_log`` keeps QEMU's raw log there. Nothing is left at ``out`` on
    any error.
    """
    from vtrace.ingest import read_events

    config.check()
    out_path = Path(out)
    check_new_dir(out_path)  # before booting: a bad -o must not cost a whole run
    with tempfile.TemporaryDirectory(prefix="vtrace-qemu-") as tmp:
        log_path = Path(tmp) / "qemu-trace.log"
        run = run_guest(config, log_path, workdir=Path(tmp))
        if raw_log is not None:
            shutil.copyfile(log_path, raw_log)
        raw_events, import_meta = read_events("qemu", log_path)
    check_guest_shape(config, run.guest_info)
    pins = ioapic_pins(run.guest_info)
    events, dropped = device_events(raw_events, config.device, pins)
    # Every event comes from the one QEMU process: the VM (the log names threads only).
    events = events.with_columns(pid=pl.lit(run.qemu_pid, pl.Int32))
    if run.sched_text is not None and run.qemu_pid is not None:
        if run.sched_lost:
            raise VtraceError(
                f"the host scheduler's recording lost {run.sched_lost} events (tracefs ring "
                "buffers full); run with --no-sched or fewer --requests"
            )
        host = sched.sched_events(run.sched_text, run.sched_offset_ns, run.qemu_pid, run.sched_tids)
        events = pl.concat([events, host]).sort("ts_ns", maintain_order=True)
    guest_meta: dict[str, Any] = {"recorded": False}
    if config.guest_trace:
        lost = run.guest_info.get("guest_trace_lost", "")
        if not lost.isdigit():
            raise VtraceError("guest trace: the guest did not report its ring buffer's state")
        disk = run.guest_info.get("disk", "").removeprefix("/dev/")
        guest, guest_meta = guest_events(run.guest_trace, disk, events, int(lost))
        events = pl.concat([events, guest]).sort("ts_ns", maintain_order=True)
    summary = summarize(
        events, config.device, config.requests, timed=import_meta.get("clock") == "realtime"
    )
    summary = {"accel": run.accel, "vcpus": config.vcpus, "queues": config.queues, **summary}
    guest_irqs = run.guest_info.get("guest_interrupts")
    summary["guest_interrupts_per_request"] = (
        int(guest_irqs) / config.requests if guest_irqs and guest_irqs.isdigit() else None
    )
    meta = {
        **import_meta,
        # The raw log lived in a temporary directory unless it was kept.
        "source_files": [str(raw_log)] if raw_log is not None else [],
        **run_meta(config, run),
        "ioapic_pins": list(pins),
        "guest_trace": guest_meta,
        "filtered_out": dropped,
        "qemu_lab": summary,
    }
    meta["events"] = events.height
    trace = write_trace(out_path, events, meta)
    return trace, summary


# --- a background guest: qemu-lab start / stop ---------------------------------------------------

LAB_NAME_PREFIX = "vtrace-lab-"
# Requests per round of a background guest's workload (x queue depth): a round ends with a
# count line on the console, a few dozen a second under TCG.
ROUND_REQUESTS = 32


@dataclass(frozen=True)
class LabGuest:
    """A background guest started by :func:`start_lab_guest`."""

    pid: int
    name: str
    qmp: Path
    console: Path
    accel: str


def console_path_for(qmp_path: Path) -> Path:
    """Where a background guest's serial console is written: next to its QMP socket."""
    return qmp_path.with_name(qmp_path.name + ".console")


def _socket_in_use(path: Path) -> bool:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(1.0)
        sock.connect(str(path))
        return True
    except OSError:
        return False
    finally:
        sock.close()


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # A zombie (exited, not yet reaped) counts as gone.
    with contextlib.suppress(OSError):
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    return False


def background_command(cmd: list[str], console: Path, pidfile: Path, name: str) -> list[str]:
    """The lab's QEMU command for a background guest: daemonized, console to a file, a name,
    no trace log (whoever records sets one over QMP)."""
    out: list[str] = []
    args = iter(cmd)
    for arg in args:
        if arg == "-serial":
            out += ["-serial", f"file:{console}"]
            next(args)
        elif arg == "-D":
            next(args)  # the recorder points the log where it reads it (HMP logfile)
        else:
            out.append(arg)
    # debug-threads=on names QEMU's threads ("CPU 0/TCG", "CPU 0/KVM"): the vCPU threads
    # are recognisable in a host-wide recording.
    return [*out, "-name", f"{name},debug-threads=on", "-daemonize", "-pidfile", str(pidfile)]


def start_lab_guest(
    config: QemuLabConfig,
    qmp_path: str | os.PathLike[str],
    *,
    timestamps: bool = True,
    boot_timeout_s: float = 90.0,
) -> LabGuest:
    """Boot the lab's guest in the background, its workload repeating until
    :func:`stop_lab_guest`; returns once the workload runs.

    ``config.requests`` is the size of one round (the guest prints its counts after each).
    The serial console goes to ``<qmp>.console``; the disk is a sparse file QEMU keeps
    open after vtrace has removed its name.
    """
    config.check()
    if uses_tap(config):
        raise VtraceError(
            "qemu-lab start: --queues with virtio-net takes a tap interface the lab makes for "
            "one run; use qemu-lab run"
        )
    qmp = Path(qmp_path).absolute()
    if qmp.exists():
        if _socket_in_use(qmp):
            raise VtraceError(f"--qmp {qmp}: a QEMU already listens there")
        if not qmp.is_socket():
            raise VtraceError(f"--qmp {qmp}: exists and is not a socket")
        qmp.unlink()  # a stale socket of a QEMU that is gone
    if not qmp.parent.is_dir():
        raise VtraceError(f"--qmp {qmp}: no such directory {qmp.parent}")
    console = console_path_for(qmp)
    qemu = find_qemu(config.qemu)
    kernel = find_kernel(config.kernel)
    accel, _reason = choose_accel(config.accel)
    initrd = build_initramfs(kernel, config.device)
    name = f"{LAB_NAME_PREFIX}{config.device}"
    with tempfile.TemporaryDirectory(prefix="vtrace-qemu-lab-") as tmp:
        work = Path(tmp)
        disk = make_disk(config, work)
        pidfile = work / "qemu.pid"
        cmd = qemu_command(
            config,
            qemu=qemu,
            accel=accel,
            kernel=kernel,
            initrd=initrd,
            log_path=work / "unused.log",
            qmp_path=qmp,
            disk_path=disk,
            timestamps=timestamps,
        )
        cmd = background_command(cmd, console, pidfile, name)
        i = cmd.index("-append") + 1
        cmd[i] += " vtrace_loop=1"
        # -daemonize: QEMU returns once it is set up (the QMP socket listens), its errors
        # on stderr before that.
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
        if done.returncode != 0:
            why = done.stderr.strip().splitlines()
            raise VtraceError(
                f"QEMU did not start (status {done.returncode}): {why[-1] if why else '?'}"
            )
        pid = int(pidfile.read_text().split()[0])
    guest = LabGuest(pid, name, qmp, console, accel)
    deadline = time.monotonic() + boot_timeout_s
    try:
        while True:
            text = console.read_text(errors="replace") if console.exists() else ""
            if _MARK + "running" in text:
                return guest
            error = next((ln for ln in text.splitlines() if ln.startswith(_MARK + "error")), None)
            if error or not _pid_alive(pid) or time.monotonic() > deadline:
                shown = " | ".join(text.strip().splitlines()[-_CONSOLE_TAIL:]) or "(none)"
                what = (
                    f"guest failed: {error[len(_MARK) :]}"
                    if error
                    else "QEMU exited"
                    if not _pid_alive(pid)
                    else f"guest did not start its workload within {boot_timeout_s:.0f} s"
                )
                raise VtraceError(f"{what}; last console lines: {shown}")
            time.sleep(0.1)
    except BaseException:
        _kill(pid)
        raise


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, 9)
    until = time.monotonic() + 10
    while _pid_alive(pid) and time.monotonic() < until:
        time.sleep(0.05)


def stop_lab_guest(qmp_path: str | os.PathLike[str], *, timeout_s: float = 20.0) -> int:
    """Quit the background guest listening at ``qmp_path`` (only one ``qemu-lab start``
    made: its name says so); returns its pid once it has exited."""
    qmp_file = Path(qmp_path).absolute()
    with Qmp(qmp_file) as qmp:
        pid = qmp.peer_pid()
        name = (qmp.execute("query-name") or {}).get("name", "")
        if not name.startswith(LAB_NAME_PREFIX):
            raise VtraceError(
                f"--qmp {qmp_file}: QEMU pid {pid} ({name or 'no -name'}) was not started by "
                "vtrace qemu-lab start; not stopping it"
            )
        with contextlib.suppress(VtraceError, OSError):
            qmp.execute("quit")
    until = time.monotonic() + timeout_s
    while _pid_alive(pid) and time.monotonic() < until:
        time.sleep(0.05)
    if _pid_alive(pid):
        _kill(pid)
    qmp_file.unlink(missing_ok=True)
    console_path_for(qmp_file).unlink(missing_ok=True)
    return pid


_COUNT_LINE = re.compile(rf"^{_MARK}count requests=(\d+) interrupts=(\d+)\s*$")


def console_counts(console: str | os.PathLike[str]) -> list[tuple[int, int]]:
    """The guest's own ``(requests, interrupts)`` after each round so far, from its console."""
    text = Path(console).read_text(errors="replace")
    return [
        (int(m.group(1)), int(m.group(2))) for m in map(_COUNT_LINE.match, text.splitlines()) if m
    ]
