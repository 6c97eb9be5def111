"""The lab: a minimal VMM on /dev/kvm that makes real exits and kicks on any KVM host.

``run_lab(device="emulated" | "virtio", ...)`` runs a tiny guest program against an
emulated register-file device (every access a user-space exit) or a split virtqueue
kicked through ioeventfd and served by a back-end thread, and returns a
:class:`LabResult`. ``measure_exit_cost`` times one PIO write handled in user space
against one handled in the kernel through ioeventfd. See docs/lab.md.

Names are loaded on first use, so importing a sibling module (the QEMU lab) does not
pay for numpy and polars.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vtrace.lab.exit_cost import ExitCost, measure_exit_cost
    from vtrace.lab.result import LabResult
    from vtrace.lab.run import expected_userspace_exits, run_lab, validate_options

__all__ = [
    "ExitCost",
    "LabResult",
    "expected_userspace_exits",
    "measure_exit_cost",
    "run_lab",
    "validate_options",
]
_HOMES = {
    "ExitCost": "vtrace.lab.exit_cost",
    "measure_exit_cost": "vtrace.lab.exit_cost",
    "LabResult": "vtrace.lab.result",
    "expected_userspace_exits": "vtrace.lab.run",
    "run_lab": "vtrace.lab.run",
    "validate_options": "vtrace.lab.run",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        import importlib

        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(name)
