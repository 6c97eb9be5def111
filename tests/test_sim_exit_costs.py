"""Calibration from a hardware-virtualised host's kernel trace: exits paired with entries.

These machines have no VMX or SVM, so `kvm_exit` and `kvm_entry` never fire here. The
trace below is written in the kernel's exact text (the tracepoints' print formats shipped
in vtrace/formats/kvm) and goes through the real importer: a virtio-pci device whose
notify writes KVM completes on its fast MMIO path (an ioeventfd registered with no length,
as QEMU registers a modern virtio-pci queue's notify address), one vCPU thread, guest work
of a known length between exits. Calibration must find the kicks, take the exit cost of
the exits that carried them from exit to entry, and with it the guest's own time.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from test_ingest import exit_payload, print_fmt, tracefs_line

from vtrace.errors import VtraceError
from vtrace.ingest import import_file
from vtrace.sim.calibrate import calibrate

NOTIFY_GPA = 0xFE003000  # a modern virtio-pci notify address (BAR 4 in QEMU's layout)
PREP_US = 9  # guest time per request
BATCH_PREP_US = 14  # and per batch
KICK_EXIT_US = 3  # exit to entry of a notify write on the fast MMIO path
MSR_EVERY = 4  # every 4th batch the guest also writes an MSR (its timer): 1 us in the kernel
REQUESTS = 2000


def line(event: str, payload: str, at: int) -> str:
    """One tracefs line of ``event`` at ``at`` microseconds."""
    return tracefs_line(event, payload, ts=f"{at // 1_000_000}.{at % 1_000_000:06d}")


def kernel_trace(tmp_path: Path, batch: int) -> Path:
    """A vCPU thread's kvm_exit / kvm_fast_mmio / kvm_entry lines for ``REQUESTS`` requests
    added ``batch`` at a time and kicked once a batch, imported as a trace directory."""
    lines = []
    t = 1_000_000  # us
    entry = print_fmt("kvm_entry")
    fast = print_fmt("kvm_fast_mmio")

    for i in range(REQUESTS // batch):
        t += batch * PREP_US + BATCH_PREP_US
        if i % MSR_EVERY == 0:
            lines.append(line("kvm_exit", exit_payload("MSR_WRITE"), t))
            lines.append(line("kvm_entry", entry % (1, 0xFFFFFFFF81000010, 0, 0, ""), t + 1))
            t += 1
        lines.append(line("kvm_exit", exit_payload("EPT_MISCONFIG"), t))
        lines.append(line("kvm_fast_mmio", fast % NOTIFY_GPA, t + 1))
        lines.append(line("kvm_entry", entry % (1, 0xFFFFFFFF81000020, 0, 0, ""), t + KICK_EXIT_US))
        t += KICK_EXIT_US
    text = tmp_path / f"b{batch}.txt"
    text.write_text("\n".join(lines) + "\n")
    out = tmp_path / f"b{batch}"
    import_file("ftrace", text, out, strict=True)
    return out


def test_fast_mmio_notify_writes_are_the_kicks(tmp_path: Path) -> None:
    fit = calibrate([kernel_trace(tmp_path, 8)], "virtio-blk", requests=REQUESTS)
    facts = fit.facts[0]
    assert facts.kicks == REQUESTS // 8
    assert facts.batch == 8
    assert f"MMIO {NOTIFY_GPA:#x}: {REQUESTS // 8} kicks" in fit.notes["virtqueue.queues"]


def test_exit_costs_come_from_exit_to_entry(tmp_path: Path) -> None:
    traces = [kernel_trace(tmp_path, 1), kernel_trace(tmp_path, 8)]
    fit = calibrate(traces, "virtio-blk", requests=REQUESTS)
    cfg, notes = fit.config, fit.notes
    assert cfg["kvm.kernel_exit_ns"] == pytest.approx(KICK_EXIT_US * 1000)
    assert "EPT_MISCONFIG" in notes["kvm.kernel_exit_ns"]
    # every reason the thread exited for, with its count and median cost
    assert "MSR_WRITE 500 x 1.0 us" in notes["kvm.kernel_exit_ns"]
    assert "EPT_MISCONFIG 2000 x 3.0 us" in notes["kvm.kernel_exit_ns"]
    # with the kicks' exit cost known, the guest's own time is what is left: the MSR
    # writes are guest time to the model (1 us every 4th batch). Within 1 %: the run's
    # length is taken from its first access to its last, a batch fewer than it counts.
    assert cfg["vcpu.request_prep_ns"] == pytest.approx(PREP_US * 1000, rel=1e-2)
    assert cfg["vcpu.batch_prep_ns"] == pytest.approx(
        BATCH_PREP_US * 1000 + 1000 / MSR_EVERY, rel=1e-2
    )


def test_a_trace_without_entries_keeps_the_base_exit_cost(tmp_path: Path) -> None:
    from vtrace.sim import load_config

    names = ["lab-virtio-b1", "lab-virtio-b8"]
    root = Path(__file__).resolve().parent.parent / "traces"
    fit = calibrate([root / n for n in names], "lab-virtio")
    assert "kvm.kernel_exit_ns" not in fit.notes
    assert fit.config["kvm.kernel_exit_ns"] == load_config("lab-virtio")["kvm.kernel_exit_ns"]


def test_no_kicks_at_all_is_still_one_line(tmp_path: Path) -> None:
    text = tmp_path / "t.txt"
    entry = print_fmt("kvm_entry")
    text.write_text(
        "\n".join(
            [
                tracefs_line("kvm_exit", exit_payload("HLT"), ts="1.000001"),
                tracefs_line("kvm_entry", entry % (1, 0x10, 0, 0, ""), ts="1.000005"),
                tracefs_line("kvm_exit", exit_payload("HLT"), ts="1.000009"),
                tracefs_line("kvm_entry", entry % (1, 0x10, 0, 0, ""), ts="1.000012"),
            ]
        )
        + "\n"
    )
    import_file("ftrace", text, tmp_path / "t", strict=True)
    with pytest.raises(VtraceError, match="no kvm_pio/kvm_mmio"):
        calibrate([tmp_path / "t"], "virtio-blk", requests=10)


USER_EXIT_US = 12  # exit to entry of a PIO write the VMM emulates
PORTS = (0x1F2, 0x1F3, 0x1F6, 0x1F7)  # the last starts the device's work


def emulated_trace(tmp_path: Path, requests: int = 400) -> Path:
    """Four PIO writes a request, each an exit to user space (kvm_exit, kvm_pio,
    kvm_userspace_exit, kvm_entry); the device works 30 us after the last."""
    lines = []
    t = 2_000_000
    entry = print_fmt("kvm_entry")
    pio = print_fmt("kvm_pio")

    for _ in range(requests):
        for port in PORTS:
            t += PREP_US
            lines.append(line("kvm_exit", exit_payload("IO_INSTRUCTION"), t))
            lines.append(line("kvm_pio", pio % ("write", port, 1, 1, 0x20, ""), t + 1))
            lines.append(line("kvm_userspace_exit", "reason KVM_EXIT_IO (2)", t + 2))
            lines.append(line("kvm_entry", entry % (1, 0x7C00, 0, 0, ""), t + USER_EXIT_US))
            t += USER_EXIT_US + (30 if port == PORTS[-1] else 0)
    text = tmp_path / "emulated.txt"
    text.write_text("\n".join(lines) + "\n")
    out = tmp_path / "emulated"
    import_file("ftrace", text, out, strict=True)
    return out


def test_user_space_exit_cost_comes_from_exit_to_entry(tmp_path: Path) -> None:
    fit = calibrate([emulated_trace(tmp_path)], "lab-emulated", requests=400)
    cfg, notes = fit.config, fit.notes
    assert cfg["kvm.userspace_exit_ns"] == pytest.approx(USER_EXIT_US * 1000)
    assert (
        "kvm_exit to kvm_entry of the exits handled in user space (1600)"
        in (notes["kvm.userspace_exit_ns"])
    )
    assert "IO_INSTRUCTION 1600 x 12.0 us" in notes["kvm.userspace_exit_ns"]
    assert [a["count"] for a in cfg["device.accesses"]] == [1, 1, 1, 1]


NET_GPA = 0xFE002000  # another device's notify address (a virtio-net queue)


def two_device_trace(tmp_path: Path) -> Path:
    """The disk's kicks as in ``kernel_trace`` at batch 8, and every other batch the vCPU
    also kicks a network queue (its own exit on the fast MMIO path)."""
    lines = []
    t = 3_000_000
    entry = print_fmt("kvm_entry")
    fast = print_fmt("kvm_fast_mmio")

    for i in range(REQUESTS // 8):
        t += 8 * PREP_US + BATCH_PREP_US
        for gpa in (NOTIFY_GPA, NET_GPA) if i % 2 else (NOTIFY_GPA,):
            lines.append(line("kvm_exit", exit_payload("EPT_MISCONFIG"), t))
            lines.append(line("kvm_fast_mmio", fast % gpa, t + 1))
            lines.append(line("kvm_entry", entry % (1, 0xFFFFFFFF81000020, 0, 0, ""), t + 3))
            t += 3
    text = tmp_path / "two.txt"
    text.write_text("\n".join(lines) + "\n")
    import_file("ftrace", text, tmp_path / "two", strict=True)
    return tmp_path / "two"


def test_notify_picks_the_devices_kicks_out_of_a_vms(tmp_path: Path) -> None:
    trace = two_device_trace(tmp_path)
    # every notify address is a queue to the kernel's events, and the source says which
    mixed = calibrate([trace], "virtio-blk", requests=REQUESTS)
    assert mixed.config["virtqueue.queues"] == 2
    assert f"MMIO {NET_GPA:#x}: {REQUESTS // 16} kicks" in mixed.notes["virtqueue.queues"]
    disk = calibrate([trace], "virtio-blk", requests=REQUESTS, notify=[NOTIFY_GPA])
    facts = disk.facts[0]
    assert (facts.kicks, facts.batch) == (REQUESTS // 8, 8)
    assert disk.config["virtqueue.queues"] == 1
    assert "--notify" in disk.notes["virtqueue.queues"]
    with pytest.raises(VtraceError, match=r"no kicks at 0x1000 \(--notify\); .* 0xfe003000: 250"):
        calibrate([trace], "virtio-blk", requests=REQUESTS, notify=[0x1000])


def test_notify_on_the_command_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    trace = two_device_trace(tmp_path)
    base = [sys.executable, "-m", "vtrace.cli", "calibrate", str(trace), "--model",
            "virtio-blk", "--requests", str(REQUESTS)]  # fmt: skip
    ok = subprocess.run(
        [*base, "--notify", f"{NOTIFY_GPA:#x}", "-o", str(tmp_path / "fit.toml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert ok.returncode == 0, ok.stderr
    assert "virtqueue.queues = 1" in ok.stdout
    bad = subprocess.run(
        [*base, "--notify", "disk", "-o", str(tmp_path / "bad.toml")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert bad.returncode == 2 and "--notify" in bad.stderr and "disk" in bad.stderr
    assert "Traceback" not in bad.stderr and not (tmp_path / "bad.toml").exists()
