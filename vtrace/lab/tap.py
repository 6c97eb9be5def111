"""A multi-queue tap interface on the host, for the QEMU lab's virtio-net with several queues.

QEMU's user network has one queue pair, so multi-queue virtio-net needs another back end: a
tap interface opened with ``IFF_MULTI_QUEUE``, one file descriptor per queue pair (QEMU's
``-netdev tap,queues=M``). The lab makes one for the run and removes it afterwards. The host
takes addresses in 198.18.0.0/24 (RFC 2544's range for benchmark networks), one per guest
stream (``host_address``), so that each stream's echo requests and replies form a flow of
their own: the tap driver sends a flow's replies to the queue its requests came from, and the
guest's transmit queue is the one its vCPU maps to (XPS), so stream i keeps to queue pair i.
The guest's eth0 is ``GUEST_ADDRESS``; nothing else is routed, so the guest reaches only the
host's own addresses on that interface.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator

from vtrace.errors import VtraceError

NETWORK = "198.18.0"
GUEST_ADDRESS = f"{NETWORK}.100"
PREFIX = 24
MAX_STREAMS = 64  # host addresses .1 to .64, below the guest's


def host_address(stream: int) -> str:
    """The host address stream ``stream`` of the guest pings."""
    return f"{NETWORK}.{1 + stream}"


def unavailable_reason() -> str | None:
    """Why this host cannot make the tap interface, or None."""
    if os.geteuid() != 0:
        return "needs root to make a multi-queue tap interface (CAP_NET_ADMIN)"
    if not os.path.exists("/dev/net/tun"):
        return "no /dev/net/tun on this host (modprobe tun)"
    if shutil.which("ip") is None:
        return "no ip command (apt-get install iproute2)"
    return None


def _ip(*args: str) -> str:
    done = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if done.returncode != 0:
        why = (done.stderr.strip() or done.stdout.strip()).splitlines()
        raise VtraceError(f"ip {' '.join(args)}: {why[-1] if why else done.returncode}")
    return done.stdout


@contextlib.contextmanager
def multiqueue_tap(streams: int) -> Iterator[str]:
    """A multi-queue tap interface, up, with ``streams`` host addresses; its name.

    Refused in one line when the range is already in use on this host or the name is
    taken; removed on the way out, whatever happened."""
    if not 1 <= streams <= MAX_STREAMS:
        raise VtraceError(f"a tap interface for {streams} streams: between 1 and {MAX_STREAMS}")
    reason = unavailable_reason()
    if reason is not None:
        raise VtraceError(f"multi-queue virtio-net: {reason}")
    used = _ip("-o", "addr", "show", "to", f"{NETWORK}.0/{PREFIX}").strip()
    if used:
        raise VtraceError(
            f"multi-queue virtio-net: {NETWORK}.0/{PREFIX} is already in use on this host "
            f"({used.split()[1]}); the lab's tap interface takes it"
        )
    name = f"vtrace{os.getpid() % 10**8}"  # at most 14 characters: IFNAMSIZ is 16
    _ip("tuntap", "add", "dev", name, "mode", "tap", "multi_queue")
    try:
        for i in range(streams):
            _ip("addr", "add", f"{host_address(i)}/{PREFIX}", "dev", name)
        _ip("link", "set", name, "up")
        yield name
    finally:
        with contextlib.suppress(VtraceError, OSError, subprocess.TimeoutExpired):
            _ip("link", "del", name)
