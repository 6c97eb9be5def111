"""Facts about the host a recording is made on: CPU vendor and model, hardware virtualisation."""

from __future__ import annotations

import itertools
import platform
import socket
from pathlib import Path
from typing import Any


def cpuinfo(path: Path = Path("/proc/cpuinfo")) -> dict[str, str]:
    """The first processor block of /proc/cpuinfo as key -> value."""
    info: dict[str, str] = {}
    try:
        text = path.read_text()
    except OSError:
        return info
    for line in text.split("\n\n", 1)[0].splitlines():
        key, sep, value = line.partition(":")
        if sep:
            info[key.strip()] = value.strip()
    return info


def virtualisation_isa(info: dict[str, str]) -> str:
    """'vmx' (Intel VT-x), 'svm' (AMD-V) or 'none': whether kvm_exit/kvm_entry can fire."""
    flags = set(info.get("flags", "").split())
    if "vmx" in flags:
        return "vmx"
    if "svm" in flags:
        return "svm"
    return "none"


def host_facts(cpuinfo_path: Path = Path("/proc/cpuinfo")) -> dict[str, Any]:
    """Host name, kernel, CPU vendor and model, virtualisation ISA."""
    info = cpuinfo(cpuinfo_path)
    uname = platform.uname()
    return {
        "host": socket.gethostname(),
        "kernel": uname.release,
        "kernel_version": uname.version,
        "machine": uname.machine,
        "cpu_vendor": info.get("vendor_id", "unknown"),
        "cpu_model": info.get("model name", "unknown"),
        "isa": virtualisation_isa(info),
    }


def vm_name(pid: int, proc: Path = Path("/proc")) -> str:
    """A VM's name: QEMU's ``-name`` (``-name foo`` or ``-name guest=foo,...``), else comm."""
    try:
        argv = (proc / str(pid) / "cmdline").read_bytes().split(b"\0")
    except OSError:
        argv = []
    for flag, value in itertools.pairwise(argv):
        if flag in (b"-name", b"--name"):
            text = value.decode(errors="replace")
            for item in text.split(","):
                if item.startswith("guest="):
                    return item[len("guest=") :]
            return text.split(",", 1)[0]
    try:
        return (proc / str(pid) / "comm").read_text().strip()
    except OSError:
        return str(pid)
