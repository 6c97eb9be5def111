"""The guest's vCPU: its driver builds requests, adds them to the queue, kicks, and stalls.

One process per vCPU. For each request it waits until the request exists (the workload's
arrival) and the vCPU is free (an interrupt handler may have taken it), pays the driver's
``request_prep_ns`` plus the request's register exits (emulated devices), adds the request
to the queue and, by the batch policy, kicks. A full ring stalls it until the interrupt
handler takes used buffers back.

Batch policies (``virtqueue.batch_policy``):

- ``count``: kick after every ``batch`` added requests (and when no further request could
  ever fill the batch: end of the workload, or a closed loop with nothing left to issue);
- ``drain``: kick when the guest has nothing more pending right now, or after ``batch``;
- ``timer``: kick ``batch_timer_ns`` after the first unkicked add, or after ``batch``.

A full ring always kicks what is unkicked first, as Linux does before it stops the queue.
"""

from __future__ import annotations

import math
from collections.abc import Generator
from typing import TYPE_CHECKING

import simpy

if TYPE_CHECKING:
    from vtrace.sim.engine import Machine


def vcpu(env: simpy.Environment, m: Machine) -> Generator[simpy.Event, None, None]:
    """The guest vCPU issuing ``m.n`` requests."""
    vq = m.vq
    arrivals = m.arrivals
    submit_ns = m.submit_ns
    n = m.n
    prep_ns = m.prep_ns + m.request_exits.time_ns
    exit_ns = m.request_exits.time_ns
    vcpu_ns = m.request_vcpu_ns
    stalls = len(vcpu_ns) > 1
    if stalls:
        prep_ns = max(prep_ns, 1e-9)  # a stall can fall on a request with no other cost
    req_exits, req_user = m.request_exits.exits, m.request_exits.userspace_exits
    exits, user_exits = m.exits, m.userspace_exits
    batch, policy = m.batch, m.batch_policy
    drop_when_full = m.drop_when_full
    whole_batches, poll = m.whole_batches, m.poll
    descs = vq.descs_per_request
    room_first = m.request_exits.exits > 0
    i = 0
    prepared = False
    while i < n:
        now = env.now
        if i >= len(arrivals):  # closed loop: wait for a completion to issue the next
            if m.unkicked:
                m.kick(i - 1)
            if poll:  # a polling driver learns of completions only by looking
                if vq.used:
                    m.take_used()
                    continue
                yield from poll_used_ring(env, m)
                continue
            m.arrival_wait = env.event()
            yield m.arrival_wait
            continue
        wake = arrivals[i]
        if m.vcpu_free_ns > wake:
            wake = m.vcpu_free_ns
        if wake > now:
            yield env.timeout(wake - now)
            continue
        # A virtio driver builds the request, then finds the ring full when it adds; an
        # emulated device's register writes are the submission, so it waits for room first.
        if (room_first or prepared or prep_ns <= 0) and (
            not vq.has_room()
            or (whole_batches and not m.unkicked and vq.num_free < min(batch, n - i) * descs)
        ):
            if poll and vq.used:  # a polling driver takes completions back when it needs room
                m.take_used()
                continue
            if drop_when_full:  # a finite reference queue loses the arrival
                m.dropped[i] = True
                submit_ns[i] = arrivals[i]
                i += 1
                prepared = False
                continue
            if m.unkicked:
                m.kick(i - 1)
            m.ring_full_stalls += 1
            if poll:
                yield from poll_used_ring(env, m)
                continue
            m.space_wait = env.event()
            yield m.space_wait
            continue
        if not prepared and prep_ns > 0:
            # the driver's own work plus, for an emulated device, its register exits (plus,
            # now and then, the host preempting the vCPU thread)
            cost = vcpu_ns[i] if stalls else prep_ns
            m.vcpu_free_ns = now + cost
            m.vcpu_exit_ns += exit_ns
            prepared = True
            yield env.timeout(cost)
            continue
        prepared = False
        submit_ns[i] = arrivals[i]
        if req_exits:
            exits[i] = req_exits
            user_exits[i] = req_user
        vq.add(i)
        i += 1
        m.unkicked += 1
        if m.unkicked >= batch or i == n:
            m.kick(i - 1)
        elif policy == "drain":
            if i >= len(arrivals) or arrivals[i] > now:
                m.kick(i - 1)
        elif policy == "timer" and m.unkicked == 1:
            m.start_batch_timer(i - 1)
    if m.unkicked:
        m.kick(n - 1)
    while poll and vq.in_flight():  # a polling driver waits for its last requests
        if vq.used:
            m.take_used()
            continue
        yield from poll_used_ring(env, m)


def poll_used_ring(env: simpy.Environment, m: Machine) -> Generator[simpy.Event, None, None]:
    """A polling driver with nothing to take back spins on used.idx: one look every
    ``poll_ns`` of guest time, so it sees the back end's publish at the end of the look
    that follows it."""
    began = env.now
    m.space_wait = env.event()
    yield m.space_wait
    poll_ns = m.poll_ns
    if poll_ns > 0:
        waited = env.now - began
        looks = math.floor(waited / poll_ns) + 1
        m.empty_polls += looks - 1
        seen = began + looks * poll_ns
        if seen > m.vcpu_free_ns:
            m.vcpu_free_ns = seen
        if seen > env.now:
            yield env.timeout(seen - env.now)
