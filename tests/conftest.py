"""Shared fixtures and the checks that decide whether real-kernel tests can run here.

Tests that need something this machine may lack carry a marker (`kvm`, `root`, `bcc`,
`qemu`, `browser`); the skip reason says what is missing and how to get it.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
TRACES = ROOT / "traces"


def _missing_kvm() -> str | None:
    if not os.path.exists("/dev/kvm"):
        return "no /dev/kvm: run on a KVM host (load kvm_intel/kvm_amd, or a kernel with KVM)"
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return "/dev/kvm is not read-write for this user: run as root or join the kvm group"
    return None


def _missing_root() -> str | None:
    return None if os.geteuid() == 0 else "needs root (run the suite with sudo)"


def _missing_bcc() -> str | None:
    from vtrace.collect.bccload import bcc_problem  # the one place that knows how to find bcc

    return bcc_problem()


def _missing_qemu() -> str | None:
    if shutil.which("qemu-system-x86_64") is None:
        return "no qemu-system-x86_64: apt-get install qemu-system-x86"
    return None


def _missing_browser() -> str | None:
    if shutil.which("chromium") is None:
        return "no chromium: apt-get install chromium"
    return None


_CHECKS = {
    "kvm": _missing_kvm,
    "root": _missing_root,
    "bcc": _missing_bcc,
    "qemu": _missing_qemu,
    "browser": _missing_browser,
}


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    cache: dict[str, str | None] = {}
    for item in items:
        for name, check in _CHECKS.items():
            if item.get_closest_marker(name) is None:
                continue
            if name not in cache:
                try:
                    cache[name] = check()
                except ImportError as e:  # the checker itself is not built yet
                    cache[name] = f"{name} check unavailable: {e}"
            if cache[name]:
                item.add_marker(pytest.mark.skip(reason=f"[{name}] {cache[name]}"))


@pytest.fixture
def data_dir() -> Path:
    return DATA


_MARKER_COUNTS: dict[str, dict[str, int]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    # Count each test once: its call phase, or its setup phase when it was skipped there.
    if report.when == "call" or (report.when == "setup" and report.skipped):
        for name in _CHECKS:
            if name in report.keywords:
                counts = _MARKER_COUNTS.setdefault(name, {"ran": 0, "skipped": 0})
                counts["skipped" if report.skipped else "ran"] += 1


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if not _MARKER_COUNTS:
        return
    terminalreporter.section("tests that need host features")
    for name, counts in sorted(_MARKER_COUNTS.items()):
        terminalreporter.write_line(
            f"{name:8s} ran {counts['ran']:4d}   skipped {counts['skipped']:4d}"
        )
