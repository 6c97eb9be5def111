"""vtrace: what each guest I/O costs in KVM exits, and what virtio buys back."""

from __future__ import annotations

from vtrace.errors import VtraceError
from vtrace.store import Trace, TraceWriter, open_trace
from vtrace.version import __version__

__all__ = ["Trace", "TraceWriter", "VtraceError", "__version__", "open_trace"]
