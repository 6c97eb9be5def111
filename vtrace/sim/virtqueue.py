"""The split virtqueue (virtio 1.x, section 2.7): descriptors, avail and used rings, suppression.

The driver (the guest) adds a request's descriptor chain and bumps ``avail.idx``; after a
batch it decides whether to notify the device (a *kick*). The device (the back end) pops
available chains, puts finished ones on the used ring, bumps ``used.idx`` and decides
whether to interrupt the driver. Either side can ask the other to stay quiet:

- without EVENT_IDX, the device sets ``VRING_USED_F_NO_NOTIFY`` while it is already
  processing, and the driver sets ``VRING_AVAIL_F_NO_INTERRUPT`` while its handler runs;
- with EVENT_IDX, the device publishes ``avail_event`` ("kick me when avail.idx passes
  this") and the driver ``used_event`` ("interrupt me when used.idx passes this"); both
  sides test the other's index with :func:`vring_need_event`.

Indices are free-running 16-bit counters, as in the spec. Descriptors return to the free
list when the driver takes the used buffer back (``get_used``), so a slow interrupt path
keeps the ring full and stalls the guest, as in Linux's ``detach_buf_split``.
"""

from __future__ import annotations

from collections import deque

VRING_USED_F_NO_NOTIFY = 1
VRING_AVAIL_F_NO_INTERRUPT = 1
_IDX_MASK = 0xFFFF


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """True when ``event_idx`` lies in [old_idx, new_idx): the spec's ``vring_need_event``."""
    return ((new_idx - event_idx - 1) & _IDX_MASK) < ((new_idx - old_idx) & _IDX_MASK)


class Virtqueue:
    """One split virtqueue; the driver calls ``add``/``kick_prepare``/``get_used``/``enable_cb``,
    the device ``pop``/``push_used``/``should_notify``/``enable_notification``."""

    counts_kicks = True
    device_polls = False  # a busy-polling back end: it never asks for a kick
    avail_event_on_pop = False  # EVENT_IDX: the device moves avail_event at every pop

    def __init__(self, ring_size: int, descs_per_request: int, event_idx: bool) -> None:
        self.ring_size = ring_size
        self.descs_per_request = descs_per_request
        self.event_idx = event_idx
        self.num_free = ring_size
        # avail ring: written by the driver, read by the device
        self.avail: deque[int] = deque()
        self.avail_idx = 0
        self.avail_flags = 0
        self.used_event = 0
        self.kicked_avail_idx = 0  # avail.idx at the driver's last kick decision
        # used ring: written by the device, read by the driver
        self.used: deque[int] = deque()
        self.used_idx = 0
        self.used_flags = 0
        self.avail_event = 0
        self.last_avail_idx = 0  # device: next avail entry to pop
        self.signalled_used = 0  # device: used.idx at the last interrupt decision
        self.last_used_idx = 0  # driver: next used entry to take back

    # -- driver (guest) side ---------------------------------------------------------------
    def has_room(self) -> bool:
        return self.num_free >= self.descs_per_request

    def add(self, request: int) -> None:
        """Put one request's descriptor chain on the avail ring (caller checked ``has_room``)."""
        self.num_free -= self.descs_per_request
        self.avail.append(request)
        self.avail_idx += 1

    def kick_prepare(self) -> bool:
        """Does the device want a notification for what was added since the last decision?"""
        old, new = self.kicked_avail_idx, self.avail_idx
        self.kicked_avail_idx = new
        if new == old or self.device_polls:
            return False
        if self.event_idx:
            return vring_need_event(self.avail_event, new, old)
        return not self.used_flags & VRING_USED_F_NO_NOTIFY

    def get_used(self) -> list[int]:
        """Take back every used buffer; their descriptors return to the free list."""
        done = list(self.used)
        self.used.clear()
        self.last_used_idx += len(done)
        self.num_free += len(done) * self.descs_per_request
        return done

    def disable_cb(self) -> None:
        """The driver's handler runs: no interrupts wanted (flag form; EVENT_IDX leaves
        used_event where it is, which already suppresses the ones that follow)."""
        if not self.event_idx:
            self.avail_flags |= VRING_AVAIL_F_NO_INTERRUPT

    def enable_cb(self) -> None:
        """Ask for an interrupt at the next used buffer."""
        if self.event_idx:
            self.used_event = self.last_used_idx
        else:
            self.avail_flags &= ~VRING_AVAIL_F_NO_INTERRUPT

    # -- device (back end) side ------------------------------------------------------------
    def avail_pending(self) -> bool:
        return self.last_avail_idx != self.avail_idx

    def pop(self) -> int:
        self.last_avail_idx += 1
        if self.avail_event_on_pop and self.event_idx:
            # a device that pops with kicks on ("kick me at the entry after the one I just
            # took"): an add that finds it caught up kicks even while it is still running
            self.avail_event = self.last_avail_idx
        return self.avail.popleft()

    def disable_notification(self) -> None:
        """The back end is running: kicks are not needed until it goes idle again."""
        if not self.event_idx:
            self.used_flags |= VRING_USED_F_NO_NOTIFY

    def enable_notification(self) -> None:
        """The back end is about to sleep: ask for a kick at the next avail entry."""
        if self.event_idx:
            self.avail_event = self.avail_idx
        else:
            self.used_flags &= ~VRING_USED_F_NO_NOTIFY

    def push_used(self, request: int) -> None:
        self.used.append(request)
        self.used_idx += 1

    def should_notify(self) -> bool:
        """Does the driver want an interrupt for the used buffers added since the last check?"""
        old, new = self.signalled_used, self.used_idx
        self.signalled_used = new
        if new == old:
            return False
        if self.event_idx:
            return vring_need_event(self.used_event, new, old)
        return not self.avail_flags & VRING_AVAIL_F_NO_INTERRUPT

    def in_flight(self) -> int:
        """Requests added by the driver and not yet taken back."""
        return (self.ring_size - self.num_free) // self.descs_per_request


class DeviceQueue(Virtqueue):
    """The queue of an emulated device, or of a reference queue: no ring in guest memory.

    The guest's register writes are the doorbell (counted as exits, not kicks), the device
    accepts ``capacity`` requests at once, and its interrupt line stays asserted until the
    guest's handler acknowledges it, so one interrupt covers every completion before the ack.
    """

    counts_kicks = False

    def __init__(self, capacity: int) -> None:
        super().__init__(ring_size=capacity, descs_per_request=1, event_idx=False)
        self.line_asserted = False

    def kick_prepare(self) -> bool:
        self.kicked_avail_idx = self.avail_idx
        return True

    def disable_notification(self) -> None:
        pass

    def enable_notification(self) -> None:
        pass

    def disable_cb(self) -> None:
        pass

    def enable_cb(self) -> None:
        self.line_asserted = False

    def should_notify(self) -> bool:
        self.signalled_used = self.used_idx
        if self.line_asserted:
            return False
        self.line_asserted = True
        return True
