"""A guest vCPU: its driver builds requests, adds them to its queue, kicks, and stalls.

One actor per vCPU, with its own time line (:mod:`vtrace.sim.timeline`) and the requests
its jobs or arrivals hand it (:mod:`vtrace.sim.workloads`); it submits to queue
``vcpu mod queues``, as blk-mq and virtio-net pick one. For each request it waits until the
request exists and the vCPU is free (an interrupt handler may have taken it), pays the
driver's ``request_prep_ns`` plus the request's register exits (emulated devices), adds
the request to the ring (publishing ``avail.idx`` at once, as Linux's
``virtqueue_add_split`` does, so a back end that is still running takes it without a kick)
and, by the batch policy, makes a kick decision. A full ring stalls it until the interrupt
handler takes used buffers back.

Batch policies (``virtqueue.batch_policy``):

- ``count``: kick after every ``batch`` added requests (and when no further request could
  ever fill the batch: end of the workload, or a closed loop with nothing left to issue);
- ``drain``: kick when the guest has nothing more pending right now, or after ``batch``
  (blk-mq's ``bd->last`` at the end of a dispatch);
- ``timer``: kick ``batch_timer_ns`` after the first unkicked add, or after ``batch``.

A full ring always kicks what is unkicked first, as Linux does before it stops the queue.
With ``workload.dispatch_splits`` the guest's block layer ends the dispatch of a batch
submission early after some requests: it kicks what it added and leaves the rest queued
until the next completion on its queue re-runs it (blk-mq's restart).

A polling driver (``interrupt.completion = "poll"``) takes used buffers back only when it
needs them (room in the ring, or a closed loop's next request), and each time it finds some
it pays ``reap_ns`` besides their per-buffer work (in ``request_prep_ns``): the lab guest's
failed room check, its calls into ``wait_used`` and ``reap``, two reads of used.idx and the
way back. With ``whole_batches`` the driver checks for room before it builds a batch, as
the lab guest does, so on a ring the batch fills it cannot build while the back end serves.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Generator

import numpy as np
import simpy

from vtrace.sim.draws import Draws
from vtrace.sim.monitors import RunMonitor
from vtrace.sim.params import GuestParams
from vtrace.sim.queuepath import QueuePath
from vtrace.sim.timeline import VcpuTimeline
from vtrace.sim.workloads import Workload


class Vcpu:
    """One guest vCPU and the driver work it does."""

    def __init__(
        self,
        env: simpy.Environment,
        index: int,
        guest: GuestParams,
        timeline: VcpuTimeline,
        path: QueuePath,
        workload: Workload,
        monitor: RunMonitor,
        prep: Draws,
        rng: np.random.Generator,
    ) -> None:
        self.env = env
        self.index = index
        self.guest = guest
        self.timeline = timeline
        self.path = path
        self.workload = workload
        self.monitor = monitor
        self.prep = prep
        self.rng = rng
        self.pending: deque[tuple[int, float]] = deque()  # (request, arrival ns)
        self.unkicked = 0
        self.last_added = 0
        self.held = False  # dispatch stopped: the rest waits for a completion
        self.arrival_wait: simpy.Event | None = None
        self.batch_timer_generation = 0
        path.vcpus.append(self)

    @property
    def running(self) -> bool:
        """Holds a host CPU: not while the guest halts, nor once it has nothing left."""
        return not self.timeline.halted

    def wake(self) -> None:
        """A request arrived for it, or a completion re-runs its queue."""
        self.held = False
        wait = self.arrival_wait
        if wait is not None and not wait.triggered:
            wait.succeed()

    def _wait(self) -> simpy.Event:
        self.arrival_wait = self.env.event()
        return self.arrival_wait

    def kick(self) -> None:
        self.unkicked = 0
        self.batch_timer_generation += 1
        self.path.kick(self.timeline, self.last_added, self.guest.batch_prep_ns)

    def _start_batch_timer(self) -> None:
        generation = self.batch_timer_generation

        def fire(_event: simpy.Event) -> None:
            if self.batch_timer_generation == generation and self.unkicked:
                self.kick()

        self.env.timeout(self.guest.batch_timer_ns).callbacks.append(fire)

    # -- the actor -------------------------------------------------------------------------
    def run(self) -> Generator[simpy.Event, None, None]:
        env = self.env
        g = self.guest
        path = self.path
        vq = path.vq
        timeline = self.timeline
        monitor = self.monitor
        workload = self.workload
        pending = self.pending
        prep_ns = g.prep_ns
        speed = timeline.speed
        driver_ns = g.driver_ns
        stalls = not self.prep.constant
        if stalls:
            prep_ns = max(prep_ns, 1e-9)  # a stall can fall on a request with no other cost
        exit_ns = g.request_exits.time_ns
        req_exits, req_user = g.request_exits.exits, g.request_exits.userspace_exits
        batch, policy = g.batch, g.batch_policy
        whole_batches, poll = g.whole_batches, g.polls_completions
        descs = vq.descs_per_request
        stops = workload.stops
        prepared = False
        while True:
            if timeline.lock_wait is not None:  # its thread sleeps on the back end's lock
                held = timeline.lock_wait
                if not held.triggered:
                    yield held
                if timeline.lock_wait is held:
                    timeline.lock_wait = None
                continue
            now = env.now
            if not pending and not workload.refill(self):
                if workload.exhausted(self):
                    break
                # closed loop: wait for a completion to issue the next
                if self.unkicked:
                    self.kick()
                if poll:  # a polling driver learns of completions only by looking
                    if vq.used:
                        self._reap()
                        continue
                    yield from self._poll_used_ring()
                    continue
                yield from self._halt(self._wait())
                continue
            request, arrival = pending[0]
            wake = arrival
            if timeline.preempt_at_ns <= now:  # an interrupt handler has started
                timeline.catch_up(now)
            if timeline.busy_until_ns > wake:
                wake = timeline.busy_until_ns
            if wake > now:
                yield env.timeout(wake - now)
                continue
            if self.held and not prepared:  # the rest of a stopped dispatch waits
                if poll:  # for a completion the polling driver sees by looking
                    if vq.used:
                        self._reap()
                    else:
                        yield from self._poll_used_ring()
                    self.held = False
                    continue
                yield from self._halt(self._wait())
                continue
            # A virtio driver builds the request, then finds the ring full when it adds; an
            # emulated device's register writes are the submission, so it waits for room first.
            if (g.room_first or prepared or prep_ns <= 0 or (whole_batches and not self.unkicked)) and (
                not vq.has_room()
                or (
                    whole_batches
                    and not self.unkicked
                    and vq.num_free < min(batch, workload.n - workload.submitted) * descs
                )
            ):  # fmt: skip
                if poll and vq.used:  # a polling driver takes completions back when it needs room
                    self._reap()
                    continue
                if g.drop_when_full:  # a finite reference queue loses the arrival
                    pending.popleft()
                    monitor.dropped_at(request, arrival)
                    prepared = False
                    continue
                if self.unkicked:
                    self.kick()
                monitor.ring_full_stalls += 1
                if poll:
                    yield from self._poll_used_ring()
                    continue
                yield from self._halt(path.wait_for_space())
                continue
            if not prepared and prep_ns > 0:
                # the driver's own work plus, for an emulated device, its register exits (plus,
                # now and then, the host preempting the vCPU thread)
                cost = self.prep.next() if stalls else prep_ns
                if speed is not None:  # a slow stretch slows the driver's own work
                    cost += (speed.factor(now) - 1.0) * driver_ns
                timeline.busy_until_ns = now + cost
                timeline.exit_ns += exit_ns
                prepared = True
                yield env.timeout(cost)
                continue
            prepared = False
            pending.popleft()
            monitor.submitted(request, arrival)
            workload.submitted += 1
            if req_exits:
                monitor.exit(request, req_exits, req_user)
            vq.add(request)
            path.added()
            self.last_added = request
            self.unkicked += 1
            if not pending:
                workload.refill(self)
            more_now = bool(pending) and pending[0][1] <= now
            if self.unkicked >= batch:
                self.kick()
            elif policy == "drain":
                if not more_now:
                    self.kick()
            elif policy == "timer" and self.unkicked == 1:
                self._start_batch_timer()
            if stops and request in stops:
                stops.discard(request)
                if more_now:
                    if self.unkicked:
                        self.kick()
                    self.held = True
        if self.unkicked:
            self.kick()
        while poll and vq.in_flight():  # a polling driver waits for its last requests
            if vq.used:
                path.take_used()
                continue
            yield from self._poll_used_ring()
        self.timeline.halted = True  # nothing left to run: the guest idles

    def _halt(self, wake: simpy.Event) -> Generator[simpy.Event, None, None]:
        """The guest has nothing to run until ``wake`` (HLT): its thread leaves the CPU,
        after ``idle_entry_ns`` of guest work on the way (the task blocks, the idle loop
        starts), which interrupt handlers may lengthen; a wake that comes meanwhile finds
        it still running."""
        timeline = self.timeline
        entry = self.guest.idle_entry_ns
        if entry > 0:
            env = self.env
            if timeline.speed is not None:  # a slow stretch slows the guest's own work
                entry *= timeline.speed.factor(env.now)
            end = timeline.occupy(env.now, entry)
            while end > env.now:
                yield env.timeout(end - env.now)
                if timeline.preempt_at_ns <= env.now:  # a handler started meanwhile
                    timeline.catch_up(env.now)
                end = timeline.busy_until_ns
            if wake.triggered:
                return
        timeline.halted = True
        yield wake
        timeline.halted = False

    def _reap(self) -> None:
        """A polling driver's look that finds used buffers: it takes them all back (they
        complete now) and its vCPU is busy ``reap_ns`` longer."""
        self.path.take_used()
        if self.guest.reap_ns > 0:
            self.timeline.occupy(self.env.now, self.guest.reap_ns)

    def _poll_used_ring(self) -> Generator[simpy.Event, None, None]:
        """A polling driver with nothing to take back spins on used.idx until the back end
        publishes, then takes the used buffers back.

        Its failed room check and the calls into the wait take ``reap_ns - poll_ns`` (the
        part of a reap before its first look), then it looks once per ``poll_ns``; the first
        look that starts after the publish finds the buffers and is done with them
        ``poll_ns`` later (the lab guest's reap: 8 + 19 x empty looks + 18 instructions,
        with a ``reap_ns`` of 26 and a ``poll_ns`` of 19). So a publish that comes before
        the first look costs ``reap_ns``, as in :meth:`_reap`, and the wait hides the rest."""
        env = self.env
        timeline = self.timeline
        now = env.now
        began = timeline.busy_until_ns if timeline.busy_until_ns > now else now
        yield self.path.wait_for_space()
        poll_ns = self.guest.poll_ns
        if poll_ns <= 0:
            return
        reap_ns = self.guest.reap_ns
        lead = reap_ns - poll_ns if reap_ns > poll_ns else 0.0
        empty = max(0, math.ceil((env.now - began - lead) / poll_ns))
        self.monitor.empty_polls += empty
        seen = began + lead + empty * poll_ns  # the look that finds the publish starts
        if seen > env.now:
            yield env.timeout(seen - env.now)
        self.path.take_used()
        done = seen + (poll_ns if reap_ns > poll_ns else reap_ns)
        if done > timeline.busy_until_ns:
            timeline.busy_until_ns = done
