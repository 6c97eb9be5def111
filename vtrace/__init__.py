"""vtrace: what each guest I/O costs in KVM exits, and what virtio buys back."""

from __future__ import annotations

__version__ = "0.1.0"

from vtrace.errors import VtraceError
from vtrace.store import Trace, TraceWriter, open_trace

__all__ = ["Trace", "TraceWriter", "VtraceError", "__version__", "open_trace"]
