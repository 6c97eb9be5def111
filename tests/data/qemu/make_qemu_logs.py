"""Regenerate the raw QEMU trace logs in this folder (real guests, a few seconds each).

    .venv/bin/python tests/data/qemu/make_qemu_logs.py [NAME ...]

Each log is QEMU's ``log`` trace backend output (``-D FILE``) of a Debian kernel guest
running one workload, with the trace events switched on over QMP only for the workload
window (see vtrace/lab/qemu.py). Prints the QEMU command line of each run, for README.md.
"""

from __future__ import annotations

import shlex
import sys
from pathlib import Path

from vtrace.lab.qemu import QemuLabConfig, capture_log

HERE = Path(__file__).resolve().parent

# name -> (config, timestamps)
LOGS: dict[str, tuple[QemuLabConfig, bool]] = {
    "virtio-blk-qd1.log": (QemuLabConfig(device="virtio-blk", requests=32, submit="streams"), True),
    "virtio-blk-qd1-notimestamp.log": (
        QemuLabConfig(device="virtio-blk", requests=16, submit="streams"),
        False,
    ),
    "virtio-blk-qd16.log": (
        QemuLabConfig(device="virtio-blk", requests=64, queue_depth=16, submit="batch"),
        True,
    ),
    "ide.log": (QemuLabConfig(device="ide", requests=32, submit="streams"), True),
    "e1000.log": (QemuLabConfig(device="e1000", requests=16, request_bytes=56), True),
    "virtio-net.log": (QemuLabConfig(device="virtio-net", requests=16, request_bytes=56), True),
}


def main(names: list[str]) -> None:
    for name in names or list(LOGS):
        config, timestamps = LOGS[name]
        run = capture_log(config, HERE / name, timestamps=timestamps)
        # Temporary paths (QMP socket, disk image) differ per run; show them generically.
        cmd = [a.replace(str(HERE / name), name) for a in run.command]
        print(f"## {name}  ({run.accel}, QEMU {run.qemu_version}, kernel {run.kernel})")
        print(f"guest: {run.guest_info}")
        print(shlex.join(cmd))
        print()


if __name__ == "__main__":
    main(sys.argv[1:])
