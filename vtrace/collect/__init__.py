"""The bcc collector: a BPF program on the kvm tracepoints, its loader, a batch consumer of
its ring buffer, the live in-kernel aggregate view (`vtrace stat`) and host checks (doctor).

Only :class:`Recording` is imported here; everything that needs bcc is loaded lazily so that
importing vtrace never requires root or Debian's python3-bpfcc.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from vtrace.collect.recording import Recording

__all__ = ["Recording"]


def __getattr__(name: str):
    if name == "Recording":
        from vtrace.collect.recording import Recording

        return Recording
    raise AttributeError(name)
